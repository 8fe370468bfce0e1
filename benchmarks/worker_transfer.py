"""What it costs to hand decoded frames from DataLoader workers to the main process: numpy arrays vs tensors.

Stage one decodes clips in worker processes. A DataLoader pickles what a worker returns through a pipe, except
tensors, which travel through shared memory (only a handle is pickled). A paper-preset clip is 41 frames at
800 px short side, ~140 MB of uint8, so the difference is the main process's time per clip, which the encoders
wait for. `python -m benchmarks.worker_transfer [--clips 24] [--no-write]`; the workers return a stored random
array, so decoding costs nothing here and only the transfer is timed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.results import machine_name, write_section


class Frames(Dataset):
    def __init__(self, count: int, shape: tuple[int, ...], as_tensor: bool):
        self.count, self.shape, self.as_tensor = count, shape, as_tensor

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        frames = np.full(self.shape, index % 251, np.uint8)
        return {"frames": torch.from_numpy(frames) if self.as_tensor else frames}


def _identity(item: Any) -> Any:
    return item


def clips_per_second(count: int, shape: tuple[int, ...], as_tensor: bool, workers: int) -> float:
    loader = DataLoader(Frames(count, shape, as_tensor), batch_size=None, num_workers=workers, collate_fn=_identity,
                        prefetch_factor=2)
    iterator = iter(loader)
    first = next(iterator)  # workers started
    assert int(first["frames"][0, 0, 0, 0]) == 0
    start = time.perf_counter()
    received = sum(1 for _ in iterator)
    return received / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", dest="write", action="store_false")
    args = parser.parse_args(argv)
    shape = (41, 800, 1422, 3)  # paper preset: 4 fps x 10.24 s, 16:9 frames at 800 px short side
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for as_tensor in (False, True):
            rates[as_tensor].append(clips_per_second(args.clips, shape, as_tensor, args.workers))
    numpy_rate, tensor_rate = statistics.median(rates[False]), statistics.median(rates[True])
    megabytes = np.prod(shape) / 1e6
    lines = [
        f"- machine: {machine_name()}; torch {torch.__version__}; {args.workers} workers, {args.clips} clips of "
        f"{shape} uint8 ({megabytes:.0f} MB each), median of {args.repeats}",
        f"- numpy arrays (pickled through the pipe; before): **{numpy_rate:.2f} clips/s** "
        f"({numpy_rate * megabytes / 1e3:.2f} GB/s)",
        f"- tensors (shared memory; after): **{tensor_rate:.2f} clips/s** ({tensor_rate * megabytes / 1e3:.2f} GB/s), "
        f"x{tensor_rate / numpy_rate:.1f}",
    ]
    print("\n".join(lines))
    if args.write:
        write_section("Stage one: frames from decoding workers, numpy vs tensors", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
