"""Synchformer features and DeSync, computed as hkchengrex/av-benchmark computes them.

DeSync (av-benchmark, av_bench/evaluate.py) is the mean over clips of |predicted audio-visual offset| in seconds,
itself the mean of two predictions: Synchformer's offset classifier (`compare_v_a`) on the first 14 and on the last
14 segments of a clip, each the argmax over 21 classes on make_class_grid(-2, 2, 21) = linspace(-2, 2, 21) s.
The features come from:

- video (extract_video.py encode_video_with_sync, av_bench/data/video_dataset.py): frames at 25 fps, the first
  int(25 * duration) of the clip, as uint8 (T, C, H, W); torchvision v2 Resize(224, bicubic, antialiased) on the
  uint8 frames (so rounded back to uint8), CenterCrop(224), ToDtype(float32, scale=True) = x / 255,
  Normalize(0.5, 0.5) = (x - 0.5) / 0.5; segments of 16 frames every 8 frames, S = (T - 16) // 8 + 1
  (8 s: 24; 10 s: 30), each encoded to (8, 768) by the MotionFormer.
- audio (av_bench/data/audio_dataset.py SynchformerAudioDataset, av_bench/extract.py encode_audio_with_sync):
  channels averaged, torchaudio Resample(sr, 16000) with its defaults, cut to int(16000 * duration) samples (an
  error when shorter; no mean removal); segments of 10240 samples every 5120, S = (L - 10240) // 5120 + 1
  (8 s: 24; 10 s: 30); torchaudio MelSpectrogram(16000, n_fft 1024, win_length 400 (periodic Hann), hop 160,
  128 HTK mel bands 0-8000 Hz without normalisation, power 2, centred with reflect padding): 65 frames; log(x + 1e-6);
  zero-padded (after the log) to 66 frames; (x + 4.2677393) / (2 * 4.5689974); each segment encoded to (6, 768) by
  the AST.

The networks are in eval/synchformer_model.py (the sources are listed there); the official checkpoint
synchformer_state_dict.pth (a state dict of av-benchmark's `Synchformer()`) loads strictly. Nothing is downloaded.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torchaudio
from torch import nn
from torchvision.transforms import v2

from eval.panns import build_weighted
from eval.synchformer_model import (
    SYNCHFORMER_CONFIGS,
    ASTEncoder,
    GlobalTransformer,
    MotionFormerEncoder,
    SynchformerConfig,
    init_weights,
)

__all__ = ["CHECKPOINT_NAME", "SAMPLE_RATE", "SEGMENTS_COMPARED", "SYNCHFORMER_CONFIGS", "VIDEO_FPS", "Synchformer",
           "SynchformerConfig", "load_synchformer", "num_segments", "offset_grid", "synchformer_audio_input",
           "synchformer_video_input"]

CHECKPOINT_NAME = "synchformer_state_dict.pth"
VIDEO_FPS = 25.0
SAMPLE_RATE = 16000
SEGMENTS_COMPARED = 14
FRAME_SIZE = 224
VIDEO_SEGMENT_BATCH = 8  # segments per MotionFormer forward pass
AUDIO_SEGMENT_BATCH = 64  # segments per AST forward pass
FRAME_CHUNK = 32  # frames per call of the video transform (bounds the float copy of full-size frames)

_VIDEO_TRANSFORM = v2.Compose([
    v2.Resize(FRAME_SIZE, interpolation=v2.InterpolationMode.BICUBIC),
    v2.CenterCrop(FRAME_SIZE),
    v2.ToImage(),
    v2.ToDtype(torch.float32, scale=True),
    v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
])


def num_segments(length: int, size: int, step: int) -> int:
    """Segments of `size` every `step` in `length` items, the last incomplete one dropped: (length - size) // step + 1
    (0 when length < size)."""
    return (length - size) // step + 1 if length >= size else 0


def offset_grid(config: SynchformerConfig = SYNCHFORMER_CONFIGS["paper"]) -> np.ndarray:
    """(classes,) float32 offsets in seconds: make_class_grid(-2, 2, 21) = float32(linspace(-2, 2, 21))."""
    return np.linspace(config.offset_min, config.offset_max, config.offset_classes).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------
def synchformer_video_input(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB frames, already at 25 fps over the clip (T = int(25 * duration)) -> (T, 3, 224, 224)
    float32: bicubic antialiased resize of the short side to 224 on the uint8 frames, centre crop 224,
    x / 255, (x - 0.5) / 0.5 (av-benchmark VideoDataset.sync_transform)."""
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or array.shape[0] == 0:
        raise ValueError(f"synchformer_video_input needs (T, H, W, 3) uint8 frames, got {array.dtype} {array.shape}")
    video = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    with torch.inference_mode():
        chunks = [_VIDEO_TRANSFORM(video[i:i + FRAME_CHUNK]) for i in range(0, video.shape[0], FRAME_CHUNK)]
    return torch.cat(chunks).as_subclass(torch.Tensor)


@functools.lru_cache(maxsize=16)
def _resampler(sample_rate: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(sample_rate, SAMPLE_RATE)  # the defaults, as av-benchmark builds it


def synchformer_audio_input(waveform: np.ndarray, sample_rate: int, duration: float) -> torch.Tensor:
    """(L,) or (C, L) float audio at `sample_rate` -> (int(16000 * duration),) float32 at 16 kHz: channels averaged,
    torchaudio Resample(sample_rate, 16000) with its defaults (none at 16 kHz), cut to int(16000 * duration) samples
    (av-benchmark SynchformerAudioDataset); ValueError when the audio is shorter."""
    array = np.asarray(waveform)
    if array.ndim not in (1, 2) or array.shape[-1] == 0 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"synchformer_audio_input needs (L,) or (C, L) float audio, got {array.dtype} {array.shape}")
    if sample_rate <= 0 or duration <= 0:
        raise ValueError(f"synchformer_audio_input: sample_rate and duration must be positive, got {sample_rate}, "
                         f"{duration}")
    expected = int(SAMPLE_RATE * duration)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    with torch.inference_mode():
        x = x.mean(dim=0) if x.ndim == 2 else x  # x: (L,)
        if sample_rate != SAMPLE_RATE:
            x = _resampler(int(sample_rate))(x)
        x = x[:expected]
    if x.shape[0] != expected:
        raise ValueError(f"Synchformer audio too short: {x.shape[0] / SAMPLE_RATE:g} s for a window of {duration:g} s "
                         f"({x.shape[0]} of {expected} samples at 16 kHz)")
    return x.clone()


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
class Synchformer(nn.Module):
    """av-benchmark's `Synchformer()` for inference: `video_features` (extract_vfeats over segments),
    `audio_features` (the mel front end + extract_afeats), `offset_logits` (compare_v_a) and `desync`."""

    def __init__(self, config: SynchformerConfig = SYNCHFORMER_CONFIGS["paper"]) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_id = "random-init"
        self.vfeat_extractor = MotionFormerEncoder(config)
        self.afeat_extractor = ASTEncoder(config)
        self.vproj = nn.Linear(config.video_dim, config.sync_dim)
        self.aproj = nn.Linear(config.audio_dim, config.sync_dim)
        self.transformer = GlobalTransformer(config)
        # the mel front end is not part of the checkpoint: non-persistent buffers, computed on the CPU
        with torch.device("cpu"):
            filters = torchaudio.functional.melscale_fbanks(config.n_fft // 2 + 1, 0.0, config.sample_rate / 2,
                                                            config.n_mels, config.sample_rate, norm=None,
                                                            mel_scale="htk")
            window = torch.hann_window(config.win_length)
        self.register_buffer("mel_window", window, persistent=False)
        self.register_buffer("mel_filters", filters, persistent=False)  # (n_fft // 2 + 1, n_mels)
        init_weights(self)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Synchformer:
        return super().train(False)  # a frozen evaluator

    def protocol(self) -> dict[str, object]:
        return {**self.config.protocol(), "checkpoint": self.checkpoint_id}

    def _device(self) -> torch.device:
        return self.vproj.weight.device

    @torch.inference_mode()
    def audio_spectrograms(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, L) 16 kHz waveforms -> (B, S, 66, 128) normalised log-mel segments, S = (L - 10240) // 5120 + 1:
        power mel spectrogram M of each segment, log(M + 1e-6), zero-padded (or cut) to 66 frames,
        (x - mean) / (2 std)."""
        c = self.config
        if waveform.ndim != 2 or waveform.shape[1] < c.segment_samples:
            raise ValueError(f"Synchformer needs (B, L) waveforms with L >= {c.segment_samples}, "
                             f"got shape {tuple(waveform.shape)}")
        x = waveform.float().to(self._device()).unfold(1, c.segment_samples, c.segment_step_samples)  # (B, S, 10240)
        power = torchaudio.functional.spectrogram(x, pad=0, window=self.mel_window, n_fft=c.n_fft,
                                                  hop_length=c.hop_length, win_length=c.win_length, power=2.0,
                                                  normalized=False, center=True, pad_mode="reflect", onesided=True)
        mel = torch.log(power.transpose(-1, -2) @ self.mel_filters + c.log_offset)  # (B, S, frames, mels)
        frames = mel.shape[-2]
        if frames < c.spec_frames:
            mel = nn.functional.pad(mel, (0, 0, 0, c.spec_frames - frames))
        mel = mel[..., :c.spec_frames, :]
        return (mel - c.mel_mean) / (2 * c.mel_std)

    @torch.inference_mode()
    def audio_features(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, L) 16 kHz waveforms -> (B, S, 6, D) AST segment features, S = (L - 10240) // 5120 + 1."""
        spec = self.audio_spectrograms(waveform)
        b, s = spec.shape[:2]
        flat = spec.flatten(0, 1)  # (B*S, 66, 128)
        out = torch.cat([self.afeat_extractor(flat[i:i + AUDIO_SEGMENT_BATCH])
                         for i in range(0, flat.shape[0], AUDIO_SEGMENT_BATCH)])
        return out.view(b, s, *out.shape[1:])

    @torch.inference_mode()
    def video_features(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, 224, 224) transformed 25 fps frames -> (B, S, 8, D) MotionFormer segment features,
        S = (T - 16) // 8 + 1. Frames may stay on the CPU: segments move to the model's device in batches."""
        c = self.config
        if frames.ndim != 5 or frames.shape[2:] != (3, c.frame_size, c.frame_size) or frames.shape[1] < c.segment_frames:
            raise ValueError(f"Synchformer needs (B, T >= {c.segment_frames}, 3, {c.frame_size}, {c.frame_size}) "
                             f"frames, got shape {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        s = num_segments(t, c.segment_frames, c.segment_step_frames)
        starts = [(i, j * c.segment_step_frames) for i in range(b) for j in range(s)]
        outs = []
        for k in range(0, len(starts), VIDEO_SEGMENT_BATCH):
            chunk = torch.stack([frames[i, start:start + c.segment_frames] for i, start in starts[k:k + VIDEO_SEGMENT_BATCH]])
            chunk = chunk.to(self._device(), torch.float32).permute(0, 2, 1, 3, 4)  # (N, 3, 16, 224, 224)
            outs.append(self.vfeat_extractor(chunk))
        out = torch.cat(outs)
        return out.view(b, s, *out.shape[1:])

    @torch.inference_mode()
    def offset_logits(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """(B, 14, 8, Dv) video and (B, 14, 6, Da) audio features -> (B, 21) offset logits (compare_v_a: vproj /
        aproj, segments and tokens flattened, the global transformer)."""
        c = self.config
        n, tv, ta = c.segments_compared, c.video_token_frames, c.audio_grid[1]
        if (video.ndim != 4 or audio.ndim != 4 or video.shape[0] != audio.shape[0]
                or video.shape[1:] != (n, tv, c.video_dim) or audio.shape[1:] != (n, ta, c.audio_dim)):
            raise ValueError(f"offset_logits needs (B, {n}, {tv}, {c.video_dim}) video and (B, {n}, {ta}, "
                             f"{c.audio_dim}) audio features, got {tuple(video.shape)} and {tuple(audio.shape)}")
        device = self._device()
        v = self.vproj(video.float().to(device)).flatten(1, 2)  # (B, 14 * 8, D)
        a = self.aproj(audio.float().to(device)).flatten(1, 2)  # (B, 14 * 6, D)
        return self.transformer(v, a)

    def desync(self, video: torch.Tensor, audio: torch.Tensor) -> np.ndarray:
        """(B, Sv, 8, Dv) video and (B, Sa, 6, Da) audio features -> (B, 2) float64 |offset| in seconds of the
        argmax class for the first and for the last 14 segments (av-benchmark evaluate.py; DeSync is the mean of
        all of them). ValueError when either stream has fewer than 14 segments."""
        n = self.config.segments_compared
        if video.ndim != 4 or audio.ndim != 4 or min(video.shape[1], audio.shape[1]) < n:
            raise ValueError(f"DeSync needs at least {n} segments of video and audio features, got shapes "
                             f"{tuple(video.shape)} and {tuple(audio.shape)}")
        first = self.offset_logits(video[:, :n], audio[:, :n]).argmax(dim=-1)
        last = self.offset_logits(video[:, -n:], audio[:, -n:]).argmax(dim=-1)
        classes = torch.stack((first, last), dim=1).cpu().numpy()  # (B, 2)
        return np.abs(offset_grid(self.config)[classes]).astype(np.float64)


def load_synchformer(
    weights_dir: str | Path | None,
    device: str | torch.device = "cpu",
    config: SynchformerConfig = SYNCHFORMER_CONFIGS["paper"],
    seed: int = 0,
) -> Synchformer:
    """Synchformer from `weights_dir / synchformer_state_dict.pth` (torch.load weights_only=True, loaded strictly),
    or with random weights (seeded, for tests and the demo) when `weights_dir` is None. `checkpoint_id` records which
    (sha256 of the file or 'random-init:seed=N') for the cache and result files."""
    model, checkpoint_id = build_weighted(lambda: Synchformer(config), weights_dir, CHECKPOINT_NAME,
                                          "Synchformer checkpoint", seed)
    model.checkpoint_id = checkpoint_id
    return model.to(device).eval()
