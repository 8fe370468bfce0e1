"""The sampler's speed paths give the plain sampler's numbers: weights cast once for autocast (bit for bit), the
static-buffer guided step that CUDA graphs replay, its per-model cache, and evaluation's sampling-batch choice."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import profile

import shards
import train
from eval.generate import pick_sampling_batch
from preprocess.config import PRESETS as FEATURE_PRESETS
from train.config import PRESETS
from train.denoiser import (
    MAX_CACHED_GRAPHS,
    CapturedDenoiser,
    GuidedDenoiser,
    cached_graphs,
    captured_denoiser,
    release_graphs,
)
from train.model import VTASAM
from train.speed import lower_precision_weights

SPEC = FEATURE_PRESETS["tiny"].shard_spec()


@pytest.fixture(scope="module")
def model() -> VTASAM:
    torch.manual_seed(0)
    built = VTASAM(PRESETS["tiny"], SPEC).eval()
    with torch.no_grad():
        for p in built.parameters():  # the added-condition projections start at zero: give every path a say
            p.normal_(0, 0.05)
    return built


def conditions(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {c.name: torch.randn(batch, *c.shape(SPEC), generator=g) for c in shards.CONDITIONS}


def latents(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, *SPEC.latent_shape, generator=torch.Generator().manual_seed(seed))


def casts(prof: profile) -> int:
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


def test_weights_cast_once_give_autocast_numbers_bit_for_bit(model):
    lowered = lower_precision_weights(copy.deepcopy(model), torch.bfloat16)
    assert lowered.weight_dtype == torch.bfloat16
    assert lowered.unet.conv_in.weight.dtype == torch.bfloat16 and lowered.project["video"].bias.dtype == torch.bfloat16
    assert lowered.unet.conv_norm_out.weight.dtype == torch.float32  # norms stay float32, as autocast runs them

    def run(m: VTASAM) -> torch.Tensor:
        return train.sample(m, conditions(1), steps=2, guidance=3.0, scheduler="ddim",
                            generator=torch.Generator().manual_seed(1), precision=torch.bfloat16)

    with profile() as prof:
        plain = run(model)
    with profile() as lowered_prof:
        cast = run(lowered)
    assert torch.equal(plain, cast)
    assert casts(lowered_prof) * 3 < casts(prof)  # the weights are no longer cast at every step
    with pytest.raises(ValueError, match="bfloat16"):
        train.sample(lowered, conditions(1), steps=1)  # float32 sampling of bf16 weights is refused, not wrong


def test_static_buffer_step_equals_the_plain_step(model):
    """What a CUDA graph replays, run eagerly: the same numbers, a fresh output per call, new conditions loaded."""
    with torch.no_grad():
        plain = GuidedDenoiser(model, conditions(2), 3.0, None)
        static = CapturedDenoiser(model, conditions(2), (2, *SPEC.latent_shape), 3.0, None, capture=False)
        t = torch.tensor(500)
        first = static(latents(2, 1), t)
        kept = first.clone()
        second = static(latents(2, 2), torch.tensor(20))
        torch.testing.assert_close(first, plain(latents(2, 1), t), rtol=0, atol=0)
        torch.testing.assert_close(second, plain(latents(2, 2), torch.tensor(20)), rtol=0, atol=0)
        assert torch.equal(first, kept)  # a later call does not overwrite what an earlier one returned
        static.load(conditions(2, seed=5))
        other = GuidedDenoiser(model, conditions(2, seed=5), 3.0, None)
        torch.testing.assert_close(static(latents(2, 1), t), other(latents(2, 1), t), rtol=0, atol=0)
        assert not torch.allclose(first, other(latents(2, 1), t))  # the conditions matter (the test can fail)


def test_graph_cache_per_shape_and_parameter_storage(model):
    model = copy.deepcopy(model)
    shape = (1, *SPEC.latent_shape)
    with torch.no_grad():
        a = captured_denoiser(model, conditions(1), shape, 3.0, None, capture=False)
        b = captured_denoiser(model, conditions(1, seed=3), shape, 3.0, None, capture=False)
        assert a is b  # same shapes: reused, with the new conditions loaded
        torch.testing.assert_close(b.inner.conditions["video"], conditions(1, seed=3)["video"], rtol=0, atol=0)
        assert captured_denoiser(model, conditions(1), shape, 2.0, None, capture=False) is not a  # other guidance
        lower_precision_weights(model, torch.bfloat16)  # new parameter storage: a graph would read freed memory
        assert captured_denoiser(model, conditions(1), shape, 3.0, torch.bfloat16, capture=False) is not a
        for batch in range(2, 2 + MAX_CACHED_GRAPHS):
            captured_denoiser(model, conditions(batch), (batch, *SPEC.latent_shape), 3.0, torch.bfloat16, capture=False)
        assert len(cached_graphs(model)) == MAX_CACHED_GRAPHS
        assert len(cached_graphs(copy.deepcopy(model))) == 0  # a copy starts without the original's graphs
        release_graphs(model)
        assert len(cached_graphs(model)) == 0


def test_cuda_graph_is_ignored_off_cuda(model):
    run = dict(steps=2, guidance=3.0, scheduler="dpmsolver++")
    plain = train.sample(model, conditions(1), generator=torch.Generator().manual_seed(0), **run)
    graphed = train.sample(model, conditions(1), generator=torch.Generator().manual_seed(0), cuda_graph=True, **run)
    assert torch.equal(plain, graphed)
    assert len(cached_graphs(model)) == 0


def test_pick_sampling_batch():
    assert pick_sampling_batch({4: 0.10, 8: 0.05, 16: 0.03, 32: 0.0301}) == 16  # within 3%: the smaller
    assert pick_sampling_batch({4: 0.10, 8: 0.05, 16: 0.03, 32: 0.02}) == 32
    assert pick_sampling_batch({4: 0.01, 8: 0.02}) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_cuda_graph_sampling_equals_eager(model, precision):
    device = torch.device("cuda")
    on_gpu = lower_precision_weights(copy.deepcopy(model).to(device), precision)
    cond = {k: v.to(device) for k, v in conditions(3).items()}

    def run(graph: bool) -> torch.Tensor:
        generators = [torch.Generator(device).manual_seed(k) for k in range(3)]
        return train.sample(on_gpu, cond, steps=5, guidance=3.0, scheduler="ddpm", generator=generators,
                            precision=precision, cuda_graph=graph)

    eager, graphed = run(False), run(True)
    assert len(cached_graphs(on_gpu)) == 1 and None not in cached_graphs(on_gpu).values()
    torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-3 if precision is None else 2e-2)
    torch.testing.assert_close(run(True), graphed, rtol=0, atol=0)  # replayed again: the same graph, same numbers
