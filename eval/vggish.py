"""VGGish: the embedder of FAD (Kilgour et al., "Frechet Audio Distance", 2019), one 128-d vector per 0.96 s patch.

Front end = the VGGish reference (tensorflow/models research/audioset/vggish: mel_features.py, vggish_input.py):
16 kHz mono; frames of 25 ms (400 samples) every 10 ms (160), no padding; periodic Hann; |rfft| with 512 points
(magnitude, not power); 64 mel bands 125-7500 Hz on the HTK scale mel = 1127 ln(1 + f / 700), triangles in the
mel domain, DC bin weight 0; log(mel + 0.01); non-overlapping patches of 96 frames x 64 bands (a remainder shorter
than 0.96 s is dropped).

Network = torchvggish's VGG (harritaylor/torchvggish, vggish.py; state dict vggish-10086976.pth): conv 3x3 blocks
64-M-128-M-256-256-M-512-512-M (ReLU after each conv, 2x2 max pooling at M), flattened in TensorFlow's
(H, W, C) order, then fc 4096-ReLU-4096-ReLU-128. The FAD embedding is the 128-d output BEFORE the final ReLU and
without the PCA/quantisation post-processing, so the last ReLU of torchvggish (embeddings.5) is not built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import torch
from torch import nn

from eval.panns import build_weighted

CHECKPOINT_NAME = "vggish-10086976.pth"
PATCH_BATCH = 256  # patches per forward pass (a 10 s clip has 10)


@dataclass(frozen=True)
class VGGishConfig:
    """Front end (fixed by the trained model) and widths; `tiny` keeps the front end and narrows the network."""

    sample_rate: int = 16000
    window_seconds: float = 0.025
    hop_seconds: float = 0.010
    mel_bins: int = 64
    fmin: float = 125.0
    fmax: float = 7500.0
    log_offset: float = 0.01
    patch_frames: int = 96  # 0.96 s; patches do not overlap (hop = patch_frames)
    channels: tuple[int, ...] = (64, 128, 256, 256, 512, 512)
    fc: tuple[int, ...] = (4096, 4096, 128)

    @property
    def window_samples(self) -> int:
        return round(self.sample_rate * self.window_seconds)

    @property
    def hop_samples(self) -> int:
        return round(self.sample_rate * self.hop_seconds)

    @property
    def fft_length(self) -> int:
        return 1 << int(np.ceil(np.log2(self.window_samples)))  # next power of two: 400 -> 512

    @property
    def embed_dim(self) -> int:
        return self.fc[-1]

    def protocol(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "channels": list(self.channels), "fc": list(self.fc),
                "embedding": "fc3 before ReLU, no PCA", "patch_hop_frames": self.patch_frames}


VGGISH_CONFIGS: dict[str, VGGishConfig] = {
    "paper": VGGishConfig(),
    "tiny": VGGishConfig(channels=(4, 8, 8, 8, 16, 16), fc=(32, 32, 128)),
}


# --------------------------------------------------------------------------------------------------------------
# Front end (numpy float64, as the reference)
# --------------------------------------------------------------------------------------------------------------
def hz_to_mel_htk(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale of the VGGish reference: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def vggish_mel_matrix(config: VGGishConfig = VGGISH_CONFIGS["paper"]) -> np.ndarray:
    """(fft_length // 2 + 1, mel_bins) weights, mel_features.spectrogram_to_mel_matrix: triangles whose edges are
    equally spaced in HTK mel between fmin and fmax, evaluated at each FFT bin's mel value; no area normalisation;
    the DC bin gets weight 0."""
    bins = config.fft_length // 2 + 1
    bins_mel = hz_to_mel_htk(np.linspace(0.0, config.sample_rate / 2.0, bins))
    edges = np.linspace(hz_to_mel_htk(config.fmin), hz_to_mel_htk(config.fmax), config.mel_bins + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


def stft_magnitude(waveform: np.ndarray, config: VGGishConfig = VGGISH_CONFIGS["paper"]) -> np.ndarray:
    """(L,) waveform -> (frames, fft_length // 2 + 1) |rfft(frame * periodic Hann, fft_length)|, frames of
    window_samples every hop_samples with no padding: frames = 1 + (L - window) // hop (0 when L < window)."""
    x = np.asarray(waveform, dtype=np.float64)
    window, hop = config.window_samples, config.hop_samples
    frames = 1 + (x.size - window) // hop if x.size >= window else 0
    if frames == 0:
        return np.zeros((0, config.fft_length // 2 + 1))
    framed = np.lib.stride_tricks.as_strided(x, shape=(frames, window), strides=(x.strides[0] * hop, x.strides[0]))
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(window) / window)  # periodic Hann
    return np.abs(np.fft.rfft(framed * hann, config.fft_length))


def log_mel(waveform: np.ndarray, config: VGGishConfig = VGGISH_CONFIGS["paper"]) -> np.ndarray:
    """(L,) waveform at config.sample_rate -> (frames, mel_bins) log(|STFT| @ mel + log_offset)."""
    return np.log(stft_magnitude(waveform, config) @ vggish_mel_matrix(config) + config.log_offset)


def waveform_to_patches(
    waveform: np.ndarray, sample_rate: int, config: VGGishConfig = VGGISH_CONFIGS["paper"]
) -> np.ndarray:
    """(L,) or (channels, L) waveform -> (n_patches, patch_frames, mel_bins) float32 VGGish input examples.

    Channels are averaged and the rate converted to 16 kHz (librosa soxr_hq; the reference uses resampy) first.
    """
    y = np.asarray(waveform, dtype=np.float32)
    if y.ndim == 2:
        y = y.mean(axis=0)
    if y.ndim != 1:
        raise ValueError(f"VGGish needs an (L,) or (channels, L) waveform, got shape {np.shape(waveform)}")
    if sample_rate != config.sample_rate:
        y = librosa.resample(y, orig_sr=sample_rate, target_sr=config.sample_rate)
    features = log_mel(y, config)
    n = features.shape[0] // config.patch_frames
    return features[: n * config.patch_frames].reshape(n, config.patch_frames, config.mel_bins).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------------------
def _features(channels: tuple[int, ...]) -> nn.Sequential:
    # conv widths c0 M c1 M c2 c3 M c4 c5 M: the same Sequential indices as torchvggish's make_layers
    layers: list[nn.Module] = []
    in_channels = 1
    for i, width in enumerate(channels):
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        if i in (0, 1, 3, 5):
            layers.append(nn.MaxPool2d(2, 2))
        in_channels = width
    return nn.Sequential(*layers)


class VGGish(nn.Module):
    """VGGish up to the 128-d embedding before its last ReLU; train() keeps eval mode (a frozen evaluator)."""

    def __init__(self, config: VGGishConfig = VGGISH_CONFIGS["paper"]) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_id = "random-init"
        self.features = _features(config.channels)
        flat = config.channels[-1] * (config.patch_frames // 16) * (config.mel_bins // 16)  # 512 * 6 * 4
        fc1, fc2, out = config.fc
        self.embeddings = nn.Sequential(nn.Linear(flat, fc1), nn.ReLU(inplace=True), nn.Linear(fc1, fc2),
                                        nn.ReLU(inplace=True), nn.Linear(fc2, out))
        self.eval()

    def train(self, mode: bool = True) -> VGGish:
        return super().train(False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, 1, patch_frames, mel_bins) or (B, patch_frames, mel_bins) log-mel patches -> (B, embed_dim)."""
        if patches.ndim == 3:
            patches = patches[:, None]
        x = self.features(patches)  # x: (B, C, H, W)
        x = x.permute(0, 2, 3, 1).flatten(1)  # TensorFlow's (H, W, C) flattening order
        return self.embeddings(x)

    @torch.inference_mode()
    def embed_patches(self, waveform: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
        """(L,) waveform -> (n_patches, embed_dim) FAD embeddings, one per non-overlapping 0.96 s patch."""
        patches = waveform_to_patches(waveform, sample_rate, self.config)
        return self.embed_log_mel_patches(patches)

    @torch.inference_mode()
    def embed_log_mel_patches(self, patches: np.ndarray) -> np.ndarray:
        """(n, patch_frames, mel_bins) front-end patches -> (n, embed_dim), PATCH_BATCH patches per forward."""
        device = next(self.parameters()).device
        out = [self(torch.as_tensor(patches[i : i + PATCH_BATCH], device=device)).float().cpu().numpy()
               for i in range(0, len(patches), PATCH_BATCH)]
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), dtype=np.float32)

    def protocol(self) -> dict[str, object]:
        return {**self.config.protocol(), "checkpoint": self.checkpoint_id}


def load_vggish(
    weights_dir: str | Path | None,
    device: str | torch.device = "cpu",
    config: VGGishConfig = VGGISH_CONFIGS["paper"],
    seed: int = 0,
) -> VGGish:
    """VGGish from `weights_dir / vggish-10086976.pth` (torchvggish's state dict, torch.load weights_only=True),
    or with random weights (seeded) when `weights_dir` is None. A final ReLU (embeddings.5) has no weights, so
    the official file fits this module as it is."""
    model, checkpoint_id = build_weighted(lambda: VGGish(config), weights_dir, CHECKPOINT_NAME,
                                          "VGGish checkpoint (torchvggish)", seed)
    model.checkpoint_id = checkpoint_id
    return model.to(device).eval()
