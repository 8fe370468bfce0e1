"""One writer per output folder (`common.lock`)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from common.lock import FolderBusy, folder_lock
from tests.conftest import lock_holder


def test_a_held_folder_refuses_a_second_holder_and_is_free_after(tmp_path):
    folder = tmp_path / "out"
    with folder_lock(folder, "evaluation"):
        with pytest.raises(FolderBusy, match=f"^{folder}: another evaluation is writing into this folder"):
            with folder_lock(folder, "evaluation"):
                pass
    with folder_lock(folder, "evaluation"):  # released at the end of the block
        pass


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    """The lock goes with the process: a run killed while holding it leaves nothing to clean up."""
    folder = tmp_path / "out"
    with lock_holder(folder, "training"):
        with pytest.raises(FolderBusy):  # another process holds it
            with folder_lock(folder, "training"):
                pass
    with folder_lock(folder, "training"):
        pass


def test_a_killed_holder_s_leftover_children_are_waited_for(tmp_path, caplog):
    """A killed run's forked children (DataLoader workers) hold the lock file open, and so the lock, until they
    exit: the folder was "busy" for a requeued run. The holder's pid is in the file; it is gone, so the lock is
    waited for (with a warning), not refused."""
    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; from pathlib import Path; "
                               "from common.lock import folder_lock\n"
                               f"with folder_lock(Path({str(folder)!r}), 'training'):\n"
                               "    if os.fork() == 0:\n"
                               "        time.sleep(3); os._exit(0)\n"  # the child keeps the lock file open
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    started = time.monotonic()
    with caplog.at_level("WARNING"), folder_lock(folder, "training"):
        waited = time.monotonic() - started
    assert 0.5 < waited < 30
    assert f"waiting for the processes left by a killed training (pid {holder.pid}) to exit" in caplog.text
