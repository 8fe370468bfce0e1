"""Latents -> waveforms: the AudioLDM VAE decoder followed by the HiFi-GAN vocoder (evaluation and generation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from audio_models.config import AudioModelConfig
from audio_models.vae import AudioVAE
from audio_models.vocoder import load_vocoder, vocoder_checksums


class Decoder:
    """Scaled latents (as the diffusion model samples them) -> 16 kHz waveforms.

    `scaling_factor` is the training run's `vae_scaling_factor`: latents are divided by it before the VAE.
    `checksum` names the VAE's weights, `vocoder_checksum` the vocoder's, `config_checksums` the config files of
    both (None: random init); all are recorded in WAV manifests."""

    def __init__(self, cfg: AudioModelConfig, weights_dir: Path | None, device: torch.device, scaling_factor: float):
        self.vae = AudioVAE.from_config(cfg, weights_dir, device)
        self.vocoder = load_vocoder(cfg, weights_dir, device)
        self.scaling_factor = scaling_factor
        self.sample_rate = cfg.sample_rate
        self.checksum = self.vae.checksum
        self.vocoder_checksum, vocoder_config = vocoder_checksums(cfg, weights_dir)
        self.config_checksums = {"vae": self.vae.config_checksum, "vocoder": vocoder_config}

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (B, C, T, F) in the diffusion model's scaled space -> waveforms (B, samples) float32."""
        mel = self.vae.decode(latents / self.scaling_factor)  # mel: (B, T * ds, 64), AudioLDM's log mel
        vocoder_device = next(self.vocoder.parameters()).device
        waveform = self.vocoder(mel.to(vocoder_device, torch.float32))  # (B, T * ds * 160 + ...)
        return waveform.float().cpu().numpy()
