"""Reading stage-one shards as a stream: checks, per-sample conditions, and a resumable batch stream.

The dataset is never held in memory: each rank reads its own shards, each DataLoader worker its own subset of
those, through a shuffle buffer (`shards.sample_stream`; samples are decoded by the schema, never unpickled).
The conditions of a sample are derived by `shards.sample_conditions` (the conditions table).

Data position (resume): the stream of rank r, worker w in epoch e is a deterministic function of
(seed, e, r, w): the shard order and the shuffle buffer are seeded with it. Every batch carries
(worker, epoch, index within that worker's epoch); the trainer records the last one consumed from each
worker and, on resume, each worker restarts at its epoch and skips the batches already consumed
(skipping before the expensive decoding). So a resumed run sees exactly the batches an uninterrupted run
would have seen, as long as num_workers and the number of ranks stay the same.

Bad data stops training with a `DataError`, one line naming the shard (and the sample key): every sample is
validated against the folder's spec, every shard against its record (`shards.stream`); nothing is dropped
silently. An error found in a DataLoader worker travels to the main process as a batch {"error": line}, so the
line reaches the command line without the worker's traceback.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import shards
from common import signals
from train.config import TrainConfig


class DataError(RuntimeError):
    """Unusable training data: the message is one line naming the folder and the reason. `own_rank`: found in this
    rank's own data (a shard only it reads), so this rank says it, not only rank 0."""

    def __init__(self, message: str, own_rank: bool = False):
        super().__init__(message)
        self.own_rank = own_rank


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
    paths = shards.split_shards(folder, config.split)  # the split's own shards when stage one named them after it
    if not paths:
        raise DataError(f"{folder}: no complete shard (*.tar) in the folder")
    return spec, paths


def count_split(folder: Path, split: str) -> int:
    """Samples whose json says `split`, reading only the small json members of each shard. A clip id found twice is
    refused (DataError): that clip would be trained twice as often as the others (stage one never writes one twice;
    a folder assembled by hand can hold one)."""
    try:
        metas = shards.read_split(folder, split)
    except shards.ShardFormatError as error:
        raise DataError(str(error)) from None
    counts = collections.Counter(meta.id for meta in metas)
    repeated = [clip_id for clip_id, count in counts.items() if count > 1]
    if repeated:
        raise DataError(f"{folder}: clip {repeated[0]!r} is in split {split!r} {counts[repeated[0]]} times"
                        + (f" ({len(repeated)} clips repeated)" if len(repeated) > 1 else "")
                        + f"; it would be trained more often than the others (python -m shards verify {folder} "
                        "names the shards)")
    return len(metas)


def to_example(sample: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Decoded sample -> the float32 tensors a training step uses: its conditions by name (`shards.conditions`;
    O of Eq. 1 derived here with `threshold`) and the stored VAE posterior."""
    return {
        "id": sample[shards.META_KEY]["id"],
        **shards.sample_conditions(sample, threshold),
        "latent_mean": torch.from_numpy(sample["latent_mean.npy"].astype(np.float32)),  # (C, T, F)
        "latent_std": torch.from_numpy(sample["latent_std.npy"].astype(np.float32)),
    }


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"id": [e["id"] for e in examples]}
    for key in examples[0]:
        if key != "id" and not key.startswith("__"):  # webdataset's map() re-attaches __key__
            batch[key] = torch.stack([e[key] for e in examples])
    return batch


class ShardStream(IterableDataset):
    """Endless batches of one rank: epoch after epoch of this rank's shards, resumable (module docstring).

    start: {worker: (epoch, batches consumed in that epoch)}; workers not named start at epoch 0.
    """

    def __init__(self, paths: list[Path], config: TrainConfig, start: dict[int, tuple[int, int]] | None = None):
        self.urls = [str(p) for p in paths]
        self.config = config
        self.start = start or {}
        self.spec: shards.ShardSpec | None = None  # read in the process that streams (a worker or the main one)

    def epoch_pipeline(self, epoch: int, skip_samples: int) -> Iterable[dict[str, Any]]:
        # shard order: the same permutation on every rank (each rank then takes every world-th shard); the shuffle
        # buffer of rank r, worker w is seeded with "<seed>-<epoch>-<r>-<w>"
        urls = list(self.urls)
        random.Random(f"{self.config.seed}-{epoch}").shuffle(urls)
        if self.spec is None:
            self.spec = shards.read_spec(self.config.shards)
        stream = shards.sample_stream(urls, self.config.split, self.config.shuffle_buffer, f"{self.config.seed}-{epoch}",
                                      skip_samples, spec=self.spec)
        return stream.map(lambda sample: to_example(sample, self.config.object_threshold))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._batches()
        except shards.ShardFormatError as error:
            yield {"error": str(error)}  # raised as DataError by the loader, in the main process

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, consumed = self.start.get(worker, (0, 0))
        size = self.config.batch_size
        while True:
            pipeline = self.epoch_pipeline(epoch, consumed * size)
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


class _Loader(DataLoader):
    """A DataLoader that turns a worker's error batch into a DataError in the main process."""

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        for batch in super().__iter__():
            if "error" in batch:
                raise DataError(batch["error"], own_rank=True)
            yield batch


def make_loader(paths: list[Path], config: TrainConfig, start: dict[int, tuple[int, int]] | None = None,
                pin_memory: bool = False, ignore_stop_signals: bool = False) -> DataLoader:
    """Batches for one rank; batch["position"] = (worker, epoch, batches consumed incl. this one).

    pin_memory (on CUDA): batches land in page-locked memory, so that `.to(device, non_blocking=True)` copies
    them while the GPU still works on the previous step. ignore_stop_signals: the workers ignore
    `common.signals.STOP_SIGNALS` (the training loop stops on them itself; a job's whole process group receives them)."""
    return _Loader(
        ShardStream(paths, config, start),
        batch_size=None,  # the stream batches itself so that positions are per worker
        num_workers=config.num_workers,
        persistent_workers=False,
        prefetch_factor=2 if config.num_workers else None,
        pin_memory=pin_memory,
        worker_init_fn=signals.ignore_stop_signals if ignore_stop_signals else None,
        # its own generator: iter() draws a worker base seed, which must not consume the global RNG that
        # a resumed run restores (the noise draws would shift by one)
        generator=torch.Generator().manual_seed(config.seed),
    )
