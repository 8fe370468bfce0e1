"""Science check of stage two on the synthetic demo set: do the conditions steer the generated timing?

Trains the tiny model twice on the same latents: with each clip's own conditions (paired), and with the
conditions (frames, caption, nouns, probabilities) of another training clip (shuffled: a control that can
learn only the marginal). On the held-out clips both models generate latents (DDIM + CFG, fixed seeds),
and the per-time loudness envelope of each generated latent is correlated (Pearson over the 256 latent
steps) with the ground truth's of the same clip; both numbers, mean +- std over clips, go to
benchmarks/RESULTS.md.

The envelope of a latent is read out linearly: loudness(z)[t] = w . z[:, t, :] + b, with (w, b) fitted by
ridge regression on the TRAINING clips from their posterior-mean latents to their log-mel loudness (mean
over the 64 mel bins of the AudioLDM log mel, averaged over the 4 mel frames of a latent step). Why not
mean(z^2) over channels and frequency: the tiny preset's VAE is random-init, its latent is a signed,
mixed-sign linear-ish image of the mel, and mean(z^2) of the ground truth correlates with the mel loudness
anywhere from -0.9 to +0.5 depending on the clip; the fitted readout reaches ~0.97 on held-out clips (the
table's ceiling row). Nor the VAE decoder: the random decoder does not invert the random encoder.

    python -m benchmarks.train_science [--shards data/shards/demo] [--steps 300]
    python -m benchmarks.train_science --shards data/shards/demo120 --demo-train 120 --demo-test 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import shards
from benchmarks.results import machine_name, write_section
from train import load_model, sample
from train.__main__ import main as train_main

RIDGE = 0.1  # ridge penalty of the loudness readout (128 inputs, ~5000 training steps per 24 clips)


def ensure_demo_shards(folder: Path, n_train: int, n_test: int) -> None:
    """Stage one on the synthetic demo set (n_train + n_test clips) unless `folder` already holds shards."""
    if folder.is_dir() and shards.list_shards(folder):
        return
    videos = folder.with_name(folder.name + "_videos")
    print(f"{folder}: no shards; building the demo set ({n_train} + {n_test} clips) and running stage one")
    subprocess.run([sys.executable, "-m", "preprocess.demo", "--out", str(videos), "--train", str(n_train),
                    "--test", str(n_test)], check=True)
    subprocess.run([sys.executable, "-m", "preprocess", "--csv", str(videos / "vggsound.csv"), "--videos",
                    str(videos / "videos"), "--out", str(folder), "--no-progress"], check=True)


def derangement(count: int, seed: int) -> list[int]:
    """donor[i] != i for every i (count >= 2): a random order, each clip taking the next one's conditions.

    A plain permutation leaves ~1 clip paired with itself, which leaks the real pairing into the control.
    """
    order = np.random.default_rng(seed).permutation(count)
    donor = [0] * count
    for position, clip in enumerate(order):
        donor[clip] = int(order[(position + 1) % count])
    return donor


def shuffled_copy(source: Path, target: Path, seed: int = 0) -> None:
    """The same shards with every condition array moved to another training clip (latents, audio stay).

    Held-out clips keep their own conditions: the control is trained on shuffled pairs and evaluated
    exactly like the paired model.
    """
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copy(source / shards.META_FILE, target / shards.META_FILE)
    spec = shards.read_spec(source)
    samples = list(shards.iterate_samples(shards.list_shards(source)))
    train = [i for i, s in enumerate(samples) if s[shards.META_KEY]["split"] == "train"]
    donor_of = {clip: train[d] for clip, d in zip(train, derangement(len(train), seed))}
    writer = shards.ShardWriter(target, "train", 0, 1000)
    for index, s in enumerate(samples):
        donor = samples[donor_of.get(index, index)]
        meta = dict(s[shards.META_KEY], nouns=donor[shards.META_KEY]["nouns"],
                    valid_frames=donor[shards.META_KEY]["valid_frames"])
        # the audio (VAE latents) stays; every visual and text feature comes from the donor
        arrays = {k: (s if k.startswith("latent_") else donor)[k] for k in spec.array_keys}
        writer.write(shards.encode_sample(spec, meta, arrays, np.asarray(s[shards.AUDIO_KEY])))
    writer.close()


def mel_loudness(waveform: np.ndarray, latent_time: int) -> np.ndarray:
    """(latent_time,) mean log mel (AudioLDM front end) over mel bins, averaged per latent step."""
    from audio_models.front_end import audioldm_waveform, log_mel

    mel = log_mel(audioldm_waveform(np.asarray(waveform, dtype=np.float32)))  # (1024, 64)
    return mel.mean(axis=1).reshape(latent_time, -1).mean(axis=1)


def latent_columns(latents: np.ndarray) -> np.ndarray:
    """(B, C, T, F) -> (B, T, C*F): one feature vector per latent time step."""
    b, c, t, f = latents.shape
    return latents.transpose(0, 2, 1, 3).reshape(b, t, c * f)


@dataclass(frozen=True)
class LoudnessReadout:
    """loudness(z)[t] = (z[:, t, :] - mean) . weight + bias: ridge regression, fitted on training clips."""

    mean: np.ndarray
    weight: np.ndarray
    bias: float

    @classmethod
    def fit(cls, latents: np.ndarray, loudness: np.ndarray, ridge: float = RIDGE) -> LoudnessReadout:
        """latents (B, C, T, F), loudness (B, T): w = (X^T X + ridge I)^-1 X^T y on centred X, y."""
        x = latent_columns(latents).reshape(-1, latents.shape[1] * latents.shape[3]).astype(np.float64)
        y = loudness.reshape(-1).astype(np.float64)
        mean = x.mean(axis=0)
        xc = x - mean
        weight = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ (y - y.mean()))
        return cls(mean, weight, float(y.mean()))

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        """(B, C, T, F) -> (B, T)."""
        return (latent_columns(latents) - self.mean) @ self.weight + self.bias


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row Pearson correlation of (..., T) arrays over the last axis."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def pearson_inside(a: np.ndarray, b: np.ndarray, ends: list[int]) -> np.ndarray:
    """Per-clip Pearson over the latent steps before each clip's end only: a model that merely knows where the
    clip stops (its frames and O are zero past the end) gains nothing here. a, b: (B, T)."""
    return np.array([pearson(x[:end], y[:end]) for x, y, end in zip(a, b, ends)])


@dataclass
class Clips:
    """Everything the evaluation needs about one split, loaded once."""

    samples: list[dict[str, Any]]  # decoded shard samples
    latents: np.ndarray  # (B, C, T, F) posterior means
    loudness: np.ndarray  # (B, T) mel loudness


def load_clips(folder: Path, train: bool) -> Clips:
    samples = [s for s in shards.iterate_samples(shards.list_shards(folder))
               if (s[shards.META_KEY]["split"] == "train") == train]
    latents = np.stack([s["latent_mean.npy"].astype(np.float32) for s in samples])
    loudness = np.stack([mel_loudness(s[shards.AUDIO_KEY], latents.shape[2]) for s in samples])
    return Clips(samples, latents, loudness)


def generate(run: Path, clips: Clips, steps: int, guidance: float, seeds: int) -> np.ndarray:
    """(seeds, B, C, T, F) latents generated for the clips' own conditions, unscaled (VAE latent units)."""
    model, config = load_model(run)
    conditions = shards.stack_conditions([shards.sample_conditions(s, config.object_threshold) for s in clips.samples])
    draws = [sample(model, conditions, steps=steps, guidance=guidance, generator=torch.Generator().manual_seed(seed))
             for seed in range(seeds)]
    return torch.stack(draws).numpy() / config.vae_scaling_factor


def summary(values: np.ndarray) -> str:
    return f"{values.mean():.3f} +- {values.std():.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=Path("data/shards/demo"))
    parser.add_argument("--demo-train", type=int, default=24, help="training clips when the shards must be built")
    parser.add_argument("--demo-test", type=int, default=6, help="held-out clips when the shards must be built")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_science"))
    parser.add_argument("--steps", type=int, default=300, help="training steps of each model")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, default=2, help="generated samples per held-out clip")
    parser.add_argument("--train-args", default="", help="extra `python -m train` flags for both runs (quoted)")
    parser.add_argument("--title", default="Stage two: science check on the demo set")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ensure_demo_shards(args.shards, args.demo_train, args.demo_test)
    shuffled_copy(args.shards, args.work / "shuffled_shards")
    train_clips, test_clips = load_clips(args.shards, train=True), load_clips(args.shards, train=False)
    readout = LoudnessReadout.fit(train_clips.latents, train_clips.loudness)
    truth = readout(test_clips.latents)
    rows = {
        "ceiling: ground-truth latent (readout) vs its mel loudness": pearson(truth, test_clips.loudness),
        "no timing: mean training-clip loudness vs each clip's": pearson(train_clips.loudness.mean(0), test_clips.loudness),
        # what a model that draws plausible envelopes regardless of the conditions would score
        "no timing: a random training clip's envelope (readout) vs each clip's":
            pearson(truth[:, None], readout(train_clips.latents)[None]).mean(1),
    }
    steps_per_second = test_clips.latents.shape[2] / shards.read_spec(args.shards).window_seconds
    ends = [max(2, int(s[shards.META_KEY]["duration"] * steps_per_second)) for s in test_clips.samples]
    rows["no timing, inside the clips: mean training envelope vs each clip's"] = pearson_inside(
        np.broadcast_to(train_clips.loudness.mean(0), truth.shape), truth, ends)
    extra = args.train_args.split()
    for name, shard_dir in (("paired", args.shards), ("shuffled", args.work / "shuffled_shards")):
        run = args.work / name
        shutil.rmtree(run, ignore_errors=True)
        code = train_main(["--shards", str(shard_dir), "--output", str(run), "--max-steps", str(args.steps),
                           "--checkpoint-every", str(args.steps), "--log-every", "50", *extra])
        if code != 0:
            return code
        generated = generate(run, test_clips, args.sampling_steps, args.guidance, args.seeds)
        scores = np.stack([pearson(readout(g), truth) for g in generated]).mean(0)  # per clip, over seeds
        rows[f"{name}: generated vs ground-truth latent (readout)"] = scores
        rows[f"{name}, inside the clips only"] = np.stack([pearson_inside(readout(g), truth, ends) for g in generated]).mean(0)
        print(name, summary(scores), f"generated std {generated.std():.3f} (ground truth {test_clips.latents.std():.3f})")
    _, config = load_model(args.work / "paired")
    body = (
        f"Machine: {machine_name()}. `python -m benchmarks.train_science`: tiny preset, inputs {config.inputs}, "
        f"scheme {config.scheme}, {args.steps} steps of batch {config.batch_size} (lr {config.learning_rate}, "
        f"EMA {config.ema_decay}, posterior_sample {config.posterior_sample}, extra flags `{args.train_args}`) on "
        f"`{args.shards}`: {len(train_clips.samples)} training clips, {len(test_clips.samples)} held-out clips. "
        f"DDIM {args.sampling_steps} steps, guidance {args.guidance}, {args.seeds} sample(s) per clip. Score: Pearson "
        f"correlation over the 256 latent steps between the loudness envelopes of the generated and the "
        f"ground-truth latent of the same clip, the envelope read out by a ridge map fitted on the training "
        f"clips' latents (see the script's docstring); mean +- std over held-out clips.\n\n"
        "| what | envelope correlation |\n|---|---|\n"
        + "".join(f"| {name} | {summary(values)} |\n" for name, values in rows.items())
    )
    write_section(args.title, body)
    print(json.dumps({k: [float(v.mean()), float(v.std())] for k, v in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
