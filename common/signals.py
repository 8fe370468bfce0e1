"""The signals on which the long jobs stop in order, and what their worker processes do with them.

A scheduler stops a job with SIGTERM (`scancel`, a preemption, a time limit; `timeout`), and SLURM's
`--signal=USR1@<seconds>` sends SIGUSR1 ahead of the time limit. Stage one closes the shard in progress and exits;
training checkpoints the step it reached (`train.trainer.StopRequests`). Their DataLoader workers ignore both: a
scheduler signals the job's whole process group, and a worker that died of the signal broke off its parent's orderly
stop (training ended with no checkpoint, stage one printed DataLoader's "worker is killed by signal" traceback).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def ignore_stop_signals(worker: int | None = None) -> None:
    """Ignore STOP_SIGNALS in this process (a DataLoader `worker_init_fn`: the process that owns the worker acts)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def die_with_parent(parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a no-op elsewhere or without libc): a worker that
    ignores the stop signals would otherwise outlive a SIGKILLed job, holding its files, its shared memory and its
    folder's lock, and the same command could not go on. The request is tied to the parent thread that started the
    worker (the one iterating a DataLoader, or submitting to a ProcessPoolExecutor; with the forkserver start method,
    the fork server, which ends with the job). `parent`: the job's pid; a worker whose job died before the request
    exits at once."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if parent is not None:
        try:
            os.kill(parent, 0)
        except (ProcessLookupError, PermissionError):  # gone (or the id is someone else's process now)
            os._exit(1)


def pool_worker(parent: int) -> None:
    """A worker pool's `initializer` (with initargs=(os.getpid(),)): it dies with the job and leaves the stop signals
    to it."""
    die_with_parent(parent)
    ignore_stop_signals()


@contextlib.contextmanager
def exit_on_stop_signals(output: object) -> Iterator[None]:
    """Inside, STOP_SIGNALS raise SystemExit(128 + the signal), so that the work in progress is closed as on an error
    (`finally` blocks, a shard or a file being written) instead of the process dying at once; such an exit leaving
    says in one line how to go on (`output`: the folder the job writes). The handlers that were there are put back
    after."""
    previous = {signum: signal.signal(signum, lambda signum, frame: sys.exit(128 + signum)) for signum in STOP_SIGNALS}
    try:
        yield
    except SystemExit as stop:
        if isinstance(stop.code, int) and stop.code - 128 in {int(signum) for signum in STOP_SIGNALS}:
            name = signal.Signals(stop.code - 128).name
            print(f"\nterminated ({name}): run the same command again to go on ({output})", file=sys.stderr)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interruptible(main: Callable[[], int | None]) -> int:
    """main()'s exit code, where a Ctrl-C that reaches this far is one line and the shell's code for it (130), not a
    traceback: one pressed while the command still loads its modules (seconds of torch and transformers), before
    its own handling, which says how to go on, begins."""
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def exit_with(main: Callable[[], int | None]) -> None:
    """sys.exit with `interruptible(main)`: the `python -m <package>` entry points."""
    sys.exit(interruptible(main))
