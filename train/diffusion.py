"""Noise schedule, training loss and sampling (DDIM / DDPM / DPM-Solver++ with classifier-free guidance).

Schedule: Stable Diffusion 2.1's, which Tango and VTA-LDM reuse: 1000 steps, scaled_linear betas
(beta_t = (linspace(sqrt(0.00085), sqrt(0.012), 1000))^2) and v-prediction, v = alpha_t eps - sigma_t z0
(Salimans & Ho 2022). We keep it so that published Tango/VTA-LDM weights and recipes carry over, and
because v-prediction stays well-posed at the highest noise levels, where eps-prediction's z0 estimate blows up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

import shards
from common.devices import autocast
from train.config import TrainConfig
from train.denoiser import CapturedDenoiser, GuidedDenoiser, captured_denoiser
from train.speed import compiled

if TYPE_CHECKING:
    from train.model import VTASAM

# SD 2.1's scheduler_config.json besides the betas: no clipping of x0, alpha_T not forced to 1, offset 1
_SCHEDULE_EXTRAS = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def noise_scheduler(config: TrainConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="scaled_linear",
        prediction_type=config.prediction,
        clip_sample=False,
    )


def steps_problem(config: TrainConfig, steps: int) -> str | None:
    """Why a sampler cannot take `steps` steps with a model trained as `config` says (None: it can): more steps
    than training timesteps (DDIM and DDPM raise diffusers' error, DPM-Solver++ visits each timestep again)."""
    if steps > config.train_timesteps:
        return f"the model was trained with {config.train_timesteps} timesteps; a sampler visits at most that many"
    return None


def sampling_scheduler(config: TrainConfig, kind: str) -> DDIMScheduler | DDPMScheduler | DPMSolverMultistepScheduler:
    common = dict(
        num_train_timesteps=config.train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="scaled_linear",
        prediction_type=config.prediction,
    )
    if kind == "ddim":
        return DDIMScheduler(**common, **_SCHEDULE_EXTRAS)
    if kind == "ddpm":
        return DDPMScheduler(**common, clip_sample=False, steps_offset=1)
    if kind == "dpmsolver++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", steps_offset=1)
    raise ValueError(f"scheduler must be ddim, ddpm or dpmsolver++, got {kind!r}")


def sample_latents(mean: torch.Tensor, std: torch.Tensor | None, scaling_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = (mean + std * eps) * scaling_factor: a draw from the stored VAE posterior, scaled as AudioLDM does.

    std None: z = mean * scaling_factor (the posterior mode; TrainConfig.posterior_sample off).
    """
    if std is None:
        return mean * scaling_factor
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scaling_factor


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t)."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, weighting: str, gamma: float) -> torch.Tensor | None:
    """Per-sample weight of the squared error at each timestep (TrainConfig.snr_weighting); None: unweighted.

    With SNR(t) = alpha_bar_t / (1 - alpha_bar_t):
    - "vta-ldm":   min(SNR, gamma) / SNR whatever the network target: what VTA-LDM and Tango train with
                   (ariesssxu/vta-ldm and declare-lab/tango, models.py: AudioDiffusion.forward with --snr_gamma 5).
                   With v-prediction it is 1 where SNR <= gamma (high noise) and gamma / SNR below.
    - "min-snr-v": the Min-SNR paper's weight for the run's target (Hang et al. 2023, https://arxiv.org/abs/2303.09556,
                   Sec. 4.2): min(SNR, gamma) / (SNR + 1) for v-prediction (the v-loss is SNR + 1 times the x0-loss),
                   min(SNR, gamma) / SNR for epsilon. At the highest noise of the SD 2.1 schedule it is ~200x smaller
                   than vta-ldm's.
    - "none":      None.
    """
    if weighting == "none":
        return None
    if weighting not in ("vta-ldm", "min-snr-v"):
        raise ValueError(f"snr weighting must be vta-ldm, min-snr-v or none, got {weighting!r}")
    ratio = snr(scheduler, timesteps)
    divisor = ratio + 1 if weighting == "min-snr-v" and scheduler.config.prediction_type == "v_prediction" else ratio
    return ratio.clamp(max=gamma) / divisor


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler, weighting: str,
    gamma: float,
) -> torch.Tensor:
    """mean over the batch of w(t) * mean((prediction - target)^2), w from `loss_weights` (1 for "none")."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    weight = loss_weights(scheduler, timesteps, weighting, gamma)
    return per_sample.mean() if weight is None else (weight * per_sample).mean()


def training_target(scheduler: DDPMScheduler, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(z0, noise, timesteps)
    return noise


def training_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    batch: dict[str, Any],
    config: TrainConfig,
    device: torch.device | None = None,
    precision: torch.dtype | None = None,
) -> torch.Tensor:
    """The loss of one training step on a collated batch (`train.data.collate`): the one step that the trainer and
    every benchmark run.

    z0 = the stored VAE posterior's mean (or, with config.posterior_sample, a draw mean + std * eps) times
    config.vae_scaling_factor; noise ~ N(0, I); timesteps uniform over the scheduler's training steps; each sample's
    conditions all zeroed with probability config.uncond_probability (classifier-free guidance); the network sees
    the noised z_t and is scored against `training_target` by `diffusion_loss`, weighted per timestep as
    config.snr_weighting says (with config.min_snr_gamma).

    The random draws come from the global generators in this order (posterior eps, noise, timesteps, drop mask),
    so that a seed, or a checkpoint's restored RNG state, reproduces a run bit for bit: keep it.
    batch: "latent_mean", "latent_std" (B, C, T, F) and the conditions of `shards.CONDITION_NAMES`; they are moved
    to `device` (None: where latent_mean is; asynchronous copies from pinned memory on CUDA).
    precision: autocast dtype of the network call (None: none here; an accelerate-prepared model autocasts itself).
    """
    device = batch["latent_mean"].device if device is None else device
    mean = batch["latent_mean"].to(device, non_blocking=True)
    std = batch["latent_std"].to(device, non_blocking=True) if config.posterior_sample else None
    z0 = sample_latents(mean, std, config.vae_scaling_factor)
    noise = torch.randn_like(z0)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
    drop = torch.rand(z0.shape[0], device=z0.device) < config.uncond_probability
    conditions = {name: batch[name].to(device, non_blocking=True) for name in shards.CONDITION_NAMES}
    with autocast(device, precision):
        prediction = model(scheduler.add_noise(z0, noise, timesteps), timesteps, conditions, drop)
    return diffusion_loss(prediction, training_target(scheduler, z0, noise, timesteps), timesteps, scheduler,
                          config.snr_weighting, config.min_snr_gamma)


@torch.no_grad()
def sample(
    model: VTASAM,
    conditions: dict[str, torch.Tensor],
    steps: int = 50,
    guidance: float = 3.0,
    scheduler: Literal["ddim", "ddpm", "dpmsolver++"] = "ddim",
    generator: torch.Generator | list[torch.Generator] | None = None,
    precision: torch.dtype | None = None,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Latents (B, C, T, F) generated for a batch of conditions, in the VAE's scaled latent space.

    precision: autocast dtype of the network calls (`common.devices.resolve_precision`; None: float32). The latents
    and the solver's arithmetic stay float32. A model whose weights `train.speed.lower_precision_weights` cast
    needs that dtype here.

    cuda_graph: on CUDA, replay the guided network call from a CUDA graph captured once per batch shape
    (`train.denoiser`; not with a torch.compile'd UNet, which has its own); the same numbers up to the
    kernels' nondeterminism, far fewer kernel launches. Ignored off CUDA.

    generator: one for the batch, or one per sample (diffusers' convention) so that a sample's noise does not
    depend on its batch mates.

    Classifier-free guidance (Ho & Salimans 2022): out = u + guidance * (c - u), where c is the network
    output for the conditions and u for the null condition (all zeros, as in training). guidance 1 is
    plain conditional sampling. Divide by config.vae_scaling_factor before the VAE decoder.
    conditions: {"video": (B, F, D), "objects": (B, F, D), "caption": (B, D)}, as the trainer feeds them.
    """
    config, spec = model.config, model.spec
    first = next(iter(conditions.values()))
    device, batch = first.device, first.shape[0]
    if precision is None and getattr(model, "weight_dtype", None) is not None:
        raise ValueError(f"the model's weights are {model.weight_dtype} (train.speed.lower_precision_weights); "
                         "sample with that precision")
    solver = sampling_scheduler(config, scheduler)
    solver.set_timesteps(steps, device=device)
    shape = (batch, spec.latent_channels, spec.latent_time, spec.latent_freq)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * solver.init_noise_sigma
    denoiser: GuidedDenoiser | CapturedDenoiser | None = None
    if cuda_graph and device.type == "cuda" and not compiled(model):
        denoiser = captured_denoiser(model, conditions, shape, guidance, precision)
    if denoiser is None:
        denoiser = GuidedDenoiser(model, conditions, guidance, precision)
    for t in solver.timesteps:
        guided = denoiser(solver.scale_model_input(latents, t), t)
        latents = solver.step(guided, t, latents, generator=generator).prev_sample
    return latents
