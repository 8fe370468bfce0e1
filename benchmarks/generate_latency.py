"""What `vta-sam generate` costs per 10.24 s window once its models are loaded, piece by piece, on this machine.

    python -m benchmarks.generate_latency [--size tiny|paper] [--device cpu] [--frames 41] [--no-write]

The pieces are the ones `vta_sam.generate.Generator.audio` runs, with random-init models of the named size
(`paper`: CLIP ViT-L/14, Grounding DINO Swin-T + SAM ViT-B, the 880 M-parameter UNet, the AudioLDM VAE decoder
and HiFi-GAN): stage one's visual features of one window (`preprocess.pipeline.Encoders.visual`: CLIP, grounding
of a 4-noun caption, SAM) on synthetic 640x360 frames, DPM-Solver++-25 with guidance 3 at batch 1 (`train.sample`,
set up as `vta-sam generate` sets it up: on CUDA bf16 with the matmul weights cast once and a CUDA graph), and the
decoder to 16 kHz audio. Video decoding and muxing are left out (they depend on the file; decoding a 360p window
takes a fraction of a second). Where a piece would take minutes on the CPU, it is timed on fewer frames or steps
and scaled linearly (said in the table). Records a section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.results import machine_name, write_section

CAPTION = "a man plays a guitar next to a dog on a sofa"
NOUNS = ["man", "guitar", "dog", "sofa"]


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def number(seconds: float) -> str:
    return f"{seconds:,.0f}" if seconds >= 100 else f"{seconds:.3g}"


def main(argv: list[str] | None = None) -> int:
    import shards
    import train
    from audio_models.decoder import Decoder
    from common.devices import resolve_precision, tune_backends
    from preprocess.config import PRESETS as FEATURE_PRESETS
    from preprocess.pipeline import Encoders
    from train.config import PRESETS
    from train.model import VTASAM
    from train.speed import lower_precision_weights

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "paper"), default="tiny", help="random-init model sizes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=0,
                        help="frames timed through the visual encoders, scaled to the window's (0: all of them)")
    parser.add_argument("--steps", type=int, default=0, help="sampler steps timed, scaled to 25 (0: all 25)")
    parser.add_argument("--no-write", dest="write", action="store_false", help="print only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    features = FEATURE_PRESETS[args.size].replace(random_init=True, random_size=args.size, device=args.device)
    spec = features.shard_spec()
    window_frames = features.num_frames
    frames = min(args.frames or window_frames, window_frames)
    steps = min(args.steps or 25, 25)
    tune_backends(device)

    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(frames, 360, 640, 3), dtype=np.uint8)
    encoders = Encoders(features, None, device, audio=False)
    encoders.visual([video[:2]], [CAPTION], [NOUNS])  # warm-up
    visual_seconds = timed(lambda: encoders.visual([video], [CAPTION], [NOUNS]), device) * window_frames / frames

    precision = resolve_precision("auto", device)
    torch.manual_seed(0)
    model = lower_precision_weights(VTASAM(PRESETS[args.size], spec).to(device).eval(), precision)
    conditions = {c.name: torch.randn(1, *c.shape(spec)).to(device) for c in shards.CONDITIONS}

    def sample(n: int) -> torch.Tensor:
        return train.sample(model, conditions, steps=n, guidance=3.0, scheduler="dpmsolver++",
                            generator=torch.Generator(device).manual_seed(0), precision=precision,
                            cuda_graph=device.type == "cuda")

    setup_seconds = timed(lambda: sample(1), device)  # warm-up; on CUDA the graph capture
    sample_seconds = timed(lambda: sample(steps), device) * 25 / steps
    decoder = Decoder(features.audio_models(), None, device, PRESETS[args.size].vae_scaling_factor)
    latents = sample(1)
    decoder(latents)  # warm-up
    decode_seconds = timed(lambda: decoder(latents), device)

    total = visual_seconds + sample_seconds + decode_seconds
    scaled = lambda done, wanted: "measured" if done == wanted else f"{done} of {wanted}, scaled"  # noqa: E731
    rows = [("visual features (CLIP, grounding of 4 nouns, SAM)", visual_seconds, scaled(frames, window_frames)),
            ("sampling, DPM-Solver++-25, guidance 3, batch 1", sample_seconds, scaled(steps, 25)),
            ("decoder (VAE + HiFi-GAN) to 16 kHz", decode_seconds, "measured")]
    lines = [f"- machine: {machine_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; device "
             f"{device}; `{args.size}` sizes, random init; one 10.24 s window of {window_frames} frames (640x360)",
             "", "| piece | seconds per window | |", "|---|---|---|"]
    lines += [f"| {name} | {number(seconds)} | {how} |" for name, seconds, how in rows]
    lines += [f"| **total** | **{number(total)}** | |", "",
              f"- one-time setup before the first window (first sampler call{', CUDA graph capture' if device.type == 'cuda' else ''}): "
              f"{setup_seconds:.3g} s; model loading not included"]
    print("\n".join(lines))
    if args.write:
        write_section(f"vta-sam generate: seconds per window ({args.size}, {device.type})", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
