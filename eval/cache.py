"""Ground-truth embeddings, computed once per protocol and kept in an HDF5 file keyed by clip id.

Layout: attribute `protocol` (JSON: cache version, embedding sample rate, audio protocol and duration, both front
ends and widths, both checkpoint ids, and what the reference audio came from: the sha256 of the shards' stage-one
config and their sample rate) plus readable copies (`sample_rate`, `duration`, `cnn14_checkpoint`,
`vggish_checkpoint`); one group per clip under `clips/` with datasets `cnn14_embedding` (D,), `cnn14_probs`
(527,), `cnn14_logits` (527,), `vggish` (n_patches, 128) and the attributes `id`, `audio_sha256` (of the
reference audio the clip was embedded from) and `complete`. A file whose protocol differs from the requested one
(an older CACHE_VERSION included) is rebuilt; a clip whose audio hash differs from the shards' is re-embedded
(the shards were rebuilt under the same config).

Crash safety, resuming and concurrency are those of `eval.array_cache`, which builds the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from eval.array_cache import cached_arrays, read_arrays, stored_protocol
from eval.audio_embedding import AudioEmbedding, embed_clips
from eval.config import AudioProtocol
from eval.panns import Cnn14
from eval.vggish import VGGish

# 2: reference source in the protocol, per-clip audio_sha256; 3: cnn14_logits, audio protocol in the protocol
CACHE_VERSION = 3
DATASETS = ("cnn14_embedding", "cnn14_probs", "vggish", "cnn14_logits")
DIGEST_ATTR = "audio_sha256"  # the clip attribute holding the sha256 of its reference audio


def cache_protocol(cnn14: Cnn14, vggish: VGGish, duration: float | None,
                   source: Mapping[str, Any] | None = None, audio_protocol: AudioProtocol = "mean-cut") -> dict[str, Any]:
    """Everything a cached embedding depends on: the audio protocol and its cut/pad duration, embedding rate, front
    ends, checkpoints, and `source`, what the reference audio came from (e.g. the sha256 of the shards' config and
    their sample rate)."""
    protocol = {"cache_version": CACHE_VERSION, "sample_rate": cnn14.config.sample_rate, "duration": duration,
                "audio_protocol": audio_protocol, "cnn14": cnn14.protocol(), "vggish": vggish.protocol()}
    if source is not None:
        protocol["reference"] = dict(source)
    return protocol


def read_cache(path: str | Path, protocol: dict[str, Any] | None = None) -> dict[str, AudioEmbedding]:
    """All complete clips of a cache file; with `protocol`, raise if the file was built for another one."""
    with h5py.File(path, "r") as handle:
        if protocol is not None and stored_protocol(handle) != json.dumps(protocol, sort_keys=True):
            raise ValueError(f"{path}: embeddings were computed under another protocol (front end, audio protocol, "
                             f"duration or checkpoint); delete it or run ground_truth_embeddings to rebuild")
        return {clip_id: _embedding(arrays) for clip_id, (arrays, _, _) in read_arrays(handle, DIGEST_ATTR).items()
                if all(key in arrays for key in DATASETS)}


def _embedding(arrays: Mapping[str, np.ndarray]) -> AudioEmbedding:
    return AudioEmbedding(**{key: arrays[key] for key in DATASETS})


def ground_truth_embeddings(
    path: str | Path,
    ids: Iterable[str],
    load_audio: Callable[[str], np.ndarray],
    cnn14: Cnn14,
    vggish: VGGish,
    sample_rate: int,
    duration: float | None,
    batch_size: int = 8,
    progress: bool = True,
    source: Mapping[str, Any] | None = None,
    audio_hashes: Mapping[str, str] | None = None,
    audio_protocol: AudioProtocol = "mean-cut",
    failed: dict[str, str] | None = None,
) -> dict[str, AudioEmbedding]:
    """Embeddings of the reference clips `ids`, from the cache at `path` where present and computed otherwise.

    `load_audio(id)` returns the clip's waveform at `sample_rate`; it is called only for clips not yet cached,
    in the order of `ids` (a streaming loader can rely on it). `source` and `audio_protocol` join the protocol
    (see `cache_protocol`; the audio protocol also decides how `load_audio`'s waveforms are prepared).
    `audio_hashes[id]`, when given, is the sha256 of the clip's reference audio now: it is stored with the clip,
    and a cached clip stored with another hash is embedded again. Returns {id: AudioEmbedding} for the requested
    ids that could be embedded; a clip that cannot (`embed_clips`: too short for the protocol, an output that is not
    finite) is cached with its reason, which goes into `failed` ({id: reason}) when given. Clips cached earlier
    for other ids are kept in the file.
    """
    protocol = cache_protocol(cnn14, vggish, duration, source, audio_protocol)
    hashes = dict(audio_hashes or {})
    wanted = {clip_id: hashes.get(clip_id) for clip_id in ids}
    header = {"sample_rate": protocol["sample_rate"], "duration": math.nan if duration is None else duration,
              "cnn14_checkpoint": protocol["cnn14"]["checkpoint"], "vggish_checkpoint": protocol["vggish"]["checkpoint"]}

    def compute(todo: list[str]) -> Iterator[tuple[str, dict[str, np.ndarray] | str]]:
        waves = ((clip_id, load_audio(clip_id)) for clip_id in todo)
        for clip_id, embedding in embed_clips(waves, cnn14, vggish, sample_rate, duration, batch_size, len(todo),
                                              progress, audio_protocol):
            yield clip_id, (embedding if isinstance(embedding, str)  # why it cannot be embedded: cached as such
                            else {key: np.asarray(getattr(embedding, key), dtype=np.float32) for key in DATASETS})

    classes = cnn14.config.classes_num
    shapes = {"cnn14_embedding": (cnn14.config.embed_dim,), "cnn14_probs": (classes,), "cnn14_logits": (classes,),
              "vggish": (None, vggish.config.embed_dim)}
    arrays, why = cached_arrays(path, protocol, wanted, compute, header, DIGEST_ATTR, shapes)
    if failed is not None:
        failed.update(why)
    return {clip_id: _embedding(arrays[clip_id]) for clip_id in wanted if clip_id in arrays}
