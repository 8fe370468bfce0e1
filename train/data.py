"""Reading stage-one shards as a stream: checks, per-sample conditions, and a resumable batch stream.

The dataset is never held in memory. Training reads it through U = ranks x DataLoader workers (at least one per
rank) data streams, and an epoch is split between them by samples, not by shards: the epoch's shard order (a
permutation seeded with (seed, epoch), the same on every rank) lays the split's samples end to end, and stream g
of U reads the g-th of U equal ranges of them (`shards.range_stream`: the shards outside its range unopened), through
a shuffle buffer seeded with (seed, epoch, rank, stream). Each stream yields the same number of batches per epoch,
P = N // (U x batch size), and drops the rest of its range (fewer than U x batch size samples of an epoch, other
ones each epoch): so every sample is trained at most once per epoch and all but those in every epoch, with
shards of any sizes, and the ranks and streams stay in step from epoch to epoch. (Streams that each took whole
shards ran through epochs at their own pace with shards of unequal sizes: some clips were trained three times
as often as others, and a stream with no complete batch stopped for good.) Samples are decoded by the schema,
never unpickled; their conditions are derived by `shards.sample_conditions` (the conditions table).

Data position (resume): every batch carries (stream, epoch, batches of that epoch consumed, this one included);
the trainer records the last one consumed from each stream. A resumed stream restarts at its epoch and skips the
batches already consumed (before the expensive decoding). The DataLoader takes batches from its workers in turn
starting with worker 0, so a resumed loader gives worker i the stream that the uninterrupted run would have
asked next (`stream_offset`): a resumed run sees exactly the batches an uninterrupted run would have seen, as
long as num_workers and the number of ranks stay the same.

Bad data stops training with a `DataError`, one line naming the shard (and the sample key): every sample is
validated against the folder's spec, every shard read to its end against its record (`shards.stream`); nothing
is dropped silently. An error found in a DataLoader worker travels to the main process as a batch {"error": line},
so the line reaches the command line without the worker's traceback.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterator
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


def split_index(paths: list[Path], split: str, folder: Path) -> list[tuple[Path, int]]:
    """(shard, its number of samples of `split`) for each of `paths`, reading only the small json members of each
    shard. A clip id found twice is refused (DataError): that clip would be trained twice as often as the others
    (stage one never writes one twice; a folder assembled by hand can hold one)."""
    try:
        metas = [[meta for meta in shards.iter_meta([path]) if meta.split == split] for path in paths]
    except shards.ShardFormatError as error:
        raise DataError(str(error)) from None
    counts = collections.Counter(meta.id for found in metas for meta in found)
    repeated = [clip_id for clip_id, count in counts.items() if count > 1]
    if repeated:
        raise DataError(f"{folder}: clip {repeated[0]!r} is in split {split!r} {counts[repeated[0]]} times"
                        + (f" ({len(repeated)} clips repeated)" if len(repeated) > 1 else "")
                        + f"; it would be trained more often than the others (python -m shards verify {folder} "
                        "names the shards)")
    return [(path, len(found)) for path, found in zip(paths, metas)]


def count_split(folder: Path, split: str) -> int:
    """Samples whose json says `split` in a shard folder (`split_index`: a clip id found twice is a DataError)."""
    return sum(count for _, count in split_index(shards.split_shards(folder, split), split, folder))


def streams(world: int, num_workers: int) -> int:
    """How many data streams an epoch is split between: one per DataLoader worker (or per rank without workers)."""
    return world * max(1, num_workers)


def epoch_batches(count: int, world: int, num_workers: int, batch_size: int) -> int:
    """P: the batches each data stream yields per epoch of `count` samples (module docstring)."""
    return count // (streams(world, num_workers) * batch_size)


def samples_per_epoch(count: int, world: int, num_workers: int, batch_size: int) -> int:
    """The samples an epoch of `count` trains: P batches from each data stream."""
    return epoch_batches(count, world, num_workers, batch_size) * streams(world, num_workers) * batch_size


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
        if key != "id" and not key.startswith("__"):
            batch[key] = torch.stack([e[key] for e in examples])
    return batch


class ShardStream(IterableDataset):
    """Endless batches of one rank: epoch after epoch of its data streams' ranges, resumable (module docstring).

    index: (shard, its number of samples of the split) of every shard, counted once (`split_index`; None: counted
    here). start: {stream: (epoch, batches consumed in that epoch)}; streams not named start at epoch 0.
    """

    def __init__(self, paths: list[Path], config: TrainConfig, start: dict[int, tuple[int, int]] | None = None,
                 rank: int = 0, world: int = 1, index: list[tuple[Path, int]] | None = None):
        self.paths = list(paths)
        self.config = config
        self.start = start or {}
        self.rank, self.world = rank, world
        self.index = [(str(path), count) for path, count in index] if index is not None else None
        self.spec: shards.ShardSpec | None = None  # read in the process that streams (a worker or the main one)

    def batches_per_epoch(self) -> int:
        """P (`epoch_batches`) for this stream's index."""
        assert self.index is not None
        return epoch_batches(sum(count for _, count in self.index), self.world, self.config.num_workers,
                             self.config.batch_size)

    def stream_offset(self) -> int:
        """Which stream DataLoader worker 0 reads: the one the uninterrupted run would have asked for the next batch
        (batch k of a rank comes from stream k mod workers; k batches were consumed before `start`)."""
        workers = max(1, self.config.num_workers)
        per_epoch = self.batches_per_epoch()
        consumed = sum(epoch * per_epoch + done for epoch, done in self.start.values())
        return consumed % workers

    def epoch_samples(self, epoch: int, stream: int, skip_batches: int) -> Iterator[dict[str, Any]]:
        """Stream `stream`'s decoded examples of `epoch`, the first `skip_batches` batches' worth left out."""
        assert self.index is not None
        order = list(self.index)
        random.Random(f"{self.config.seed}-{epoch}").shuffle(order)  # the same permutation on every rank
        if self.spec is None:
            self.spec = shards.read_spec(self.config.shards)
        total = sum(count for _, count in order)
        workers = max(1, self.config.num_workers)
        streams_all = streams(self.world, self.config.num_workers)
        number = self.rank * workers + stream  # of all ranks' streams
        size = self.config.batch_size
        samples = shards.range_stream(order, self.config.split, number * total // streams_all,
                                      (number + 1) * total // streams_all, self.config.shuffle_buffer,
                                      f"{self.config.seed}-{epoch}-{self.rank}-{stream}",
                                      take=self.batches_per_epoch() * size, skip=skip_batches * size, spec=self.spec)
        return (to_example(sample, self.config.object_threshold) for sample in samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            if self.index is None:
                self.index = [(str(path), count) for path, count in
                              split_index(self.paths, self.config.split, Path(self.config.shards))]
            yield from self._batches()
        except shards.ShardFormatError as error:
            yield {"error": str(error)}  # raised as DataError by the loader, in the main process
        except DataError as error:
            yield {"error": str(error)}

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = max(1, self.config.num_workers)
        stream = ((info.id if info is not None else 0) + self.stream_offset()) % workers
        per_epoch = self.batches_per_epoch()
        if per_epoch == 0:
            return  # fewer samples than one batch per stream: the trainer refuses such a run before it starts
        epoch, consumed = self.start.get(stream, (0, 0))
        epoch, consumed = epoch + consumed // per_epoch, consumed % per_epoch  # a position of another epoch size
        size = self.config.batch_size
        while True:
            produced = 0
            buffer: list[dict[str, Any]] = []
            for example in self.epoch_samples(epoch, stream, consumed):
                buffer.append(example)
                if len(buffer) == size:
                    batch = collate(buffer)
                    batch["position"] = torch.tensor([stream, epoch, consumed + produced + 1])
                    produced += 1
                    buffer = []
                    yield batch
            epoch, consumed = epoch + 1, 0


class _Loader(DataLoader):
    """A DataLoader that turns a worker's error batch into a DataError in the main process."""

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        batches = super().__iter__()
        try:
            for batch in batches:
                if "error" in batch:
                    raise DataError(batch["error"], own_rank=True)
                yield batch
        finally:  # closed, or an error: the workers go now (they ignore the stop signals that would end them)
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def make_loader(paths: list[Path], config: TrainConfig, start: dict[int, tuple[int, int]] | None = None,
                pin_memory: bool = False, ignore_stop_signals: bool = False, rank: int = 0, world: int = 1,
                index: list[tuple[Path, int]] | None = None) -> DataLoader:
    """Batches for rank `rank` of `world`; batch["position"] = (stream, epoch, batches of that epoch consumed incl.
    this one). index: `split_index` of `paths`, when the caller has it (else counted here, once).

    pin_memory (on CUDA): batches land in page-locked memory, so that `.to(device, non_blocking=True)` copies
    them while the GPU still works on the previous step. ignore_stop_signals: the workers ignore
    `common.signals.STOP_SIGNALS` (the training loop stops on them itself; a job's whole process group receives them)."""
    if index is None:
        index = split_index(list(paths), config.split, Path(config.shards))
    return _Loader(
        ShardStream(paths, config, start, rank, world, index),
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
