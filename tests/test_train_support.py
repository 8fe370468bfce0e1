"""Helpers for the stage-two tests: tiny shard folders and a small model config (no tests here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import shards
from preprocess.config import PRESETS as FEATURE_PRESETS
from tests.conftest import make_sample
from train.config import PRESETS, TrainConfig

# the tiny stage-one spec (20 frames, embed 32) with a shorter latent time axis: 4x less UNet work on the
# shared 2-core test machine; the full (8, 256, 16) latent is exercised by the alignment test
SPEC = dataclasses.replace(FEATURE_PRESETS["tiny"].shard_spec(), latent_time=64)
FULL_SPEC = FEATURE_PRESETS["tiny"].shard_spec()


def small_config(**changes: object) -> TrainConfig:
    """The tiny preset made smaller still (16/32 channels) so a step takes a fraction of a second."""
    base = PRESETS["tiny"].replace(block_channels=(16, 32), attention_heads=(2, 2), cross_attention_dim=32,
                                   batch_size=2, shuffle_buffer=4, log_every=1)
    return base.replace(**changes)


def write_meta(folder: Path, spec: shards.ShardSpec, schema_version: int = shards.SCHEMA_VERSION) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    spec_dict = {**spec.to_dict(), "schema_version": schema_version}
    (folder / shards.META_FILE).write_text(json.dumps({"schema_version": schema_version, "spec": spec_dict}))


def write_shards(folder: Path, spec: shards.ShardSpec = SPEC, num_shards: int = 2, per_shard: int = 4,
                 splits: tuple[str, ...] = ("train",)) -> list[str]:
    """Shards of random spec-conformant samples; the split cycles through `splits`. Returns the clip ids."""
    write_meta(folder, spec)
    ids = []
    for rank in range(num_shards):
        writer = shards.ShardWriter(folder, "train", rank, per_shard)
        for i in range(per_shard):
            clip_id = f"clip{rank}_{i}"
            meta, arrays, waveform = make_sample(spec, clip_id, seed=100 * rank + i, split=splits[i % len(splits)])
            writer.write(shards.encode_sample(spec, meta, arrays, waveform))
            ids.append(clip_id)
        writer.close()
    return ids


def write_uneven_shards(folder: Path, spec: shards.ShardSpec = SPEC) -> list[str]:
    """Shards of 3, 3, 5, 1, 4 and 3 train samples and one of 2 test samples (19 train samples): a shard smaller than a
    batch, one without a sample of the split, counts that no number of streams divides. Returns the train ids."""
    write_meta(folder, spec)
    ids = []
    for rank, (size, split) in enumerate([(3, "train"), (3, "train"), (5, "train"), (1, "train"), (2, "test"),
                                          (4, "train"), (3, "train")]):
        writer = shards.ShardWriter(folder, "train", rank, size)
        for i in range(size):
            clip_id = f"clip{rank}_{i}"
            meta, arrays, waveform = make_sample(spec, clip_id, seed=10 * rank + i, split=split)
            writer.write(shards.encode_sample(spec, meta, arrays, waveform))
            ids += [clip_id] if split == "train" else []
        writer.close()
    return ids


@pytest.fixture(autouse=True)
def one_thread():
    """Run the tiny models single-threaded: on a shared 2-core machine, OpenMP's spinning threads make a
    step of these small models up to 40x slower when other processes compete for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("stage_one, threshold, noted", [
    ({"use_sam": True, "sam_floor": 0.1}, 0.0, True),  # the ablation on shards whose SAM skipped low scores
    ({"use_sam": True, "sam_floor": 0.1}, 0.35, False),  # the paper's threshold: above the floor
    ({"use_sam": True, "sam_floor": 0.0}, 0.0, False),  # SAM refined everything
    ({"use_sam": False, "sam_floor": 0.1}, 0.0, False),  # no SAM at all: nothing to refine
    ({"use_sam": True, "sam_floor": 0.1, "random_init": True}, 0.0, False),  # the demo's random detector
    ({}, 0.0, False),  # a folder that does not say
])
def test_a_threshold_below_the_sam_floor_is_said(tmp_path, stage_one, threshold, noted):
    """Noun-frames scored under the shards' SAM floor never went through SAM: at an object threshold below the floor
    they count with their unrefined score, which the ablation at --object-threshold 0 did not say."""
    from train.trainer import sam_floor_note

    stage_one = {"random_init": False, **stage_one} if stage_one else stage_one  # trained weights unless said
    (tmp_path / shards.META_FILE).write_text(json.dumps({"spec": {}, "config": stage_one}))
    note = sam_floor_note(PRESETS["tiny"].replace(shards=str(tmp_path), object_threshold=threshold))
    assert (note is not None) == noted
    if noted:
        assert note.startswith("note: object threshold 0 is below the shards' SAM floor 0.1") and "--sam-floor 0" in note
