"""The embedding step of av-benchmark's own metrics (hkchengrex/av-benchmark): PaSST on the reference and the
generated audio (FD-PaSST, KL-PaSST, IS-PaSST), ImageBind and Synchformer on the source videos and the generated
audio (IB-score, DeSync). PANNs and VGGish, which both harnesses use, are in `eval.embed`.

Ground-truth side, cached per protocol in HDF5 (`eval.array_cache`, one file per embedder): PaSST outputs of the
shards' reference audio (each clip checked against the sha256 of its `flac` member, so one cache serves every
selection of clips), and the ImageBind embedding and Synchformer features of each clip's source-video window
(checked against the video file's path, size and modification time and the window). Generated side, from the WAVs
in <output>/wav: PaSST outputs, the ImageBind audio embedding, and Synchformer's audio features, compared at once
with the cached video features into the clip's two DeSync values (first and last 4.8 s).

The window of a clip is --duration seconds from its start, or the clip's own length when that is shorter (counted:
'video_windows_shortened'; av-benchmark would drop such a clip). A clip whose source video is missing has no
ImageBind/Synchformer pair (counted: 'benchmark_videos_missing'). A window shorter than an embedder needs
(ImageBind 4 s: two frames at 0.5 fps; Synchformer 4.8 s: 14 segments for DeSync; from each model's config) is
decided before any model runs (stage '<embedder>_window'). A video that cannot give its window's frames (stage
'<embedder>_video', cached with its reason and reported again until the file changes) or a WAV an embedder cannot
take, e.g. too short (stage '<embedder>_audio'), is a failure of that clip and embedder alone; the other clips are
still measured. Each failure is one line naming the video or the WAV.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import shards
from eval.array_cache import Arrays, cached_arrays
from eval.clips import wav_path
from eval.config import EvalConfig
from eval.embed import Embedders, ReferenceAudio, ShardAudio, generated_waves
from eval.video_frames import VideoReadError, window_frames

CACHE_VERSION = 1
VIDEO_SHORT_SIDE = 224  # both video embedders start with Resize(224, bicubic): done once while decoding

Sets = dict[str, tuple[dict[str, Any], dict[str, Any]]]  # embedder -> (reference set, generated set)


def _cache_path(config: EvalConfig, kind: str, protocol: dict[str, Any]) -> Path:
    digest = hashlib.sha256(repr(sorted(protocol.items())).encode()).hexdigest()[:12]
    return config.cache_folder / f"{config.split}-{kind}-{digest}.h5"


def _window(config: EvalConfig, clip: shards.SampleMeta) -> float:
    """Seconds of a clip that ImageBind and Synchformer see: --duration, or the clip's own length when that is
    shorter or --duration is 0 (av-benchmark drops a clip shorter than its --audio_length instead)."""
    return min(config.duration, clip.duration) if config.duration else clip.duration


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


# ----------------------------------------------------------------------------------------------------------------
# PaSST
# ----------------------------------------------------------------------------------------------------------------
def passt_outputs(model: Any, waves: Iterable[tuple[str, np.ndarray, int]], duration: float | None,
                  batch_size: int, total: int | None, progress: bool, what: str) -> Iterator[tuple[str, Arrays]]:
    """(id, {'logits', 'embedding'}) for (id, waveform, rate) triples, `batch_size` clips per pass."""
    from eval.passt import passt_waveform

    with tqdm(total=total, disable=not progress, unit="clip", desc=f"PaSST, {what}") as bar:
        for batch in _batches(waves, batch_size):
            inputs = np.stack([passt_waveform(w, rate, duration) for _, w, rate in batch])
            logits, embedding = model.logits_and_embedding(inputs)
            for (clip_id, _, _), lg, e in zip(batch, logits, embedding):
                yield clip_id, {"logits": lg, "embedding": e}
            bar.update(len(batch))


def passt_sets(config: EvalConfig, model: Any, reference: ReferenceAudio, clips: list[shards.SampleMeta],
               failures: list[dict[str, str]], progress: bool) -> tuple[dict[str, Arrays], dict[str, Arrays]]:
    """PaSST outputs of the reference audio (cached; each clip checked against its flac's sha256, so one cache
    serves every selection of clips) and of the generated WAVs."""
    duration = config.duration or None
    source = {k: reference.source[k] for k in ("shards_config_sha256", "sample_rate")}
    protocol = {"cache_version": CACHE_VERSION, "passt": model.protocol(), "duration": duration, "reference": source}

    def decoded(todo: list[str]) -> Iterator[tuple[str, np.ndarray, int]]:
        audio = ShardAudio(config.shards, config.split, todo)  # streams in shard order, as `todo` is
        for clip_id in todo:
            yield clip_id, audio(clip_id), reference.sample_rate

    def compute(todo: list[str]) -> Iterator[tuple[str, Arrays | str]]:
        yield from passt_outputs(model, decoded(todo), duration, config.batch_size, len(todo), progress,
                                 "reference audio")

    wanted = {clip_id: reference.hashes[clip_id] for clip_id in reference.ids}
    cached, _ = cached_arrays(_cache_path(config, "passt", protocol), protocol, wanted, compute, keys=("logits", "embedding"))
    generated = dict(passt_outputs(model, generated_waves(config.output_dir, clips, failures), duration,
                                   config.batch_size, len(clips), progress, "generated audio"))
    return {c.id: cached[c.id] for c in clips if c.id in cached}, generated


# ----------------------------------------------------------------------------------------------------------------
# ImageBind and Synchformer: the source videos, then the generated audio
# ----------------------------------------------------------------------------------------------------------------
VIDEO_EMBEDDERS = ("imagebind", "synchformer")


def video_digest(clip: shards.SampleMeta, seconds: float) -> str:
    """What a clip's video embeddings depend on besides the protocol: the file (path, size, mtime) and window."""
    stat = Path(clip.source).stat()
    text = f"{Path(clip.source).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{clip.start!r}|{seconds!r}"
    return hashlib.sha256(text.encode()).hexdigest()


def embed_video(name: str, model: Any, frames: np.ndarray) -> Arrays:
    """One clip's video embedding by embedder `name` from its frames ((T, H, W, 3) uint8 at the embedder's rate):
    ImageBind {'video': (D,)}, Synchformer {'video': (S, t, D)}."""
    if name == "imagebind":
        from eval.imagebind import imagebind_video_input

        return {"video": model.embed_video(imagebind_video_input(frames)[None])[0]}
    from eval.synchformer import synchformer_video_input

    with torch.inference_mode():
        features = model.video_features(synchformer_video_input(frames)[None])
    return {"video": features[0].float().cpu().numpy()}


def video_rate(name: str) -> float:
    if name == "imagebind":
        from eval.imagebind import VIDEO_FPS as IB_FPS

        return IB_FPS
    from eval.synchformer import VIDEO_FPS as SYNC_FPS

    return SYNC_FPS


def source_video_set(config: EvalConfig, name: str, model: Any, clips: list[shards.SampleMeta],
                     failures: list[dict[str, str]], progress: bool) -> dict[str, Arrays]:
    """{clip id: arrays} of embedder `name` on the source-video windows of `clips` (which have a video), through
    its own cache; clips whose window cannot be read are failures (cached with their reason, reported again)."""
    by_id = {c.id: c for c in clips}
    rate = video_rate(name)

    def compute(todo: list[str]) -> Iterator[tuple[str, Arrays | str]]:
        for clip_id in tqdm(todo, disable=not progress, unit="clip", desc=f"{name}, source videos"):
            clip = by_id[clip_id]
            try:
                frames = window_frames(clip.source, clip.start, _window(config, clip), {name: rate}, VIDEO_SHORT_SIDE)
                yield clip_id, embed_video(name, model, frames[name])
            except (VideoReadError, ValueError) as error:
                yield clip_id, str(error).splitlines()[0]

    def named(clip_id: str, reason: str) -> str:  # a front end's ValueError names no file: the video is added
        source = by_id[clip_id].source
        return reason if source in reason else f"{source}: {reason}"

    protocol = {"cache_version": CACHE_VERSION, name: model.protocol(), "window": "min(duration, clip)",
                "video_frames": "ffmpeg fps filter rule, short side 224 bicubic"}
    wanted = {c.id: video_digest(c, _window(config, c)) for c in clips}
    arrays, failed = cached_arrays(_cache_path(config, f"video-{name}", protocol), protocol, wanted, compute,
                                   keys=("video",))
    failures += [{"id": clip_id, "stage": f"{name}_video", "reason": named(clip_id, reason)}
                 for clip_id, reason in failed.items()]
    return arrays


def generated_av(config: EvalConfig, models: dict[str, Any], clips: list[shards.SampleMeta],
                 videos: dict[str, dict[str, Arrays]], failures: list[dict[str, str]],
                 progress: bool, measured: dict[str, set[str]] | None = None) -> dict[str, dict[str, Arrays]]:
    """{embedder: {clip id: arrays}} of the generated WAVs: ImageBind {'audio': (D,)} for every readable WAV;
    Synchformer {'desync': (2,)} for every readable WAV whose clip has source-video features. `measured` limits
    an embedder to the clips whose window it can measure (`window_shortfall`). A WAV an embedder cannot take (too
    short) is a failure of that embedder alone, naming the WAV."""
    out: dict[str, dict[str, Arrays]] = {name: {} for name in models}
    durations = {c.id: _window(config, c) for c in clips}
    if measured is not None:
        clips = [c for c in clips if any(c.id in ids for ids in measured.values())]
    waves = generated_waves(config.output_dir, clips, failures)
    for clip_id, waveform, rate in tqdm(waves, total=len(clips), disable=not progress, unit="clip",
                                        desc="ImageBind/Synchformer, generated audio"):
        for name, model in models.items():
            if measured is not None and clip_id not in measured[name]:
                continue
            try:
                if name == "imagebind":
                    from eval.imagebind import imagebind_audio_input

                    out[name][clip_id] = {"audio": model.embed_audio(imagebind_audio_input(waveform, rate)[None])[0]}
                elif clip_id in videos[name]:
                    out[name][clip_id] = {"desync": desync_of(model, waveform, rate, durations[clip_id],
                                                              videos[name][clip_id]["video"])}
            except ValueError as error:
                failures.append({"id": clip_id, "stage": f"{name}_audio",
                                 "reason": f"{wav_path(config.output_dir, clip_id)}: {str(error).splitlines()[0]}"})
    return out


def window_shortfall(name: str, model: Any, seconds: float) -> str | None:
    """Why embedder `name` cannot measure a clip whose window is `seconds` long (None: it can), from the model's
    own config: ImageBind needs one clip of consecutive frames at 0.5 fps (4 s), Synchformer 14 segments of
    video and of audio for DeSync (4.8 s). A shorter window would only fail inside the model's front end."""
    config = model.config
    if name == "imagebind":
        from eval.imagebind import VIDEO_FPS as IB_FPS

        if config.embeds_window(seconds):
            return None
        return f"ImageBind needs at least {config.min_video_seconds:g} s ({config.video_frames} frames at {IB_FPS:g} fps)"
    if config.measures_window(seconds):
        return None
    return (f"Synchformer needs at least {config.min_seconds:g} s for DeSync ({config.segments_compared} segments of "
            f"{config.segment_frames / config.video_fps:g} s every {config.segment_step_frames / config.video_fps:g} s)")


def measurable_clips(config: EvalConfig, models: dict[str, Any], clips: list[shards.SampleMeta],
                  failures: list[dict[str, str]]) -> dict[str, set[str]]:
    """{embedder: ids of the clips whose window it can measure}, decided before any model runs. A clip with a
    source video whose window is too short for an embedder is a failure of that embedder (stage
    '<embedder>_window'), one line naming the video's window and the generated WAV, the clip's length and the
    embedder's minimum; a clip without a source video is left out silently (counted as missing)."""
    measured: dict[str, set[str]] = {}
    for name, model in models.items():
        measured[name] = set()
        for clip in clips:
            seconds = _window(config, clip)
            reason = window_shortfall(name, model, seconds)
            if reason is None:
                measured[name].add(clip.id)
                continue
            if not (clip.source and Path(clip.source).is_file()):
                continue
            wav = wav_path(config.output_dir, clip.id)
            files = f"{clip.source} [{clip.start:g}, {clip.start + seconds:g}) s" + (f" and {wav}" if wav.exists() else "")
            length = (f"the clip is {seconds:g} s long" if seconds >= clip.duration
                      else f"its window (--duration) is {seconds:g} s long")
            failures.append({"id": clip.id, "stage": f"{name}_window", "reason": f"{files}: {length} while {reason}"})
    return measured


def desync_of(model: Any, waveform: np.ndarray, rate: int, seconds: float, video: np.ndarray) -> np.ndarray:
    """(2,) |offset| in seconds Synchformer predicts between the source video's features and the generated audio,
    on the first and on the last 14 segments."""
    from eval.synchformer import synchformer_audio_input

    with torch.inference_mode():
        features = model.audio_features(synchformer_audio_input(waveform, rate, seconds)[None])
        return np.asarray(model.desync(torch.from_numpy(video)[None].to(features), features))[0]


def video_sets(config: EvalConfig, embedders: Embedders, clips: list[shards.SampleMeta],
               failures: list[dict[str, str]], counts: dict[str, Any], progress: bool) -> Sets:
    """The ImageBind and Synchformer sets: reference = the source videos' embeddings, generated = the generated
    audio's (ImageBind) or the clip's DeSync values (Synchformer)."""
    models: dict[str, Any] = {name: embedders.models[name] for name in VIDEO_EMBEDDERS
                              if name in embedders.models and name not in embedders.unavailable}
    if not models:
        return {}
    with_video = [c for c in clips if c.source and Path(c.source).is_file()]
    counts["benchmark_videos_missing"] = len(clips) - len(with_video)
    counts["video_windows_shortened"] = sum(bool(config.duration) and c.duration < config.duration for c in clips)
    measured = measurable_clips(config, models, clips, failures)
    videos = {name: source_video_set(config, name, model, [c for c in with_video if c.id in measured[name]],
                                     failures, progress)
              for name, model in models.items()}
    generated = generated_av(config, models, clips, videos, failures, progress, measured)
    return {name: (videos[name], generated[name]) for name in models}


def benchmark_sets(config: EvalConfig, embedders: Embedders, reference: ReferenceAudio | None,
                   clips: list[shards.SampleMeta], failures: list[dict[str, str]], counts: dict[str, Any],
                   progress: bool) -> Sets:
    """The sets of every av-benchmark embedder that is loaded and available."""
    sets: Sets = {}
    if "passt" in embedders.models and "passt" not in embedders.unavailable and reference is not None:
        sets["passt"] = passt_sets(config, embedders.models["passt"], reference, clips, failures, progress)
    sets.update(video_sets(config, embedders, clips, failures, counts, progress))
    return sets
