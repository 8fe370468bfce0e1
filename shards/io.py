"""Writing and reading shard files.

Crash safety: a shard is written under a temporary name, flushed, fsynced and renamed, so a
reader (and a resumed run) only ever sees complete `.tar` files. Before that rename its record
(`<shard>.json`: sample count, byte size, SHA-256; `shards.stream`) is made visible the same way, so
every shard this code wrote carries a record and a shard cut or altered later is detected. A killed
writer leaves at most a `*.tar.tmp` (and possibly the record of that shard without the shard), which
the next run deletes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import webdataset as wds

from shards.schema import ShardFormatError, ShardSpec
from shards.stream import RECORD_SUFFIX, HashingWriter, decode_checked, read_raw, record_path, write_record

log = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<rank>\d{3})-(?P<index>\d{6})\.tar$")
META_FILE = "meta.json"
FAILURES_FILE = "failures.jsonl"


def shard_name(split: str, rank: int, index: int) -> str:
    return f"{split}-{rank:03d}-{index:06d}.tar"


def list_shards(directory: str | os.PathLike[str], split: str | None = None) -> list[Path]:
    """Complete shards in a directory (temporary files excluded), sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.iterdir()):
        match = SHARD_PATTERN.match(path.name)
        if match and (split is None or match["split"] == split):
            found.append(path)
    return found


class ShardWriter:
    """Writes samples into `{split}-{rank}-{NNNNNN}.tar` shards, each made visible only when complete."""

    def __init__(self, directory: str | os.PathLike[str], split: str, rank: int, max_samples: int, start_index: int = 0):
        self.directory = Path(directory)
        self.split = split
        self.rank = rank
        self.max_samples = max_samples
        self.index = start_index
        self._tar: wds.TarWriter | None = None
        self._file: Any = None
        self._hashing: HashingWriter | None = None
        self._tmp: Path | None = None
        self._count = 0
        self.completed: list[Path] = []

    @property
    def pending(self) -> int:
        """Samples written into the shard in progress (not yet visible)."""
        return self._count if self._tar is not None else 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._tar.write(sample)
        self._count += 1
        if self._count >= self.max_samples:
            self.flush()

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        while (self.directory / shard_name(self.split, self.rank, self.index)).exists():
            self.index += 1
        self._tmp = self.directory / (shard_name(self.split, self.rank, self.index) + ".tmp")
        self._file = open(self._tmp, "wb")
        self._hashing = HashingWriter(self._file)
        self._tar = wds.TarWriter(self._hashing, encoder=False)
        self._count = 0

    def flush(self) -> Path | None:
        """Close the shard in progress and make it visible, its record first; returns its final path."""
        if self._tar is None:
            return None
        assert self._tmp is not None and self._hashing is not None
        self._tar.close()  # closes the tar stream; the file object stays ours
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.directory / shard_name(self.split, self.rank, self.index)
        write_record(final, self._count, self._hashing.sha256.hexdigest(), self._hashing.size)
        os.replace(self._tmp, final)
        # visible from here on: counted as written before the directory's fsync, which may still fail (EIO)
        self._tar = self._file = self._tmp = self._hashing = None
        self.index += 1
        self.completed.append(final)
        _fsync_directory(self.directory)
        return final

    def close(self) -> None:
        self.flush()

    def abort(self) -> None:
        """Drop the shard in progress (a write failed half-way, so it may hold a partial sample). Never raises: the
        error that made the caller abort is the one to report (closing a file on a full disk fails again)."""
        if self._tar is not None:
            with contextlib.suppress(OSError, ValueError):
                self._file.close()
            # the dropped tar stream flushes what it buffers when it is collected: into nothing, not the closed file
            # ("Exception ignored in: <function _Stream.__del__> ... write to closed file" after the error's line)
            if self._hashing is not None:
                self._hashing.file = typing.cast(BinaryIO, _Discard())
            if self._tmp is not None:
                with contextlib.suppress(OSError):
                    self._tmp.unlink(missing_ok=True)
            self._tar = self._file = self._tmp = self._hashing = None


class _Discard:
    """A write-only file that keeps nothing."""

    def write(self, data: bytes) -> int:
        return len(data)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial(directory: str | os.PathLike[str], rank: int | None = None) -> list[Path]:
    """Delete what a killed writer (of one rank, or of all) left: `*.tar.tmp`, and records whose shard was never
    renamed into place (`orphan_records`)."""
    removed = []
    for path in Path(directory).glob("*.tar.tmp"):
        match = SHARD_PATTERN.match(path.name[: -len(".tmp")])
        if match and (rank is None or int(match["rank"]) == rank):
            path.unlink(missing_ok=True)
            removed.append(path)
    for path in orphan_records(directory):
        match = SHARD_PATTERN.match(path.name[: -len(RECORD_SUFFIX)])
        if match and (rank is None or int(match["rank"]) == rank):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def orphan_records(directory: str | os.PathLike[str]) -> list[Path]:
    """Shard records without their shard: a writer was killed between the record's rename and the shard's."""
    found = []
    for path in sorted(Path(directory).glob(f"*.tar{RECORD_SUFFIX}")):
        shard = path.with_name(path.name[: -len(RECORD_SUFFIX)])
        if SHARD_PATTERN.match(shard.name) and not shard.exists():
            found.append(path)
    return found


def unrecorded_shards(directory: str | os.PathLike[str]) -> list[Path]:
    """Complete shards without a record: written before shards carried records (read, but not checked)."""
    return [p for p in list_shards(directory) if not record_path(p).exists()]


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line with a single O_APPEND write (atomic for concurrent writers on a local disk). A file whose
    last line a crash cut short (no newline at its end) gets one first, so the new line is not glued onto it."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a line that is not JSON (cut short by a crash, or edited) is skipped, and so is
    one that is not a JSON object (every reader expects objects), each with a warning naming file and line."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            log.warning("%s:%d: not JSON (a line cut short by a crash?); skipped", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            log.warning("%s:%d: not a JSON object; skipped", path, number)
    return records


# ----------------------------------------------------------------------------------- reading
def require_stage_one_folder(directory: str | os.PathLike[str]) -> Path:
    """`directory` as a Path when it holds a meta.json; ShardFormatError saying what it is otherwise (no folder,
    a file, a folder without meta.json)."""
    folder = Path(directory)
    if not (folder / META_FILE).exists():
        if not folder.is_dir():
            raise ShardFormatError(f"{folder}: {'not a folder' if folder.exists() else 'folder not found'}")
        raise ShardFormatError(f"{folder / META_FILE}: missing (not a stage-one output folder?)")
    return folder


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = require_stage_one_folder(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ShardFormatError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("spec", {}), dict):
        raise ShardFormatError(f"{path}: unreadable (not a JSON object with a 'spec' object)")
    return meta


def recorded_model(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """meta.json's record of model `name` ("models": {"clip" | "grounding" | "vae": {"checksum", ...}}); {} when
    the folder records none (older folders) or records it in another shape."""
    models = meta.get("models")
    entry = models.get(name) if isinstance(models, dict) else None
    return entry if isinstance(entry, dict) else {}


def config_differs(recorded: dict[str, Any], config_checksum: str | None) -> bool:
    """Whether a model loaded now, whose config files have `config_checksum` (None: none), differs from
    `recorded_model`'s record in its config, preprocessor or tokenizer files. A record without "config_checksum"
    (a folder written before it was recorded) compares nothing."""
    return "config_checksum" in recorded and recorded["config_checksum"] != config_checksum


def read_spec(directory: str | os.PathLike[str]) -> ShardSpec:
    meta = read_meta(directory)
    if "spec" not in meta:
        raise ShardFormatError(f"{Path(directory) / META_FILE}: no 'spec' (not written by stage one?)")
    try:
        return ShardSpec.from_dict(meta["spec"])
    except ShardFormatError as error:
        raise ShardFormatError(f"{Path(directory) / META_FILE}: {error}") from None
    except TypeError as error:  # a field missing from the spec
        raise ShardFormatError(f"{Path(directory) / META_FILE}: spec {error}") from None


def iterate_samples(paths: list[Path] | list[str], spec: ShardSpec | None = None) -> Iterator[dict[str, Any]]:
    """Decode the samples of some shards in order (one process; the trainer's streams are `shards.read.range_stream`).

    Every shard is read by `shards.stream.read_raw` (members refused, records checked); given the folder's spec,
    each sample is validated against it too. Errors name the shard and the sample key."""
    for path in paths:
        for raw in read_raw(Path(path), spec):
            yield decode_checked(raw, spec)
