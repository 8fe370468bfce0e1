"""PaSST-S at 32 kHz: the embedder of FD_PaSST (768-d) and the classifier (527 AudioSet logits) of KL_PaSST and
IS_PaSST, computed as av-benchmark computes them.

Reference harness: hkchengrex/av-benchmark (av_bench/extraction_models.py, av_bench/extract.py,
av_bench/data/audio_dataset.py). It builds `hear21passt.base.get_basic_model(mode="all")` (package hear21passt,
kkoutini/passt_hear21; av-benchmark installs the fork hkchengrex/passt_hear21, whose only commit on top of
kkoutini's 0.0.26 removes debug prints and a size warning, loads the file with weights_only=True and calls
torch.stft with return_complex=True + view_as_real: the same numbers), which downloads
passt-s-f128-p16-s10-ap.476-swa.pt (Koutini et al., "Efficient Training of Audio Transformers with Patchout", 2022;
github.com/kkoutini/PaSST releases v0.0.1-audioset). Here the same hear21passt classes are built without any
download and the file is read from the weights folder.

Front end (av_bench/data/audio_dataset.py `AudioDataset(sr=32000).read_from_file` and av_bench/extract.py):
channels averaged, the mean subtracted, `torchaudio.transforms.Resample(sr, 32000)` with its defaults (windowed
sinc, Hann, lowpass_filter_width 6, rolloff 0.99), cut to duration * 32000 samples, then cut or zero-padded at the
end to 320000 samples (10 s).

Model (hear21passt: models/preprocess.py AugmentMelSTFT, models/passt.py PaSST, wrapper.py PasstBasicWrapper):
- mel: pre-emphasis y[n] = x[n + 1] - 0.97 x[n] (L - 1 samples); STFT n_fft 1024, symmetric Hann window of 800,
  hop 320, centred with reflect padding -> 1000 frames for 10 s; power |X|^2; 128 Kaldi mel bands (mel = 1127
  ln(1 + f / 700), triangles in the mel domain) from 0 to 15000 Hz (get_basic_model passes fmax=None, which
  AugmentMelSTFT resolves to sr / 2 - fmax_aug_range / 2 = 15000), the Nyquist bin weighted 0; log(mel + 1e-5);
  (x + 4.5) / 5. In eval mode there is no fmin/fmax jitter and no frequency/time masking (it still draws two
  numbers from the global CPU generator; this module restores the generator afterwards).
- net: 16 x 16 patches with stride 10 x 10 over the (128, 1000) mel image -> 12 x 99 patches; separate frequency
  and time positional embeddings; class and distillation tokens; 12 pre-norm blocks (768-d, 12 heads, MLP 3072,
  GELU, LayerNorm eps 1e-6); final LayerNorm; embedding = (class token + distillation token) / 2 (768-d), logits =
  head(embedding) = Linear(LayerNorm(embedding)) (527, before any sigmoid). The wrapper in mode "all" returns
  cat(logits, embedding), which av-benchmark splits at 527.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torchaudio
from hear21passt.models import passt as passt_module
from hear21passt.models.passt import PaSST, checkpoint_filter_fn
from hear21passt.models.preprocess import AugmentMelSTFT
from hear21passt.wrapper import PasstBasicWrapper
from torch import nn

from eval.panns import build_weighted, read_state_dict

CHECKPOINT_NAME = "passt-s-f128-p16-s10-ap.476-swa.pt"
CHECKPOINT_URL = ("https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/"
                  "passt-s-f128-p16-s10-ap.476-swa.pt")  # hear21passt models/passt.py, passt_s_swa_p16_128_ap476
CHECKPOINT_DESCRIPTION = f"PaSST checkpoint ({CHECKPOINT_NAME}, AudioSet PaSST-S SWA mAP .476)"
SAMPLE_RATE = 32000
INPUT_SAMPLES = 320000  # 10 s at 32 kHz: av_bench/extract.py pads or cuts every clip to this
# torchaudio.transforms.Resample defaults, as av_bench/data/audio_dataset.py builds it: Resample(sr, 32000)
RESAMPLER = {"class": "torchaudio.transforms.Resample", "resampling_method": "sinc_interp_hann",
             "lowpass_filter_width": 6, "rolloff": 0.99, "beta": None}
# hear21passt warnings that say nothing about the result: its torch.stft/autocast spellings, and the patch grid
# of a 1000-frame input against the nominal 998 (the positional embeddings cover 99 time patches either way).
_QUIET = ("stft with return_complex=False", r"`torch\.cuda\.amp\.autocast", r"Input image size \(128\*1000\)")


@dataclass(frozen=True)
class PaSSTConfig:
    """AugmentMelSTFT arguments (as hear21passt.base.get_basic_model passes them, fmax resolved) and PaSST
    arguments (as get_model(arch="passt_s_swa_p16_128_ap476") passes them); `tiny` keeps the front end and the
    patch grid and narrows the transformer."""

    sample_rate: int = SAMPLE_RATE
    n_mels: int = 128
    win_length: int = 800
    hopsize: int = 320
    n_fft: int = 1024
    freqm: int = 48  # masking and jitter widths act in training only; kept so the module is the one get_basic_model
    timem: int = 192  # builds
    htk: bool = False
    fmin: float = 0.0
    fmax: float = 15000.0  # get_basic_model passes None: AugmentMelSTFT sets sr // 2 - fmax_aug_range // 2
    norm: int = 1
    fmin_aug_range: int = 10
    fmax_aug_range: int = 2000
    input_fdim: int = 128
    input_tdim: int = 998
    patch_size: int = 16
    fstride: int = 10
    tstride: int = 10
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    distilled: bool = True
    num_classes: int = 527
    in_chans: int = 1

    def protocol(self) -> dict[str, object]:
        """The knobs a cached embedding depends on (written into result and cache files)."""
        return {**dataclasses.asdict(self), "input_samples": INPUT_SAMPLES, "resampler": dict(RESAMPLER),
                "front_end": "mono mean, mean removed, resampled to 32 kHz, cut to duration, cut/zero-pad to 10 s",
                "embedding": "(class token + distillation token) / 2", "logits": "head (LayerNorm + Linear)",
                "hear21passt": _package_version("hear21passt"), "torchaudio": _package_version("torchaudio")}


PASST_CONFIGS: dict[str, PaSSTConfig] = {
    "paper": PaSSTConfig(),
    "tiny": PaSSTConfig(embed_dim=32, depth=1, num_heads=2),
}


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------------------------
# Front end
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _resampler(sample_rate: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(sample_rate, SAMPLE_RATE)  # the defaults, as av-benchmark builds it


def passt_waveform(waveform: np.ndarray, sample_rate: int, duration: float | None) -> np.ndarray:
    """(L,) or (C, L) float audio at `sample_rate` -> (320000,) float32 at 32 kHz, the av-benchmark PaSST input.

    In float32 like torchaudio.load: x = mean over channels; x = x - mean(x); x = Resample(sample_rate, 32000)(x)
    (torchaudio defaults; none when the rate is already 32 kHz); x = x[:int(32000 * duration)] (no cut when
    `duration` is None); then x[:320000] or x zero-padded at the end to 320000 samples
    (av_bench/data/audio_dataset.py AudioDataset.read_from_file, av_bench/extract.py).
    """
    array = np.asarray(waveform)
    if array.ndim not in (1, 2) or array.shape[-1] == 0 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"passt_waveform needs (L,) or (C, L) float audio, got {array.dtype} {array.shape}")
    if sample_rate <= 0:
        raise ValueError(f"passt_waveform: sample_rate must be positive, got {sample_rate}")
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    with torch.inference_mode():
        x = x.mean(dim=0) if x.ndim == 2 else x  # x: (L,)
        x = x - x.mean()
        if sample_rate != SAMPLE_RATE:
            x = _resampler(int(sample_rate))(x)
        if duration is not None:
            x = x[: int(SAMPLE_RATE * duration)]
        if x.shape[-1] >= INPUT_SAMPLES:
            x = x[:INPUT_SAMPLES]
        else:
            x = torch.nn.functional.pad(x, (0, INPUT_SAMPLES - x.shape[-1]))
    return x.numpy().astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
def build_mel(config: PaSSTConfig) -> AugmentMelSTFT:
    """hear21passt's AugmentMelSTFT with get_basic_model's arguments, in eval mode."""
    return AugmentMelSTFT(n_mels=config.n_mels, sr=config.sample_rate, win_length=config.win_length,
                          hopsize=config.hopsize, n_fft=config.n_fft, freqm=config.freqm, timem=config.timem,
                          htk=config.htk, fmin=config.fmin, fmax=config.fmax, norm=config.norm,
                          fmin_aug_range=config.fmin_aug_range, fmax_aug_range=config.fmax_aug_range).eval()


def build_net(config: PaSSTConfig) -> PaSST:
    """hear21passt's PaSST with the arguments get_model(arch="passt_s_swa_p16_128_ap476", pretrained=False) passes
    (patchout off, no dropout), built directly so that nothing downloads; random initialisation as hear21passt's."""
    return PaSST(u_patchout=0, s_patchout_t=0, s_patchout_f=0, img_size=(config.input_fdim, config.input_tdim),
                 patch_size=config.patch_size, stride=(config.fstride, config.tstride), in_chans=config.in_chans,
                 num_classes=config.num_classes, embed_dim=config.embed_dim, depth=config.depth,
                 num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                 distilled=config.distilled).eval()


class PaSSTEmbedder(nn.Module):
    """PasstBasicWrapper(AugmentMelSTFT, PaSST, mode="all") frozen in eval mode (train() keeps it there)."""

    def __init__(self, config: PaSSTConfig = PASST_CONFIGS["paper"], net: PaSST | None = None) -> None:
        super().__init__()
        passt_module.first_RUN = False  # hear21passt prints tensor shapes on its first forward otherwise
        self.config = config
        self.checkpoint_id = "random-init"
        self.model = PasstBasicWrapper(mel=build_mel(config), net=net if net is not None else build_net(config),
                                       mode="all")
        self.requires_grad_(False)
        self.eval()

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def train(self, mode: bool = True) -> PaSSTEmbedder:
        return super().train(False)  # a frozen evaluator: no mel jitter, masking or patchout

    def forward(self, waveforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 320000) 32 kHz waveforms -> (logits (B, num_classes), embedding (B, embed_dim))."""
        if waveforms.ndim != 2 or waveforms.shape[1] != INPUT_SAMPLES:
            raise ValueError(f"PaSST needs (B, {INPUT_SAMPLES}) waveforms (passt_waveform), "
                             f"got shape {tuple(waveforms.shape)}")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            for message in _QUIET:
                warnings.filterwarnings("ignore", message=message)
            out = self.model(waveforms)  # out: (B, num_classes + embed_dim) = cat(logits, embedding)
        return out[:, : self.config.num_classes], out[:, self.config.num_classes:]

    @torch.inference_mode()
    def logits_and_embedding(self, waveforms: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, 320000) or (320000,) 32 kHz waveforms (see `passt_waveform`) -> (logits (B, num_classes) float32,
        embedding (B, embed_dim) float32), as av_bench/extract.py splits the wrapper's output."""
        device = self.model.device()
        if isinstance(waveforms, torch.Tensor):
            x = waveforms.float().to(device)
        else:
            x = torch.from_numpy(np.ascontiguousarray(waveforms, dtype=np.float32)).to(device)
        logits, embedding = self(x[None] if x.ndim == 1 else x)
        return logits.float().cpu().numpy(), embedding.float().cpu().numpy()

    def protocol(self) -> dict[str, object]:
        return {**self.config.protocol(), "checkpoint": self.checkpoint_id}


def official_state_dict(path: Path, net: PaSST) -> dict[str, torch.Tensor]:
    """The tensors of the official file as hear21passt's load_pretrained hands them to PaSST.load_state_dict
    (strict): a bare state dict of the PaSST net, no 'net.' prefix ('model' wrapping and a DataParallel 'module.'
    prefix are unwrapped too); checkpoint_filter_fn (legacy flat patch-projection weights reshaped); adapt_input_conv
    for one input channel, a no-op for a (768, 1, 16, 16) projection. An ImageNet ViT/DeiT file (no
    time_new_pos_embed: hear21passt would interpolate its positional embedding) is not this protocol's model."""
    state = read_state_dict(path)
    if "time_new_pos_embed" not in state:
        raise ValueError(f"{path}: no 'time_new_pos_embed' tensor: not a state dict of the AudioSet PaSST net "
                         f"(an ImageNet ViT/DeiT file, or keys under a prefix such as 'net.')")
    state = checkpoint_filter_fn(state, net)
    weight = state.get("patch_embed.proj.weight")
    if weight is not None and weight.ndim == 4 and weight.shape[1] != net.patch_embed.proj.in_channels:
        raise ValueError(f"{path}: patch_embed.proj.weight has {weight.shape[1]} input channels, expected "
                         f"{net.patch_embed.proj.in_channels}")
    return state


def load_passt(
    weights_dir: str | Path | None,
    device: str | torch.device = "cpu",
    config: PaSSTConfig = PASST_CONFIGS["paper"],
    seed: int = 0,
) -> PaSSTEmbedder:
    """PaSST from `weights_dir / passt-s-f128-p16-s10-ap.476-swa.pt` (torch.load weights_only=True, strict load into
    the PaSST net), or with random weights (seeded, for tests and the demo) when `weights_dir` is None.
    `checkpoint_id` records which (sha256 of the file or 'random-init:seed=N') for the cache and result files."""
    net, checkpoint_id = build_weighted(lambda: build_net(config), weights_dir, CHECKPOINT_NAME, CHECKPOINT_DESCRIPTION,
                                        seed, read=official_state_dict)
    model = PaSSTEmbedder(config, net)
    model.checkpoint_id = checkpoint_id
    return model.to(device).eval()
