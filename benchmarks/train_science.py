"""Science check of stage two on the synthetic demo set: do the conditions steer the generated timing?

Trains the tiny model with V+O twice: on the real pairing, and with the conditions (frames, caption,
nouns, probabilities) shuffled across training clips (a control that can learn only the marginal). On the
held-out clips, the per-time energy envelope of generated latents (mean over channels and frequency of z^2,
DDIM + CFG) is correlated (Pearson) with the ground truth's (the stored posterior mean); both numbers go to
benchmarks/RESULTS.md. Needs the demo shards (`make features`); builds them when absent.

    python -m benchmarks.train_science [--shards data/shards/demo] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import shards
from benchmarks.results import machine_name, write_section
from train import load_model, sample
from train.__main__ import main as train_main
from train.data import to_example


def ensure_demo_shards(folder: Path) -> None:
    if shards.list_shards(folder):
        return
    demo = Path("data/demo")
    print(f"{folder}: no shards; building the demo set (stage one) first")
    subprocess.run([sys.executable, "-m", "preprocess.demo", "--out", str(demo)], check=True)
    subprocess.run([sys.executable, "-m", "preprocess", "--csv", str(demo / "vggsound.csv"), "--videos",
                    str(demo / "videos"), "--out", str(folder)], check=True)


def shuffled_copy(source: Path, target: Path, seed: int = 0) -> None:
    """The same shards with every condition array moved to another training clip (latents stay)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copy(source / shards.META_FILE, target / shards.META_FILE)
    spec = shards.read_spec(source)
    samples = list(shards.iterate_samples(shards.list_shards(source)))
    train = [i for i, s in enumerate(samples) if s[shards.META_KEY]["split"] == "train"]
    donors = train[:]
    random.Random(seed).shuffle(donors)
    writer = shards.ShardWriter(target, "train", 0, 1000)
    for index, s in enumerate(samples):
        donor = samples[donors[train.index(index)]] if index in train else s
        meta = dict(s[shards.META_KEY], nouns=donor[shards.META_KEY]["nouns"])
        arrays = {k: s[k] for k in ("latent_mean.npy", "latent_std.npy")}
        arrays.update({k: donor[k] for k in ("clip.npy", "caption.npy", "nouns.npy", "probs.npy")})
        writer.write(shards.encode_sample(spec, meta, arrays, np.asarray(s[shards.AUDIO_KEY])))
    writer.close()


def envelope(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, T, F) -> (B, T): energy per latent time step."""
    return latents.float().pow(2).mean(dim=(1, 3))


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-12)


def evaluate(run: Path, shard_dir: Path, steps: int, guidance: float) -> tuple[float, float, int]:
    model, config = load_model(run)
    held_out = [s for s in shards.iterate_samples(shards.list_shards(shard_dir)) if s[shards.META_KEY]["split"] != "train"]
    examples = [to_example(s, config.object_threshold) for s in held_out]
    conditions = {k: torch.stack([e[k] for e in examples]) for k in ("video", "objects", "caption")}
    truth = torch.stack([e["latent_mean"] for e in examples]) * config.vae_scaling_factor
    generated = sample(model, conditions, steps=steps, guidance=guidance, generator=torch.Generator().manual_seed(0))
    r = pearson(envelope(generated), envelope(truth))
    return float(r.mean()), float(r.std()), len(examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=Path("data/shards/demo"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench_science"))
    parser.add_argument("--steps", type=int, default=400, help="training steps of each model")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ensure_demo_shards(args.shards)
    shuffled_copy(args.shards, args.work / "shuffled_shards")
    results = {}
    for name, shard_dir in (("paired", args.shards), ("shuffled", args.work / "shuffled_shards")):
        run = args.work / name
        shutil.rmtree(run, ignore_errors=True)
        code = train_main(["--shards", str(shard_dir), "--output", str(run), "--max-steps", str(args.steps),
                           "--checkpoint-every", str(args.steps), "--log-every", "50"])
        if code != 0:
            return code
        results[name] = evaluate(run, args.shards, args.sampling_steps, args.guidance)
        print(name, results[name])
    count = results["paired"][2]
    body = (
        f"Machine: {machine_name()}. Tiny preset (inputs V+O, scheme Z@V+O), {args.steps} steps, batch 4, "
        f"on `{args.shards}` (train split); held-out clips: {count}. DDIM {args.sampling_steps} steps, "
        f"guidance {args.guidance}. Score: Pearson correlation between the per-time energy envelope "
        f"(mean over channels and frequency of z^2, 256 latent steps) of generated and ground-truth latents, "
        f"mean +- std over clips.\n\n"
        "| training conditions | envelope correlation |\n|---|---|\n"
        f"| paired (V+O of the clip) | {results['paired'][0]:.3f} +- {results['paired'][1]:.3f} |\n"
        f"| shuffled across clips (control) | {results['shuffled'][0]:.3f} +- {results['shuffled'][1]:.3f} |\n"
    )
    write_section("Stage two: science check on the demo set", body)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
