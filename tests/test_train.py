"""Stage two: routing, the object term's time alignment, one step per ablation, overfitting, sampling."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import safetensors.torch
import torch

from common.devices import precision_name, resolve_precision
from shards import CONDITION_NAMES
from tests.test_train_support import SPEC, one_thread, small_config  # noqa: F401 (autouse fixture)
from train import VTASAM, route, sample
from train.config import INPUTS, PRESETS, SCHEMES, TrainConfig
from train.diffusion import (
    diffusion_loss,
    loss_weights,
    noise_scheduler,
    sample_latents,
    training_loss,
    training_target,
)
from train.model import align_to_tokens, time_overlap, token_grid
from train.speed import speed_up
from train.trainer import ConfigError, LearningRateSchedule, RankRecorder, check_scaling_factor


def conditions(spec, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "video": torch.randn(batch, spec.num_frames, spec.embed_dim, generator=g),
        "objects": torch.randn(batch, spec.num_frames, spec.embed_dim, generator=g),
        "caption": torch.randn(batch, spec.embed_dim, generator=g),
    }


def test_route_places_each_condition():
    assert route("V+O", "Z@V+O") == (["video"], "objects")
    assert route("V+O", "Z@O+V") == (["objects"], "video")
    assert route("V+O", "Z@(V+O)") == (["video", "objects"], None)
    assert route("V+O", "Z@V") == (["video"], None)
    assert route("T", "Z@V+O") == (["caption"], None)
    assert route("V+T", "Z@V+O") == (["video", "caption"], None)
    assert route("V+O+T", "Z@V+O") == (["video", "caption"], "objects")
    assert route("V", "Z@(V+O)") == (["video"], None)  # a condition the inputs lack is dropped
    assert route("V", "Z@V+O") == (["video"], None)
    with pytest.raises(ValueError, match="no cross-attention keys"):
        route("V", "Z@O+V")  # V would only be added: nothing to attend to


def test_config_refuses_pairs_that_leave_no_keys():
    with pytest.raises(ValueError, match="no cross-attention keys"):
        TrainConfig(inputs="V", scheme="Z@O+V")
    assert TrainConfig(inputs="T", scheme="Z@O+V").scheme == "Z@O+V"  # T is a key whatever the scheme


def test_time_overlap_rows_are_frame_coverage():
    w = time_overlap(256, 20)
    assert torch.allclose(w.sum(1), torch.ones(256))
    # step 0 covers [0, 0.04 s) of 10.24 s: inside frame 0 ([0, 0.512 s))
    assert w[0, 0] == 1
    # step 12 covers [0.48, 0.52) s: 0.032 s in frame 0 and 0.008 s in frame 1
    assert torch.allclose(w[12, :2], torch.tensor([0.8, 0.2]), atol=1e-5)
    coarse = time_overlap(10, 20)  # a coarse level averages two frames per step
    assert torch.allclose(coarse[3, 6:8], torch.tensor([0.5, 0.5]))


def test_token_grid_follows_the_unet_levels():
    assert token_grid(256 * 16, (256, 16)) == (256, 16)
    assert token_grid(128 * 8, (256, 16)) == (128, 8)
    assert token_grid(32 * 2, (256, 16)) == (32, 2)
    with pytest.raises(ValueError):
        token_grid(100, (256, 16))


def test_align_to_tokens_touches_only_the_frames_seconds():
    frames, dim = 20, 3
    base = torch.randn(1, frames, dim)
    changed = base.clone()
    changed[:, 7] += 1.0  # frame 7 covers [3.584, 4.096) s
    tokens = 128 * 8
    delta = (align_to_tokens(changed, tokens, (256, 16)) - align_to_tokens(base, tokens, (256, 16))).abs().sum(-1)
    per_step = delta.view(128, 8)
    # token n is time step n // 8 (row-major H then W); every frequency of a step gets the same change
    assert torch.equal(per_step.amax(1) > 0, per_step.amin(1) > 0)
    seconds = (torch.arange(128) + 0.5) * 10.24 / 128
    inside = (seconds > 3.584 + 0.08) & (seconds < 4.096 - 0.08)
    outside = (seconds < 3.584 - 0.08) | (seconds > 4.096 + 0.08)
    assert (per_step[inside] > 0).all() and (per_step[outside] == 0).all()


def _output_change(model: VTASAM, frame: int) -> torch.Tensor:
    """|change| of the UNet output per latent time step when the object embedding of one frame changes."""
    torch.manual_seed(1)
    z = torch.randn(1, *SPEC.latent_shape)
    c = conditions(SPEC, batch=1)
    t = torch.tensor([500])
    with torch.no_grad():
        before = model(z, t, c)
        c["objects"][:, frame] += 3.0
        after = model(z, t, c)
    return (after - before).abs().mean(dim=(0, 1, 3))  # (latent_time,)


@pytest.mark.parametrize("frame", [3, 14])
def test_object_term_is_time_aligned_in_the_unet(frame):
    torch.manual_seed(0)
    model = VTASAM(small_config(), SPEC).eval()
    assert _output_change(model, frame).abs().max() == 0  # the object projections start at zero
    for p in model.added_parameters():
        torch.nn.init.normal_(p, std=0.5)
    change = _output_change(model, frame)
    # frame f covers latent steps [f, f + 1) * 64 / 20; convolutions, GroupNorm statistics and self-attention
    # spread the change somewhat, so compare the frame's span with the steps far from it
    first, last = int(frame * 3.2), int((frame + 1) * 3.2)
    steps = torch.arange(SPEC.latent_time)
    far = (steps < first - 12) | (steps > last + 12)
    assert first - 1 <= int(change.argmax()) <= last + 1, change
    assert change[first:last + 1].mean() > 4 * change[far].mean(), change


def _one_step(config: TrainConfig) -> tuple[float, VTASAM]:
    torch.manual_seed(0)
    model = VTASAM(config, SPEC)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = noise_scheduler(config)
    z0 = torch.randn(2, *SPEC.latent_shape)
    noise, t = torch.randn_like(z0), torch.tensor([10, 900])
    prediction = model(scheduler.add_noise(z0, noise, t), t, conditions(SPEC), drop=torch.tensor([False, True]))
    loss = diffusion_loss(prediction, training_target(scheduler, z0, noise, t), t, scheduler, config.snr_weighting,
                          config.min_snr_gamma)
    loss.backward()
    for p in model.added_parameters():  # the zero-initialised Linear_l still receive gradients
        assert p.grad is not None and p.grad.abs().sum() > 0
    optimizer.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no parameter changed"
    return float(loss.detach()), model


@pytest.mark.parametrize("inputs", INPUTS)
def test_one_step_for_every_input_set(inputs):
    loss, model = _one_step(small_config(inputs=inputs))
    assert torch.isfinite(torch.tensor(loss))
    assert ("objects" in model.project) == ("O" in inputs)
    assert ("caption" in model.project) == ("T" in inputs)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_step_for_every_scheme(scheme):
    loss, model = _one_step(small_config(inputs="V+O", scheme=scheme))
    assert torch.isfinite(torch.tensor(loss))
    assert bool(model.added_parameters()) == (scheme in ("Z@O+V", "Z@V+O"))


def test_loss_falls_on_a_fixed_batch():
    config = small_config()
    spec = dataclasses.replace(SPEC, latent_time=32)  # smaller still: 25 steps on a shared 2-core machine
    torch.manual_seed(0)
    model = VTASAM(config, spec)
    scheduler = noise_scheduler(config)
    z0 = torch.randn(2, *spec.latent_shape) * 0.5
    noise, t, c = torch.randn_like(z0), torch.tensor([200, 700]), conditions(spec, batch=2)
    target = training_target(scheduler, z0, noise, t)
    noisy = scheduler.add_noise(z0, noise, t)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = diffusion_loss(model(noisy, t, c), target, t, scheduler, "none", 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def training_batch(spec, batch: int = 2, seed: int = 0) -> dict:
    """A collated batch as `train.data.collate` makes it: posterior mean and std, conditions, ids."""
    g = torch.Generator().manual_seed(seed + 1)
    return {"id": [f"clip{i}" for i in range(batch)], **conditions(spec, batch, seed),
            "latent_mean": 0.2 * torch.randn(batch, *spec.latent_shape, generator=g),
            "latent_std": 0.1 + torch.rand(batch, *spec.latent_shape, generator=g)}


def seeded_loss(model, config: TrainConfig, batch: dict, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return training_loss(model, noise_scheduler(config), batch, config)


@pytest.mark.parametrize("posterior, weighting, gamma", [(False, "none", 0.0), (True, "min-snr-v", 5.0),
                                                        (False, "vta-ldm", 5.0)])
def test_training_loss_is_the_hand_assembled_step(posterior, weighting, gamma):
    """The same draws, in the same order and of the same kind, as the step the trainer always ran: a seed (or a
    resumed run's restored RNG) gives the same loss bit for bit."""
    config = small_config(posterior_sample=posterior, snr_weighting=weighting, min_snr_gamma=gamma,
                          uncond_probability=0.5)
    model, batch = model_with_objects(config), training_batch(SPEC)
    loss = seeded_loss(model, config, batch)
    scheduler = noise_scheduler(config)
    torch.manual_seed(7)
    with torch.no_grad():
        z0 = sample_latents(batch["latent_mean"], batch["latent_std"] if posterior else None, config.vae_scaling_factor)
        noise = torch.randn_like(z0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (2,), device=z0.device)
        drop = torch.rand(2) < config.uncond_probability
        prediction = model(scheduler.add_noise(z0, noise, t), t, {k: batch[k] for k in CONDITION_NAMES}, drop)
        expected = diffusion_loss(prediction, training_target(scheduler, z0, noise, t), t, scheduler, weighting, gamma)
    assert torch.equal(loss, expected)
    assert not torch.equal(seeded_loss(model, config, batch, seed=8), loss)  # the draws do matter
    # the configured weighting is the one applied (vta-ldm is 1, like none, where both drawn steps have SNR < 5)
    other = "none" if weighting == "min-snr-v" else "min-snr-v"
    assert not torch.equal(seeded_loss(model, config.replace(snr_weighting=other, min_snr_gamma=5.0), batch), loss)


def hand_alpha_bar(t: int, start: float = 0.00085, end: float = 0.012, steps: int = 1000) -> float:
    """alpha_bar_t = prod_{i <= t} (1 - beta_i), beta_i = (sqrt(start) + i (sqrt(end) - sqrt(start)) / (steps - 1))^2."""
    product = 1.0
    for i in range(t + 1):
        product *= 1 - (math.sqrt(start) + i * (math.sqrt(end) - math.sqrt(start)) / (steps - 1)) ** 2
    return product


TIMESTEPS = [0, 100, 500, 999]


def hand_weights(weighting: str, gamma: float, prediction: str = "v_prediction") -> list[float]:
    weights = []
    for t in TIMESTEPS:
        snr = hand_alpha_bar(t) / (1 - hand_alpha_bar(t))
        if weighting == "none":
            weights.append(1.0)
        elif weighting == "min-snr-v" and prediction == "v_prediction":
            weights.append(min(snr, gamma) / (snr + 1))
        else:
            weights.append(min(snr, gamma) / snr)
    return weights


@pytest.mark.parametrize("weighting", ["vta-ldm", "min-snr-v", "none"])
def test_loss_weights_are_the_hand_computed_ones(weighting):
    config = small_config(snr_weighting=weighting, min_snr_gamma=0.0 if weighting == "none" else 5.0)
    scheduler = noise_scheduler(config)
    t = torch.tensor(TIMESTEPS)
    expected = torch.tensor(hand_weights(weighting, 5.0))
    weights = loss_weights(scheduler, t, weighting, config.min_snr_gamma)
    if weighting == "none":
        assert weights is None
    else:  # float32 schedule: 1 - alpha_bar_0 = 0.00085 keeps ~4 digits
        assert weights is not None
        torch.testing.assert_close(weights, expected.float(), rtol=1e-4, atol=0)
    # the loss is the mean of weight * per-sample squared error: errors 1, 2, 3, 4 give squared errors 1, 4, 9, 16
    target = torch.arange(1.0, 5.0)[:, None, None, None].expand(4, 2, 3, 3)
    loss = diffusion_loss(torch.zeros_like(target), target, t, scheduler, weighting, config.min_snr_gamma)
    torch.testing.assert_close(loss, (expected * torch.tensor([1.0, 4.0, 9.0, 16.0])).mean().float(), rtol=1e-4, atol=0)


def test_the_two_min_snr_forms_differ_where_the_paper_says():
    """vta-ldm = min(SNR, 5) / SNR is 1 at high noise; the Min-SNR v-form is ~SNR there (~200x smaller at t=999);
    with epsilon-prediction the Min-SNR form is VTA-LDM's."""
    vta, v_form = hand_weights("vta-ldm", 5.0), hand_weights("min-snr-v", 5.0)
    assert vta[-1] == 1.0 and 150 < vta[-1] / v_form[-1] < 250
    assert math.isclose(vta[0], v_form[0], rel_tol=1e-3)  # low noise: SNR ~1175, both ~5 / SNR
    scheduler = noise_scheduler(small_config(prediction="epsilon"))
    weights = loss_weights(scheduler, torch.tensor(TIMESTEPS), "min-snr-v", 5.0)
    assert weights is not None
    torch.testing.assert_close(weights, torch.tensor(vta).float(), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="snr weighting must be"):
        loss_weights(scheduler, torch.tensor(TIMESTEPS), "min-snr", 5.0)


@pytest.mark.parametrize("changes, message", [
    ({"snr_weighting": "min-snr"}, "snr_weighting must be one of"),
    ({"snr_weighting": "vta-ldm", "min_snr_gamma": 0.0}, "min_snr_gamma must be > 0 with snr_weighting 'vta-ldm'"),
    ({"snr_weighting": "min-snr-v", "min_snr_gamma": -1.0}, "min_snr_gamma must be > 0"),
    ({"snr_weighting": "none", "min_snr_gamma": -1.0}, "min_snr_gamma must be > 0"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of"),
])
def test_config_refuses_bad_weighting_and_schedule(changes, message):
    with pytest.raises(ValueError, match=message) as error:
        TrainConfig(**changes)
    assert "\n" not in str(error.value)


def test_presets_weighting_and_schedule():
    paper, tiny = PRESETS["paper"], PRESETS["tiny"]
    assert (paper.snr_weighting, paper.min_snr_gamma, paper.lr_schedule, paper.warmup_steps) == ("vta-ldm", 5.0, "linear", 0)
    assert (tiny.snr_weighting, tiny.min_snr_gamma, tiny.lr_schedule) == ("none", 0.0, "constant")


@pytest.mark.parametrize("gamma, expected", [(5.0, "min-snr-v"), (0.0, "none"), (None, "none")])
def test_a_run_config_without_snr_weighting_loads_as_it_trained(gamma, expected):
    saved = PRESETS["paper"].to_dict()
    del saved["snr_weighting"]
    if gamma is None:
        del saved["min_snr_gamma"]
    else:
        saved["min_snr_gamma"] = gamma
    assert TrainConfig.from_dict(saved).snr_weighting == expected
    written = dict(PRESETS["paper"].to_dict(), snr_weighting="vta-ldm")  # a config that has the field keeps it
    assert TrainConfig.from_dict(written).snr_weighting == "vta-ldm"


def test_training_loss_samples_the_posterior_only_when_asked():
    batch = training_batch(SPEC)
    wider = dict(batch, latent_std=2 * batch["latent_std"])
    for posterior in (False, True):
        config = small_config(posterior_sample=posterior)
        model = model_with_objects(config)
        same = torch.equal(seeded_loss(model, config, batch), seeded_loss(model, config, wider))
        assert same != posterior, f"posterior_sample={posterior}"


def test_training_loss_drops_every_condition_with_probability_one():
    always = small_config()
    object.__setattr__(always, "uncond_probability", 1.0)  # TrainConfig refuses 1 (no conditional training at all)
    batch = training_batch(SPEC)
    zeroed = dict(batch, **{k: torch.zeros_like(batch[k]) for k in CONDITION_NAMES})
    other = dict(batch, **conditions(SPEC, seed=5))
    model = model_with_objects(always)
    dropped = seeded_loss(model, always, batch)
    assert torch.equal(dropped, seeded_loss(model, always, zeroed))
    assert torch.equal(dropped, seeded_loss(model, always, other))
    never = small_config(uncond_probability=0.0)  # the conditions matter: the comparison above is not vacuous
    assert not torch.equal(seeded_loss(model, never, batch), seeded_loss(model, never, other))


def test_rank_recorder_appends_ids_and_writes_weights(tmp_path):
    with RankRecorder(tmp_path, 1) as ranks:
        ranks.on_batch(0, 3, ["a", "b"])
    assert ranks.ids.closed
    with RankRecorder(tmp_path, 1) as ranks:  # a resumed run appends
        ranks.on_batch(1, 4, ["c"])
        ranks.save_weights(torch.nn.Linear(2, 1))
    assert (tmp_path / "ranks/ids_rank1.txt").read_text().splitlines() == ["0 3 a", "0 3 b", "1 4 c"]
    weights = safetensors.torch.load_file(str(tmp_path / "ranks/weights_rank1.safetensors"))
    assert set(weights) == {"weight", "bias"}


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpmsolver++"])
def test_sample_shapes_and_guidance(kind):
    torch.manual_seed(0)
    model = VTASAM(small_config(), SPEC).eval()
    c = conditions(SPEC, batch=2)
    latents = sample(model, c, steps=2, guidance=3.0, scheduler=kind, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, *SPEC.latent_shape) and torch.isfinite(latents).all()
    again = sample(model, c, steps=2, guidance=3.0, scheduler=kind, generator=torch.Generator().manual_seed(0))
    assert torch.equal(latents, again)
    if kind == "ddim":  # guidance changes the result unless the conditions do not matter
        plain = sample(model, c, steps=2, guidance=1.0, scheduler=kind, generator=torch.Generator().manual_seed(0))
        assert not torch.allclose(latents, plain)


def assert_same_model(reference: VTASAM, fast: VTASAM) -> None:
    """The same outputs and parameter gradients on one batch (up to float rounding)."""
    z, t, c = torch.randn(2, *SPEC.latent_shape), torch.tensor([10, 900]), conditions(SPEC)
    outputs = [model(z, t, c) for model in (reference, fast)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    for out in outputs:
        out.square().mean().backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


def model_with_objects(config: TrainConfig | None = None) -> VTASAM:
    """The small model with non-zero object projections (a fresh one ignores O)."""
    torch.manual_seed(0)
    model = VTASAM(config or small_config(), SPEC)
    for p in model.added_parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def test_sampling_goes_nhwc_on_cuda_only():
    """Evaluation and `vta-sam generate` sample in NHWC on CUDA (measured faster there), by default, and never on
    the CPU, where the layout stays as trained."""
    from eval.config import EvalConfig
    from train.speed import sampling_channels_last

    assert EvalConfig().channels_last
    assert sampling_channels_last(True, torch.device("cuda")) and sampling_channels_last(True, torch.device("cuda", 1))
    assert not sampling_channels_last(True, torch.device("cpu"))
    assert not sampling_channels_last(False, torch.device("cuda"))


def test_channels_last_computes_what_the_plain_layout_does():
    plain = model_with_objects()
    fast = speed_up(copy.deepcopy(plain), channels_last=True)
    conv = fast.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert_same_model(plain, fast)


def test_precision_resolves_per_device():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    with pytest.raises(ValueError, match="bf16 needs a CUDA device"):
        resolve_precision("bf16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", cpu)
    assert resolve_precision("fp16", torch.device("cuda")) is torch.float16  # no CUDA call: the name decides
    assert precision_name(torch.bfloat16) == "bf16" and precision_name(None) == "fp32"


@pytest.mark.slow
def test_the_compiled_unet_computes_what_the_eager_one_does():
    """torch.compile (inductor, the C++ backend on the CPU) in place: same outputs and gradients, same state keys."""
    eager = model_with_objects()
    compiled = speed_up(copy.deepcopy(eager), compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and the EMA are unaffected
    assert_same_model(eager, compiled)


@pytest.mark.parametrize("kind, warmup, total, expected", [
    ("linear", 0, 10, {0: 1.0, 1: 0.9, 5: 0.5, 9: 0.1, 10: 0.0, 13: 0.0}),
    ("cosine", 0, 10, {0: 1.0, 2: 0.5 * (1 + math.cos(0.2 * math.pi)), 5: 0.5, 10: 0.0, 12: 0.0}),
    ("linear", 4, 12, {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 8: 0.5, 12: 0.0}),
    ("constant", 2, 10, {0: 0.5, 1: 1.0, 10: 1.0, 100: 1.0}),
])
def test_learning_rate_schedule_values(kind, warmup, total, expected):
    schedule = LearningRateSchedule(kind, warmup, total)
    for step, factor in expected.items():
        assert math.isclose(schedule(step), factor, abs_tol=1e-12), (step, schedule(step), factor)


def test_learning_rate_schedule_in_a_lambda_lr_resumes_with_its_horizon():
    """Without warmup it is transformers' linear schedule (what Tango and VTA-LDM use); the LambdaLR's state carries
    the horizon, so a resumed run keeps decaying towards the one it started with."""
    from transformers import get_linear_schedule_with_warmup

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-5)

    ours = torch.optim.lr_scheduler.LambdaLR(optimizer(), LearningRateSchedule("linear", 0, 10))
    reference = get_linear_schedule_with_warmup(optimizer(), num_warmup_steps=0, num_training_steps=10)
    for _ in range(5):
        assert math.isclose(ours.get_last_lr()[0], reference.get_last_lr()[0], rel_tol=1e-12)
        ours.optimizer.step(), ours.step(), reference.optimizer.step(), reference.step()
    assert math.isclose(ours.get_last_lr()[0], 3e-5 * 0.5, rel_tol=1e-12)
    resumed = torch.optim.lr_scheduler.LambdaLR(optimizer(), LearningRateSchedule("linear", 0, 99))
    resumed.load_state_dict(ours.state_dict())
    assert resumed.lr_lambdas[0].total == 10
    resumed.optimizer.step(), resumed.step()
    assert math.isclose(resumed.get_last_lr()[0], 3e-5 * 0.4, rel_tol=1e-12)


def _meta(tmp_path, random_init: bool, factor: float):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"config": {"random_init": random_init}, "models": {"vae": {"scaling_factor": factor}}}))
    return path


def test_scaling_factor_must_match_a_trained_vae(tmp_path):
    paper = PRESETS["paper"]
    check_scaling_factor(paper, _meta(tmp_path, False, 0.9227914214134216 * (1 + 5e-7)))  # within 1e-6 relative
    with pytest.raises(ConfigError) as error:
        check_scaling_factor(paper, _meta(tmp_path, False, 0.18215))
    message = str(error.value)
    assert "meta.json" in message and "0.18215" in message and "0.9227914214134216" in message
    assert "--vae-scaling-factor 0.18215" in message and "\n" not in message
    # a random VAE (the tiny shards: factor 1.0, trained with 5.0 on purpose) and a folder that does not say are exempt
    check_scaling_factor(PRESETS["tiny"], _meta(tmp_path, True, 1.0))
    (tmp_path / "meta.json").write_text("{}")
    check_scaling_factor(paper, tmp_path / "meta.json")
