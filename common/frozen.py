"""Frozen models (feature extractors, the AudioLDM VAE, embedders) and their seeded random-weight builds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random-init weights depend on the seed only, and the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_init_checksum(seed: int, size: str = "tiny") -> str:
    """What names random weights where a checkpoint's sha256 would stand (meta.json, WAV manifests)."""
    suffix = "" if size == "tiny" else f", size={size}"
    return f"random-init(seed={seed}{suffix})"


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices of at most `size` (at least 1) covering range(n): the batches of a forward pass."""
    for start in range(0, n, max(1, size)):
        yield slice(start, min(n, start + max(1, size)))


class FrozenModule(nn.Module):
    """Base of the frozen models: always in eval mode, no gradients; `checksum` names the weights."""

    checksum: str

    def freeze(self) -> FrozenModule:
        self.requires_grad_(False)
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where its first parameter (the wrapped model's, registered first) lives."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def train(self, mode: bool = True) -> FrozenModule:
        # frozen models never switch to training behaviour (dropout, drop-path), whatever a caller asks
        return super().train(False)
