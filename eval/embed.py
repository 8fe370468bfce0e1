"""The embedding step of an evaluation: the two embedders, the reference set and the generated set.

Embedders: PANNs Cnn14 (FD, KL, IS) and VGGish (FAD) from `embedder_weights` when the official checkpoints are
there, else seeded random weights when the config allows them (`load_embedders`). Reference set: the shards'
ground-truth audio (the `flac` member) of every selected clip, embedded once per protocol into the HDF5 cache of
`eval.cache`, each clip checked against the sha256 of its audio. Generated set: the readable WAVs of
<output>/wav; a WAV that cannot be read is a failure, not silence. Both sets go through the same audio protocol
(`EvalConfig.audio_protocol`, `eval.audio_embedding.prepare_waveform`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import soundfile

import shards
from common.devices import resolve_device
from eval import cache
from eval.audio_embedding import RESAMPLER, AudioEmbedding, embed_clips
from eval.clips import EvalError, iterate_reference_audio, read_wav, shards_config_sha256, wav_path
from eval.config import AudioProtocol, EvalConfig
from eval.panns import CHECKPOINT_NAME as CNN14_FILE
from eval.panns import CNN14_CONFIGS, Cnn14, load_cnn14
from eval.vggish import CHECKPOINT_NAME as VGGISH_FILE
from eval.vggish import VGGISH_CONFIGS, VGGish, load_vggish


# ----------------------------------------------------------------------------------------------------------------
# Embedders
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


def embedder_protocol(config: EvalConfig, cnn14: Cnn14, vggish: VGGish, random_weights: bool) -> dict[str, Any]:
    """What the embeddings depend on, as results.json's protocol states it."""
    return {
        "duration": config.metric_duration, "audio_protocol": config.audio_protocol,
        "sample_rate": cnn14.config.sample_rate,
        "embedders": {"cnn14": cnn14.protocol(), "vggish": vggish.protocol()},
        "embedder_checkpoints": {"cnn14": cnn14.checkpoint_id, "vggish": vggish.checkpoint_id},
        "random_embedders": random_weights,
        "random_embedder_size": config.random_embedder_size if random_weights else None,
        "embedder_seed": config.embedder_seed if random_weights else None,
        "resampler": f"librosa.resample(res_type={RESAMPLER!r})",
    }


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
    protocol = cache.cache_protocol(cnn14, vggish, config.metric_duration, source, config.audio_protocol)
    digest = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
    path = config.cache_folder / f"{config.split}-{digest}.h5"
    return cache.ground_truth_embeddings(path, ids, ShardAudio(config.shards, config.split, ids), cnn14, vggish,
                                         sample_rate, config.metric_duration, progress=progress, source=source,
                                         audio_hashes=hashes, audio_protocol=config.audio_protocol)


def reference_set(config: EvalConfig, in_shard_order: list[shards.SampleMeta], clips: list[shards.SampleMeta],
                  cnn14: Cnn14, vggish: VGGish, sample_rate: int,
                  progress: bool) -> tuple[dict[str, AudioEmbedding], dict[str, Any]]:
    """The reference embeddings of `clips` (in their order) and what names that reference set in results.json
    (the shards' config, their rate, the fingerprint of the clips' audio). `in_shard_order`: the whole split as
    the shards hold it, so that the audio is read in one pass."""
    wanted = {c.id for c in clips}
    shard_ids = [c.id for c in in_shard_order if c.id in wanted]  # reference audio streams in shard order
    hashes = reference_audio_hashes(config.shards, config.split, shard_ids)
    embeddings = reference_embeddings(config, shard_ids, cnn14, vggish, sample_rate, hashes, progress)
    source = {"shards_config_sha256": shards_config_sha256(config.shards), "sample_rate": sample_rate,
              "fingerprint": reference_fingerprint(hashes)}
    return {c.id: embeddings[c.id] for c in clips}, source  # back to id order


# ----------------------------------------------------------------------------------------------------------------
# Generated set: the readable WAVs
# ----------------------------------------------------------------------------------------------------------------
def generated_embeddings(out_dir: Path, clips: list[shards.SampleMeta], cnn14: Cnn14, vggish: VGGish,
                         duration: float | None, failures: list[dict[str, str]], progress: bool,
                         audio_protocol: AudioProtocol = "mean-cut") -> dict[str, AudioEmbedding]:
    """Embeddings of the generated WAVs that exist and can be read; unreadable ones are appended to `failures`.

    `read_wav` averages channels; under the audioldm-eval protocol a WAV with several channels is read again for
    its first channel. A WAV at another rate than the embedders' is resampled here, so under audioldm-eval its
    DC offset is removed after resampling rather than before (resampling keeps the mean up to its filter's
    ripple)."""
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
            if audio_protocol == "audioldm-eval" and soundfile.info(path).channels > 1:
                waveform = soundfile.read(path, dtype="float32", always_2d=True)[0][:, 0]
            if found != rate:  # resampled by prepare_waveform only for one shared rate: do it here per file
                waveform = librosa.resample(waveform, orig_sr=found, target_sr=rate, res_type=RESAMPLER)
            yield clip.id, waveform

    return dict(embed_clips(waves(), cnn14, vggish, rate, duration, progress=progress, audio_protocol=audio_protocol))
