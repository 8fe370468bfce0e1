"""Speed switches of the denoiser, shared by training, evaluation, `vta-sam generate` and the benchmarks.

Each switch is one measured change (benchmarks/gpu_bench.py times it against the run without it):
- precision: autocast of the UNet to bf16 / fp16 (`common.devices.resolve_precision`). The loss, the sampler's
  arithmetic and the weights stay float32.
- channels_last: the UNet's weights and input in NHWC, the layout cuDNN's tensor-core convolutions want.
- compile: `torch.compile` of the UNet in place (`nn.Module.compile`, so state-dict keys, checkpoints and the EMA
  are unchanged); it pays when the shapes repeat, as they do in training and sampling.
- `common.devices.tune_backends`: TF32 for the float32 matmuls and convolutions that remain, cuDNN's autotuner.
Fused attention needs no switch: every attention processor of the UNet is diffusers' AttnProcessor2_0, i.e.
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from train.model import VTASAM


def speed_up(model: VTASAM, channels_last: bool = False, compile: bool = False, compile_mode: str | None = None,
             dynamic: bool | None = False) -> VTASAM:
    """Apply the memory-format and compile switches to `model` in place (call after moving it to its device).

    compile_mode: torch.compile's mode (None: the default; "reduce-overhead" adds CUDA graphs, for small batches).
    dynamic: False compiles for one shape (training batches, sampling steps: a new shape recompiles); None lets
    torch mark a changing batch size dynamic (`vta-sam generate`: one batch per video, its number of windows)."""
    if channels_last:
        model.unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        model.channels_last = True
    if compile:
        model.unet.compile(dynamic=dynamic, mode=compile_mode)
    return model
