"""One evaluation, end to end: generate the missing WAVs, measure FD, FAD, KL and AV-Align, write the results.

Reference set = the shards' ground-truth audio (the `flac` member) of every selected clip, embedded once per
protocol into the HDF5 cache of `eval.cache`. Generated set = the readable WAVs in <output>/wav. FD and FAD
compare the two sets as distributions; KL pairs clips by id; AV-Align measures each generated WAV against the
original video's window [start, start + duration) at the video's native frame rate. Definitions: `eval.metrics`.

Bad input is reported, never papered over: a WAV that cannot be read is a failure (listed in results.json),
not silence; when fewer than `min_paired` of the clips have a readable WAV, FD/FAD/KL are null with the reason;
a metric whose computation fails is null with the error; a clip whose AV-Align fails (a video OpenCV cannot
follow, a dead worker) is a failure with its reason; a clip whose source video is missing is left out of
AV-Align (counted), and with no video at all AV-Align is null with the reason.

What results.json states about generation comes from <output>/wav/manifest.json (written by `eval.generate`
when it starts filling the folder), not from the current flags: with --no-generate the WAVs may have been made
with other settings than the command line says.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from tqdm import tqdm

import shards
from common.devices import resolve_device
from common.versions import software_versions
from eval import cache
from eval.config import EvalConfig
from eval.embed import RESAMPLER, AudioEmbedding, audio_metrics, embed_clips
from eval.generate import (
    GENERATION_FAILURES,
    MANIFEST_FILE,
    WAV_DIR,
    EvalError,
    TestClip,
    generate,
    iterate_reference_audio,
    read_manifest,
    read_split,
    run_info,
    select_clips,
    shards_config_sha256,
    wav_path,
)
from eval.metrics import (
    FARNEBACK_PARAMS,
    FD_EPS,
    FLOW_MIN_MAGNITUDE,
    KL_EPS,
    ONSET_SAMPLE_RATE,
    audio_peaks,
    av_align_score,
    optical_flow_magnitudes,
    read_gray_frames,
    summarize,
    video_peaks,
)
from eval.panns import CHECKPOINT_NAME as CNN14_FILE
from eval.panns import CNN14_CONFIGS, Cnn14, load_cnn14
from eval.vggish import CHECKPOINT_NAME as VGGISH_FILE
from eval.vggish import VGGISH_CONFIGS, VGGish, load_vggish

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
FIGURE_FILE = "figure.png"
CONFIG_FILE = "config.json"
NOT_COMPARABLE = ("The embedders have random weights: these numbers are NOT comparable to published ones "
                  "(only to other runs measured with the same random embedders).")
# generation settings copied from the WAVs' manifest to the top of results.json's protocol (table and report)
GENERATION_KNOBS = ("sampler", "steps", "guidance", "seed", "samples_per_clip", "peak", "checkpoint_sha256", "vae",
                    "vae_scaling_factor", "inputs", "scheme", "train_preset")
AV_ALIGN_PROTOCOL = {
    "method": "Yariv et al. 2024 (2025 version): Farneback flow at the native fps, librosa onsets, one-to-one "
              "matching; clips with no peak on either side excluded",
    "flow_min_magnitude": FLOW_MIN_MAGNITUDE,  # a video peak needs a mean flow magnitude >= this (pixels)
    "match_window_frames": 1,  # an audio peak matches a video peak within 1/fps seconds
    "onset_sample_rate": ONSET_SAMPLE_RATE,
    "farneback": list(FARNEBACK_PARAMS),
}


# ----------------------------------------------------------------------------------------------------------------
# Embedders and audio
# ----------------------------------------------------------------------------------------------------------------
def load_embedders(config: EvalConfig) -> tuple[Cnn14, VGGish, bool]:
    """Cnn14 and VGGish from `embedder_weights` when the official files are there; seeded random weights when
    they are absent and `random_embedders` is on. Returns (cnn14, vggish, random weights?)."""
    folder = Path(config.embedder_weights)
    device = resolve_device(config.device)
    if (folder / CNN14_FILE).is_file() and (folder / VGGISH_FILE).is_file():
        try:
            return load_cnn14(folder, device), load_vggish(folder, device), False
        except ValueError as error:
            raise EvalError(str(error)) from None
    if not config.random_embedders:
        missing = [name for name in (CNN14_FILE, VGGISH_FILE) if not (folder / name).is_file()]
        raise EvalError(f"{folder}: {' and '.join(missing)} missing; put the official checkpoints there or pass "
                        "--random-embedders (numbers then not comparable to published ones)")
    size = config.random_embedder_size
    return (load_cnn14(None, device, CNN14_CONFIGS[size], seed=config.embedder_seed),
            load_vggish(None, device, VGGISH_CONFIGS[size], seed=config.embedder_seed), True)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(samples,) float32 mono and its rate; ValueError naming the file when it cannot be used."""
    try:
        waveform, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise ValueError(f"{path}: unreadable WAV ({error})") from None
    if waveform.shape[0] == 0:
        raise ValueError(f"{path}: empty WAV")
    return waveform.mean(axis=1), rate


class ShardAudio:
    """Ground-truth waveform by clip id, decoded from the shards' `flac` members as one stream.

    Memory stays at one clip: `ids` is the order the clips will be asked for (shard order), so the stream never
    reads past a clip that is still wanted; members skipped on the way (clips already cached) are dropped
    undecoded. A clip asked for out of order restarts the stream (time, not memory).
    """

    def __init__(self, folder: str | Path, split: str, ids: list[str]):
        self.folder, self.split, self.ids = folder, split, list(ids)
        self.stream = iterate_reference_audio(folder, split, self.ids)
        self.where = f"{folder} (split {split})"

    def __call__(self, clip_id: str) -> np.ndarray:
        for restart in (False, True):
            if restart:
                self.stream = iterate_reference_audio(self.folder, self.split, self.ids)
            for found, data in self.stream:
                if found == clip_id:
                    try:
                        return soundfile.read(io.BytesIO(data), dtype="float32", always_2d=False)[0]
                    except (soundfile.LibsndfileError, RuntimeError) as error:
                        raise EvalError(f"{self.where}: clip {clip_id!r} has an unreadable flac member ({error})") from None
        raise EvalError(f"{self.where}: clip {clip_id!r} not found")


def reference_audio_hashes(folder: str | Path, split: str, ids: list[str]) -> dict[str, str]:
    """sha256 of each clip's `flac` member bytes (one pass over the shards, reading only json and flac members);
    EvalError when a clip has no audio."""
    hashes = {clip_id: hashlib.sha256(data).hexdigest() for clip_id, data in iterate_reference_audio(folder, split, ids)}
    missing = [clip_id for clip_id in ids if clip_id not in hashes]
    if missing:
        raise EvalError(f"{folder} (split {split}): no flac member for {len(missing)} clips (e.g. {missing[0]!r})")
    return hashes


def reference_fingerprint(hashes: dict[str, str]) -> str:
    """sha256 over the sorted 'id:sha256(flac)' lines: one value naming the reference set."""
    return hashlib.sha256("".join(f"{k}:{hashes[k]}\n" for k in sorted(hashes)).encode()).hexdigest()


def reference_embeddings(config: EvalConfig, ids: list[str], cnn14: Cnn14, vggish: VGGish, sample_rate: int,
                         hashes: dict[str, str], progress: bool) -> dict[str, AudioEmbedding]:
    """Ground-truth embeddings through the HDF5 cache; one file per (split, protocol) so that switching
    embedders does not rebuild another protocol's cache. `ids` in shard order (the audio streams in it);
    the result keeps that order. The protocol names the shards' config and rate; `hashes` check each clip."""
    source = {"shards_config_sha256": shards_config_sha256(config.shards), "sample_rate": sample_rate}
    protocol = cache.cache_protocol(cnn14, vggish, config.metric_duration, source)
    digest = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
    path = config.cache_folder / f"{config.split}-{digest}.h5"
    return cache.ground_truth_embeddings(path, ids, ShardAudio(config.shards, config.split, ids), cnn14, vggish,
                                         sample_rate, config.metric_duration, progress=progress, source=source,
                                         audio_hashes=hashes)


def generated_embeddings(out_dir: Path, clips: list[TestClip], cnn14: Cnn14, vggish: VGGish, duration: float | None,
                         failures: list[dict[str, str]], progress: bool) -> dict[str, AudioEmbedding]:
    """Embeddings of the generated WAVs that exist and can be read; unreadable ones are appended to `failures`."""
    rate = cnn14.config.sample_rate

    def waves() -> Iterator[tuple[str, np.ndarray]]:
        for clip in clips:
            path = wav_path(out_dir, clip.id)
            if not path.exists():
                continue
            try:
                waveform, found = read_wav(path)
            except ValueError as error:
                failures.append({"id": clip.id, "stage": "read_wav", "reason": str(error)})
                continue
            if found != rate:  # resampled by prepare_waveform only for one shared rate: do it here per file
                import librosa

                waveform = librosa.resample(waveform, orig_sr=found, target_sr=rate, res_type=RESAMPLER)
            yield clip.id, waveform

    return dict(embed_clips(waves(), cnn14, vggish, rate, duration, progress=progress))


def audio_scores(reference: dict[str, AudioEmbedding], generated: dict[str, AudioEmbedding], expected: int,
                 min_paired: float) -> tuple[dict[str, Any], dict[str, str]]:
    """FD, FAD, KL and their counts; a metric that cannot be trusted or fails to compute is None with its reason."""
    fraction = len(generated) / expected if expected else 0.0
    reason = None
    if fraction < min_paired:
        reason = (f"only {len(generated)} of {expected} clips ({fraction:.0%}) have a readable generated WAV, "
                  f"below min_paired {min_paired:.0%}")
    elif len(generated) < 2 or len(reference) < 2:
        reason = f"a Frechet distance needs at least 2 clips per set ({len(reference)} reference, {len(generated)} generated)"
    if reason is not None:
        return {"fd": None, "fad": None, "kl": None}, {"fd": reason, "fad": reason, "kl": reason}
    errors: dict[str, str] = {}
    metrics = audio_metrics(reference, generated, errors)
    return metrics, {k: f"computation failed ({v})" for k, v in errors.items()}


def error_line(error: BaseException) -> str:
    """'<type>: <first line of the message>' (BrokenProcessPool and cv2.error say little without their type)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def unique_failures(failures: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (clip id, stage), the last one kept (generation_failures.jsonl grows over resumed runs),
    in the order of first appearance."""
    by_key: dict[tuple[Any, Any], dict[str, Any]] = {}
    for record in failures:
        key = (record.get("id"), record.get("stage"))
        by_key[key] = record
    return list(by_key.values())


# ----------------------------------------------------------------------------------------------------------------
# AV-Align on the original video's window
# ----------------------------------------------------------------------------------------------------------------
def av_align_window(video: str, start: float, duration: float, wav: str) -> float:
    """AV-Align of a generated WAV against frames [start, start + duration) of `video` at its native rate.

    Frame i of the file is at i / fps; the window keeps frames with start <= i / fps < start + duration and
    video peak times are shifted to the window's clock (the audio starts at `start`).
    """
    waveform, rate = read_wav(Path(wav))
    frames, fps = read_gray_frames(video)
    first, stop = math.ceil(start * fps - 1e-6), math.ceil((start + duration) * fps - 1e-6)
    try:
        magnitudes = optical_flow_magnitudes(islice(frames, first, stop))
    finally:
        frames.close()  # releases the capture when the window ends before the file does
    peaks = video_peaks(magnitudes, fps) + (first / fps - start)
    return av_align_score(audio_peaks(waveform, rate), peaks, fps)


def av_align_scores(out_dir: Path, clips: list[TestClip], workers: int, failures: list[dict[str, str]],
                    progress: bool, measure: Callable[[str, float, float, str], float] = av_align_window) -> dict[str, Any]:
    """Per-clip AV-Align of every clip with a readable generated WAV and a source video, and its summary.

    A clip whose measurement raises (OpenCV on a stream that changes resolution, librosa, a worker process that
    died) is appended to `failures` with the reason; the other clips are still measured. WAVs already listed
    as unreadable (stage read_wav) are not tried again. `measure` is `av_align_window` (or, in tests, a
    picklable function with its signature).
    """
    unreadable = {f["id"] for f in failures if f.get("stage") == "read_wav"}
    with_wav = [c for c in clips if wav_path(out_dir, c.id).exists() and c.id not in unreadable]
    with_video = [c for c in with_wav if c.source and Path(c.source).is_file()]
    missing = len(with_wav) - len(with_video)
    if not with_video:
        example = f" (e.g. {with_wav[0].source!r})" if with_wav else ""
        reason = (f"no source video found for any of the {len(with_wav)} clips with a generated WAV{example}"
                  if with_wav else "no generated WAV to measure")
        return {"skipped": reason, "videos_missing": missing}
    jobs = [(c.source, c.start, c.duration, str(wav_path(out_dir, c.id))) for c in with_video]
    scores: dict[str, float] = {}
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        futures = [pool.submit(measure, *job) if pool else job for job in jobs]
        for clip, future in tqdm(zip(with_video, futures), total=len(jobs), unit="clip", desc="AV-Align",
                                 disable=not progress):
            try:
                scores[clip.id] = future.result() if pool else measure(*future)  # type: ignore[union-attr,misc]
            except Exception as error:  # one bad clip (cv2.error, BrokenProcessPool, ...) must not end the run
                failures.append({"id": clip.id, "stage": "av_align", "reason": error_line(error)})
    finally:
        if pool is not None:
            pool.shutdown()
    return {**summarize(scores.values()), "videos_missing": missing,
            "per_clip": {k: (None if math.isnan(v) else v) for k, v in scores.items()}}


# ----------------------------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------------------------
def generated_rate(out_dir: Path, clips: list[TestClip], manifest: dict[str, Any] | None) -> int | None:
    """The rate of the generated WAVs: the manifest's, else the first readable WAV's header (None: no WAV)."""
    if manifest is not None and "sample_rate" in manifest:
        return int(manifest["sample_rate"])
    for clip in clips:
        try:
            return int(soundfile.info(wav_path(out_dir, clip.id)).samplerate)
        except (soundfile.LibsndfileError, RuntimeError, OSError):
            continue
    return None


def evaluate(config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Generate (unless config.generate is off), measure, and write config.json, results.json, report.md and
    figure.png into config.output_dir. Returns the results."""
    from eval.report import write_outputs

    out_dir = config.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
    try:
        spec = shards.read_spec(config.shards)
    except shards.ShardFormatError as error:
        raise EvalError(str(error)) from None
    in_shard_order = read_split(config.shards, config.split)
    clips = select_clips(in_shard_order, config.max_clips)
    if not clips:
        raise EvalError(f"{config.shards}: no clip of split {config.split!r}")
    cnn14, vggish, random_weights = load_embedders(config)  # before generating: a missing checkpoint fails fast
    generation = generate(config, clips, progress) if config.generate else {}
    manifest = generation["manifest"] if config.generate else read_manifest(out_dir)
    notes = []
    if manifest is None:
        notes.append(f"{WAV_DIR}/{MANIFEST_FILE} is missing: the settings that generated these WAVs are unknown")
    else:
        now = run_info(config.run).get("checkpoint_sha256")
        if now is not None and manifest.get("checkpoint_sha256") not in (None, now):
            notes.append(f"the WAVs were generated by checkpoint {manifest.get('checkpoint_sha256')}, "
                         f"{config.run} now holds {now}")

    wanted = {c.id for c in clips}
    failures = [f for f in unique_failures(shards.read_jsonl(out_dir / GENERATION_FAILURES))
                if f.get("id") in wanted and not wav_path(out_dir, f["id"]).exists()]
    duration = config.metric_duration
    shard_ids = [c.id for c in in_shard_order if c.id in wanted]  # reference audio streams in shard order
    hashes = reference_audio_hashes(config.shards, config.split, shard_ids)
    reference = reference_embeddings(config, shard_ids, cnn14, vggish, spec.sample_rate, hashes, progress)
    reference = {c.id: reference[c.id] for c in clips}  # back to id order
    generated = generated_embeddings(out_dir, clips, cnn14, vggish, duration, failures, progress)
    metrics, reasons = audio_scores(reference, generated, len(clips), config.min_paired)

    if config.av_align:
        av = av_align_scores(out_dir, clips, config.workers, failures, progress)
    else:
        av = {"skipped": "turned off (--no-av-align)"}
    if "skipped" in av:
        reasons["av_align"] = av["skipped"]
    failures = unique_failures(failures)

    results: dict[str, Any] = {
        "comparable": not random_weights,
        "warning": NOT_COMPARABLE if random_weights else None,
        "fd": metrics["fd"], "fad": metrics["fad"], "kl": metrics["kl"],
        "av_align": None if "skipped" in av else {k: v for k, v in av.items() if k != "per_clip"},
        "null_reasons": reasons,
        "counts": {"clips": len(clips), "paired": len(generated), "paired_fraction": len(generated) / len(clips),
                   "min_paired": config.min_paired, "reference": len(reference),
                   **{k: metrics[k] for k in ("kl_pairs", "n_reference_patches", "n_generated_patches") if k in metrics},
                   "failures": len(failures), "failed_clips": len({f["id"] for f in failures}),
                   "videos_missing": av.get("videos_missing", 0)},
        "failures": failures,
        "generation": {"generated_in_this_run": config.generate, "wavs_written": generation.get("written", 0),
                       "manifest_found": manifest is not None, "notes": notes},
        "run": str(config.run),
        "run_name": config.run_name,
        "shards": str(config.shards),
        "split": config.split,
        "wav_dir": WAV_DIR,
        "clips": [c.id for c in clips],
        "protocol": {
            "duration": duration, "sample_rate": cnn14.config.sample_rate,
            "generated_sample_rate": generated_rate(out_dir, clips, manifest),
            "window_seconds": spec.window_seconds,
            **{k: (manifest or {}).get(k) for k in GENERATION_KNOBS},
            "generation_manifest": manifest,
            "clip_count": len(clips), "max_clips": config.max_clips,
            "reference": {"shards_config_sha256": shards_config_sha256(config.shards), "sample_rate": spec.sample_rate,
                          "fingerprint": reference_fingerprint(hashes)},
            "embedders": {"cnn14": cnn14.protocol(), "vggish": vggish.protocol()},
            "embedder_checkpoints": {"cnn14": cnn14.checkpoint_id, "vggish": vggish.checkpoint_id},
            "random_embedders": random_weights,
            "random_embedder_size": config.random_embedder_size if random_weights else None,
            "embedder_seed": config.embedder_seed if random_weights else None,
            "resampler": f"librosa.resample(res_type={RESAMPLER!r})",
            "fd_eps": FD_EPS, "kl_eps": KL_EPS,
            "av_align": AV_ALIGN_PROTOCOL,
        },
        "software": software_versions(),
        "config": config.to_dict(),
        "av_align_per_clip": av.get("per_clip", {}),
    }
    write_outputs(out_dir, results, config, clips, progress)
    return results
