"""Ground-truth embeddings, computed once per protocol and kept in an HDF5 file keyed by clip id.

Layout: attribute `protocol` (JSON: cache version, embedding sample rate, audio protocol and duration, both front
ends and widths, both checkpoint ids, and what the reference audio came from: the sha256 of the shards' stage-one
config and their sample rate) plus readable copies (`sample_rate`, `duration`, `cnn14_checkpoint`,
`vggish_checkpoint`); one group per clip under `clips/` with datasets `cnn14_embedding` (D,), `cnn14_probs`
(527,), `cnn14_logits` (527,), `vggish` (n_patches, 128) and the attributes `id`, `audio_sha256` (of the
reference audio the clip was embedded from) and `complete`. A file whose protocol differs from the requested one
(an older CACHE_VERSION included) is rebuilt; a clip whose audio hash differs from the shards' is re-embedded
(the shards were rebuilt under the same config).

Crash safety: new clips are written into `<path>.partial` (flushed after every clip; `complete` is set after the
clip's datasets, so a clip cut short by a crash is dropped on the next run, and a partial file that no longer
opens is discarded); when every requested clip is there the partial file is renamed over `<path>` (atomic), so
`<path>` is always a whole file. Run the same command again to resume.

Concurrency: the build holds an exclusive `fcntl.flock` on `<path>.lock`, so two evaluations of the same
shards at once take turns (the second waits, saying so, then finds the clips the first one cached) instead of
fighting over `<path>.partial`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import h5py
import numpy as np

from eval.audio_embedding import AudioEmbedding, embed_clips
from eval.config import AudioProtocol
from eval.panns import Cnn14
from eval.vggish import VGGish

log = logging.getLogger(__name__)

# 2: reference source in the protocol, per-clip audio_sha256; 3: cnn14_logits, audio protocol in the protocol
CACHE_VERSION = 3
DATASETS = ("cnn14_embedding", "cnn14_probs", "vggish", "cnn14_logits")

Cached = tuple[AudioEmbedding, str | None]  # an embedding and the sha256 of the audio it was computed from


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


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on `<path>.lock` for the duration of a build; waits (saying so) while another process
    holds it. The lock file stays: deleting it would let a third process lock a different inode."""
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another evaluation is building this cache; waiting for it to finish", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _encode(protocol: dict[str, Any]) -> str:
    return json.dumps(protocol, sort_keys=True)


def _group_name(clip_id: str) -> str:
    return "id=" + quote(clip_id, safe="")  # '/' would nest groups; the prefix keeps '.' and '' valid names


def _stored_protocol(handle: h5py.File) -> str | None:
    value = handle.attrs.get("protocol")
    return value.decode() if isinstance(value, bytes) else value


def _write_header(handle: h5py.File, protocol: dict[str, Any]) -> None:
    handle.attrs["protocol"] = _encode(protocol)
    handle.attrs["sample_rate"] = protocol["sample_rate"]
    handle.attrs["duration"] = math.nan if protocol["duration"] is None else protocol["duration"]
    handle.attrs["cnn14_checkpoint"] = protocol["cnn14"]["checkpoint"]
    handle.attrs["vggish_checkpoint"] = protocol["vggish"]["checkpoint"]
    handle.require_group("clips")


def _write_clip(handle: h5py.File, clip_id: str, embedding: AudioEmbedding, audio_sha256: str | None) -> None:
    name = _group_name(clip_id)
    clips = handle["clips"]
    if name in clips:
        del clips[name]
    group = clips.create_group(name)
    group.attrs["id"] = clip_id
    if audio_sha256 is not None:
        group.attrs["audio_sha256"] = audio_sha256
    for key in DATASETS:
        group.create_dataset(key, data=np.asarray(getattr(embedding, key), dtype=np.float32))
    group.attrs["complete"] = True  # last: a clip without it was cut short and is not trusted
    handle.flush()


def _read_clips(handle: h5py.File) -> dict[str, Cached]:
    out = {}
    for group in handle["clips"].values():
        if group.attrs.get("complete", False) and all(key in group for key in DATASETS):
            digest = group.attrs.get("audio_sha256")
            out[str(group.attrs["id"])] = (AudioEmbedding(**{key: group[key][()] for key in DATASETS}),
                                           None if digest is None else str(digest))
    return out


def read_cache(path: str | Path, protocol: dict[str, Any] | None = None) -> dict[str, AudioEmbedding]:
    """All complete clips of a cache file; with `protocol`, raise if the file was built for another one."""
    with h5py.File(path, "r") as handle:
        if protocol is not None and _stored_protocol(handle) != _encode(protocol):
            raise ValueError(f"{path}: embeddings were computed under another protocol (front end, audio protocol, "
                             f"duration or checkpoint); delete it or run ground_truth_embeddings to rebuild")
        return {clip_id: embedding for clip_id, (embedding, _) in _read_clips(handle).items()}


def _matching_clips(path: Path, protocol: dict[str, Any]) -> dict[str, Cached] | None:
    """The complete clips of `path` when it exists, opens and matches `protocol`; None otherwise."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as handle:
            if _stored_protocol(handle) != _encode(protocol):
                log.info("%s: protocol or checkpoints changed, rebuilding the cache", path)
                return None
            return _read_clips(handle)
    except (OSError, KeyError) as error:  # a file cut short by a crash no longer opens
        log.warning("%s: unreadable (%s), discarding it", path, error)
        return None


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
) -> dict[str, AudioEmbedding]:
    """Embeddings of the reference clips `ids`, from the cache at `path` where present and computed otherwise.

    `load_audio(id)` returns the clip's waveform at `sample_rate`; it is called only for clips not yet cached,
    in the order of `ids` (a streaming loader can rely on it). `source` and `audio_protocol` join the protocol
    (see `cache_protocol`; the audio protocol also decides how `load_audio`'s waveforms are prepared).
    `audio_hashes[id]`, when given, is the sha256 of the clip's reference audio now: it is stored with the clip,
    and a cached clip stored with another hash is embedded again. Returns {id: AudioEmbedding} for the requested
    ids; clips cached earlier for other ids are kept in the file.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    protocol = cache_protocol(cnn14, vggish, duration, source, audio_protocol)
    wanted = list(dict.fromkeys(ids))
    hashes = dict(audio_hashes or {})

    def current(cached: Mapping[str, Cached], clip_id: str) -> bool:
        return clip_id in cached and (clip_id not in hashes or cached[clip_id][1] == hashes[clip_id])

    finished = _matching_clips(path, protocol) or {}
    if all(current(finished, clip_id) for clip_id in wanted):
        return {clip_id: finished[clip_id][0] for clip_id in wanted}

    path.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(path):
        finished = _matching_clips(path, protocol) or {}  # another process may have built it while we waited
        if all(current(finished, clip_id) for clip_id in wanted):
            return {clip_id: finished[clip_id][0] for clip_id in wanted}
        resumed = _matching_clips(partial, protocol)
        if resumed is None and partial.exists():
            partial.unlink()
        with h5py.File(partial, "a") as handle:
            if resumed is None:
                _write_header(handle, protocol)
                resumed = {}
            for name in [n for n, g in handle["clips"].items() if not g.attrs.get("complete", False)]:
                del handle["clips"][name]  # cut short by a crash
            for clip_id, cached in finished.items():  # carry over what the whole file already had
                if clip_id not in resumed:
                    _write_clip(handle, clip_id, *cached)
                    resumed[clip_id] = cached
            todo = [clip_id for clip_id in wanted if not current(resumed, clip_id)]
            changed = sum(clip_id in resumed for clip_id in todo)
            if changed:
                log.warning("%s: the reference audio of %d cached clips changed (shards rebuilt?); embedding them "
                            "again", path, changed)
            if resumed:
                log.info("%s: %d clips cached, %d to embed", path, len(resumed), len(todo))
            waves = ((clip_id, load_audio(clip_id)) for clip_id in todo)
            for clip_id, embedding in embed_clips(waves, cnn14, vggish, sample_rate, duration, batch_size, len(todo),
                                                  progress, audio_protocol):
                _write_clip(handle, clip_id, embedding, hashes.get(clip_id))
                resumed[clip_id] = (embedding, hashes.get(clip_id))
        os.replace(partial, path)
    return {clip_id: resumed[clip_id][0] for clip_id in wanted}
