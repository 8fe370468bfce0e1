"""Training at a global batch: --global-batch derives grad_accumulation for the ranks launched, a run records and
resumes what it derived, and accumulating micro-batches takes the optimizer step of one batch that size."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from tests.test_train_run import run
from tests.test_train_support import SPEC, one_thread, small_config, write_shards  # noqa: F401 (autouse fixture)
from train import diffusion, trainer
from train.config import PRESETS
from train.trainer import ConfigError, global_batch_line, resolve_global_batch


def test_global_batch_derives_the_accumulation_per_rank_count():
    paper = PRESETS["paper"]
    assert (paper.global_batch, paper.batch_size, paper.grad_accumulation) == (32, 8, 1)
    assert [resolve_global_batch(paper, ranks).grad_accumulation for ranks in (1, 2, 4)] == [4, 2, 1]
    one_gpu = resolve_global_batch(paper, 1)
    assert one_gpu.global_batch == 32 and global_batch_line(one_gpu, 1) == "global batch 32 = 8 per rank x 1 rank x 4 accumulation"
    assert global_batch_line(resolve_global_batch(paper, 4), 4) == "global batch 32 = 8 per rank x 4 ranks x 1 accumulation"
    assert resolve_global_batch(paper.replace(grad_accumulation=4), 1) == one_gpu  # given by hand and agreeing
    tiny = PRESETS["tiny"].replace(grad_accumulation=3)  # global_batch 0: batch_size x grad_accumulation x ranks as given
    assert tiny.global_batch == 0 and resolve_global_batch(tiny, 2) is tiny


@pytest.mark.parametrize("changes, ranks, expected", [
    ({"global_batch": 30}, 1, "global_batch 30 is not a multiple of batch_size 8 x 1 rank(s) = 8"),
    ({}, 3, "global_batch 32 is not a multiple of batch_size 8 x 3 rank(s) = 24"),
    ({"global_batch": 4}, 1, "global_batch 4 is not a multiple of batch_size 8 x 1 rank(s) = 8"),
    ({"grad_accumulation": 2}, 1, "global_batch 32 = batch_size 8 x 1 rank(s) x accumulation 4, but grad_accumulation is 2"),
])
def test_a_global_batch_that_does_not_divide_is_one_line(changes, ranks, expected):
    with pytest.raises(ConfigError) as error:
        resolve_global_batch(PRESETS["paper"].replace(**changes), ranks)
    assert expected in str(error.value) and "\n" not in str(error.value), error.value


def test_a_negative_global_batch_is_refused():
    with pytest.raises(ValueError, match="global_batch must be >= 0"):
        PRESETS["tiny"].replace(global_batch=-8)


def test_a_run_records_its_global_batch_and_resumes_with_the_same_command(tmp_path, capsys):
    data, out = tmp_path / "shards", tmp_path / "run"
    write_shards(data, num_shards=1, per_shard=8)
    flags = ["--global-batch", "4", "--checkpoint-every", "1"]  # batch 2 (the small flags) x 1 rank x 2
    assert run(data, out, "--max-steps", "1", *flags) == 0
    assert "global batch 4 = 2 per rank x 1 rank x 2 accumulation" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert (saved["global_batch"], saved["batch_size"], saved["grad_accumulation"], saved["world_size"]) == (4, 2, 2, 1)
    assert json.loads((out / "checkpoints/step_00000001/progress.json").read_text())["samples"] == 4
    assert run(data, out, "--max-steps", "2", *flags) == 0  # resumes: the same command resolves the same way
    assert json.loads((out / "checkpoints/step_00000002/progress.json").read_text())["samples"] == 8
    capsys.readouterr()
    assert run(data, out, "--max-steps", "3", "--global-batch", "8", "--checkpoint-every", "1") == 2  # would train x 4
    err = capsys.readouterr().err.strip()
    assert "other grad_accumulation" in err and "derives grad_accumulation 4 here with 1 rank(s); it was 2 with 1 rank(s)" in err, err
    assert len(err.splitlines()) == 1


class ReplayedDraws:
    """Stands in for the `torch` module inside train.diffusion: `training_loss`'s three draws (randn_like: noise,
    randint: timesteps, rand: the condition drop) return the next rows of draws made once for all the step's
    samples, so one batch of 8 and two micro-batches of 4 give every sample the same noise, timestep and drop.
    Everything else is torch's own."""

    def __init__(self, noise: torch.Tensor, timesteps: torch.Tensor, uniforms: torch.Tensor):
        self.draws = {"noise": noise, "timesteps": timesteps, "uniforms": uniforms}
        self.used = dict.fromkeys(self.draws, 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def take(self, kind: str, rows: int) -> torch.Tensor:
        start = self.used[kind]
        self.used[kind] = start + rows
        assert self.used[kind] <= len(self.draws[kind]), f"more {kind} drawn than the step's samples"
        return self.draws[kind][start : start + rows]

    def randn_like(self, z0: torch.Tensor) -> torch.Tensor:
        noise = self.take("noise", z0.shape[0])
        assert noise.shape == z0.shape
        return noise.to(z0)

    def randint(self, low: int, high: int, size: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
        assert (low, high) == (0, 1000) and len(size) == 1
        return self.take("timesteps", size[0]).to(device)

    def rand(self, size: int, device: torch.device | None = None) -> torch.Tensor:
        return self.take("uniforms", size).to(device)


def step_draws(samples: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    uniforms = torch.rand(samples, generator=g).clamp(min=0.2)
    uniforms[[2, 5]] = 0.05  # below uncond_probability 0.1: one sample of each half trains unconditioned
    return {"noise": torch.randn(samples, *SPEC.latent_shape, generator=g),
            "timesteps": torch.randint(0, 1000, (samples,), generator=g), "uniforms": uniforms}


def step_samples(samples: int) -> dict[str, torch.Tensor]:
    """A collated batch (`train.data.collate`): posterior mean and std, and the conditions."""
    g = torch.Generator().manual_seed(1)
    return {"latent_mean": 0.2 * torch.randn(samples, *SPEC.latent_shape, generator=g),
            "latent_std": 0.1 + torch.rand(samples, *SPEC.latent_shape, generator=g),
            "video": torch.randn(samples, SPEC.num_frames, SPEC.embed_dim, generator=g),
            "objects": torch.randn(samples, SPEC.num_frames, SPEC.embed_dim, generator=g),
            "caption": torch.randn(samples, SPEC.embed_dim, generator=g)}


def one_optimizer_step(folder: Path, batch_size: int, accumulation: int, monkeypatch: pytest.MonkeyPatch,
                       undivided: bool = False) -> dict[str, Any]:
    """The trainer's own step (`train.trainer.train_step`: training_loss per micro-batch, backward / accumulation,
    clip, AdamW, LR schedule, EMA) from the seed-0 weights on the same 8 samples, fed as `accumulation` micro-batches
    of `batch_size`. undivided: each micro-batch's loss goes backward without the division by the count (the bug
    the comparison must catch). Returns the weights, EMA, the gradients AdamW saw, the grad norm and the step loss."""
    config = small_config(batch_size=batch_size, grad_accumulation=accumulation, output=str(folder))
    samples, count = step_samples(8), batch_size * accumulation
    assert count == 8
    run_ = trainer.start_run(config, SPEC, trainer.make_accelerator(config), lambda *_: None, count)
    model = run_.accelerator.unwrap_model(run_.model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    draws = ReplayedDraws(**step_draws(8))
    monkeypatch.setattr(diffusion, "torch", draws)
    if undivided:
        backward = run_.accelerator.backward
        monkeypatch.setattr(run_.accelerator, "backward", lambda loss, **kwargs: backward(loss * accumulation, **kwargs))
    seen: dict[str, torch.Tensor] = {}
    parameters = dict(model.named_parameters())
    cast(Any, run_.optimizer).optimizer.register_step_pre_hook(lambda *_: seen.update(
        {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in parameters.items()}))
    micro_batches: Iterator[dict[str, torch.Tensor]] = iter(
        [{k: v[i : i + batch_size] for k, v in samples.items()} for i in range(0, count, batch_size)])
    stepped, step_loss, grad_norm = trainer.train_step(run_, micro_batches, diffusion.noise_scheduler(config))
    monkeypatch.undo()
    assert stepped and draws.used == {"noise": 8, "timesteps": 8, "uniforms": 8}
    assert next(micro_batches, None) is None  # every micro-batch was trained on
    return {"initial": initial, "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in run_.ema.state_dict().items()}, "grads": seen,
            "grad_norm": float(grad_norm), "loss": float(step_loss.mean())}


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over max |a|, over all tensors together (a and b name the same tensors)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a) / max(float(x.abs().max()) for x in a.values())


def test_accumulated_micro_batches_take_the_step_of_one_large_batch(tmp_path, monkeypatch):
    """One optimizer step with batch 8 x 1 and with batch 4 x 2 on the same 8 samples and per-sample draws, from the
    same weights: the same loss, gradients, gradient norm, weights and EMA.

    Tolerances (float32, unit roundoff 6e-8): the two differ only in the order of summation (the mean of 8 per-sample
    losses vs two means of 4, halved; each weight gradient reduced over 8 samples at once vs 4 + 4), a few roundings
    per operation through the network: the gradients agree to 1e-5 of the largest one (measured: 2.5e-6), the loss
    to 1e-6. The first AdamW step moves a weight by lr m / (sqrt(v) + eps) = lr g / (|g| + eps), eps = 1e-8,
    lr = 1e-3, whose slope in g is lr eps / (|g| + eps)^2: up to lr / eps = 1e5 near g = 0, where a rounding of the
    gradient can turn the step around (measured: 7e-6 on 6 of 261k entries), and at most 1e-4 where |g| >= 1e-5
    (~90% of the entries): there a gradient difference of 1e-5 x max|g| (3e-7) moves a weight by < 1e-10, and weights
    and EMA agree to 1e-7, the rounding of a float32 weight below 1 (measured: 1.5e-8). The undivided run (the bug)
    doubles every gradient, far outside 1e-5, while its weights barely move (AdamW's first step and the norm clip are
    blind to the gradient's scale): which is why the gradients and their norm are compared, not the weights alone."""
    large = one_optimizer_step(tmp_path / "8x1", 8, 1, monkeypatch)
    accumulated = one_optimizer_step(tmp_path / "4x2", 4, 2, monkeypatch)
    assert accumulated["loss"] == pytest.approx(large["loss"], rel=1e-6)
    assert accumulated["grad_norm"] == pytest.approx(large["grad_norm"], rel=1e-5)
    assert relative_difference(large["grads"], accumulated["grads"]) < 1e-5
    conditioned = {k: (g.abs() >= 1e-5) & (accumulated["grads"][k].abs() >= 1e-5) for k, g in large["grads"].items()}
    assert sum(int(c.sum()) for c in conditioned.values()) > 0.8 * sum(c.numel() for c in conditioned.values())
    for name in ("weights", "ema"):
        assert large[name].keys() == conditioned.keys()  # every entry is a parameter (no buffers)
        for key, mask in conditioned.items():
            torch.testing.assert_close(accumulated[name][key][mask], large[name][key][mask], rtol=0, atol=1e-7,
                                       msg=f"{name}.{key}")
    moved = max(float((large["weights"][k] - v).abs().max()) for k, v in large["initial"].items())
    assert moved > 1e-4 and all(torch.equal(v, accumulated["initial"][k]) for k, v in large["initial"].items())  # the step moved the weights (the comparison above is not vacuous)

    # the comparison fails for the bug it is there for: the loss not divided by the accumulation count
    undivided = one_optimizer_step(tmp_path / "4x2-undivided", 4, 2, monkeypatch, undivided=True)
    assert undivided["grad_norm"] == pytest.approx(2 * large["grad_norm"], rel=1e-5)
    assert relative_difference(large["grads"], undivided["grads"]) > 0.5
