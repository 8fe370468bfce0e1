"""Training throughput: reading from shards (the trainer's stream) versus one batch held in memory.

Same tiny model, batch and step (forward, backward, AdamW); the difference is the cost of reading,
decoding and collating shards. Writes a section of benchmarks/RESULTS.md.

    python -m benchmarks.train_throughput [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import shards
from benchmarks.results import machine_name, write_section
from preprocess.config import PRESETS as FEATURE_PRESETS
from tests.conftest import make_sample
from train.config import PRESETS
from train.data import make_loader
from train.diffusion import diffusion_loss, noise_scheduler, sample_latents, training_target
from train.model import VTASAM


def write_random_shards(folder: Path, count: int) -> None:
    spec = FEATURE_PRESETS["tiny"].shard_spec()
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"schema_version": shards.SCHEMA_VERSION, "spec": spec.to_dict()}
    (folder / shards.META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    writer = shards.ShardWriter(folder, "train", 0, 16)
    for i in range(count):
        meta, arrays, waveform = make_sample(spec, f"clip{i}", seed=i)
        writer.write(shards.encode_sample(spec, meta, arrays, waveform))
    writer.close()


def timed_steps(model, optimizer, scheduler, config, batches, steps: int) -> float:
    """Samples per second over `steps` training steps after 3 warm-up steps."""
    start = time.perf_counter()
    for index in range(steps + 3):
        if index == 3:
            start = time.perf_counter()
        batch = next(batches)
        z0 = sample_latents(batch["latent_mean"], batch["latent_std"], config.vae_scaling_factor)
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (z0.shape[0],))
        conditions = {k: batch[k] for k in ("video", "objects", "caption")}
        loss = diffusion_loss(model(scheduler.add_noise(z0, noise, t), t, conditions),
                              training_target(scheduler, z0, noise, t), t, scheduler, config.min_snr_gamma)
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
        write_random_shards(folder, 64)
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
