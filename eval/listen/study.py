"""What a listening test plays: the systems (evaluation runs plus the ground truth), the clips and the muxed videos.

An evaluation run is a folder written by `make eval`: `results.json` ({"run_name", "shards", "split", "clips",
"wav_dir", ...}) and `<wav_dir>/<clip_id>.wav` (16 kHz mono). The ground truth of a clip is the 16 kHz waveform
stored in the stage-one shards, and its picture is the window [start, start + duration] of the source video.

Every stimulus (clip, system) becomes one H.264 + AAC mp4 made once, ahead of the test, so the page only plays
files. All tracks get the same treatment (same window, same loudness, same codec, rate and channel count), so
nothing in a file tells a listener which system made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

import shards
from common.ffmpeg import error_reason, file_url

GROUND_TRUTH = "Ground-Truth"  # the system name of the reference, as in the paper's Table II
ASPECTS = ("audio_quality", "semantic_alignment", "temporal_alignment", "overall_quality")
ASPECT_TITLES = {
    "audio_quality": "Audio quality",
    "semantic_alignment": "Semantic alignment",
    "temporal_alignment": "Temporal alignment",
    "overall_quality": "Overall quality",
}
FFMPEG = "/usr/bin/ffmpeg" if Path("/usr/bin/ffmpeg").exists() else "ffmpeg"
# Loudness: every track is scaled to this RMS level (dBFS), then lowered if its peak would pass PEAK_DBFS, so that
# listeners do not prefer the louder system. Plain RMS stands in for BS.1770 loudness (no K-weighting); on
# 10 s clips of one scene the two rank tracks alike.
TARGET_RMS_DBFS = -23.0
PEAK_DBFS = -1.0
SILENCE_RMS = 1e-5  # below this a track is left as it is (nothing to normalise)
MEDIA_VERSION = 1  # part of every media file's hash: bump when the muxing recipe changes


@dataclass(frozen=True)
class Run:
    """One evaluation run: a system whose generated audio is rated."""

    name: str
    directory: Path
    shards: Path
    split: str
    clips: tuple[str, ...]
    wav_dir: Path

    def wav(self, clip_id: str) -> Path:
        return self.wav_dir / f"{clip_id}.wav"


@dataclass
class Study:
    """Clips (in selection order), systems (ground truth first) and the mp4 of every (clip, system)."""

    clips: list[str]
    systems: list[str]
    media: dict[tuple[str, str], Path] = field(default_factory=dict)


def _resolve(path: str, base: Path) -> Path:
    """A path from results.json: absolute, or relative to the run folder, else to the working directory."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    return base / candidate if (base / candidate).exists() else candidate.resolve()


def load_run(directory: str | os.PathLike[str]) -> Run:
    """Read `<directory>/results.json` (see the module docstring) into a Run."""
    directory = Path(directory)
    results_path = directory / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path}: missing (not an evaluation run folder written by `make eval`?)")
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{results_path}: not valid JSON ({error})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{results_path}: not a JSON object")
    missing = [k for k in ("shards", "split", "clips") if k not in results]
    if missing:
        raise ValueError(f"{results_path}: lacks {', '.join(missing)}")
    if not isinstance(results["clips"], list) or not all(isinstance(c, str) for c in results["clips"]):
        raise ValueError(f"{results_path}: clips is not a list of clip ids")
    name = str(results.get("run_name") or directory.resolve().name)
    if name == GROUND_TRUTH:
        raise ValueError(f"{results_path}: run_name {name!r} is reserved for the ground truth")
    return Run(
        name=name,
        directory=directory,
        shards=_resolve(str(results["shards"]), directory),
        split=str(results["split"]),
        clips=tuple(str(c) for c in results["clips"]),
        wav_dir=directory / str(results.get("wav_dir", "wav")),
    )


def load_runs(directories: list[str] | list[Path]) -> list[Run]:
    """Load runs that rate the same test set: distinct names, one shards folder and split."""
    runs = [load_run(d) for d in directories]
    if not runs:
        raise ValueError("no evaluation run given")
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"runs share the name(s) {', '.join(duplicates)}: set distinct run_name in results.json")
    first = runs[0]
    for run in runs[1:]:
        if run.shards.resolve() != first.shards.resolve() or run.split != first.split:
            raise ValueError(
                f"{run.directory}: evaluates {run.shards} ({run.split}) but {first.directory} evaluates "
                f"{first.shards} ({first.split}); a listening test compares runs on the same clips"
            )
    return runs


def common_clips(runs: list[Run]) -> list[str]:
    """Clip ids that every run lists and has a WAV for, sorted."""
    common = set(runs[0].clips)
    for run in runs[1:]:
        common &= set(run.clips)
    return sorted(c for c in common if all(run.wav(c).is_file() for run in runs))


def pick_clips(runs: list[Run], count: int, seed: int) -> list[str]:
    """`count` clips drawn without replacement (random.Random(seed)) from the clips common to every run."""
    available = common_clips(runs)
    if count < 1:
        raise ValueError(f"--clips must be at least 1, got {count}")
    if count > len(available):
        raise ValueError(
            f"only {len(available)} clips have a WAV in every run; ask for --clips {len(available)} or fewer"
        )
    return random.Random(seed).sample(available, count)


# --------------------------------------------------------------------------------------------------------------
# Ground truth and muxing
# --------------------------------------------------------------------------------------------------------------
def ground_truth(shards_dir: Path, split: str, clip_ids: list[str]) -> dict[str, dict[str, Any]]:
    """{clip id: {"source", "start", "duration", "waveform", "sample_rate"}} read from the shards of `split`."""
    paths = shards.list_shards(shards_dir, split)
    if not paths:
        raise FileNotFoundError(f"{shards_dir}: no complete {split!r} shards")
    sample_rate = shards.read_spec(shards_dir).sample_rate if (shards_dir / shards.META_FILE).exists() else 16000
    wanted, found = set(clip_ids), {}
    for sample in shards.iterate_samples(paths):
        meta = sample[shards.META_KEY]
        if meta["id"] not in wanted:
            continue
        if "start" not in meta:
            raise ValueError(
                f"{shards_dir}: sample {meta['id']!r} has no 'start' (shards older than stage one's contract?)"
            )
        found[meta["id"]] = {
            "source": meta["source"],
            "start": float(meta["start"] or 0.0),
            "duration": float(meta["duration"]),
            "waveform": np.asarray(sample[shards.AUDIO_KEY], dtype=np.float32),
            "sample_rate": sample_rate,
        }
        if len(found) == len(wanted):
            break  # the shards can be large: stop once every chosen clip is in hand
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"{shards_dir}: no {split!r} sample for clip(s) {', '.join(missing[:5])}")
    return found


def normalise_loudness(waveform: np.ndarray) -> np.ndarray:
    """Scale to TARGET_RMS_DBFS RMS, lowered so the peak stays at or below PEAK_DBFS; near-silence is kept."""
    waveform = np.asarray(waveform, dtype=np.float64)
    rms = float(np.sqrt(np.mean(waveform**2))) if waveform.size else 0.0
    if rms < SILENCE_RMS:
        return waveform.astype(np.float32)
    gain = 10 ** (TARGET_RMS_DBFS / 20) / rms
    peak = float(np.abs(waveform).max())
    gain = min(gain, 10 ** (PEAK_DBFS / 20) / peak)
    return (waveform * gain).astype(np.float32)


def _ffmpeg(arguments: list[str], out: Path, what: str) -> Path:
    """Run ffmpeg writing `out` under a temporary name, renamed when complete (a killed run leaves no half file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    command = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *arguments, "-f", "mp4", file_url(tmp)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{what}: ffmpeg failed: {error_reason(result.stderr)}")
    os.replace(tmp, out)
    return out


def cut_video(video: Path, start: float, duration: float, out: Path) -> Path:
    """Write `out`: the window [start, start + duration] of `video`'s picture (no sound), re-encoded to H.264
    (yuv420p, even size, display rotation applied), +faststart.

    The picture is re-encoded rather than stream-copied: a copy can only start at a keyframe, which would shift it
    against the audio by up to a GOP, and temporal alignment is one of the rated aspects. `-ss` before `-i` with
    re-encoding is frame-accurate (ffmpeg >= 2.1). Done once per clip; every version then copies this stream, so
    all versions of a clip have the same picture, bit for bit.
    """
    arguments = [
        "-ss", f"{start:.6f}", "-i", file_url(video), "-t", f"{duration:.6f}", "-map", "0:v:0", "-an",
        "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2,format=yuv420p",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-movflags", "+faststart",
    ]  # fmt: skip
    return _ffmpeg(arguments, out, f"{video} [{start:g} s, +{duration:g} s]")


def mux(picture: Path, audio: Path, duration: float, out: Path) -> Path:
    """Write `out`: the H.264 stream of `picture` (copied) with `audio` as AAC 128 kb/s, 48 kHz mono, padded with
    silence or cut to `duration` seconds, +faststart (the index first, so a browser starts playing at once)."""
    arguments = [
        "-i", file_url(picture), "-i", file_url(audio), "-map", "0:v:0", "-map", "1:a:0", "-t", f"{duration:.6f}",
        "-c:v", "copy", "-af", "apad", "-c:a", "aac", "-b:a", "128k", "-ar", "48000", "-ac", "1",
        "-movflags", "+faststart",
    ]  # fmt: skip
    return _ffmpeg(arguments, out, f"{picture} with {audio.name}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:80]


def _write_wav(path: Path, waveform: np.ndarray, sample_rate: int) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".wav", delete=False) as handle:
        tmp = Path(handle.name)
    soundfile.write(tmp, waveform, sample_rate, subtype="FLOAT")
    os.replace(tmp, path)


def prepare_study(
    runs: list[Run],
    clip_ids: list[str],
    work: str | os.PathLike[str],
    normalise: bool = True,
    jobs: int | None = None,
    log: Callable[[str], None] = print,
) -> Study:
    """Cut each clip's picture once (`<work>/video/`), then mux it with every system's audio (`<work>/media/`),
    skipping files already made from the same inputs.

    A file's name ends with a hash of what goes into it (video path and size, window, MEDIA_VERSION; for a media
    file also the audio samples after loudness levelling), so a changed input makes a new file and a re-run
    reuses the old ones.
    """
    if shutil.which(FFMPEG) is None:
        raise FileNotFoundError(f"{FFMPEG}: not found (apt-get install -y ffmpeg)")
    work = Path(work)
    audio_dir, video_dir, media_dir = work / "audio", work / "video", work / "media"
    for folder in (audio_dir, video_dir, media_dir):
        folder.mkdir(parents=True, exist_ok=True)
    truth = ground_truth(runs[0].shards, runs[0].split, clip_ids)
    study = Study(clips=list(clip_ids), systems=[GROUND_TRUTH, *(r.name for r in runs)])
    cuts: list[tuple[Path, float, float, Path]] = []  # (source, start, duration, picture): one per clip
    muxes: list[tuple[Path, Path, float, Path]] = []  # (picture, audio, duration, media): one per (clip, system)
    for clip_id in clip_ids:
        info = truth[clip_id]
        video = Path(info["source"])
        if not video.is_file():
            raise FileNotFoundError(f"{video}: source video of clip {clip_id!r} not found")
        window = json.dumps(
            [MEDIA_VERSION, str(video.resolve()), video.stat().st_size, info["start"], info["duration"]]
        )
        window_hash = hashlib.sha256(window.encode()).hexdigest()[:12]
        picture = video_dir / f"{_safe(clip_id)}__{window_hash}.mp4"
        tracks = {GROUND_TRUTH: (info["waveform"], info["sample_rate"])}
        for run in runs:
            waveform, rate = soundfile.read(run.wav(clip_id), dtype="float32", always_2d=True)
            tracks[run.name] = (waveform.mean(axis=1), rate)  # a stereo file is downmixed like the mono ones
        pending = []
        for system, (waveform, rate) in tracks.items():
            if normalise:
                waveform = normalise_loudness(waveform)
            digest = hashlib.sha256(f"{window_hash}:{rate}".encode())
            digest.update(np.ascontiguousarray(waveform, dtype=np.float32).tobytes())
            stem = f"{_safe(clip_id)}__{_safe(system)}__{digest.hexdigest()[:12]}"
            out = media_dir / f"{stem}.mp4"
            study.media[(clip_id, system)] = out
            if not out.exists():
                wav = audio_dir / f"{stem}.wav"
                _write_wav(wav, waveform, rate)
                pending.append((picture, wav, info["duration"], out))
        if pending and not picture.exists():
            cuts.append((video, info["start"], info["duration"], picture))
        muxes.extend(pending)
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        if cuts:
            log(f"cutting {len(cuts)} video window(s) into {video_dir} ...")
            list(pool.map(lambda task: cut_video(*task), cuts))  # list() re-raises the first failure
        if muxes:
            log(f"muxing {len(muxes)} version(s) into {media_dir} ...")
            list(pool.map(lambda task: mux(*task), muxes))
    for _picture, wav, _duration, _out in muxes:
        wav.unlink(missing_ok=True)
    return study
