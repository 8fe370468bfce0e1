"""AudioLDM's mel VAE (diffusers AutoencoderKL), frozen: stage one encodes with it, evaluation and generation
decode with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from audio_models.config import MEL_BINS, MEL_FRAMES, AudioModelConfig
from audio_models.random_configs import vae_config
from common.devices import half_dtype
from common.frozen import FrozenModule, chunks, random_init_checksum, seeded
from common.weights import load_pretrained_model, require_model_dir, sha256_configs, sha256_dir, weights_folder


class AudioVAE(FrozenModule):
    """mel (B, 1024, 64) <-> latents (B, C, 1024/ds, 64/ds).

    The posterior is stored raw (mean, std); `scaling_factor` (AudioLDM: latents * scaling_factor enter the
    diffusion model) is applied by the trainer, and `decode` takes unscaled latents.
    """

    vae: Any  # diffusers AutoencoderKL (its config and methods are not visible to type checkers)
    config_checksum: str | None = None  # of the folder's config.json (`sha256_configs`); None for random init

    def __init__(self, vae: Any, batch: int, checksum: str) -> None:
        super().__init__()
        self.vae = vae
        self.batch = batch
        self.checksum = checksum
        self.scaling_factor: float = float(vae.config.scaling_factor)
        downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels: int = int(vae.config.latent_channels)
        self.latent_size: tuple[int, int] = (MEL_FRAMES // downsample, MEL_BINS // downsample)
        self.freeze()

    @classmethod
    def from_config(cls, cfg: AudioModelConfig, weights_dir: Path | None, device: torch.device) -> AudioVAE:
        vae: Any
        if cfg.random_init:
            with seeded(cfg.seed):
                vae = AutoencoderKL(**vae_config(cfg.random_size, cfg))
            checksum, where = random_init_checksum(cfg.seed, cfg.random_size), f"random {cfg.random_size} VAE"
        else:
            folder = weights_folder(weights_dir, "AudioLDM VAE") / cfg.audioldm_dir / "vae"
            vae = load_pretrained_model(AutoencoderKL.from_pretrained, require_model_dir(folder, "AudioLDM VAE"), "AudioLDM VAE")
            checksum, where = sha256_dir(folder), str(folder)
            config_checksum = sha256_configs(folder)
        config = vae.config
        downsample = 2 ** (len(config.block_out_channels) - 1)
        found = (config.in_channels, config.latent_channels, downsample)
        if found != (1, cfg.latent_channels, cfg.vae_downsample):
            raise ValueError(f"{where}: VAE has in_channels={found[0]}, latent_channels={found[1]}, downsample={found[2]}; "
                             f"the config says 1, {cfg.latent_channels}, {cfg.vae_downsample}")
        vae = vae.to(device)
        if not config.get("force_upcast", True):  # diffusers' mark of VAEs unreliable in float16: keep those float32
            vae = vae.to(dtype=half_dtype(cfg.half, device))
        encoder = cls(vae, cfg.batch_clips, checksum)
        if not cfg.random_init:
            encoder.config_checksum = config_checksum
        return encoder

    @torch.inference_mode()
    def encode(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel (B, 1024, 64) -> posterior mean and std, each (B, C, 1024/ds, 64/ds) float32."""
        if mel.ndim != 3 or tuple(mel.shape[1:]) != (MEL_FRAMES, MEL_BINS):
            raise ValueError(f"mel must be (B, {MEL_FRAMES}, {MEL_BINS}), got {tuple(mel.shape)}")
        means, stds = [], []
        for part in chunks(mel.shape[0], self.batch):
            # AudioLDM feeds the mel as a one-channel image: (B, 1, time, freq)
            posterior = self.vae.encode(mel[part, None].to(self.device, self.dtype)).latent_dist
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
        if not means:
            empty = torch.zeros(0, self.latent_channels, *self.latent_size)
            return empty, empty.clone()
        return torch.cat(means), torch.cat(stds)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, T, F) -> log-mel (B, T * ds, F * ds) float32."""
        out = [self.vae.decode(latents[part].to(self.device, self.dtype)).sample[:, 0].float().cpu()
               for part in chunks(latents.shape[0], self.batch)]
        return torch.cat(out) if out else torch.zeros(0, MEL_FRAMES, MEL_BINS)
