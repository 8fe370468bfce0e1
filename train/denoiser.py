"""One guided network evaluation of a sampler step, eager or replayed from a CUDA graph.

A guided step is two UNet forwards (conditional and null condition, batched as 2B rows) and the guidance mix
u + g (c - u); the solver's own update (diffusers' `step`) is a few element-wise kernels around it. At batch 1 a
paper-size UNet forward is about 1,400 operations (normalisations, element-wise ops, attention pieces),
most of which take less time to run than to launch, which is why sampling one clip ran at a fraction of the
GPU's rate and bf16 was no faster than float32 there. A CUDA graph records the
kernels once and replays them with one launch:

- `CapturedDenoiser` copies the conditions into static buffers once per `train.sample` call and the latents and
  the timestep into static buffers at every step, replays the graph, and returns a copy of the static output (the
  solver keeps earlier outputs: DPM-Solver++'s multistep history). Capture is a few eager warm-up forwards on a
  side stream (cuDNN autotuning, lazily cached buffers such as `train.model.time_overlap`) and one recorded
  forward: about a second, no compilation.
- Graphs are cached per model and per (batch, condition shapes, guidance, precision, parameter storage), so the
  fixed-size batches of evaluation capture once per run; `vta-sam generate` captures once per number of windows.
  Moving or replacing the parameters changes their storage and so the key: a graph never reads freed memory.
- Off CUDA the same class runs the forward eagerly through the same static buffers (`capture=False`), which is
  what the CPU tests exercise; `train.sample` only uses it on CUDA.

Autocast runs with its weight-cast cache off (`torch.autocast(cache_enabled=False)`): a cast cached during
capture would be freed when the context exits while the graph still points at it. With
`train.speed.lower_precision_weights` the matmul weights are already in the autocast dtype, so there is no
weight cast to cache anyway.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from train.model import VTASAM

log = logging.getLogger(__name__)
MAX_CACHED_GRAPHS = 4  # per model; each holds its own memory pool (activations of one forward at its batch)
WARMUP_FORWARDS = 3  # eager forwards before capture: cuDNN's autotuner and lazily built buffers settle
# per model, held beside it rather than on it: a copy of the model (copy.deepcopy, the EMA) starts without graphs
_GRAPHS: weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict[Any, CapturedDenoiser | None]] = (
    weakref.WeakKeyDictionary())


def _autocast(device: torch.device, precision: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision, cache_enabled=False)


class GuidedDenoiser:
    """denoiser(latents (B, C, T, F), t) -> float32 u + guidance (c - u), with the network called once on 2B rows
    (rows :B with `conditions`, rows B: with the null condition: `drop`), under autocast to `precision`."""

    def __init__(self, model: VTASAM, conditions: dict[str, torch.Tensor], guidance: float,
                 precision: torch.dtype | None) -> None:
        first = next(iter(conditions.values()))
        self.model, self.conditions, self.guidance, self.precision = model, conditions, guidance, precision
        self.device, self.batch = first.device, first.shape[0]
        self.drop = torch.cat([torch.zeros(self.batch, dtype=torch.bool),
                               torch.ones(self.batch, dtype=torch.bool)]).to(self.device)

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat([latents, latents])
        doubled = {k: torch.cat([v, v]) for k, v in self.conditions.items()}
        with _autocast(self.device, self.precision):
            out = self.model(x, t.expand(2 * self.batch), doubled, self.drop).float()
        conditional, unconditional = out.chunk(2)
        return unconditional + self.guidance * (conditional - unconditional)


class CapturedDenoiser:
    """A `GuidedDenoiser` over static buffers: `load(conditions)` once per sampling call, then
    denoiser(latents, t) copies both in, replays the CUDA graph (or, with capture=False, runs the forward) and
    returns a fresh tensor."""

    def __init__(self, model: VTASAM, conditions: dict[str, torch.Tensor], latent_shape: tuple[int, ...],
                 guidance: float, precision: torch.dtype | None, capture: bool = True) -> None:
        device = next(iter(conditions.values())).device
        # static buffers: the graph reads these addresses at every replay
        self.latents = torch.zeros(latent_shape, device=device)
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.inner = GuidedDenoiser(model, {k: v.clone() for k, v in conditions.items()}, guidance, precision)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output = torch.zeros(latent_shape, device=device)
        if capture:
            self._capture(device)

    def _capture(self, device: torch.device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_FORWARDS):
                self.inner(self.latents, self.t)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.output = self.inner(self.latents, self.t)
        self.graph = graph

    def load(self, conditions: dict[str, torch.Tensor]) -> None:
        for name, value in conditions.items():
            self.inner.conditions[name].copy_(value)

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.latents.copy_(latents)
        self.t.copy_(t)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.output = self.inner(self.latents, self.t)
        return self.output.clone()  # the next replay overwrites the static output


def parameter_storage(model: torch.nn.Module) -> tuple[tuple[int, torch.dtype], ...]:
    """Where and in which dtype every parameter and buffer lives: a captured graph is valid while this holds."""
    return tuple((t.data_ptr(), t.dtype) for t in (*model.parameters(), *model.buffers()))


def cached_graphs(model: torch.nn.Module) -> OrderedDict[Any, CapturedDenoiser | None]:
    """The model's cached denoisers by key, oldest first (None where capture failed for that key)."""
    return _GRAPHS.setdefault(model, OrderedDict())


def release_graphs(model: torch.nn.Module) -> None:
    """Drop the model's cached graphs (and with them their memory pools)."""
    _GRAPHS.pop(model, None)


def captured_denoiser(model: VTASAM, conditions: dict[str, torch.Tensor], latent_shape: tuple[int, ...],
                      guidance: float, precision: torch.dtype | None, capture: bool = True) -> CapturedDenoiser | None:
    """The model's cached graph for these shapes (captured on first use) with `conditions` loaded; None when
    capture fails (the caller then samples eagerly; the reason is logged once per shape). capture=False keeps
    the static buffers and the cache but runs the forward eagerly (any device)."""
    cache = cached_graphs(model)
    key = (tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(conditions.items())), latent_shape, guidance,
           precision, model.channels_last, parameter_storage(model))
    if key not in cache:
        try:
            cache[key] = CapturedDenoiser(model, conditions, latent_shape, guidance, precision, capture)
        except RuntimeError as error:  # e.g. an operation that cannot be captured; eager sampling still works
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            log.warning("CUDA graph capture of the sampler step failed (%s); sampling without it", first)
            if capture:
                torch.cuda.synchronize()
            cache[key] = None
        while len(cache) > MAX_CACHED_GRAPHS:
            cache.popitem(last=False)
    cache.move_to_end(key)
    denoiser = cache[key]
    if denoiser is not None:
        denoiser.load(conditions)
    return denoiser
