"""ImageBind (imagebind_huge) video and audio embeddings for the ImageBind score (IB-Score), computed as
av-benchmark computes them.

Sources:
- Model: Girdhar et al., "ImageBind: One Embedding Space To Bind Them All", CVPR 2023; `ImageBindModel` and
  `imagebind_huge` of facebookresearch/ImageBind (imagebind/models/imagebind_model.py), checkpoint
  imagebind_huge.pth (the state dict of the whole ImageBindModel: vision, text, audio, depth, thermal and IMU
  towers). av-benchmark loads it through its fork hkchengrex/ImageBind, whose model code differs from the upstream
  repository (and from the `imagebind-unofficial` 0.1.1 package on PyPI) only in the checkpoint download path and
  in the text tokenizer's end-of-text handling: the vision and audio towers, and so these embeddings, are the same.
  The model classes are imported from the installed `imagebind` package, not re-implemented.
- Protocol: hkchengrex/av-benchmark. Video: extract_video.py (`encode_video_with_imagebind`),
  av_bench/data/video_dataset.py (`VideoDataset`: frames decoded at 0.5 fps, the first int(0.5 * duration) kept)
  and av_bench/data/ib_data.py (`SpatialCrop`). Audio: av_bench/extract.py with av_bench/data/audio_dataset.py
  (`ImageBindAudioDataset.load_and_transform_audio_data`, the same as ImageBind's imagebind/data.py
  `load_and_transform_audio_data`). Score: av_bench/evaluate.py, the mean over paired clips of
  torch.cosine_similarity(video embedding, audio embedding).

Audio front end (`imagebind_audio_input`): resample to 16 kHz with torchaudio.functional.resample (its defaults),
three 2 s clips at the start times of pytorchvideo's ConstantClipsPerVideoSampler, a Kaldi log-mel filter bank per
clip (torchaudio.compliance.kaldi.fbank: 25 ms Hann windows every 10 ms, 128 bins, HTK-compatible, dither 0) padded
with zeros or cut to 204 frames, then (x - (-4.268)) / 9.138.

Video front end (`imagebind_video_input`): frames resized so that the short side is 224 (bicubic, antialiased),
scaled to [0, 1], normalised with the CLIP mean and std, three 224 x 224 crops along the long side, and every pair of
consecutive frames (i, i + 1) of every crop as one two-frame clip.

Embeddings: ImageBindModel.forward with one modality: each clip through its preprocessor, trunk, head and
postprocessor (vision: x / |x|; audio: 20 x / |x|), then the mean over the clips of a sample.

The package's `imagebind/__init__.py` imports imagebind/data.py, which needs pytorchvideo (and through it
`torchvision.transforms.functional_tensor`, a module current torchvision no longer has); `imagebind_model_module`
bypasses that __init__ when it fails, and this module uses neither imagebind.data nor pytorchvideo.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import math
import sys
import types
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio
from torch import nn
from torchvision.transforms import v2

from eval.panns import build_weighted

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "imagebind_huge.pth"

# Video front end (av_bench/data/video_dataset.py, av_bench/data/ib_data.py, extract_video.py)
VIDEO_FPS = 0.5  # frames per second the video is decoded at
IMAGE_SIZE = 224  # short side after resizing, and the crop size
NUM_CROPS = 3  # spatial crops: start, centre and end of the long side
FRAMES_PER_CLIP = 2  # consecutive frames per vision clip
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Audio front end (ImageBindAudioDataset.load_and_transform_audio_data and waveform2melspec)
SAMPLE_RATE = 16000
CLIP_DURATION = 2  # seconds per audio clip
CLIPS_PER_AUDIO = 3
MEL_BINS = 128
TARGET_FRAMES = 204
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
MEL_MEAN = -4.268
MEL_STD = 9.138

VISION = "vision"  # imagebind_model.ModalityType.VISION
AUDIO = "audio"  # imagebind_model.ModalityType.AUDIO


def imagebind_model_module() -> types.ModuleType:
    """The `imagebind.models.imagebind_model` module of the installed ImageBind package.

    When `import imagebind` fails (its __init__ imports imagebind/data.py, whose pytorchvideo dependency imports
    `torchvision.transforms.functional_tensor`, which current torchvision no longer has), an empty package object with the
    installed package's search path stands in for `imagebind` in sys.modules, so that the model code (which imports
    only torch, timm, einops and its sibling modules) loads without the data helpers.
    """
    if "imagebind" not in sys.modules:
        try:
            importlib.import_module("imagebind")
        except ImportError as error:
            spec = importlib.util.find_spec("imagebind")
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("the ImageBind model code is not installed: pip install imagebind-unofficial "
                                  "(or facebookresearch/ImageBind from GitHub)") from error
            package = types.ModuleType("imagebind")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            sys.modules.setdefault("imagebind", package)
    return importlib.import_module("imagebind.models.imagebind_model")


@dataclass(frozen=True)
class ImageBindConfig:
    """The arguments of `ImageBindModel.__init__`; defaults = what `imagebind_huge()` passes (its own arguments
    plus the class defaults). `tiny` keeps the front ends and input sizes (224 px two-frame clips, 128 x 204 mel)
    and narrows every tower, so that its state dict has the same keys as the official one."""

    video_frames: int = 2
    kernel_size: tuple[int, int, int] = (2, 14, 14)
    audio_kernel_size: int = 16
    audio_stride: int = 10
    out_embed_dim: int = 1024
    vision_embed_dim: int = 1280
    vision_num_blocks: int = 32
    vision_num_heads: int = 16
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_num_mel_bins: int = MEL_BINS
    audio_target_len: int = TARGET_FRAMES
    audio_drop_path: float = 0.1
    text_embed_dim: int = 1024
    text_num_blocks: int = 24
    text_num_heads: int = 16
    depth_embed_dim: int = 384
    depth_kernel_size: int = 16
    depth_num_blocks: int = 12
    depth_num_heads: int = 8
    depth_drop_path: float = 0.0
    thermal_embed_dim: int = 768
    thermal_kernel_size: int = 16
    thermal_num_blocks: int = 12
    thermal_num_heads: int = 12
    thermal_drop_path: float = 0.0
    imu_embed_dim: int = 512
    imu_kernel_size: int = 8
    imu_num_blocks: int = 6
    imu_num_heads: int = 8
    imu_drop_path: float = 0.7

    @property
    def embed_dim(self) -> int:
        return self.out_embed_dim

    @property
    def min_video_seconds(self) -> float:
        """The shortest window the vision tower can embed: one clip of `video_frames` consecutive frames at 0.5 fps
        (4 s), since the video front end keeps the first int(0.5 * seconds) frames."""
        return self.video_frames / VIDEO_FPS

    def embeds_window(self, seconds: float) -> bool:
        """Whether a window of `seconds` gives the vision tower at least one clip: int(0.5 * seconds) frames, the
        count the frame reader keeps (`eval.video_frames.window_frames`), reach `video_frames`."""
        return int(VIDEO_FPS * seconds) >= self.video_frames

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ImageBindModel.__init__."""
        return dataclasses.asdict(self)

    def protocol(self) -> dict[str, object]:
        """The knobs a cached embedding depends on (written into result and cache files)."""
        return {
            **self.model_kwargs(), "kernel_size": list(self.kernel_size),
            "audio": {"sample_rate": SAMPLE_RATE, "resampler": "torchaudio.functional.resample (defaults)",
                      "clip_duration": CLIP_DURATION, "clips": CLIPS_PER_AUDIO,
                      "clip_sampler": "pytorchvideo ConstantClipsPerVideoSampler", "mel_bins": MEL_BINS,
                      "target_frames": TARGET_FRAMES, "frame_length_ms": FRAME_LENGTH_MS,
                      "frame_shift_ms": FRAME_SHIFT_MS, "fbank": "torchaudio kaldi fbank, htk_compat, hanning, dither 0",
                      "mean": MEL_MEAN, "std": MEL_STD},
            "video": {"fps": VIDEO_FPS, "size": IMAGE_SIZE, "resize": "torchvision v2 bicubic antialias",
                      "crops": NUM_CROPS, "frames_per_clip": FRAMES_PER_CLIP, "mean": list(CLIP_MEAN),
                      "std": list(CLIP_STD)},
            "embedding": "mean over clips of the modality head after postprocessing (vision x/|x|, audio 20 x/|x|)",
        }


IMAGEBIND_CONFIGS: dict[str, ImageBindConfig] = {
    "paper": ImageBindConfig(),
    "tiny": ImageBindConfig(
        out_embed_dim=16,
        vision_embed_dim=32, vision_num_blocks=1, vision_num_heads=2,
        audio_embed_dim=32, audio_num_blocks=1, audio_num_heads=2,
        text_embed_dim=16, text_num_blocks=1, text_num_heads=2,
        depth_embed_dim=16, depth_num_blocks=1, depth_num_heads=2,
        thermal_embed_dim=16, thermal_num_blocks=1, thermal_num_heads=2,
        imu_embed_dim=16, imu_num_blocks=1, imu_num_heads=2,
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Audio front end
# --------------------------------------------------------------------------------------------------------------
def clip_timepoints(duration: float, clip_duration: int = CLIP_DURATION,
                    clips_per_video: int = CLIPS_PER_AUDIO) -> list[tuple[Fraction, Fraction]]:
    """(start, end) seconds of the clips pytorchvideo's ConstantClipsPerVideoSampler yields over `duration`
    (pytorchvideo/data/clip_sampling.py, read out as ImageBind's `get_clip_timepoints` does).

    With d = clip_duration and n = clips_per_video: max_start = Fraction(max(duration - d, 0)) (the subtraction
    of a Fraction from a float is done in float), step = max_start / n (exact), clip k starts at k * step and ends
    d later; sampling stops after n clips or once (k + 1) * step > max_start. Note the step is max_start / n, not
    max_start / (n - 1): the last clip ends before the end of the audio.
    """
    clip = Fraction(clip_duration)
    max_start = Fraction(max(duration - clip, 0))
    step = Fraction(max_start, clips_per_video)
    points = []
    index = 0
    while True:
        start = step * index
        points.append((start, start + clip))
        index += 1
        if index >= clips_per_video or step * index > max_start:
            return points


def _melspec(clip: torch.Tensor) -> torch.Tensor:
    """(C, L) 16 kHz clip -> (1, 128, 204) log-mel (waveform2melspec of ImageBind's data.py).

    The mean over all channels and samples is subtracted IN PLACE, as the reference does (`waveform -=
    waveform.mean()` on a slice of the whole waveform): a later clip that overlaps this one sees the shifted
    samples. kaldi.fbank then uses channel 0 of the (C, L) input (its `channel=-1` means channel 0), removes each
    frame's DC offset, applies pre-emphasis 0.97, a Hann window ('hanning'), a 512-point power spectrum and 128
    HTK mel bins, and takes log(max(x, float32 eps)).
    """
    clip -= clip.mean()
    fbank = torchaudio.compliance.kaldi.fbank(
        clip, htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False, window_type="hanning",
        num_mel_bins=MEL_BINS, dither=0.0, frame_length=FRAME_LENGTH_MS, frame_shift=FRAME_SHIFT_MS,
    ).transpose(0, 1)  # (128, frames)
    frames = fbank.shape[1]
    gap = TARGET_FRAMES - frames
    if abs(gap) / frames > 0.2:  # the reference warns here; padded as there, so only a debug line (it names no file)
        log.debug("ImageBind audio clip has %d mel frames for a target of %d (audio shorter than %d s)",
                  frames, TARGET_FRAMES, CLIP_DURATION)
    if gap > 0:
        fbank = torch.nn.functional.pad(fbank, (0, gap), mode="constant", value=0.0)
    elif gap < 0:
        fbank = fbank[:, :TARGET_FRAMES]
    return fbank[None]  # (1, 128, 204)


def imagebind_audio_input(waveform: np.ndarray, sample_rate: int) -> torch.Tensor:
    """Audio as ImageBind's audio tower takes it: (L,) mono or (C, L) channels-first samples in [-1, 1] (the layout
    torchaudio.load returns) at `sample_rate` -> (3, 1, 128, 204) float32 normalised log-mel clips.

    Steps (ImageBindAudioDataset.load_and_transform_audio_data): float32; resample to 16 kHz with
    torchaudio.functional.resample(orig_freq=sample_rate, new_freq=16000) when the rate differs; clip times from
    `clip_timepoints(L16 / 16000)`, samples [int(start * 16000), int(end * 16000)) of every channel; `_melspec` per
    clip; (x - (-4.268)) / 9.138. Of a multichannel input only channel 0 reaches the filter bank (as in the
    reference), though the mean removal uses all channels. The input array is not modified.
    """
    samples = np.asarray(waveform, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[None]
    if samples.ndim != 2 or samples.shape[0] > samples.shape[1]:
        raise ValueError(f"ImageBind audio: expected (L,) or channels-first (C, L) samples, got shape {samples.shape}")
    wave = torch.tensor(samples)  # a copy: the clips below are mean-shifted in place
    if sample_rate != SAMPLE_RATE:
        wave = torchaudio.functional.resample(wave, orig_freq=sample_rate, new_freq=SAMPLE_RATE)
    if wave.shape[1] < int(SAMPLE_RATE * FRAME_LENGTH_MS / 1000):
        raise ValueError(f"ImageBind audio: {wave.shape[1]} samples at 16 kHz, shorter than one 25 ms frame")
    clips = []
    for start, end in clip_timepoints(wave.shape[1] / SAMPLE_RATE):
        clips.append(_melspec(wave[:, int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)]))
    mel = torch.stack(clips)  # (3, 1, 128, 204)
    return v2.functional.normalize(mel, mean=[MEL_MEAN], std=[MEL_STD])


# --------------------------------------------------------------------------------------------------------------
# Video front end
# --------------------------------------------------------------------------------------------------------------
def _spatial_crop(frames: torch.Tensor, index: int) -> torch.Tensor:
    """(T, C, H, W) -> (T, C, 224, 224): crop `index` of SpatialCrop(224, 3) (`uniform_crop` of ImageBind's
    data.py / av-benchmark's ib_data.py): both offsets start at ceil((side - 224) / 2); along the long side
    (height when H > W, else width) crop 0 starts at 0 and crop 2 at side - 224."""
    height, width = frames.shape[-2:]
    top = math.ceil((height - IMAGE_SIZE) / 2)
    left = math.ceil((width - IMAGE_SIZE) / 2)
    if height > width:
        top = {0: 0, 1: top, 2: height - IMAGE_SIZE}[index]
    else:
        left = {0: 0, 1: left, 2: width - IMAGE_SIZE}[index]
    return frames[..., top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]


def imagebind_video_input(frames: np.ndarray) -> torch.Tensor:
    """Frames as ImageBind's vision tower takes them: (T, H, W, 3) uint8 RGB frames, already sampled at 0.5 fps
    over the clip (T = int(0.5 * duration), T >= 2) -> (3 * (T - 1), 3, 2, 224, 224) float32 clips.

    Steps (VideoDataset.ib_transform, SpatialCrop, encode_video_with_imagebind): torchvision v2 resize of the uint8
    frames to a short side of 224 (bicubic, antialias on, long side int(224 * long / short)); to float32 / 255;
    (x - CLIP mean) / CLIP std; the three spatial crops; then for i in 0 .. T-2 the frames i, i + 1 of crop 0, 1, 2
    (clip-major order, as torch.cat over i of x[:, :, i:i+2] arranges them), each as (C, 2, 224, 224).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < FRAMES_PER_CLIP:
        raise ValueError(f"ImageBind video: expected (T >= 2, H, W, 3) uint8 frames, got {frames.dtype} "
                         f"{frames.shape}")
    if min(frames.shape[1:3]) < 1:
        raise ValueError(f"ImageBind video: empty frames {frames.shape}")
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)
    video = v2.functional.resize(video, [IMAGE_SIZE], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    video = v2.functional.to_dtype(video, torch.float32, scale=True)
    video = v2.functional.normalize(video, mean=list(CLIP_MEAN), std=list(CLIP_STD))
    crops = torch.stack([_spatial_crop(video, i) for i in range(NUM_CROPS)])  # (3, T, 3, 224, 224)
    clips = torch.cat([crops[:, i:i + FRAMES_PER_CLIP] for i in range(len(frames) - 1)])  # (3 (T-1), 2, 3, 224, 224)
    return clips.permute(0, 2, 1, 3, 4).contiguous()  # (3 (T-1), 3, 2, 224, 224)


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
def build_imagebind_model(config: ImageBindConfig) -> nn.Module:
    """`ImageBindModel(**config.model_kwargs())` of the installed ImageBind package (random weights, eval mode)."""
    return imagebind_model_module().ImageBindModel(**config.model_kwargs()).eval()


class ImageBindEmbedder(nn.Module):
    """A frozen ImageBindModel (`self.model`, the module the official state dict loads into) that embeds the
    vision and audio inputs of the front ends above; only the tower of the modality asked for runs."""

    def __init__(self, config: ImageBindConfig = IMAGEBIND_CONFIGS["paper"], model: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_id = "random-init"
        self.model = build_imagebind_model(config) if model is None else model
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ImageBindEmbedder:
        return super().train(False)  # frozen: drop path and dropout stay off

    @torch.inference_mode()
    def _embed(self, modality: str, inputs: torch.Tensor, clip_shape: tuple[int, ...]) -> np.ndarray:
        if inputs.ndim != 2 + len(clip_shape) or tuple(inputs.shape[2:]) != clip_shape:
            raise ValueError(f"ImageBind {modality}: expected (B, clips, {', '.join(map(str, clip_shape))}) inputs, "
                             f"got shape {tuple(inputs.shape)}")
        device = next(self.model.parameters()).device
        outputs = self.model({modality: inputs.to(device=device, dtype=torch.float32)})
        return outputs[modality].float().cpu().numpy()  # (B, D)

    def embed_audio(self, inputs: torch.Tensor) -> np.ndarray:
        """(B, 3, 1, 128, 204) clips of `imagebind_audio_input` -> (B, D) float32: the mean over a sample's clips of
        20 h / |h| (h = the audio head's projection of the CLS token), ImageBindModel.forward({'audio': inputs})."""
        cfg = self.config
        return self._embed(AUDIO, inputs, (1, cfg.audio_num_mel_bins, cfg.audio_target_len))

    def embed_video(self, inputs: torch.Tensor) -> np.ndarray:
        """(B, N, 3, 2, 224, 224) clips of `imagebind_video_input` -> (B, D) float32: the mean over a sample's N clips
        of h / |h| (h = the vision head's projection of the CLS token), ImageBindModel.forward({'vision': inputs})."""
        return self._embed(VISION, inputs, (3, self.config.video_frames, IMAGE_SIZE, IMAGE_SIZE))

    def protocol(self) -> dict[str, object]:
        return {**self.config.protocol(), "checkpoint": self.checkpoint_id}


def load_imagebind(
    weights_dir: str | Path | None,
    device: str | torch.device = "cpu",
    config: ImageBindConfig = IMAGEBIND_CONFIGS["paper"],
    seed: int = 0,
) -> ImageBindEmbedder:
    """ImageBind from `weights_dir / imagebind_huge.pth` (the state dict of the whole ImageBindModel, loaded with
    torch.load weights_only=True and strict key and shape checks), or with random weights seeded by `seed` when
    `weights_dir` is None. Nothing is downloaded. `checkpoint_id` is the file's sha256 or 'random-init:seed=N'."""
    model, checkpoint_id = build_weighted(lambda: build_imagebind_model(config), weights_dir, CHECKPOINT_NAME,
                                          "ImageBind checkpoint", seed)
    embedder = ImageBindEmbedder(config, model)
    embedder.checkpoint_id = checkpoint_id
    return embedder.to(device).eval()


def ib_score(video: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """Per-pair cosine similarity of (N, D) video and (N, D) audio embeddings -> (N,) float32.

    As torch.cosine_similarity(video, audio, dim=-1) in float32: v . a / (max(|v|, eps) max(|a|, eps)), eps = 1e-8.
    av-benchmark (av_bench/evaluate.py) reports IB-Score = the mean of these over the paired clips; papers print it
    x 100.
    """
    v = torch.as_tensor(np.asarray(video, dtype=np.float32))
    a = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    if v.shape != a.shape or v.ndim not in (1, 2):
        raise ValueError(f"ib_score: expected two (N, D) arrays of one shape, got {tuple(v.shape)} and {tuple(a.shape)}")
    return torch.cosine_similarity(v, a, dim=-1).numpy()
