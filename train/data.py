"""Reading stage-one shards as a stream: checks, per-sample conditions, and a resumable batch stream.

The dataset is never held in memory: each rank reads its own shards (wds.split_by_node), each DataLoader
worker its own subset of those (wds.split_by_worker), through a shuffle buffer. Samples are decoded with
`shards.decode_sample` (never webdataset's `.decode()`, which unpickles).

Data position (resume): the stream of rank r, worker w in epoch e is a deterministic function of
(seed, e, r, w): the shard order and the shuffle buffer are seeded with it. Every batch carries
(worker, epoch, index within that worker's epoch); the trainer records the last one consumed from each
worker and, on resume, each worker restarts at its epoch and skips the batches already consumed
(skipping before the expensive decoding). So a resumed run sees exactly the batches an uninterrupted run
would have seen, as long as num_workers and the number of ranks stay the same.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import shards
from train.config import TrainConfig


class DataError(RuntimeError):
    """Unusable training data: the message is one line naming the folder and the reason."""


def check_shards(config: TrainConfig) -> tuple[shards.ShardSpec, list[Path]]:
    """The shard spec and shard paths, or DataError (schema version, missing files, empty folder)."""
    folder = Path(config.shards)
    if not folder.is_dir():
        raise DataError(f"{folder}: shard folder does not exist (run stage one: make features)")
    try:
        spec = shards.read_spec(folder)
    except shards.ShardFormatError as error:
        raise DataError(str(error)) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{folder / shards.META_FILE}: unreadable ({error})") from None
    paths = shards.list_shards(folder)
    if not paths:
        raise DataError(f"{folder}: no complete shard (*.tar) in the folder")
    return spec, paths


def count_split(paths: list[Path], split: str) -> int:
    """Samples whose json says `split`, reading only the small json members of each tar."""
    count = 0
    for path in paths:
        try:
            with tarfile.open(path, "r") as tar:
                for member in tar:
                    if member.name.endswith("." + shards.META_KEY):
                        handle = tar.extractfile(member)
                        if handle is not None and json.loads(handle.read()).get("split") == split:
                            count += 1
        except (tarfile.TarError, OSError, json.JSONDecodeError) as error:
            raise DataError(f"{path}: unreadable shard ({error})") from None
    return count


def to_example(sample: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Decoded sample -> float32 tensors the trainer uses; O is derived here (Eq. 1)."""
    probs = torch.from_numpy(sample["probs.npy"].astype(np.float32))  # (F, K)
    nouns = torch.from_numpy(sample["nouns.npy"].astype(np.float32))  # (K, D)
    return {
        "id": sample[shards.META_KEY]["id"],
        "video": torch.from_numpy(sample["clip.npy"].astype(np.float32)),  # (F, D), zeros past the clip's end
        "caption": torch.from_numpy(sample["caption.npy"].astype(np.float32)),  # (D,)
        "objects": shards.object_embedding(probs, nouns, threshold=threshold),  # (F, D)
        "latent_mean": torch.from_numpy(sample["latent_mean.npy"].astype(np.float32)),  # (C, T, F)
        "latent_std": torch.from_numpy(sample["latent_std.npy"].astype(np.float32)),
    }


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"id": [e["id"] for e in examples]}
    for key in examples[0]:
        if key != "id" and not key.startswith("__"):  # webdataset's map() re-attaches __key__
            batch[key] = torch.stack([e[key] for e in examples])
    return batch


def _split_of(raw: dict[str, Any]) -> str | None:
    meta = raw.get(shards.META_KEY)
    return json.loads(meta.decode("utf-8")).get("split") if meta is not None else None


def _raise(error: Exception) -> bool:
    raise error


class ShardStream(IterableDataset):
    """Endless batches of one rank: epoch after epoch of this rank's shards, resumable (module docstring).

    start: {worker: (epoch, batches consumed in that epoch)}; workers not named start at epoch 0.
    """

    def __init__(self, paths: list[Path], config: TrainConfig, start: dict[int, tuple[int, int]] | None = None):
        self.urls = [str(p) for p in paths]
        self.config = config
        self.start = start or {}

    def epoch_pipeline(self, epoch: int, worker: int, skip_samples: int) -> wds.WebDataset:
        rank = wds.utils.pytorch_worker_info()[0]
        # shard order: the same permutation on every rank (split_by_node then takes every world-th shard)
        urls = list(self.urls)
        random.Random(f"{self.config.seed}-{epoch}").shuffle(urls)
        dataset = wds.WebDataset(
            urls,
            shardshuffle=False,  # shuffled above, per epoch, identically on all ranks
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,  # fewer shards than workers leaves some workers without shards
            handler=_raise,
        )
        split = self.config.split
        return (
            dataset.select(lambda raw: _split_of(raw) == split)
            .shuffle(self.config.shuffle_buffer, rng=random.Random(f"{self.config.seed}-{epoch}-{rank}-{worker}"))
            .slice(skip_samples, None)
            .map(shards.decode_sample)
            .map(lambda sample: to_example(sample, self.config.object_threshold))
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, consumed = self.start.get(worker, (0, 0))
        size = self.config.batch_size
        while True:
            pipeline = self.epoch_pipeline(epoch, worker, consumed * size)
            produced = 0
            buffer: list[dict[str, Any]] = []
            for example in pipeline:
                buffer.append(example)
                if len(buffer) == size:
                    batch = collate(buffer)
                    batch["position"] = torch.tensor([worker, epoch, consumed + produced + 1])
                    produced += 1
                    buffer = []
                    yield batch
            if produced == 0 and consumed == 0:
                return  # this worker has no shards (or no sample of the split): nothing to repeat
            epoch, consumed = epoch + 1, 0  # the incomplete last batch of an epoch is dropped


def make_loader(paths: list[Path], config: TrainConfig, start: dict[int, tuple[int, int]] | None = None,
                pin_memory: bool = False) -> DataLoader:
    """Batches for one rank; batch["position"] = (worker, epoch, batches consumed incl. this one).

    pin_memory (on CUDA): batches land in page-locked memory, so that `.to(device, non_blocking=True)` copies
    them while the GPU still works on the previous step."""
    return DataLoader(
        ShardStream(paths, config, start),
        batch_size=None,  # the stream batches itself so that positions are per worker
        num_workers=config.num_workers,
        persistent_workers=False,
        prefetch_factor=2 if config.num_workers else None,
        pin_memory=pin_memory,
        # its own generator: iter() draws a worker base seed, which must not consume the global RNG that
        # a resumed run restores (the noise draws would shift by one)
        generator=torch.Generator().manual_seed(config.seed),
    )
