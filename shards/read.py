"""Reading shard folders: the one way the stages open shard files.

- `iter_meta` / `read_split`: the `SampleMeta` of every sample (of a split), reading only the small json members.
- `shard_index`: the sample keys of one shard with their `SampleMeta`, forgiving a json member that does not parse
  (what stage one's resume counts as made).
- `iter_split`: decoded samples of a split (optionally only some clip ids), in shard order.
- `iter_member`: (meta, raw bytes of one member) per sample of a split, e.g. the `flac` of the clips still to embed,
  reading only the json and that member (tarfile seeks over the features).
- `sample_stream`: the WebDataset pipeline of decoded samples of a split that the trainer's data loader wraps
  (shuffled shards and buffer, split across ranks and workers).

A shard that cannot be read is a `ShardFormatError` naming the file and the reason. Decoded samples come through
`shards.stream.read_raw` (members refused, shard records checked) and are validated against the folder's spec.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tarfile
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from shards.io import list_shards, read_spec, require_stage_one_folder
from shards.schema import META_KEY, SAMPLE_KEYS, SampleMeta, ShardFormatError, ShardSpec
from shards.stream import (
    MAX_JSON_BYTES,
    check_member,
    checked_record,
    decode_checked,
    member_limit,
    read_raw,
    unreadable,
)

Folder = str | os.PathLike[str]


def split_shards(folder: Folder, split: str) -> list[Path]:
    """Shards that may hold `split`: stage one names its shards after the split (`{split}-...tar`); a folder whose
    shards are named otherwise is read whole (samples are then selected by their json 'split')."""
    return list_shards(folder, split) or list_shards(folder)


def _members(path: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, str, bytes]]:
    """(sample key, member extension, bytes) of the members of one shard whose extension `wanted` accepts, in tar
    order; the others are skipped unread. ShardFormatError naming the shard when it cannot be read or holds a member
    the schema refuses (a link, an unknown name), or when its size or sample count differs from its record (a
    shard cut at a sample's end reads as a whole, shorter archive)."""
    record = checked_record(path)
    keys = 0
    last = None
    try:
        with _no_memory_error(path), tarfile.open(path, "r:") as tar:  # plain tar, as shards are written
            for member in tar:
                key, ext = check_member(path, member, SAMPLE_KEYS)
                if key != last:
                    keys, last = keys + 1, key
                if not wanted(ext):
                    continue
                limit = member_limit(ext, None)
                if limit is not None and member.size > limit:  # tarfile would allocate what the header claims
                    raise ShardFormatError(f"{path}: sample {key!r}: member {ext!r} has {member.size} bytes, more "
                                           f"than the schema allows ({limit})")
                handle = tar.extractfile(member)
                yield key, ext, handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError) as error:
        raise unreadable(path, error) from None
    if record is not None and keys != record["samples"]:
        raise ShardFormatError(f"{path}: shard holds {keys} samples, its record says {record['samples']}")


@contextlib.contextmanager
def _no_memory_error(path: Path) -> Iterator[None]:
    """A tar header that claims a huge size (a GNU long name of 2**45 bytes: tarfile reads it whole) as the shard's
    ShardFormatError, not a MemoryError traceback."""
    try:
        yield
    except MemoryError:
        raise ShardFormatError(f"{path}: unreadable shard (a tar header claims more bytes than memory holds)") from None


def shard_index(path: Path) -> dict[str, SampleMeta | None]:
    """The sample keys of one shard, in tar order, each with its SampleMeta (None where its json member does not parse
    or is larger than the schema allows), in one pass over the tar headers and the small json members (tarfile seeks over
    the features). A key counts when its json member is there: unlike `iter_meta`, neither the shard's record nor its
    other member names are checked (stage one's resume, which must not make a clip twice). Errors opening or walking
    the tar propagate (tarfile's errors, OSError)."""
    index: dict[str, SampleMeta | None] = {}
    with _no_memory_error(path), tarfile.open(path, "r") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext != META_KEY:
                continue
            index[key] = None
            handle = tar.extractfile(member) if member.size <= MAX_JSON_BYTES else None
            if handle is not None:
                with contextlib.suppress(ShardFormatError):
                    index[key] = _meta(path, key, handle.read())
    return index


def _meta(path: Path, key: str, data: bytes) -> SampleMeta:
    """The SampleMeta of sample `key`'s json member; ShardFormatError naming the shard and the sample."""
    try:
        found = json.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError; too deep or too many digits
        raise ShardFormatError(f"{path}: sample {key!r}: its json member is not JSON ({type(error).__name__}: "
                               f"{error})") from None
    try:
        return SampleMeta.from_json(found)
    except ShardFormatError as error:
        raise ShardFormatError(f"{path}: sample {key!r}: {error}") from None


def iter_meta(paths: Iterable[Path]) -> Iterator[SampleMeta]:
    """The `SampleMeta` of every sample of these shards, in order (only json members are read)."""
    for path in paths:
        for key, _, data in _members(path, lambda ext: ext == META_KEY):
            yield _meta(path, key, data)


def read_split(folder: Folder, split: str) -> list[SampleMeta]:
    """The samples of `split` in a stage-one output folder, in shard order (only json members are read)."""
    return [meta for meta in iter_meta(split_shards(require_stage_one_folder(folder), split)) if meta.split == split]


def iter_split(folder: Folder, split: str, ids: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of `split` (only the clips `ids` when given), in shard order."""
    wanted = None if ids is None else set(ids)
    folder = require_stage_one_folder(folder)
    spec = read_spec(folder)
    for path in split_shards(folder, split):
        for raw in read_raw(path, spec):
            meta = _meta(path, raw["__key__"], raw[META_KEY])  # only the json is parsed for the samples left out
            if meta.split == split and (wanted is None or meta.id in wanted):
                yield decode_checked(raw, spec)


def _samples(path: Path, exts: Collection[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(sample key, {ext: bytes}) of each sample of one shard, with its members `exts`. WebDataset keeps a sample's
    members together, so a sample is complete when the key changes."""
    key: str | None = None
    found: dict[str, bytes] = {}
    for name, ext, data in _members(path, lambda ext: ext in exts):
        if name != key and found and key is not None:
            yield key, found
            found = {}
        key, found[ext] = name, data
    if found and key is not None:
        yield key, found


def iter_member(folder: Folder, split: str, member: str, ids: Collection[str] | None = None
                ) -> Iterator[tuple[SampleMeta, bytes]]:
    """(meta, bytes of `member`) of each sample of `split` (only the clips `ids` when given) that has that member,
    in shard order, reading only the json and that member."""
    wanted = None if ids is None else set(ids)
    for path in split_shards(require_stage_one_folder(folder), split):
        for key, found in _samples(path, (META_KEY, member)):
            if META_KEY not in found or member not in found:
                continue
            meta = _meta(path, key, found[META_KEY])
            if meta.split == split and (wanted is None or meta.id in wanted):
                yield meta, found[member]


def _split_of(raw: dict[str, Any]) -> str:
    """The split a raw sample's json names; ShardFormatError naming shard and key when the json is not a valid
    `SampleMeta` (a sample is never dropped for want of a readable split)."""
    try:
        return SampleMeta.from_json(json.loads(raw[META_KEY].decode("utf-8"))).split
    except (ValueError, RecursionError) as error:  # not JSON, too deep, too many digits, or not a SampleMeta
        raise ShardFormatError(f"{raw.get('__url__', '?')}: sample {raw.get('__key__')!r}: json: {error}") from None


class _Pipeline(wds.DataPipeline, wds.compat.FluidInterface):
    """A webdataset pipeline with the fluid methods (`select`, `shuffle`, `slice`, `map`)."""


def _read_shards(spec: ShardSpec | None) -> Callable[[Iterable[dict[str, Any]]], Iterator[dict[str, Any]]]:
    def stage(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in sources:
            yield from read_raw(Path(source["url"]), spec)
    return stage


def sample_stream(urls: list[str], split: str, shuffle_buffer: int, seed: str, skip: int = 0,
                  spec: ShardSpec | None = None) -> wds.DataPipeline:
    """Decoded samples of `split` from `urls` in the given shard order: each rank takes every world-th shard
    (`wds.split_by_node`), each DataLoader worker every n-th of those (`wds.split_by_worker`); then a shuffle
    buffer of `shuffle_buffer` samples drawn with `random.Random(f"{seed}-{rank}-{worker}")`, and the first
    `skip` samples dropped before decoding (a resumed epoch). Shards are read by `shards.stream.read_raw` (refused
    members, missing members and a shard that disagrees with its record are errors naming it); members are decoded
    by `decode_sample` (never webdataset's `.decode()`, which unpickles) and, given the folder's `spec`, each sample
    is validated against it: a bad sample is a ShardFormatError naming its shard and key, never dropped."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    # the caller orders the shards (identically on every rank); fewer shards than workers leaves some without any
    dataset = _Pipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker, _read_shards(spec))
    return (
        dataset.select(lambda raw: _split_of(raw) == split)
        .shuffle(shuffle_buffer, rng=random.Random(f"{seed}-{rank}-{worker}"))
        .slice(skip, None)
        .map(lambda raw: decode_checked(raw, spec))
    )
