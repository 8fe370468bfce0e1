"""SAM's image-encoder attention: relative positions as a dense bias (transformers) vs folded into query and key
(`preprocess.sam_attention`), time and peak memory of one attention module of the paper's ViT-B.

Two cases per run: a global-attention block on SAM's whole 64 x 64 token grid (bias: heads x 4096 x 4096 per
frame) and the windowed blocks' 14 x 14 windows (25 windows a frame, the 64 x 64 grid padded to 70 x 70), each for
`--frames` frames, random weights (positions drawn at 0.5 so that they matter), the same input both ways. Reported:
the fastest of --repeats forwards, the peak memory of one forward (CUDA: allocated by torch; CPU: the process's
peak resident set, reset before each run through /proc/self/clear_refs, so it includes what is already resident),
and the largest difference between the two outputs.

    python -m benchmarks.sam_attention [--device cpu|cuda] [--frames 1] [--dtype float32|float16] [--no-write]

The CPU numbers say what the bias costs in memory; which way is faster is a GPU question (`benchmarks/gpu.sh`,
`stage_one.changes.sam_folded_rel_pos`): the folded queries and keys carry 3x the channels in the global blocks.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers.models.sam.modeling_sam import SamVisionSdpaAttention

from benchmarks.grounding_cost import timed
from benchmarks.results import machine_name, write_section
from preprocess.model_configs import random_configs
from preprocess.sam_attention import FoldedRelPosAttention

TITLE = "Stage one: SAM's relative positions, dense bias vs folded (sam_attention.py)"
CASES = (("global block (64 x 64 tokens)", 0, 64, 1), ("windowed blocks (14 x 14 windows, 25 a frame)", 14, 14, 25))


def peak_bytes(device: torch.device, job: Callable[[], Any]) -> tuple[Any, int]:
    """job()'s result and the peak memory while it ran (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = job()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    result = job()
    status = Path("/proc/self/status").read_text()
    return result, int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=1, help="frames per forward")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not record in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = random_configs("paper").sam.vision_config
    rows = []
    for name, window, grid, per_frame in CASES:
        generator = torch.Generator().manual_seed(0)
        reference = SamVisionSdpaAttention(config, window)
        with torch.no_grad():
            for parameter in reference.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
            for table in (reference.rel_pos_h, reference.rel_pos_w):
                table.mul_(25)  # 0.5
        reference = reference.to(device, dtype).eval()
        folded = FoldedRelPosAttention(reference)
        hidden = torch.randn(args.frames * per_frame, grid, grid, config.hidden_size, generator=generator).to(device, dtype)
        outputs: dict[str, torch.Tensor] = {}
        seconds: dict[str, float] = {}
        memory: dict[str, int] = {}
        with torch.inference_mode():
            for way, module in (("bias", reference), ("folded", folded)):
                forward = functools.partial(lambda m, x: m(x)[0], module, hidden)
                forward()  # warm-up
                outputs[way], memory[way] = peak_bytes(device, forward)
                seconds[way] = timed(forward, args.repeats, device)
        difference = (outputs["folded"].float() - outputs["bias"].float()).abs().max().item()
        rows.append((name, seconds, memory, difference))
        print(f"{name}: bias {seconds['bias']:.3f} s, {memory['bias'] / 2**30:.2f} GiB; folded {seconds['folded']:.3f} s, "
              f"{memory['folded'] / 2**30:.2f} GiB; max difference {difference:.2e}", flush=True)
    memory_kind = "peak allocated by torch" if device.type == "cuda" else "process peak resident set"
    lines = [f"- machine: {machine_name()} (load average {os.getloadavg()[0]:.2f} at the end); torch {torch.__version__}, "
             f"{args.threads} threads; device {device}, "
             f"{args.dtype}; {args.frames} frame(s) per forward; one attention module of SAM ViT-B (12 heads of "
             f"64), random weights", f"- memory: {memory_kind}, one forward", "",
             "| attention | bias: s | bias: GiB | folded: s | folded: GiB | time folded / bias | max difference |",
             "|---|---|---|---|---|---|---|"]
    for name, seconds, memory, difference in rows:
        lines.append(f"| {name} | {seconds['bias']:.3f} | {memory['bias'] / 2**30:.2f} | {seconds['folded']:.3f} | "
                     f"{memory['folded'] / 2**30:.2f} | {seconds['folded'] / seconds['bias']:.2f} | {difference:.1e} |")
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(TITLE, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
