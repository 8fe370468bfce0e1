"""The signals on which the long jobs stop in order, and what their worker processes do with them.

A scheduler stops a job with SIGTERM (`scancel`, a preemption, a time limit; `timeout`), and SLURM's
`--signal=USR1@<seconds>` sends SIGUSR1 ahead of the time limit. Stage one closes the shard in progress and exits;
training checkpoints the step it reached (`train.trainer.StopRequests`). Their DataLoader workers ignore both: a
scheduler signals the job's whole process group, and a worker that died of the signal broke off its parent's orderly
stop (training ended with no checkpoint, stage one printed DataLoader's "worker is killed by signal" traceback).
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker: int | None = None) -> None:
    """Ignore STOP_SIGNALS in this process (a DataLoader `worker_init_fn`: the process that owns the worker acts)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
