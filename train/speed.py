"""Speed switches of the denoiser, shared by training, evaluation, `vta-sam generate` and the benchmarks.

Each switch is one measured change (benchmarks/gpu_bench.py times it against the run without it):
- precision: autocast of the UNet to bf16 / fp16 ("auto": bf16 on a CUDA device that has it, float32 elsewhere;
  autocast on the CPU is slow and untested here). The loss, the sampler's arithmetic and the weights stay float32.
- channels_last: the UNet's weights and input in NHWC, the layout cuDNN's tensor-core convolutions want.
- compile: `torch.compile` of the UNet in place (`nn.Module.compile`, so state-dict keys, checkpoints and the EMA
  are unchanged); it pays when the shapes repeat, as they do in training and sampling.
- `tune_backends`: TF32 for the float32 matmuls and convolutions that remain, and cuDNN's autotuner.
Fused attention needs no switch: every attention processor of the UNet is diffusers' AttnProcessor2_0, i.e.
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from train.model import VTASAM

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the UNet, None for float32. 'auto': bf16 on CUDA devices that support it, else fp32.

    Half precision is refused off CUDA (a clear error rather than a slow, unvalidated path)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else None
    if name != "fp32" and device.type != "cuda":
        raise ValueError(f"precision {name} needs a CUDA device (this run is on {device}); use fp32 or auto")
    return _DTYPES[name]


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to `dtype` on `device`; nothing when dtype is None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def tune_backends(device: torch.device) -> None:
    """TF32 tensor cores for float32 matmuls/convolutions and cuDNN's autotuner (fixed shapes). No-op off CUDA."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


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
