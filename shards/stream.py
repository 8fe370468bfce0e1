"""Reading a shard file member by member, and the record that says what a complete shard holds.

Every reader of this package goes through `read_raw`, which guarantees, before any member is decoded:
- each tar member is a regular file named `<key>.<ext>` (no directory part) with an `ext` the schema knows: links,
  devices, directories, `__*` names and any other member are refused (webdataset's `__key__` / `__url__` are added
  by the reader, never read from the tar);
- a member is never larger than the schema allows it to be (so a forged size cannot make a reader allocate it);
- every sample holds its `json`, its `flac` and (given the folder's spec) the arrays of its schema version;
- the shard matches its record: `<shard>.json`, written by `ShardWriter` with the number of samples, the byte size
  and the SHA-256 of the tar. A shard cut short (even exactly at a sample boundary, where the tar itself still
  reads cleanly) or altered is an error naming it. The size is checked before the first sample, the count and
  checksum when the shard has been read through.

Crash safety of the record: the writer makes the record visible (atomic rename) before it renames the shard into
place, so every `.tar` this code wrote has its record; a crash between the two renames leaves a record without a
shard (deleted by `remove_partial`, overwritten by the next writer of that index). A shard without a record was
therefore written before records existed (an older folder): it is read unchecked and `verify` says so.

Every error is a `ShardFormatError` whose message names the shard (and the sample key where there is one).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Iterator
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

from shards.schema import ARRAY_KEYS, AUDIO_KEY, META_KEY, SAMPLE_KEYS, ShardFormatError, ShardSpec, decode_sample, validate_decoded

RECORD_SUFFIX = ".json"  # train-000-000000.tar -> train-000-000000.tar.json
MAX_JSON_BYTES = 1 << 20
NPY_HEADER_BYTES = 1 << 16  # far above any header np.save writes for the schema's arrays


def record_path(shard: Path) -> Path:
    return shard.with_name(shard.name + RECORD_SUFFIX)


class HashingWriter:
    """A write-only file wrapper that counts and hashes what passes through it (the writer's checksum costs no
    second read of the shard)."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)


class _HashingReader:
    def __init__(self, file: BinaryIO):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def write_record(shard: Path, samples: int, sha256: str, size: int) -> None:
    """Write `<shard>.json` atomically (temporary file, fsync, rename); the caller fsyncs the directory."""
    final = record_path(shard)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"samples": samples, "sha256": sha256, "bytes": size}, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)


def read_record(shard: Path) -> dict[str, Any] | None:
    """The record of a shard, None when it has none (an older folder); ShardFormatError when it is malformed."""
    path = record_path(shard)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardFormatError(f"{path}: unreadable shard record ({error})") from None
    if not (isinstance(record, dict) and all(isinstance(record.get(k), t) and not isinstance(record.get(k), bool)
                                             for k, t in (("samples", int), ("bytes", int), ("sha256", str)))):
        raise ShardFormatError(f"{path}: shard record lacks samples, bytes or sha256")
    return record


# the first bytes of a compressed file: a shard someone gzip'd is named as such, not as a tar with a bad checksum
COMPRESSIONS = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def unreadable(path: Path, reason: object) -> ShardFormatError:
    """The error for a shard the tar reader refused, saying so when the file is compressed (shards are plain tar)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(6)
    except OSError:
        head = b""
    kind = next((name for magic, name in COMPRESSIONS.items() if head.startswith(magic)), None)
    note = f"; the file is {kind}-compressed, and shards are plain tar files" if kind else ""
    return ShardFormatError(f"{path}: unreadable shard ({reason}){note}")


def checked_record(path: Path) -> dict[str, Any] | None:
    """The shard's record (`read_record`) after checking the shard's size against it: ShardFormatError naming the
    shard when it was cut short (also exactly at a sample's end, where a tar reader sees a whole archive) or
    altered."""
    record = read_record(path)
    try:
        status = path.stat()
    except OSError as error:
        raise ShardFormatError(f"{path}: unreadable shard ({error})") from None
    if not stat.S_ISREG(status.st_mode):  # a pipe would block its reader, a device (/dev/zero) never end
        kind = "a folder" if stat.S_ISDIR(status.st_mode) else "a pipe" if stat.S_ISFIFO(status.st_mode) else "a device"
        raise ShardFormatError(f"{path}: {kind}, not a shard file")
    size = status.st_size
    if record is not None and size != record["bytes"]:
        raise ShardFormatError(f"{path}: shard has {size} bytes, its record says {record['bytes']} (cut short or "
                               f"altered after it was written)")
    return record


def member_limit(ext: str, spec: ShardSpec | None) -> int | None:
    """The most bytes a member `ext` may have under `spec` (None: no spec, no bound)."""
    if ext == META_KEY:
        return MAX_JSON_BYTES
    if spec is None:
        return None
    if ext in ARRAY_KEYS:
        return NPY_HEADER_BYTES + 2 * prod(spec.expected_shapes(spec.max_nouns).get(ext, (0,)))
    return 4 * spec.num_samples + (1 << 20)  # flac: 16-bit PCM compressed, with room for frame headers


def _allowed(spec: ShardSpec | None) -> tuple[str, ...]:
    return SAMPLE_KEYS if spec is None else (META_KEY, *spec.array_keys, AUDIO_KEY)


def _required(spec: ShardSpec | None) -> tuple[str, ...]:
    return (META_KEY, AUDIO_KEY) if spec is None else (META_KEY, *spec.array_keys, AUDIO_KEY)


def check_member(path: Path, member: tarfile.TarInfo, allowed: tuple[str, ...]) -> tuple[str, str]:
    """(key, ext) of a member the schema allows; ShardFormatError naming the shard and the member otherwise."""
    if not member.isfile():
        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "directory" if member.isdir() \
            else "special file"
        raise ShardFormatError(f"{path}: member {member.name!r} is a {kind}, not a regular file: refused")
    key, _, ext = member.name.partition(".")
    if "/" in member.name or not key:
        raise ShardFormatError(f"{path}: member {member.name!r} is not named <key>.<ext>: refused")
    if ext not in allowed:
        note = " (__key__ and __url__ are added by the reader, never tar members)" if ext.startswith("__") else ""
        raise ShardFormatError(f"{path}: sample {key!r}: unknown member {ext!r}: refusing to decode it "
                               f"(only {', '.join(allowed)}){note}")
    return key, ext


def read_raw(path: Path, spec: ShardSpec | None = None) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard ({"__key__", "__url__", ext: bytes}) in tar order, with the guarantees of the
    module docstring. Nothing is written to disk and nothing is decoded here."""
    record = checked_record(path)
    allowed, required = _allowed(spec), _required(spec)
    count = 0
    sample: dict[str, Any] = {}
    seen: set[str] = set()  # the keys of the samples read

    def finish() -> dict[str, Any]:
        missing = [k for k in required if k not in sample]
        if missing:
            raise ShardFormatError(f"{path}: sample {sample['__key__']!r} lacks {', '.join(missing)}")
        return sample

    try:
        with open(path, "rb") as file:
            reader = _HashingReader(file)
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    key, ext = check_member(path, member, allowed)
                    limit = member_limit(ext, spec)
                    if limit is not None and member.size > limit:
                        raise ShardFormatError(f"{path}: sample {key!r}: member {ext!r} has {member.size} bytes, "
                                               f"more than the schema allows ({limit})")
                    if sample and key != sample["__key__"]:
                        yield finish()
                        count += 1
                        seen.add(sample["__key__"])
                        sample = {}
                    if not sample and key in seen:  # another sample of a key already read (or a member split off)
                        raise ShardFormatError(f"{path}: sample {key!r} appears twice in the shard")
                    if ext in sample:
                        raise ShardFormatError(f"{path}: sample {key!r}: member {ext!r} appears twice")
                    handle = tar.extractfile(member)
                    sample |= {"__key__": key, "__url__": str(path), ext: handle.read() if handle else b""}
                if sample:
                    yield finish()
                    count += 1
            reader.drain()
    except (tarfile.TarError, OSError) as error:
        raise unreadable(path, error) from None
    if record is not None and count != record["samples"]:
        raise ShardFormatError(f"{path}: shard holds {count} samples, its record says {record['samples']}")
    if record is not None and reader.sha256.hexdigest() != record["sha256"]:
        raise ShardFormatError(f"{path}: shard checksum differs from its record (altered after it was written)")


def decode_checked(raw: dict[str, Any], spec: ShardSpec | None) -> dict[str, Any]:
    """Decode a raw sample and (given the spec) validate it; ShardFormatError naming the shard and the key."""
    try:
        sample = decode_sample(raw, spec)
        if spec is not None:
            validate_decoded(spec, sample)
    except ShardFormatError as error:
        raise ShardFormatError(f"{raw.get('__url__', '?')}: sample {raw.get('__key__')!r}: {error}") from None
    return sample
