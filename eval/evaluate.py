"""One evaluation, end to end: generate the missing WAVs, measure FD, FAD, KL and AV-Align, write the results.

Reference set = the shards' ground-truth audio (the `flac` member) of every selected clip, embedded once per
protocol into the HDF5 cache of `eval.cache`. Generated set = the readable WAVs in <output>/wav. FD and FAD
compare the two sets as distributions; KL pairs clips by id; AV-Align measures each generated WAV against the
original video's window [start, start + duration) at the video's native frame rate. Definitions: `eval.metrics`.

Bad input is reported, never papered over: a WAV that cannot be read is a failure (listed in results.json),
not silence; when fewer than `min_paired` of the clips have a readable WAV, FD/FAD/KL are null with the reason;
a clip whose source video is missing is left out of AV-Align (counted), and with no video at all AV-Align is
null with the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from tqdm import tqdm

import shards
from eval import cache
from eval.config import EvalConfig
from eval.embed import ClipEmbedding, audio_metrics, embed_clips
from eval.generate import (
    GENERATION_FAILURES,
    WAV_DIR,
    EvalError,
    TestClip,
    generate,
    iterate_split_samples,
    read_split,
    resolve_device,
    run_info,
    select_clips,
    wav_path,
)
from eval.metrics import (
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
SOFTWARE = ("torch", "diffusers", "transformers", "numpy", "scipy", "librosa", "opencv-python-headless",
            "soundfile", "h5py")
NOT_COMPARABLE = ("The embedders have random weights: these numbers are NOT comparable to published ones "
                  "(only to other runs measured with the same random embedders).")


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


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
    return (load_cnn14(None, device, CNN14_CONFIGS[size], seed=config.seed),
            load_vggish(None, device, VGGISH_CONFIGS[size], seed=config.seed), True)


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
    """Ground-truth waveform by clip id, read from the shards as a stream (the clips are asked for in shard
    order, so the few samples read past are kept until asked for)."""

    def __init__(self, folder: str | Path, split: str, ids: list[str]):
        self.samples = iterate_split_samples(folder, split, ids)
        self.pending: dict[str, np.ndarray] = {}
        self.where = f"{folder} (split {split})"

    def __call__(self, clip_id: str) -> np.ndarray:
        while clip_id not in self.pending:
            sample = next(self.samples, None)
            if sample is None:
                raise EvalError(f"{self.where}: clip {clip_id!r} not found")
            self.pending[sample[shards.META_KEY]["id"]] = np.asarray(sample[shards.AUDIO_KEY], dtype=np.float32)
        return self.pending.pop(clip_id)


def reference_embeddings(config: EvalConfig, ids: list[str], cnn14: Cnn14, vggish: VGGish, sample_rate: int,
                         progress: bool) -> dict[str, ClipEmbedding]:
    """Ground-truth embeddings through the HDF5 cache; one file per (split, protocol) so that switching
    embedders does not rebuild another protocol's cache."""
    protocol = cache.cache_protocol(cnn14, vggish, config.metric_duration)
    digest = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
    path = config.cache_folder / f"{config.split}-{digest}.h5"
    return cache.ground_truth_embeddings(path, ids, ShardAudio(config.shards, config.split, ids), cnn14, vggish,
                                         sample_rate, config.metric_duration, progress=progress)


def generated_embeddings(out_dir: Path, clips: list[TestClip], cnn14: Cnn14, vggish: VGGish, duration: float | None,
                         failures: list[dict[str, str]], progress: bool) -> dict[str, ClipEmbedding]:
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

                waveform = librosa.resample(waveform, orig_sr=found, target_sr=rate)
            yield clip.id, waveform

    return dict(embed_clips(waves(), cnn14, vggish, rate, duration, progress=progress))


def audio_scores(reference: dict[str, ClipEmbedding], generated: dict[str, ClipEmbedding], expected: int,
                 min_paired: float) -> tuple[dict[str, Any], dict[str, str]]:
    """FD, FAD, KL and their counts; a metric that cannot be trusted is None with its reason."""
    fraction = len(generated) / expected if expected else 0.0
    reason = None
    if fraction < min_paired:
        reason = (f"only {len(generated)} of {expected} clips ({fraction:.0%}) have a readable generated WAV, "
                  f"below min_paired {min_paired:.0%}")
    elif len(generated) < 2 or len(reference) < 2:
        reason = f"a Frechet distance needs at least 2 clips per set ({len(reference)} reference, {len(generated)} generated)"
    if reason is not None:
        return {"fd": None, "fad": None, "kl": None}, {"fd": reason, "fad": reason, "kl": reason}
    return audio_metrics(reference, generated), {}


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
                    progress: bool) -> dict[str, Any]:
    """Per-clip AV-Align of every clip with a generated WAV and a source video, and its summary."""
    with_wav = [c for c in clips if wav_path(out_dir, c.id).exists()]
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
        futures = [pool.submit(av_align_window, *job) if pool else job for job in jobs]
        for clip, future in tqdm(zip(with_video, futures), total=len(jobs), unit="clip", desc="AV-Align",
                                 disable=not progress):
            try:
                scores[clip.id] = future.result() if pool else av_align_window(*future)  # type: ignore[union-attr,misc]
            except (ValueError, OSError) as error:
                failures.append({"id": clip.id, "stage": "av_align", "reason": str(error).splitlines()[0]})
    finally:
        if pool is not None:
            pool.shutdown()
    return {**summarize(scores.values()), "videos_missing": missing,
            "per_clip": {k: (None if math.isnan(v) else v) for k, v in scores.items()}}


# ----------------------------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------------------------
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
    clips = select_clips(read_split(config.shards, config.split), config.max_clips)
    if not clips:
        raise EvalError(f"{config.shards}: no clip of split {config.split!r}")
    generation = generate(config, clips, progress) if config.generate else {}
    generation.update(run_info(config.run))

    failures = shards.read_jsonl(out_dir / GENERATION_FAILURES)
    wanted = {c.id for c in clips}
    failures = [f for f in failures if f.get("id") in wanted and not wav_path(out_dir, f["id"]).exists()]
    cnn14, vggish, random_weights = load_embedders(config)
    duration = config.metric_duration
    reference = reference_embeddings(config, [c.id for c in clips], cnn14, vggish, spec.sample_rate, progress)
    generated = generated_embeddings(out_dir, clips, cnn14, vggish, duration, failures, progress)
    metrics, reasons = audio_scores(reference, generated, len(clips), config.min_paired)

    if config.av_align:
        av = av_align_scores(out_dir, clips, config.workers, failures, progress)
    else:
        av = {"skipped": "turned off (--no-av-align)"}
    if "skipped" in av:
        reasons["av_align"] = av["skipped"]

    results: dict[str, Any] = {
        "comparable": not random_weights,
        "warning": NOT_COMPARABLE if random_weights else None,
        "fd": metrics["fd"], "fad": metrics["fad"], "kl": metrics["kl"],
        "av_align": None if "skipped" in av else {k: v for k, v in av.items() if k != "per_clip"},
        "null_reasons": reasons,
        "counts": {"clips": len(clips), "paired": len(generated), "paired_fraction": len(generated) / len(clips),
                   "min_paired": config.min_paired, "reference": len(reference),
                   **{k: metrics[k] for k in ("kl_pairs", "n_reference_patches", "n_generated_patches") if k in metrics},
                   "failures": len(failures), "videos_missing": av.get("videos_missing", 0)},
        "failures": failures,
        "run": str(config.run),
        "run_name": config.run_name,
        "shards": str(config.shards),
        "split": config.split,
        "wav_dir": WAV_DIR,
        "clips": [c.id for c in clips],
        "protocol": {
            "duration": duration, "sample_rate": cnn14.config.sample_rate, "generated_sample_rate": spec.sample_rate,
            "window_seconds": spec.window_seconds, "sampler": config.sampler, "steps": config.steps,
            "guidance": config.guidance, "seed": config.seed, "samples_per_clip": 1, "peak": config.peak,
            "clip_count": len(clips), "max_clips": config.max_clips,
            "checkpoint_sha256": generation.get("checkpoint_sha256"),
            "embedders": {"cnn14": cnn14.protocol(), "vggish": vggish.protocol()},
            "embedder_checkpoints": {"cnn14": cnn14.checkpoint_id, "vggish": vggish.checkpoint_id},
            "random_embedders": random_weights,
            **{k: generation[k] for k in ("vae", "vae_scaling_factor", "inputs", "scheme", "train_preset") if k in generation},
            "av_align": "Yariv et al. 2024 (2025 version): Farneback flow at the native fps, flow peaks >= 0.1, "
                        "librosa onsets, window 1/fps, one-to-one; clips with no peak on either side excluded",
        },
        "software": software_versions(),
        "config": config.to_dict(),
        "av_align_per_clip": av.get("per_clip", {}),
    }
    write_outputs(out_dir, results, config, clips, progress)
    return results
