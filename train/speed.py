"""Speed switches of the denoiser, shared by training, evaluation, `vta-sam generate` and the benchmarks.

Each switch is one measured change (benchmarks/gpu_bench.py times it against the run without it):
- precision: autocast of the UNet to bf16 / fp16 (`common.devices.resolve_precision`). The loss, the sampler's
  arithmetic and the weights stay float32.
- channels_last: the UNet's weights and input in NHWC, the layout cuDNN's tensor-core convolutions want. On for
  sampling on CUDA (`sampling_channels_last`): an H200 sampled DPM-Solver++-25 at batch 1 in 0.298 s instead of
  0.336 s (bf16, CUDA graph). Off in training by default, and on the CPU.
- compile: `torch.compile` of the UNet in place (`nn.Module.compile`, so state-dict keys, checkpoints and the EMA
  are unchanged); it pays when the shapes repeat, as they do in training and sampling.
- lower_precision_weights: for sampling only, the weights of every Linear and convolution stored in the autocast
  dtype, so that autocast stops casting them at every step (the paper UNet's 300 Linear and convolution layers
  hold 504 weights and biases: 504 cast kernels per forward, and 1.8 GB of bf16 copies written, on top of the
  forward's ~1,400 operations); the numbers are bit for bit those of autocast over float32 weights.
- `common.devices.tune_backends`: TF32 for the float32 matmuls and convolutions that remain, cuDNN's autotuner.
Fused attention needs no switch: every attention processor of the UNet is diffusers' AttnProcessor2_0, i.e.
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

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


def sampling_channels_last(wanted: bool, device: torch.device) -> bool:
    """Whether a sampling model goes NHWC: when `wanted` (evaluation's --channels-last, on by default) and on CUDA,
    where cuDNN's convolutions take NHWC without the layout conversions around each call; on the CPU the layout
    stays as trained."""
    return wanted and device.type == "cuda"


def compiled(model: VTASAM) -> bool:
    """Whether `speed_up` compiled the UNet."""
    return getattr(model.unet, "_compiled_call_impl", None) is not None


def lower_precision_weights(model: VTASAM, dtype: torch.dtype | None) -> VTASAM:
    """Store the weights and biases of every Linear and convolution in `dtype` (in place; None: no change), for a
    model that only samples from now on (evaluation, `vta-sam generate`), always under autocast to `dtype`.

    Autocast runs linear and convolution in its dtype and casts their float32 weights at every call; the cast of
    a weight to bf16 is the same rounding whether done once here or at every step, so the outputs are bit for bit
    those of autocast over float32 weights. Normalisation layers keep float32 weights: autocast runs them in
    float32. Training needs the float32 weights: never train a model after this (`train.sample` refuses to run
    it without autocast to `dtype`)."""
    if dtype is None:
        return model
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            module.to(dtype)
    model.weight_dtype = dtype
    return model
