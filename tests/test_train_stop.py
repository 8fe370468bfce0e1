"""Training stopped by SIGTERM or SIGUSR1 (a scheduler's preemption or time limit): it checkpoints the step it reached
and exits 128 + the signal; the same command resumes it exactly, in one process and across two ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_train_run import SMALL, _state, run
from tests.test_train_support import one_thread, write_shards  # noqa: F401
from train import trainer

REPO = Path(__file__).resolve().parents[1]
STOP = (signal.SIGTERM, signal.SIGUSR1)  # what a scheduler sends ahead of SIGKILL


class Unhandled(Exception):
    pass


@pytest.fixture(autouse=True)
def signals_raise():
    """A stop signal that training does not take itself fails the test instead of ending the test process."""

    def fail(signum, frame):
        raise Unhandled(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, fail) for signum in STOP}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def signal_after_step(monkeypatch, step: int, signum: int) -> None:
    """The process signals itself once the optimizer has taken `step` steps (mid-run, not at a checkpoint)."""
    real = trainer.train_step

    def stepped(run_, *args):
        result = real(run_, *args)
        if run_.progress.step == step:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(trainer, "train_step", stepped)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_checkpoints_the_step_reached_and_the_same_command_resumes_exactly(tmp_path, capsys, monkeypatch,
                                                                                      signum):
    data = tmp_path / "shards"
    write_shards(data, num_shards=2, per_shard=4)
    assert run(data, tmp_path / "a", "--max-steps", "6", "--checkpoint-every", "4") == 0
    handlers = {s: signal.getsignal(s) for s in STOP}
    signal_after_step(monkeypatch, 3, signum)
    assert run(data, tmp_path / "b", "--max-steps", "6", "--checkpoint-every", "4") == 128 + signum
    assert {s: signal.getsignal(s) for s in STOP} == handlers  # put back
    out = capsys.readouterr().out
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step 3; resume state in {tmp_path / 'b/checkpoints/step_00000003'}: run the same " \
           "command again to go on" in out
    steps = sorted(p.name for p in (tmp_path / "b/checkpoints").iterdir())
    assert steps == ["step_00000003"], steps  # the step reached, nothing beyond it
    assert json.loads((tmp_path / "b/checkpoints/step_00000003/progress.json").read_text())["step"] == 3

    monkeypatch.undo()
    assert run(data, tmp_path / "b", "--max-steps", "6", "--checkpoint-every", "4") == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = _state(tmp_path / "a/checkpoints/step_00000006"), _state(tmp_path / "b/checkpoints/step_00000006")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key


def test_a_signal_before_the_first_step_of_a_resumed_run_writes_nothing(tmp_path, capsys, monkeypatch):
    data = tmp_path / "shards"
    write_shards(data, num_shards=1, per_shard=4)
    assert run(data, tmp_path / "run", "--max-steps", "2", "--checkpoint-every", "2") == 0
    before = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    real = trainer.start_run

    def signalled(*args, **kwargs):
        prepared = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # while resuming: no step taken in this process yet
        return prepared

    monkeypatch.setattr(trainer, "start_run", signalled)
    assert run(data, tmp_path / "run", "--max-steps", "4", "--checkpoint-every", "2") == 128 + signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == before
    assert "stopped by SIGTERM at step 2; resume state in" in capsys.readouterr().out


def wait_for(path: Path, lines: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until `path` holds `lines` lines (what --record-ranks appends per sample), or fail with the process's output."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().count("\n") >= lines:
            return
        if process.poll() is not None:
            pytest.fail(f"training ended before the signal: {process.communicate()}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no progress in {timeout} s: {process.communicate()}")


def start(command: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def test_sigterm_to_the_whole_process_group_with_data_workers_stops_with_a_checkpoint(tmp_path):
    """As a scheduler does it: every process of the job (the DataLoader workers too) gets SIGTERM. A worker that died
    of it used to end the run with "DataLoader worker exited unexpectedly" and no checkpoint of the steps since the
    last one."""
    data, out = tmp_path / "shards", tmp_path / "run"
    write_shards(data, num_shards=2, per_shard=4)
    process = start([sys.executable, "-m", "train", "--shards", str(data), "--output", str(out), *SMALL,
                     "--max-steps", "100000", "--checkpoint-every", "100000", "--num-workers", "2", "--record-ranks"])
    wait_for(out / "ranks/ids_rank0.txt", 3 * 2, process)  # 3 steps of batch 2
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].startswith("step_") and not saved[0].endswith(".tmp"), saved
    step = int(saved[0][5:])
    assert step >= 3 and (out / "checkpoints" / saved[0] / "complete").exists()
    assert f"stopped by SIGTERM at step {step}; resume state in" in stdout


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    """Two ranks (torchrun, gloo): SIGUSR1 reaches rank 1 alone; both stop at one step boundary, with one complete
    checkpoint holding both ranks' states, and exit 128 + SIGUSR1."""
    data, out = tmp_path / "shards", tmp_path / "run"
    write_shards(data, num_shards=4, per_shard=4)
    process = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "-m", "train", "--shards", str(data), "--output", str(out), *SMALL,
                     "--max-steps", "100000", "--checkpoint-every", "100000", "--record-ranks"])
    wait_for(out / "ranks/ids_rank1.txt", 3 * 2, process)
    rank1 = None  # rank 1's pid, found among torchrun's children by its environment
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"RANK=1" in environ:
            rank1 = int(pid)
    assert rank1 is not None, children
    os.kill(rank1, signal.SIGUSR1)
    stdout, stderr = process.communicate(timeout=180)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and not saved[0].endswith(".tmp"), (saved, stderr[-3000:])
    folder = out / "checkpoints" / saved[0]
    assert (folder / "complete").exists() and (folder / "rng_rank0.safetensors").exists() \
        and (folder / "rng_rank1.safetensors").exists()
    step = int(saved[0][5:])
    assert f"stopped by SIGUSR1 at step {step}; resume state in" in stdout, stdout[-2000:]
    # each rank recorded the batches of steps 0 .. step-1 only, so both stopped at the same boundary
    for rank in (0, 1):
        recorded = {int(line.split()[1]) for line in (out / f"ranks/ids_rank{rank}.txt").read_text().splitlines()}
        assert max(recorded) == step - 1, (rank, sorted(recorded)[-3:], step)
    assert process.returncode != 0
