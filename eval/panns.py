"""PANNs Cnn14 for 16 kHz audio: the embedder of FD (2048-d `relu(fc1)`) and the classifier (527 AudioSet classes)
of KL and the Inception score.

Architecture of `Cnn14_16k` (Kong et al., "PANNs: Large-Scale Pretrained Audio Neural Networks for Audio Pattern
Recognition", 2020; qiuqiangkong/audioset_tagging_cnn, pytorch/models.py), checkpoint Cnn14_16k_mAP=0.438.pth:
a log-mel front end (torchlibrosa's Spectrogram + LogmelFilterBank: n_fft 512, hop 160, Hann, centred with
reflect padding, power spectrogram, 64 Slaney mel bands 50-8000 Hz, 10 log10(max(x, 1e-10)), no top_db), BatchNorm
over the mel axis (bn0), six conv blocks 64-128-256-512-1024-2048 (two 3x3 conv + BN + ReLU, 2x2 average pooling
but none after the last), mean over frequency, max + mean over time, fc1 (2048) + ReLU, fc_audioset (527).

torchlibrosa is not a dependency: its STFT (conv weights = windowed DFT basis) and mel matrix are rebuilt here in
numpy under the same state-dict names, so the official file loads unchanged; the loader checks that the file's
front-end tensors agree with ours (a different front end means a different protocol).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.weights import missing_weights, one_line, sha256_file, weight_file_problem

log = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=nn.Module)

CHECKPOINT_NAME = "Cnn14_16k_mAP=0.438.pth"
FRONT_END_KEYS = ("spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight",
                  "logmel_extractor.melW")
AMIN = 1e-10  # power_to_db floor (torchlibrosa LogmelFilterBank, as Cnn14 sets it: ref 1.0, amin 1e-10, top_db None)


@dataclass(frozen=True)
class Cnn14Config:
    """Front end (fixed by the checkpoint) and widths; `tiny` keeps the front end and narrows the network."""

    sample_rate: int = 16000
    window_size: int = 512
    hop_size: int = 160
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 8000.0
    classes_num: int = 527
    channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)

    @property
    def embed_dim(self) -> int:
        return self.channels[-1]

    @property
    def min_samples(self) -> int:
        """Shortest input: five 2x2 poolings need at least 32 frames."""
        return 31 * self.hop_size  # frames = L // hop + 1

    def protocol(self) -> dict[str, object]:
        """The knobs a cached embedding depends on (written into result and cache files)."""
        return {**dataclasses.asdict(self), "channels": list(self.channels), "embedding": "relu(fc1)",
                "class_probs": "softmax(fc_audioset)"}


CNN14_CONFIGS: dict[str, Cnn14Config] = {
    "paper": Cnn14Config(),
    "tiny": Cnn14Config(channels=(4, 8, 8, 16, 16, 32)),
}


# --------------------------------------------------------------------------------------------------------------
# Front end (numpy, float64, then float32 like torchlibrosa)
# --------------------------------------------------------------------------------------------------------------
def periodic_hann(length: int) -> np.ndarray:
    """scipy/librosa `get_window('hann', length, fftbins=True)`: 0.5 - 0.5 cos(2 pi n / length)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)


def dft_basis(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    """Windowed DFT rows as torchlibrosa's STFT conv weights: real = w[n] cos(2 pi k n / N), imag = -w[n] sin(...),
    each (n_fft // 2 + 1, 1, n_fft)."""
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    angle = 2.0 * np.pi * k * n / n_fft
    window = periodic_hann(n_fft)
    return (np.cos(angle) * window)[:, None, :], (-np.sin(angle) * window)[:, None, :]


def _hz_to_mel_slaney(hz: np.ndarray | float) -> np.ndarray:
    # Slaney's Auditory Toolbox scale (librosa htk=False): linear below 1 kHz, logarithmic above.
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, hz / f_sp)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the Slaney mel scale with Slaney area normalisation
    (each triangle scaled by 2 / (f_right - f_left)): librosa.filters.mel(htk=False, norm='slaney')."""
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges_hz = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    widths = np.diff(edges_hz)
    ramps = edges_hz[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return weights * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]


class _STFT(nn.Module):
    """STFT as two strided Conv1d (torchlibrosa.stft.STFT, centre=True, reflect padding)."""

    def __init__(self, n_fft: int, hop: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.conv_real = nn.Conv1d(1, n_fft // 2 + 1, n_fft, stride=hop, bias=False)
        self.conv_imag = nn.Conv1d(1, n_fft // 2 + 1, n_fft, stride=hop, bias=False)
        real, imag = dft_basis(n_fft)
        self.conv_real.weight.data = torch.tensor(real, dtype=torch.float32)
        self.conv_imag.weight.data = torch.tensor(imag, dtype=torch.float32)

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # waveform: (B, L) -> real, imag: (B, 1, T, F)
        x = F.pad(waveform[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        return self.conv_real(x).transpose(1, 2)[:, None], self.conv_imag(x).transpose(1, 2)[:, None]


class _Spectrogram(nn.Module):
    def __init__(self, n_fft: int, hop: int) -> None:
        super().__init__()
        self.stft = _STFT(n_fft, hop)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        real, imag = self.stft(waveform)
        return real**2 + imag**2  # power spectrogram (B, 1, T, F)


class _LogmelFilterBank(nn.Module):
    def __init__(self, config: Cnn14Config) -> None:
        super().__init__()
        mel = slaney_mel_filters(config.sample_rate, config.window_size, config.mel_bins, config.fmin, config.fmax)
        self.melW = nn.Parameter(torch.tensor(mel.T, dtype=torch.float32), requires_grad=False)  # (F, mels)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        # 10 log10(max(mel, amin)) - 10 log10(max(amin, ref)), ref = 1: the second term is 0.
        return 10.0 * torch.log10(torch.clamp(power @ self.melW, min=AMIN))


class _ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool) if pool > 1 else x


class Cnn14(nn.Module):
    """Cnn14_16k in inference mode (dropout and SpecAugment of training are omitted; train() keeps eval mode)."""

    def __init__(self, config: Cnn14Config = CNN14_CONFIGS["paper"]) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_id = "random-init"
        self.spectrogram_extractor = _Spectrogram(config.window_size, config.hop_size)
        self.logmel_extractor = _LogmelFilterBank(config)
        self.bn0 = nn.BatchNorm2d(config.mel_bins)
        widths = (1, *config.channels)
        for i in range(len(config.channels)):
            self.add_module(f"conv_block{i + 1}", _ConvBlock(widths[i], widths[i + 1]))
        self.fc1 = nn.Linear(config.embed_dim, config.embed_dim)
        self.fc_audioset = nn.Linear(config.embed_dim, config.classes_num)
        for module in self.modules():  # PANNs' init_layer / init_bn
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for parameter in [*self.spectrogram_extractor.parameters(), *self.logmel_extractor.parameters()]:
            parameter.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Cnn14:
        return super().train(False)  # a frozen evaluator: BatchNorm always uses its running statistics

    def logmel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(B, L) 16 kHz waveforms -> (B, 1, T, mel_bins) log-mel in dB, T = L // hop + 1."""
        return self.logmel_extractor(self.spectrogram_extractor(waveforms))

    def forward(self, waveforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) 16 kHz waveforms -> (logits (B, classes), embedding relu(fc1) (B, embed_dim))."""
        if waveforms.ndim != 2 or waveforms.shape[1] < self.config.min_samples:
            raise ValueError(f"Cnn14 needs (B, L) waveforms with L >= {self.config.min_samples}, "
                             f"got shape {tuple(waveforms.shape)}")
        x = self.logmel(waveforms)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # BatchNorm over the mel axis
        blocks = len(self.config.channels)
        for i in range(blocks):
            x = getattr(self, f"conv_block{i + 1}")(x, pool=2 if i < blocks - 1 else 1)
        x = x.mean(dim=3)  # x: (B, C, T')
        x = x.max(dim=2).values + x.mean(dim=2)
        embedding = F.relu(self.fc1(x))
        return self.fc_audioset(embedding), embedding

    @torch.inference_mode()
    def embed_probs_logits(self, waveforms: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, L) or (L,) 16 kHz waveforms -> (embedding (B, embed_dim), class probabilities (B, classes),
        logits (B, classes)).

        The probabilities are softmax over the 527 AudioSet logits, as the KL of audioldm_eval ("softmax over
        logits") and av-benchmark computes them; note that PANNs itself is trained with per-class sigmoid outputs.
        The logits (audioldm_eval's 'logits' feature, fc_audioset before any activation) feed the sigmoid KL and
        the Inception score.
        """
        if isinstance(waveforms, torch.Tensor):
            x = waveforms.float().to(self._device())
        else:
            x = torch.from_numpy(np.ascontiguousarray(waveforms, dtype=np.float32)).to(self._device())
        logits, embedding = self(x[None] if x.ndim == 1 else x)
        logits = logits.float()
        return (embedding.float().cpu().numpy(), torch.softmax(logits, dim=-1).cpu().numpy(),
                logits.cpu().numpy())

    def embed_and_probs(self, waveforms: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, L) or (L,) 16 kHz waveforms -> (embedding (B, embed_dim), softmax class probabilities (B, classes))."""
        return self.embed_probs_logits(waveforms)[:2]

    def embed(self, waveforms: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, L) 16 kHz waveforms -> (B, embed_dim) FD embeddings relu(fc1)."""
        return self.embed_and_probs(waveforms)[0]

    def class_probs(self, waveforms: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, L) 16 kHz waveforms -> (B, classes) softmax of the AudioSet logits (see `embed_and_probs`)."""
        return self.embed_and_probs(waveforms)[1]

    def protocol(self) -> dict[str, object]:
        return {**self.config.protocol(), "checkpoint": self.checkpoint_id}

    def _device(self) -> torch.device:
        return self.fc1.weight.device


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a bare state dict, or a dict with 'model' holding one (the PANNs layout)."""
    problem = weight_file_problem(path)  # empty, cut short: said as such
    if problem:
        raise ValueError(f"{path}: {problem}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors: one line naming the file and the reason (a refused pickle's is
        # after a paragraph of torch's advice)
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({one_line(error)})") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if (not isinstance(state, dict) or not all(isinstance(k, str) for k in state)
            or not all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"{path}: expected a state dict or a dict with 'model' holding one (names to tensors)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], path: Path,
                            fixed_keys: tuple[str, ...] = ()) -> None:
    """Load `state` into `model` strictly (BatchNorm's num_batches_tracked may be absent).

    Tensors named in `fixed_keys` are computed from the config, not learnt. The stored ones are loaded, as PANNs'
    own inference does (torchlibrosa rebuilds them, then load_state_dict overwrites them), so a librosa-version
    rounding difference cannot change the features; a gap beyond 1% of their scale means another front end
    (other mel edges, window or rate) and is refused.
    """
    own = model.state_dict()
    learnt = {name for name, _ in model.named_parameters()}
    for key, value in state.items():  # NaN anywhere; infinity in a learnt tensor (a buffer may be a -inf mask)
        if value.is_floating_point() and (bool(torch.isnan(value).any())
                                          or (key in learnt and not bool(torch.isfinite(value).all()))):
            raise ValueError(f"{path}: {key} holds NaN or infinity (a damaged checkpoint)")
        if key in own and own[key].is_floating_point() and not value.is_floating_point():  # load_state_dict would cast it
            raise ValueError(f"{path}: {key} is stored as {value.dtype}, where {type(model).__name__} has float "
                             "values (not a trained checkpoint)")
    for key in fixed_keys:
        if key in state and state[key].shape == own[key].shape:
            gap = float((state[key].float() - own[key].float()).abs().max())
            scale = max(float(own[key].abs().max()), 1e-12)
            if gap > 1e-2 * scale:
                raise ValueError(f"{path}: {key} differs from this front end (max gap {gap:.3g}): "
                                 f"not a checkpoint for this protocol")
            if gap > 1e-5 * scale:
                log.info("%s: %s differs from the rebuilt one by %.3g (rounding); using the stored one", path, key, gap)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        reason = str(error).splitlines()[-1].strip()
        raise ValueError(f"{path}: does not fit {type(model).__name__}: {reason}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: not a {type(model).__name__} state dict "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")


def build_weighted(make: Callable[[], ModelT], weights_dir: str | Path | None, checkpoint_name: str, description: str,
                   seed: int, fixed_keys: tuple[str, ...] = (),
                   read: Callable[[Path, ModelT], dict[str, torch.Tensor]] | None = None) -> tuple[ModelT, str]:
    """`make()` with random weights seeded by `seed` when `weights_dir` is None, else with the weights of
    `weights_dir / checkpoint_name` (checked by `load_state_dict_checked`); and its checkpoint id for the cache and
    result files ('random-init:seed=N', or the sha256 of the file).

    read(path, model): the file's tensors as the model's state dict, for a file laid out otherwise (default:
    `read_state_dict(path)`)."""
    if weights_dir is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return make(), f"random-init:seed={seed}"
    path = Path(weights_dir) / checkpoint_name
    if not path.is_file():
        raise missing_weights(path, description)
    if read is None:  # the file first: a damaged one is refused before a large model is built (ImageBind: 5 GB)
        state = read_state_dict(path)
        model = make()
    else:
        model = make()
        state = read(path, model)
    load_state_dict_checked(model, state, path, fixed_keys)
    return model, sha256_file(path)


def load_cnn14(
    weights_dir: str | Path | None,
    device: str | torch.device = "cpu",
    config: Cnn14Config = CNN14_CONFIGS["paper"],
    seed: int = 0,
) -> Cnn14:
    """Cnn14 from `weights_dir / Cnn14_16k_mAP=0.438.pth` (torch.load weights_only=True), or with random weights
    (seeded, for tests and the demo) when `weights_dir` is None. `checkpoint_id` records which (sha256 of the file
    or 'random-init:seed=N') for the cache and result files."""
    model, checkpoint_id = build_weighted(lambda: Cnn14(config), weights_dir, CHECKPOINT_NAME,
                                          "PANNs Cnn14 16 kHz checkpoint", seed, FRONT_END_KEYS)
    model.checkpoint_id = checkpoint_id
    return model.to(device).eval()
