"""Shared fixtures: tiny configs and small spec-conformant samples."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import shards
from preprocess.config import PRESETS, FeatureConfig


@pytest.fixture
def tiny_cfg() -> FeatureConfig:
    return PRESETS["tiny"].replace(num_workers=0)


def make_sample(spec: shards.ShardSpec, clip_id: str, num_nouns: int = 2, seed: int = 0, split: str = "train"):
    """A random sample that follows `spec` (meta, arrays, waveform): the members of the spec's schema version, with
    probs.npy = detector.npy * iou.npy (version 1: probs.npy alone)."""
    rng = np.random.default_rng(seed)
    nouns = [f"noun{k}" for k in range(num_nouns)]
    meta = {"id": clip_id, "caption": " ".join(nouns), "label": "x", "split": split, "duration": 3.5,
            "valid_frames": spec.num_frames, "nouns": nouns, "source": f"/videos/{clip_id}.mp4"}
    arrays = {
        "clip.npy": rng.standard_normal((spec.num_frames, spec.embed_dim)),
        "caption.npy": rng.standard_normal(spec.embed_dim),
        "nouns.npy": rng.standard_normal((num_nouns, spec.embed_dim)),
        # rounded to float16 first, so that the stored product is the product of the stored factors
        "detector.npy": rng.uniform(0, 1, (spec.num_frames, num_nouns)).astype(np.float16),
        "latent_mean.npy": rng.standard_normal(spec.latent_shape),
        "latent_std.npy": rng.uniform(0.1, 1, spec.latent_shape),
    }
    arrays["iou.npy"] = rng.uniform(0.3, 1, (spec.num_frames, num_nouns)).astype(np.float16)
    arrays["probs.npy"] = arrays["detector.npy"].astype(np.float32) * arrays["iou.npy"].astype(np.float32)
    waveform = (0.3 * np.sin(np.arange(spec.sample_rate) * 2 * np.pi * 440 / spec.sample_rate)).astype(np.float32)
    return meta, {k: arrays[k] for k in spec.array_keys}, waveform


def rewrite_shard(path, change) -> None:
    """Rewrite the shard at `path` with each member's bytes replaced by change(name, data), and delete its record
    (as in a folder written before shard records), so that readers must find a damaged sample by itself."""
    import io
    import tarfile

    from shards.stream import record_path

    with tarfile.open(path) as tar:
        members = [(member.name, change(member.name, tar.extractfile(member).read())) for member in tar]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    record_path(path).unlink()


@contextlib.contextmanager
def lock_holder(folder: Path, what: str, name: str = ".lock") -> Iterator[subprocess.Popen]:
    """Another process holding `folder`/`name` (`common.lock.folder_lock`) while the block runs; killed after it."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from pathlib import Path; "
                               "from common.lock import folder_lock\n"
                               f"with folder_lock(Path({str(folder)!r}), {what!r}, {name!r}):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
