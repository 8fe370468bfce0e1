"""One writer per output folder: an exclusive `fcntl.flock` on `<folder>/.lock`, held for as long as a command writes
there (a training run, an evaluation). A second command given the same folder while the first still runs stops at
once with one line, before it writes anything: two writers would delete each other's unfinished files and
interleave checkpoints. The lock goes with the process, so a killed run leaves nothing to clean up; the empty lock
file stays (deleting it would let a third process lock a different file of the same name)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder`/.lock exclusively while the block runs; FolderBusy at once when another process holds it.
    `what` names the command in the message ("training", "evaluation"). A file system without locks (some network
    mounts answer ENOLCK) runs unlocked."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"{folder}: another {what} is writing into this folder; wait for it to end, or choose "
                             "another folder") from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
