"""The embedding step of an evaluation: the embedders, the reference set and the generated set (PANNs/VGGish
here; PaSST, ImageBind and Synchformer in `eval.benchmark_embed`).

Embedders: PANNs Cnn14 (FD, KL, IS), VGGish (FAD), PaSST, ImageBind and Synchformer, each from its official file
in `embedder_weights` when it is there, else seeded random weights when the config allows them, else unavailable
with one line naming the file (`load_embedders`). Reference set: the shards'
ground-truth audio (the `flac` member) of every selected clip, embedded once per protocol into the HDF5 cache of
`eval.cache`, each clip checked against the sha256 of its audio. Generated set: the readable WAVs of
<output>/wav; a WAV that cannot be read is a failure, not silence. Both sets go through the same audio protocol
(`EvalConfig.audio_protocol`, `eval.audio_embedding.prepare_waveform`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import soundfile
import torch

import shards
from common.devices import resolve_device
from eval import cache
from eval.audio_embedding import RESAMPLER, AudioEmbedding, av_benchmark_waveform, embed_clips
from eval.clips import EvalError, iterate_reference_audio, read_wav, shards_config_sha256, wav_path
from eval.config import AudioProtocol, EvalConfig
from eval.panns import CHECKPOINT_NAME as CNN14_FILE
from eval.panns import CNN14_CONFIGS, Cnn14, load_cnn14
from eval.vggish import CHECKPOINT_NAME as VGGISH_FILE
from eval.vggish import VGGISH_CONFIGS, VGGish, load_vggish

PANNS_VGGISH = ("cnn14", "vggish")


# ----------------------------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------------------------
# embedder -> (its official file in --embedder-weights, what it is)
CHECKPOINTS: dict[str, tuple[str, str]] = {
    "cnn14": (CNN14_FILE, "PANNs Cnn14 16 kHz checkpoint"),
    "vggish": (VGGISH_FILE, "VGGish checkpoint (torchvggish)"),
    "passt": ("passt-s-f128-p16-s10-ap.476-swa.pt", "PaSST checkpoint (hear21passt)"),
    "imagebind": ("imagebind_huge.pth", "ImageBind-huge checkpoint"),
    "synchformer": ("synchformer_state_dict.pth", "Synchformer checkpoint (av-benchmark's, AudioSet 24-01-04T16-39-21)"),
}


@dataclass
class Embedders:
    """The loaded embedders of an evaluation.

    models: embedder name -> model; random: the names loaded with seeded random weights; unavailable: embedder
    name -> why the metrics on it cannot be computed (one line naming the missing file). Cnn14 and VGGish are
    embedded in one pass: when one of them is unavailable and the other is not, the unavailable one is still
    built with tiny random weights so that the pass runs, and its metrics stay null through `unavailable`.
    """

    models: dict[str, Any] = field(default_factory=dict)
    random: set[str] = field(default_factory=set)
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def comparable(self) -> bool:
        """Every usable embedder has its official weights."""
        return not (self.random - set(self.unavailable))

    @property
    def usable(self) -> set[str]:
        """The embedders whose metrics can be computed."""
        return set(self.models) - set(self.unavailable)

    def to(self, device: torch.device) -> Embedders:
        """Move every model to `device` (they are loaded on the CPU, so that generation has the device's memory)."""
        for name, model in self.models.items():
            self.models[name] = model.to(device)
        return self


def _build(name: str, folder: Path | None, device: torch.device, size: str, seed: int) -> Any:
    """Embedder `name` from `folder` (its official file) or, with folder None, seeded random weights of `size`."""
    if name == "cnn14":
        return load_cnn14(folder, device, CNN14_CONFIGS[size], seed=seed)
    if name == "vggish":
        return load_vggish(folder, device, VGGISH_CONFIGS[size], seed=seed)
    if name == "passt":
        from eval.passt import PASST_CONFIGS, load_passt

        return load_passt(folder, device, PASST_CONFIGS[size], seed=seed)
    if name == "imagebind":
        from eval.imagebind import IMAGEBIND_CONFIGS, load_imagebind

        return load_imagebind(folder, device, IMAGEBIND_CONFIGS[size], seed=seed)
    if name == "synchformer":
        from eval.synchformer import SYNCHFORMER_CONFIGS, load_synchformer

        return load_synchformer(folder, device, SYNCHFORMER_CONFIGS[size], seed=seed)
    raise ValueError(f"unknown embedder {name!r}")


def load_embedders(config: EvalConfig, needed: set[str] | None = None, device: torch.device | None = None) -> Embedders:
    """The embedders `needed` (default: Cnn14 and VGGish), each from its official file in `embedder_weights`
    when it is there (built at the official size: `random_embedder_size` is the size of random ones only), else
    with seeded random weights when `random_embedders` is on, else unavailable: a missing file is one line naming
    it (its metrics are null with that line; the others still run). A file that is there but cannot be loaded,
    and a folder or a broken link where the file goes, is an EvalError. `device`: where to build them (default:
    the config's device)."""
    needed = set(PANNS_VGGISH) if needed is None else set(needed)
    if needed & set(PANNS_VGGISH):
        needed |= set(PANNS_VGGISH)  # one pass computes both
    folder = Path(config.embedder_weights)
    device = resolve_device(config.device) if device is None else device
    out = Embedders()
    for name in [n for n in CHECKPOINTS if n in needed]:
        file, description = CHECKPOINTS[name]
        path = folder / file
        try:
            if path.is_file():  # the official file: the official architecture, whatever random_embedder_size says
                out.models[name] = _build(name, folder, device, "paper", config.embedder_seed)
                continue
            if path.exists() or path.is_symlink():  # a folder, a broken link or a loop where the file goes
                kind = "a folder" if path.is_dir() else "not a readable regular file"
                raise EvalError(f"{path}: {description} is {kind}, not a checkpoint file (README, Weights)")
            if not config.random_embedders:
                out.unavailable[name] = (f"{path}: {description} missing; put the official file there (README, "
                                         "Weights) or pass --random-embedders (numbers then not comparable)")
                if name not in PANNS_VGGISH:
                    continue
                size = "tiny"  # stands in so that the shared PANNs/VGGish pass runs; its metrics stay null
            else:
                size = config.random_embedder_size
            out.models[name] = _build(name, None, device, size, config.embedder_seed)
            out.random.add(name)
        except ValueError as error:
            raise EvalError(str(error).splitlines()[0]) from None
    if set(PANNS_VGGISH) <= set(out.unavailable):  # no stand-in needed: neither pass runs
        for name in PANNS_VGGISH:
            out.models.pop(name, None)
            out.random.discard(name)
    return out


def embedder_protocol(config: EvalConfig, embedders: Embedders) -> dict[str, Any]:
    """What the embeddings depend on, as results.json's protocol states it."""
    models = embedders.models
    random = sorted(embedders.random - set(embedders.unavailable))
    return {
        "duration": config.metric_duration, "audio_protocol": config.audio_protocol,
        "sample_rate": models["cnn14"].config.sample_rate if "cnn14" in models else None,
        "metrics": config.metrics,
        "embedders": {name: model.protocol() for name, model in models.items() if name not in embedders.unavailable},
        "embedder_checkpoints": {name: model.checkpoint_id for name, model in models.items()
                                 if name not in embedders.unavailable},
        "unavailable_embedders": dict(embedders.unavailable),
        "random_embedders": bool(random),
        "random_embedder_names": random,
        "random_embedder_size": config.random_embedder_size if random else None,
        "embedder_seed": config.embedder_seed if random else None,
        "resampler": ("torchaudio.transforms.Resample (sinc_interp_hann, width 6, rolloff 0.99)"
                      if config.audio_protocol == "av-benchmark" else f"librosa.resample(res_type={RESAMPLER!r})"),
        "video_window": video_window_protocol(config),
    }


def video_window_protocol(config: EvalConfig) -> dict[str, Any]:
    """How the ImageBind and Synchformer frames are taken from the source videos."""
    return {"seconds": f"min({config.duration:g}, the clip's duration)" if config.duration else "the clip's duration",
            "start": "the clip's start in its source video",
            "frame_selection": "ffmpeg fps filter rule (eval.video_frames)", "resize": "short side 224, bicubic, "
            "antialiased (torchvision v2), before each embedder's own transform"}


# ----------------------------------------------------------------------------------------------------------------
# Reference set: the shards' audio, through the cache
# ----------------------------------------------------------------------------------------------------------------
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
        try:
            self.sample_rate = shards.read_spec(folder).sample_rate
        except shards.ShardFormatError as error:
            raise EvalError(str(error)) from None

    def __call__(self, clip_id: str) -> np.ndarray:
        for restart in (False, True):
            if restart:
                self.stream = iterate_reference_audio(self.folder, self.split, self.ids)
            for found, data in self.stream:
                if found == clip_id:
                    try:
                        return shards.read_flac(data, self.sample_rate)
                    except shards.ShardFormatError as error:
                        raise EvalError(f"{self.where}: clip {clip_id!r}: {error}") from None
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
                         hashes: dict[str, str], progress: bool,
                         failed: dict[str, str] | None = None) -> dict[str, AudioEmbedding]:
    """Ground-truth embeddings through the HDF5 cache; one file per (split, protocol) so that switching
    embedders does not rebuild another protocol's cache. `ids` in shard order (the audio streams in it);
    the result keeps that order, less the clips that cannot be embedded (their reasons into `failed`). The
    protocol names the shards' config and rate; `hashes` check each clip."""
    source = {"shards_config_sha256": shards_config_sha256(config.shards), "sample_rate": sample_rate}
    protocol = cache.cache_protocol(cnn14, vggish, config.metric_duration, source, config.audio_protocol)
    digest = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
    path = config.cache_folder / f"{config.split}-{digest}.h5"
    return cache.ground_truth_embeddings(path, ids, ShardAudio(config.shards, config.split, ids), cnn14, vggish,
                                         sample_rate, config.metric_duration, progress=progress, source=source,
                                         audio_hashes=hashes, audio_protocol=config.audio_protocol, failed=failed)


@dataclass(frozen=True)
class ReferenceAudio:
    """The selected clips' ground-truth audio as the shards hold it: ids in shard order (the audio streams in
    it), the sha256 of each clip's `flac` member, their rate, and what names the set in results.json."""

    ids: list[str]
    hashes: dict[str, str]
    sample_rate: int
    source: dict[str, Any]


def reference_audio(config: EvalConfig, in_shard_order: list[shards.SampleMeta], clips: list[shards.SampleMeta],
                    sample_rate: int) -> ReferenceAudio:
    """The reference audio of `clips`; `in_shard_order`: the whole split as the shards hold it, so that the
    audio is read in one pass."""
    wanted = {c.id for c in clips}
    shard_ids = [c.id for c in in_shard_order if c.id in wanted]
    hashes = reference_audio_hashes(config.shards, config.split, shard_ids)
    source = {"shards_config_sha256": shards_config_sha256(config.shards), "sample_rate": sample_rate,
              "fingerprint": reference_fingerprint(hashes)}
    return ReferenceAudio(shard_ids, hashes, sample_rate, source)


def reference_set(config: EvalConfig, reference: ReferenceAudio, clips: list[shards.SampleMeta], cnn14: Cnn14,
                  vggish: VGGish, failures: list[dict[str, str]], progress: bool) -> dict[str, AudioEmbedding]:
    """The reference PANNs/VGGish embeddings of `clips`, in their order; a clip whose reference audio cannot be
    embedded (too short for the audio protocol) is appended to `failures` (stage 'embed_reference')."""
    failed: dict[str, str] = {}
    embeddings = reference_embeddings(config, reference.ids, cnn14, vggish, reference.sample_rate, reference.hashes,
                                      progress, failed)
    where = f"{config.shards} (split {config.split})"
    failures += [{"id": clip_id, "stage": "embed_reference", "reason": f"{where}: clip {clip_id!r}: its reference audio "
                  f"cannot be embedded: {reason}"} for clip_id, reason in failed.items()]
    return {c.id: embeddings[c.id] for c in clips if c.id in embeddings}  # back to id order


# ----------------------------------------------------------------------------------------------------------------
# Generated set: the readable WAVs
# ----------------------------------------------------------------------------------------------------------------
def generated_waves(out_dir: Path, clips: list[shards.SampleMeta],
                    failures: list[dict[str, str]]) -> Iterator[tuple[str, np.ndarray, int]]:
    """(clip id, mono waveform, rate) of every readable generated WAV (`read_wav`: channels averaged); a WAV that
    cannot be read is appended to `failures` (stage 'read_wav'), one that does not exist is skipped."""
    for clip in clips:
        path = wav_path(out_dir, clip.id)
        if not path.exists():
            continue
        try:
            waveform, rate = read_wav(path)
        except ValueError as error:
            failures.append({"id": clip.id, "stage": "read_wav", "reason": str(error)})
            continue
        yield clip.id, waveform, rate


def generated_embeddings(out_dir: Path, clips: list[shards.SampleMeta], cnn14: Cnn14, vggish: VGGish,
                         duration: float | None, failures: list[dict[str, str]], progress: bool,
                         audio_protocol: AudioProtocol = "mean-cut") -> dict[str, AudioEmbedding]:
    """Embeddings of the generated WAVs that exist and can be read and embedded; the others are appended to
    `failures` (stages 'read_wav' and 'embed_audio': too short for the audio protocol, an output not finite).

    `read_wav` averages channels; under the audioldm-eval protocol a WAV with several channels is read again for
    its first channel. A WAV at another rate than the embedders' is resampled here, so under audioldm-eval its
    DC offset is removed after resampling rather than before (resampling keeps the mean up to its filter's
    ripple)."""
    rate = cnn14.config.sample_rate

    def waves() -> Iterator[tuple[str, np.ndarray]]:
        for clip_id, waveform, found in generated_waves(out_dir, clips, failures):
            path = wav_path(out_dir, clip_id)
            if audio_protocol == "audioldm-eval" and soundfile.info(path).channels > 1:
                waveform = soundfile.read(path, dtype="float32", always_2d=True)[0][:, 0]
            if found != rate and audio_protocol == "av-benchmark":  # its resampler, its order (mean first)
                waveform = av_benchmark_waveform(waveform, found, rate, None)
            elif found != rate:  # resampled by prepare_waveform only for one shared rate: do it here per file
                waveform = librosa.resample(waveform, orig_sr=found, target_sr=rate, res_type=RESAMPLER)
            yield clip_id, waveform

    embedded: dict[str, AudioEmbedding] = {}
    for clip_id, embedding in embed_clips(waves(), cnn14, vggish, rate, duration, progress=progress,
                                          audio_protocol=audio_protocol):
        if isinstance(embedding, str):
            failures.append({"id": clip_id, "stage": "embed_audio", "reason": f"{wav_path(out_dir, clip_id)}: {embedding}"})
        else:
            embedded[clip_id] = embedding
    return embedded
