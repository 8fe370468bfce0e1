"""AudioLDM's HiFi-GAN vocoder (transformers SpeechT5HifiGan), frozen: log mel (B, 1024, 64) -> 16 kHz waveform."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import SpeechT5HifiGan

from audio_models.config import MEL_BINS, AudioModelConfig
from audio_models.random_configs import vocoder_config
from common.frozen import random_init_checksum, seeded
from common.weights import load_pretrained_model, require_model_dir, sha256_configs, sha256_dir, weights_folder


def vocoder_folder(cfg: AudioModelConfig, weights_dir: Path | None) -> Path:
    """Where the vocoder of `cfg` is read from: `<weights>/<audioldm_dir>/vocoder/`."""
    return weights_folder(weights_dir, "AudioLDM vocoder") / cfg.audioldm_dir / "vocoder"


def vocoder_checksums(cfg: AudioModelConfig, weights_dir: Path | None) -> tuple[str, str | None]:
    """(its weights' sha256, its config files' sha256) of the vocoder `load_vocoder` loads (random init: its
    name, and None), as WAV manifests record them."""
    if cfg.random_init:
        return random_init_checksum(cfg.seed, cfg.random_size), None
    folder = vocoder_folder(cfg, weights_dir)
    return sha256_dir(folder), sha256_configs(folder)


def load_vocoder(cfg: AudioModelConfig, weights_dir: Path | None, device: torch.device) -> SpeechT5HifiGan:
    """The vocoder of `cfg` (random weights, or `<weights>/<audioldm_dir>/vocoder/`), in eval mode, no gradients.
    Its input width, rate and upsampling (= the mel hop) are checked against `cfg`."""
    if cfg.random_init:
        with seeded(cfg.seed):
            vocoder = SpeechT5HifiGan(vocoder_config(cfg.random_size, cfg))
        where = f"random {cfg.random_size} vocoder"
    else:
        folder = vocoder_folder(cfg, weights_dir)
        vocoder = load_pretrained_model(SpeechT5HifiGan.from_pretrained, require_model_dir(folder, "AudioLDM vocoder"),
                                        "AudioLDM vocoder")
        where = str(folder)
    config = vocoder.config
    found = (config.model_in_dim, config.sampling_rate, math.prod(config.upsample_rates))
    if found != (MEL_BINS, cfg.sample_rate, cfg.hop):
        raise ValueError(f"{where}: vocoder has model_in_dim={found[0]}, sampling_rate={found[1]}, upsampling={found[2]}; "
                         f"expected {MEL_BINS}, {cfg.sample_rate}, {cfg.hop}")
    vocoder.requires_grad_(False).eval()
    return vocoder.to(device)  # type: ignore[arg-type]  # mypy misreads transformers' decorated .to
