"""Shard folders of random, spec-conformant samples (`tests.conftest.make_sample`) for the benchmarks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import shards
from preprocess.config import FeatureConfig
from tests.conftest import make_sample


def write_random_shards(folder: Path, features: FeatureConfig, counts: dict[str, int], per_shard: int = 16,
                        num_nouns: int = 2) -> Path:
    """meta.json (the spec and stage-one config of `features`) and, per split, counts[split] random samples with ids
    "<split><index>", in shards of `per_shard`. Every clip lasts the full window (10.24 s latents). Returns `folder`."""
    spec = features.shard_spec()
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"schema_version": shards.SCHEMA_VERSION, "spec": spec.to_dict(), "config": dataclasses.asdict(features)}
    (folder / shards.META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    for split, count in counts.items():
        writer = shards.ShardWriter(folder, split, 0, per_shard)
        for i in range(count):
            sample_meta, arrays, waveform = make_sample(spec, f"{split}{i}", num_nouns=num_nouns, seed=i, split=split)
            sample_meta["duration"] = spec.window_seconds
            writer.write(shards.encode_sample(spec, sample_meta, arrays, waveform))
        writer.close()
    return folder
