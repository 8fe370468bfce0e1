"""Configs of AudioLDM's VAE and vocoder for random-weight builds: toy widths (`tiny`) or the published
architectures (`paper`). Random weights say nothing about quality.

Sources of the `paper` configs (cvssp/audioldm-s-full-v2):
- VAE, vae/: AudioLDM's first-stage ddconfig (ch 128, ch_mult [1, 2, 4], num_res_blocks 2, z_channels 8, in/out
  1 channel) as diffusers' convert_original_audioldm_to_diffusers.py maps it (block_out_channels [128, 256, 512],
  layers_per_block 2, latent_channels 8, sample_size 512) and the scaling factor stored in that folder.
  ~56 M parameters (encoder + decoder).
- HiFi-GAN, vocoder/: AudioLDM's HIFIGAN_16K_64 (64 mels in, 16 kHz, upsample_initial_channel 1024, upsample
  rates [5, 4, 2, 2, 2] = hop 160, kernels [16, 16, 8, 4, 4], resblock kernels [3, 7, 11], dilations [1, 3, 5]
  each, no input normalisation). ~55 M parameters.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import SpeechT5HifiGanConfig

from audio_models.config import MEL_BINS, MEL_FRAMES, AudioModelConfig

RANDOM_SIZES: tuple[str, ...] = ("tiny", "paper")
AUDIOLDM_VAE_SCALING_FACTOR = 0.9227914214134216  # audioldm-s-full-v2 vae/config.json


def vae_config(size: str, cfg: AudioModelConfig | None = None) -> dict[str, Any]:
    """diffusers AutoencoderKL keyword arguments of a random-weight VAE: `tiny` (shaped by `cfg`) or `paper`."""
    if size == "tiny":
        return tiny_vae_config(cfg or AudioModelConfig())
    if size == "paper":
        return paper_vae_config()
    raise ValueError(f"random model size must be one of {RANDOM_SIZES}, got {size!r}")


def vocoder_config(size: str, cfg: AudioModelConfig | None = None) -> SpeechT5HifiGanConfig:
    """transformers SpeechT5HifiGanConfig of a random-weight vocoder: `tiny` (shaped by `cfg`) or `paper`."""
    if size == "tiny":
        return tiny_vocoder_config(cfg or AudioModelConfig())
    if size == "paper":
        return paper_vocoder_config()
    raise ValueError(f"random model size must be one of {RANDOM_SIZES}, got {size!r}")


def tiny_vae_config(cfg: AudioModelConfig) -> dict[str, Any]:
    """AudioLDM's VAE structure (1 input channel, 3 down blocks -> downsample 4) at toy width."""
    blocks = 1 + int(math.log2(cfg.vae_downsample))
    return dict(in_channels=1, out_channels=1, latent_channels=cfg.latent_channels,
                block_out_channels=[8] + [16] * (blocks - 1), down_block_types=["DownEncoderBlock2D"] * blocks,
                up_block_types=["UpDecoderBlock2D"] * blocks, layers_per_block=1, norm_num_groups=4,
                sample_size=MEL_FRAMES // 4, scaling_factor=1.0)


def paper_vae_config() -> dict[str, Any]:
    """cvssp/audioldm-s-full-v2 vae/ (diffusers AutoencoderKL). force_upcast is left at diffusers' default (True),
    as in that folder's config, so the VAE runs in float32 under half-precision inference too."""
    blocks = 3
    return dict(in_channels=1, out_channels=1, latent_channels=8, block_out_channels=[128, 256, 512],
                down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
                layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512,
                scaling_factor=AUDIOLDM_VAE_SCALING_FACTOR)


def tiny_vocoder_config(cfg: AudioModelConfig) -> SpeechT5HifiGanConfig:
    """AudioLDM's HiFi-GAN (64 mel bins in, upsampling x160 = the hop) at toy width.

    initializer_range 0.2 instead of HF's 0.01: at 0.01 each of the random layers shrinks the signal and the
    toy vocoder outputs ~1e-10, i.e. silent WAVs (every sample rounds to 0 in 16-bit PCM); at 0.2 its output
    is audible noise of amplitude ~0.1-0.9 (still random: the tiny preset's audio means nothing)."""
    return SpeechT5HifiGanConfig(model_in_dim=MEL_BINS, sampling_rate=cfg.sample_rate, upsample_initial_channel=32,
                                 upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[10, 8, 4, 4, 4],
                                 resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False,
                                 initializer_range=0.2)


def paper_vocoder_config() -> SpeechT5HifiGanConfig:
    """cvssp/audioldm-s-full-v2 vocoder/: AudioLDM's HIFIGAN_16K_64 (audioldm/utils.py) in transformers' format."""
    return SpeechT5HifiGanConfig(model_in_dim=MEL_BINS, sampling_rate=16000, upsample_initial_channel=1024,
                                 upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4],
                                 resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3,
                                 leaky_relu_slope=0.1, normalize_before=False)
