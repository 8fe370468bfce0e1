"""Training's data streams: how many bytes an epoch reads, against the bytes of its split, and samples per second.

Training splits each epoch between ranks x DataLoader workers data streams by sample ranges (`train.data`). A
stream opens only the shards its range touches, but a tar is read from its beginning: the shard a range starts in
is read up to the range's start as well, so an epoch reads about one shard per stream more than the split holds
(a range that ends inside a shard stops reading there). This measures that cost with the trainer's own stream
(`train.data.ShardStream.epoch_samples`, every stream of one epoch in this process) for several shard sizes and
stream counts, counting the bytes the process reads (`rchar` of /proc/self/io: reads from the page cache count).
It also counts what building the split's index (`train.data.split_index`, once per run) reads. Writes a section
of benchmarks/RESULTS.md.

    python -m benchmarks.data_streams [--samples 1000] [--per-shard 25,100,250] [--streams 1,3,8,32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import shards
from benchmarks.random_shards import write_random_shards
from benchmarks.results import machine_name, write_section
from preprocess.config import PRESETS as FEATURE_PRESETS
from train.config import PRESETS
from train.data import ShardStream, split_index


def bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def one_epoch(folder: Path, index: list[tuple[Path, int]], streams: int, batch_size: int) -> tuple[int, int, float]:
    """(bytes read, samples decoded, seconds) for epoch 0 of `streams` data streams (ranks without workers)."""
    config = PRESETS["tiny"].replace(shards=str(folder), batch_size=batch_size, num_workers=0)
    paths = [path for path, _ in index]
    decoded, before, start = 0, bytes_read(), time.perf_counter()
    for rank in range(streams):
        stream = ShardStream(paths, config, rank=rank, world=streams, index=index)
        decoded += sum(1 for _ in stream.epoch_samples(0, 0, 0))
    return bytes_read() - before, decoded, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="samples of the split")
    parser.add_argument("--per-shard", default="25,100,250", help="samples per shard, comma-separated")
    parser.add_argument("--streams", default="1,3,8,32", help="data stream counts, comma-separated")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for per_shard in (int(n) for n in args.per_shard.split(",")):
            folder = write_random_shards(Path(tmp) / f"shards{per_shard}", FEATURE_PRESETS["tiny"],
                                         {"train": args.samples}, per_shard=per_shard)
            paths = shards.split_shards(folder, "train")
            split_bytes = sum(path.stat().st_size for path in paths)
            before = bytes_read()
            index = split_index(paths, "train", folder)
            index_bytes = bytes_read() - before
            for streams in (int(n) for n in args.streams.split(",")):
                read, decoded, seconds = one_epoch(folder, index, streams, args.batch_size)
                rows.append(f"| {per_shard} | {len(paths)} | {streams} | {decoded} | {read / split_bytes:.2f} | "
                            f"{index_bytes / split_bytes:.2f} | {decoded / seconds:.0f} |")
            print(rows[-1], flush=True)
    body = (
        f"Machine: {machine_name()}, one process, 1 torch thread. Tiny preset samples, {args.samples} of the split, "
        f"batch {args.batch_size}; each row reads epoch 0 of every stream in turn (the trainer's "
        "`ShardStream.epoch_samples`). 'epoch read': bytes read over the split's shard bytes; 'index read': the "
        "same for building the split's index once per run.\n\n"
        "| samples per shard | shards | streams | samples decoded | epoch read | index read | samples/s |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "A stream reads the shard its range starts in from that shard's beginning: about half a shard per stream "
        "beyond its share, so an epoch reads about 1 + streams x shard samples / (2 x split samples) times the "
        "split's bytes (rows with ranges on shard boundaries read exactly 1.00). For the paper preset's shards of "
        "1000 samples and VGGSound's ~180k training clips, 4 ranks x 8 workers (32 streams) read about 9% more than "
        "the split, 256 streams about 70%: on many GPUs, write smaller shards (stage one's --shard-max-samples) "
        "when storage is slow.\n"
    )
    write_section("Stage two: bytes an epoch's data streams read (data_streams.py)", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
