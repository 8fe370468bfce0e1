"""A real two-process data-parallel run on the CPU (gloo): same weights on both ranks, each sample once per epoch."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.test_train_run import SMALL
from tests.test_train_support import write_shards, write_uneven_shards

REPO = Path(__file__).resolve().parents[1]


def launch(launcher: list[str], shard_dir: Path, out: Path, steps: int = 8, *extra: str) -> subprocess.CompletedProcess:
    command = [*launcher, "-m", "train", "--shards", str(shard_dir), "--output", str(out), *SMALL,
               "--max-steps", str(steps), "--checkpoint-every", "4", "--record-ranks", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def check_two_ranks(out: Path, ids: list[str]) -> None:
    lines = {rank: (out / f"ranks/ids_rank{rank}.txt").read_text().split("\n")[:-1] for rank in (0, 1)}
    assert lines[0] and lines[1], "a rank consumed nothing: not two real processes"
    seen = collections.Counter()
    for rows in lines.values():
        seen.update((line.split()[0], line.split()[2]) for line in rows)
    # 16 samples, 2 ranks x batch 2 -> 4 steps per epoch: 8 steps = epochs 0 and 1, every sample once in each
    assert set(seen.values()) == {1}
    assert {epoch for epoch, _ in seen} == {"0", "1"}
    for epoch in ("0", "1"):
        assert sorted(clip for e, clip in seen if e == epoch) == sorted(ids)
    w0 = safetensors.torch.load_file(str(out / "ranks/weights_rank0.safetensors"))
    w1 = safetensors.torch.load_file(str(out / "ranks/weights_rank1.safetensors"))
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    saved = safetensors.torch.load_file(str(out / "checkpoints/step_00000008/model.safetensors"))
    assert all(torch.equal(saved[k], w0[k]) for k in saved)


def test_torchrun_two_processes(tmp_path):
    ids = write_shards(tmp_path / "shards", num_shards=4, per_shard=4)
    result = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                    tmp_path / "shards", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    check_two_ranks(tmp_path / "run", ids)
    # resumed on two CPU ranks: their device is "cpu:0", which safetensors refused to load the EMA onto
    again = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                   tmp_path / "shards", tmp_path / "run", steps=10)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "run/checkpoints/step_00000010").is_dir()


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path):
    """accelerate 1.15 on the CPU: `--cpu --num_processes 2` runs ONE process; `--multi_gpu` with Accelerator(cpu=True) runs two."""
    ids = write_shards(tmp_path / "shards", num_shards=4, per_shard=4)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    result = launch(launcher, tmp_path / "shards", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    check_two_ranks(tmp_path / "run", ids)


def test_a_bad_shard_only_rank_one_reads_is_named(tmp_path):
    """Rank 1 found a damaged shard and exited without a word (only rank 0 printed errors): the output was rank 0's
    gloo traceback. The rank that finds an error in its own data says it, in one line naming the shard, and rank 0
    says in one line that it lost that process."""
    import random
    import tarfile

    write_shards(tmp_path / "shards", num_shards=4, per_shard=4)
    urls = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    random.Random("0-0").shuffle(urls)  # epoch 0's shard order (seed 0): rank 1 reads the second half of its samples
    damaged = Path(urls[2])
    with tarfile.open(damaged) as tar:
        member = max(tar.getmembers(), key=lambda m: m.size)  # the largest feature array of the shard
    data = bytearray(damaged.read_bytes())
    data[member.offset_data + member.size - 8] ^= 0xFF  # one of its values: only the shard's checksum tells
    damaged.write_bytes(bytes(data))
    result = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                    tmp_path / "shards", tmp_path / "run")
    assert result.returncode != 0
    assert f"error: {damaged}" in result.stderr, result.stderr[-3000:]
    assert "Connection closed by peer" not in result.stderr  # rank 0's gloo traceback: one line now


def test_two_processes_with_workers_read_uneven_shards_once_per_epoch(tmp_path):
    """19 samples in shards of 1 to 5 (and one of another split), 2 ranks x 2 workers x batch 2: 2 batches per
    stream and epoch, so 4 steps an epoch of 16 samples; every sample at most once in each epoch (whole-shard
    streams trained some clips three times in two epochs, others once)."""
    ids = write_uneven_shards(tmp_path / "shards")
    result = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                    tmp_path / "shards", tmp_path / "run", 8, "--num-workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    seen = collections.Counter()
    for rank in (0, 1):
        for line in (tmp_path / f"run/ranks/ids_rank{rank}.txt").read_text().splitlines():
            epoch, _, clip = line.split()[:3]
            seen[(epoch, clip)] += 1
    assert set(seen.values()) == {1}
    for epoch in ("0", "1"):
        clips = [clip for e, clip in seen if e == epoch]
        assert len(clips) == 16 and set(clips) <= set(ids)
