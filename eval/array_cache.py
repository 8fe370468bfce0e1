"""Per-clip arrays computed once per protocol and kept in an HDF5 file keyed by clip id: the ground-truth side of
every embedder (`eval.cache` for PANNs and VGGish; PaSST outputs of the reference audio, ImageBind and Synchformer
features of the source videos in `eval.benchmark_embed`).

Layout: attribute `protocol` (JSON: everything the arrays depend on) plus readable copies of some of its values;
one group per clip under `clips/` holding one dataset per array, with the attributes `id`, the sha256 of what the
clip was computed from (its reference audio or its source video; attribute name per cache) and `complete` (set
last, so a clip cut short by a crash is dropped on the next run). A file of another protocol is rebuilt; a clip
whose source hash changed is computed again, and so is one whose arrays are missing, of the wrong shape or not
floating point (`damage`: a file edited or written by something else), with a warning.

A clip that could not be computed (an undecodable video) is cached as a failure with its reason and source hash,
so a later run reports it again without retrying it until its source changes.

Crash safety: a new file is built in `<path>.partial`, flushed after every clip, and renamed over `<path>` when
every requested clip is there (a partial file that no longer opens is discarded); later clips are added to the
whole file in place, each flushed with `complete` set last, so a clip cut short is dropped on the next run (a file
left unreadable by a crash in the middle of a write is discarded and rebuilt). Run the same command again to
resume. Concurrency: the build holds an exclusive
`fcntl.flock` on `<path>.lock`, so two evaluations of the same shards take turns (the second waits, saying so,
then finds the clips the first one cached).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import h5py
import numpy as np

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]  # array name -> value, for one clip
# a clip's arrays (empty for a failure), the sha256 of what they were computed from, and why it failed (or None)
Cached = tuple[Arrays, str | None, str | None]


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


def group_name(clip_id: str) -> str:
    return "id=" + quote(clip_id, safe="")  # '/' would nest groups; the prefix keeps '.' and '' valid names


def _encode(protocol: Mapping[str, Any]) -> str:
    return json.dumps(protocol, sort_keys=True)


def stored_protocol(handle: h5py.File) -> str | None:
    value = handle.attrs.get("protocol")
    return value.decode() if isinstance(value, bytes) else value


MAX_ARRAY_BYTES = 1 << 28  # a cached embedding or logits array is KiB; a dataset declared larger is damage, unread


def read_arrays(handle: h5py.File, digest_attr: str = "source_sha256") -> dict[str, Cached]:
    """The complete clips of an open cache file: {id: (arrays, source sha256 or None, failure reason or None)}. A
    clip with a dataset declared larger than MAX_ARRAY_BYTES is left out (computed again): h5py would allocate, and
    fill, all that the header claims (the cache travels with a shards folder someone hands over)."""
    out: dict[str, Cached] = {}
    for group in handle["clips"].values():
        if any(getattr(group[key], "nbytes", 0) > MAX_ARRAY_BYTES for key in group):
            log.warning("%s: clip %s: a cached array claims more than %d bytes: damaged, computed again",
                        handle.filename, group.attrs.get("id"), MAX_ARRAY_BYTES)
            continue
        if group.attrs.get("complete", False):
            digest, failure = group.attrs.get(digest_attr), group.attrs.get("failure")
            out[str(group.attrs["id"])] = ({key: group[key][()] for key in group}, None if digest is None else str(digest),
                                           None if failure is None else str(failure))
    return out


def _matching(path: Path, protocol: Mapping[str, Any], digest_attr: str) -> dict[str, Cached] | None:
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as handle:
            if stored_protocol(handle) != _encode(protocol):
                log.info("%s: protocol or checkpoint changed, rebuilding the cache", path)
                return None
            return read_arrays(handle, digest_attr)
    except (OSError, KeyError, AttributeError, TypeError) as error:  # cut short by a crash; `clips` not a group
        log.warning("%s: unreadable (%s), discarding it", path, error)
        return None


def _write(handle: h5py.File, clip_id: str, arrays: Mapping[str, np.ndarray], digest: str | None,
           failure: str | None, digest_attr: str) -> None:
    name = group_name(clip_id)
    if name in handle["clips"]:
        del handle["clips"][name]
    group = handle["clips"].create_group(name)
    group.attrs["id"] = clip_id
    if digest is not None:
        group.attrs[digest_attr] = digest
    if failure is not None:
        group.attrs["failure"] = failure
    for key, value in arrays.items():
        group.create_dataset(key, data=np.asarray(value))
    group.attrs["complete"] = True  # last: a clip without it was cut short and is not trusted
    handle.flush()


Shape = tuple[int | None, ...]  # an array's expected shape; None: any length on that axis


def damage(arrays: Arrays, keys: Collection[str] | Mapping[str, Shape]) -> str | None:
    """Why a cached clip's arrays cannot be what was computed (None: they can): a name of `keys` missing, an array
    of another shape than `keys` gives it (when `keys` maps names to shapes), or one that is not floating point
    (every cached array is an embedding or logits). NaN is no sign of damage: an embedder can give it (a float16
    overflow), and the metrics refuse it with a reason naming the clip."""
    for key in keys:
        if key not in arrays:
            return f"no {key!r}"
        want = keys[key] if isinstance(keys, Mapping) else None
        shape = np.shape(arrays[key])
        if want is not None and (len(shape) != len(want) or any(w not in (None, n) for w, n in zip(want, shape))):
            return f"{key!r} has shape {shape}, not {tuple('any' if w is None else w for w in want)}"
    for key, value in arrays.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            return f"{key!r} is {value.dtype}, not floating point"
    return None


def cached_arrays(path: str | Path, protocol: Mapping[str, Any], wanted: Mapping[str, str | None],
                  compute: Callable[[list[str]], Iterable[tuple[str, Arrays | str]]],
                  header: Mapping[str, Any] | None = None,
                  digest_attr: str = "source_sha256", keys: Collection[str] | Mapping[str, Shape] = ()
                  ) -> tuple[dict[str, Arrays], dict[str, str]]:
    """({clip id: arrays}, {clip id: why it failed}) for the clips of `wanted` ({id: sha256 of its source, or
    None}), from the cache at `path` where present and current, else from `compute(ids still to do)`, which
    yields (id, arrays) or (id, failure reason) in any order. A failure is cached too (with its source hash): it
    is returned again, not recomputed, until its source changes. `header`: readable copies of protocol values
    written as file attributes; `digest_attr`: the clip attribute holding the source hash; `keys`: the arrays
    every computed clip has (or a map of them to their shapes). A cached clip that lacks one, holds one of another
    shape, or one that is not floating point (`damage`: a file edited or written by something else), is computed
    again, with a warning.

    New clips are added in place to a whole file of the same protocol (each clip flushed, `complete` set last);
    a file of another protocol, or none, is built in `<path>.partial` and renamed over `<path>` when whole."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    warned: set[str] = set()

    def trusted(cached: dict[str, Cached] | None, where: Path) -> dict[str, Cached] | None:
        """The clips read from a file, less those `damage` finds fault with (said once each); clips computed by
        this call are not checked: what the embedder gave is what the metrics judge."""
        if cached is None:
            return None
        kept = {}
        for clip_id, entry in cached.items():
            problem = None if entry[2] is not None else damage(entry[0], keys)
            if problem is None:
                kept[clip_id] = entry
            elif clip_id not in warned:
                warned.add(clip_id)
                log.warning("%s: cached clip %r is damaged (%s); computing it again", where, clip_id, problem)
        return kept

    def current(cached: Mapping[str, Cached], clip_id: str) -> bool:
        return clip_id in cached and (wanted[clip_id] is None or cached[clip_id][1] == wanted[clip_id])

    def result(cached: Mapping[str, Cached]) -> tuple[dict[str, Arrays], dict[str, str]]:
        done = [clip_id for clip_id in wanted if current(cached, clip_id)]
        return ({clip_id: cached[clip_id][0] for clip_id in done if cached[clip_id][2] is None},
                {clip_id: str(cached[clip_id][2]) for clip_id in done if cached[clip_id][2] is not None})

    finished = trusted(_matching(path, protocol, digest_attr), path)
    if finished is not None and all(current(finished, clip_id) for clip_id in wanted):
        return result(finished)
    path.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(path):
        finished = trusted(_matching(path, protocol, digest_attr), path)  # another process may have built it meanwhile
        if finished is not None and all(current(finished, clip_id) for clip_id in wanted):
            return result(finished)
        target = path if finished is not None else partial  # a whole file grows in place
        resumed = finished if finished is not None else trusted(_matching(partial, protocol, digest_attr), partial)
        if resumed is None and partial.exists():
            partial.unlink()
        with h5py.File(target, "a") as handle:
            if resumed is None:
                handle.attrs["protocol"] = _encode(protocol)
                for key, value in (header or {}).items():
                    handle.attrs[key] = value
                handle.require_group("clips")
                resumed = {}
            for name in [n for n, g in handle["clips"].items() if not g.attrs.get("complete", False)]:
                del handle["clips"][name]  # cut short by a crash
            todo = [clip_id for clip_id in wanted if not current(resumed, clip_id)]
            changed = sum(clip_id in resumed for clip_id in todo)  # damaged clips were dropped by `trusted`
            if changed:
                log.warning("%s: the source of %d cached clips changed; computing them again", path, changed)
            if resumed:
                log.info("%s: %d clips cached, %d to compute", path, len(resumed), len(todo))
            for clip_id, value in _checked(compute(todo), set(todo)):
                arrays, failure = ({}, value) if isinstance(value, str) else (value, None)
                _write(handle, clip_id, arrays, wanted[clip_id], failure, digest_attr)
                resumed[clip_id] = (arrays, wanted[clip_id], failure)
        if target == partial:
            os.replace(partial, path)
    return result(resumed)


def _checked(pairs: Iterable[tuple[str, Arrays | str]], todo: set[str]) -> Iterator[tuple[str, Arrays | str]]:
    for clip_id, arrays in pairs:
        if clip_id not in todo:
            raise ValueError(f"computed a clip that was not asked for: {clip_id!r}")
        yield clip_id, arrays
