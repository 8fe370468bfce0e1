"""Training throughput: reading from shards (the trainer's stream) versus one batch held in memory.

Same tiny model, batch and step (the trainer's `training_loss`, backward, AdamW); the difference is the cost of reading,
decoding and collating shards. Writes a section of benchmarks/RESULTS.md.

    python -m benchmarks.train_throughput [--steps 30]
"""

from __future__ import annotations

import argparse
import os
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
from train.data import make_loader
from train.diffusion import noise_scheduler, training_loss
from train.model import VTASAM


def timed_steps(model, optimizer, scheduler, config, batches, steps: int) -> float:
    """Samples per second over `steps` training steps (`train.diffusion.training_loss`, backward, AdamW) after 3
    warm-up steps."""
    start = time.perf_counter()
    for index in range(steps + 3):
        if index == 3:
            start = time.perf_counter()
        loss = training_loss(model, scheduler, next(batches), config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * config.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        write_random_shards(folder, FEATURE_PRESETS["tiny"], {"train": 64})
        config = PRESETS["tiny"].replace(shards=str(folder), num_workers=args.workers)
        spec = shards.read_spec(folder)
        torch.manual_seed(0)
        model = VTASAM(config, spec)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
        scheduler = noise_scheduler(config)
        stream = iter(make_loader(shards.list_shards(folder), config))
        from_shards = timed_steps(model, optimizer, scheduler, config, stream, args.steps)
        fixed = next(stream)
        in_memory = timed_steps(model, optimizer, scheduler, config, iter(lambda: fixed, None), args.steps)
    body = (
        f"Machine: {machine_name()}, {torch.get_num_threads()} torch thread(s), {args.workers} DataLoader workers. "
        f"Tiny preset (UNet {config.block_channels}, ~{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
        f"batch {config.batch_size}, latent {spec.latent_shape}, {args.steps} timed steps after 3 warm-up steps.\n\n"
        "| input | samples/s |\n|---|---|\n"
        f"| shards (stream: read, decode, Eq. 1, collate) | {from_shards:.1f} |\n"
        f"| one batch in memory | {in_memory:.1f} |\n"
    )
    write_section("Stage two: training throughput (shards vs memory)", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
