"""One writer per output folder: an exclusive `fcntl.flock` on `<folder>/.lock`, held for as long as a command writes
there (a training run, an evaluation). A second command given the same folder while the first still runs stops at
once with one line, before it writes anything: two writers would delete each other's unfinished files and
interleave checkpoints.

The lock goes with the process, so a killed run leaves nothing to clean up, with one delay: processes it forked
(DataLoader workers) hold the lock file open, and so the lock, until they notice and exit (seconds). The holder
writes its pid into the file; a lock held although that pid is gone is waited for (up to `LEFTOVER_WAIT_S`,
saying so), not refused. The empty lock file stays (deleting it would let a third process lock a different file
of the same name)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
LEFTOVER_WAIT_S = 60.0  # how long the processes left by a killed holder may take to exit
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # file systems without flock (some network mounts)


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


def _holder(handle: IO[bytes]) -> int | None:
    """The pid the lock file names (None when it names none)."""
    try:
        text = os.pread(handle.fileno(), 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Whether a process of that id exists on this machine (another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process of that pid; an id no process can have
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: Path, what: str, name: str = LOCK_FILE) -> Iterator[None]:
    """Hold `folder`/`name` (.lock) exclusively while the block runs; FolderBusy at once when a running process
    holds it. `what` names the command in the message ("training", "evaluation"). A file system without locks
    runs unlocked."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "a+b") as handle:
        locked = True
        deadline = None
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(handle)
                if holder is None or alive(holder):
                    raise FolderBusy(f"{folder}: another {what} is writing into this folder"
                                     + (f" (pid {holder})" if holder is not None else "")
                                     + "; wait for it to end, or choose another folder") from None
                if deadline is None:  # its holder was killed; its children still hold the file open
                    deadline = time.monotonic() + LEFTOVER_WAIT_S
                    log.warning("%s: waiting for the processes left by a killed %s (pid %d) to exit", folder, what,
                                holder)
                elif time.monotonic() > deadline:
                    raise FolderBusy(f"{folder}: still locked {LEFTOVER_WAIT_S:.0f} s after its holder (pid {holder}) "
                                     "ended: processes it left hold the lock file; end them, or choose another folder"
                                     ) from None
                time.sleep(0.2)
            except OSError as error:
                if error.errno not in NO_LOCKS:
                    raise
                locked = False
                break
        if locked:
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n".encode())
            handle.flush()
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)
