"""Where models run and in which precision: shared by stage one, training, evaluation and `vta-sam generate`.

- `resolve_device`: 'auto' is this rank's CUDA device when there is one (LOCAL_RANK under torchrun/accelerate),
  else the CPU; anything else is a torch device string.
- precision of the UNet while sampling: 'auto' is bf16 on a CUDA device that has it, float32 elsewhere (autocast
  on the CPU is slow and untested here); half precision off CUDA is refused with a clear error.
- `tune_backends`: TF32 for float32 matmuls and convolutions, and cuDNN's autotuner (fixed shapes). No-op off CUDA.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' -> this process's CUDA device (LOCAL_RANK modulo the device count) when CUDA is there, else cpu.
    ValueError, one line, for a name torch does not know and for a CUDA device this machine does not have."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        device = torch.device(name)
    except RuntimeError as error:  # "Expected one of cpu, cuda, ... device type at start of device string: ..."
        raise ValueError(f"device {name!r}: {str(error).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def half_dtype(half: bool, device: torch.device) -> torch.dtype:
    """float16 for frozen encoders when `half` and the device is CUDA; float32 otherwise (CPU half is slow, inexact)."""
    return torch.float16 if half and device.type == "cuda" else torch.float32


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the UNet, None for float32. 'auto': bf16 on CUDA devices that support it, else fp32."""
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
