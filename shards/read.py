"""Reading shard folders: the one way the stages open shard files.

- `iter_meta` / `read_split`: the `SampleMeta` of every sample (of a split), reading only the small json members.
- `shard_index`: the sample keys of one shard with their `SampleMeta`, forgiving a json member that does not parse
  (what stage one's resume counts as made).
- `iter_split`: decoded samples of a split (optionally only some clip ids), in shard order.
- `iter_member`: (meta, raw bytes of one member) per sample of a split, e.g. the `flac` of the clips still to embed,
  reading only the json and that member (tarfile seeks over the features).
- `range_stream`: the trainer's data streams: decoded samples of one range of a split's samples
  in a given shard order, through a shuffle buffer.

A shard that cannot be read is a `ShardFormatError` naming the file and the reason. Decoded samples come through
`shards.stream.read_raw` (members refused, shard records checked) and are validated against the folder's spec.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import tarfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

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
    """Shards that may hold `split`: stage one names its shards after the split (`{split}-...tar`); a folder with no
    shard of that name is read whole (samples are then selected by their json 'split'). Files not named like shards
    (`{name}-{rank}-{index}.tar`) are read by no stage (`shards verify` names them)."""
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


def _in_range(shards: Sequence[tuple[str | Path, int]], split: str, start: int, stop: int,
              spec: ShardSpec | None) -> Iterator[dict[str, Any]]:
    """Raw samples number [start, stop) of `split` in the concatenation of `shards`, each given with its count of
    the split's samples: the shards before and after the range are not opened; a shard the range starts in is read
    from its beginning (a tar streams: about one shard more per range), one it ends in up to the range's end (its
    record is then checked by the reader of its end, which reads it whole). ShardFormatError when a shard holds
    fewer samples of the split than its count."""
    offset = 0
    for url, count in shards:
        path = Path(url)
        if count and offset + count > start and offset < stop:  # a shard of none of the split is not opened
            index, end = offset, min(stop, offset + count)
            for raw in read_raw(path, spec):
                if _split_of(raw) != split:
                    continue
                if start <= index < end:
                    yield raw
                index += 1
                if index >= end and end < offset + count:  # the range ends inside this shard
                    break
            if index < end or (end == offset + count and index != end):  # read whole: its count is known
                raise ShardFormatError(f"{path}: holds {index - offset} samples of split {split!r}, {count} when this "
                                       "stream began (the shard changed since)")
        offset += count


def _shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """`items` through a shuffle buffer of `size` items (1: in order), drawn with `rng`."""
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= max(1, size):
            pick = rng.randrange(len(buffer))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def range_stream(shards: Sequence[tuple[str | Path, int]], split: str, start: int, stop: int, shuffle_buffer: int,
                 seed: str, take: int | None = None, skip: int = 0, spec: ShardSpec | None = None
                 ) -> Iterator[dict[str, Any]]:
    """Decoded samples number [start, stop) of `split` in the concatenation of `shards` (in the order given, each
    with its count of the split's samples, from `iter_meta`), through a shuffle buffer of `shuffle_buffer` samples
    drawn with `random.Random(seed)`; the first `take` of those (all: None), of which the first `skip` are dropped
    before decoding (a resumed stream); the rest of the range is read after them, undecoded. The trainer gives each of its data streams one range of an epoch's samples,
    so that every sample is read by exactly one stream. Shards are read by `shards.stream.read_raw` (refused
    members, missing members and a shard that disagrees with its record are errors naming it); members are decoded
    by `decode_sample` (never unpickled) and, given the folder's `spec`, each sample is validated against it: a bad
    sample is a ShardFormatError naming its shard and key, never dropped."""
    raws = _shuffled(_in_range(shards, split, start, stop, spec), shuffle_buffer, random.Random(seed))
    for raw in itertools.islice(raws, skip, take):
        yield decode_checked(raw, spec)
    for _ in raws:  # the rest of the range is read, not decoded: a shard read to its end is checked against its record
        pass
