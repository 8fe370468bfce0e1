"""Stage-one configuration: one frozen dataclass and named presets.

`tiny` builds every model from a small config with random weights (tests, the demo, CI);
`paper` is the published setup (CLIP ViT-L/14 at 4 fps, Grounding DINO Swin-T, SAM ViT-B,
the AudioLDM VAE), loaded from a local weights folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from audio_models.config import MEL_BINS, MEL_FRAMES, AudioModelConfig
from common.config import ConfigMethods
from shards import ShardSpec
from shards.schema import MAX_WINDOW_SECONDS

MAX_FRAMES = 10_000  # frames per clip (fps x window_seconds): the paper samples 41
# the audio a shard can hold: FLAC's range is wider, but the mel front end and the VAE want speech-band rates and up
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000

# What a config (a meta.json's "config") written before a field existed stands for: the value those runs used.
BEFORE_FIELD: dict[str, Any] = {
    "sam_floor": 0.0,  # SAM refined every detection
}


@dataclass(frozen=True)
class FeatureConfig(ConfigMethods):
    """Everything stage one needs to know; every run writes it (resolved) into meta.json."""

    preset: str = field(default="tiny", metadata={"help": "name of the preset this config started from"})
    # --- time grid -------------------------------------------------------------------------
    window_seconds: float = field(default=10.24, metadata={"help": "length of the window read from each clip's start"})
    fps: float = field(default=2.0, metadata={"help": "visual frames per second sampled over the window"})
    sample_rate: int = field(default=16000, metadata={"help": "audio sample rate (AudioLDM: 16 kHz)"})
    # --- decoding --------------------------------------------------------------------------
    frame_short_side: int = field(default=96, metadata={"help": "decoded frames are downscaled so their short side is at most this"})
    audio_backend: Literal["pyav", "decord"] = field(default="pyav", metadata={"help": "audio decoder (see benchmarks/RESULTS.md)"})
    num_workers: int = field(default=1, metadata={"help": "DataLoader worker processes that decode clips"})
    # --- models ----------------------------------------------------------------------------
    random_init: bool = field(default=True, metadata={"help": "build every model from its config with random weights (no weights folder)"})
    random_size: Literal["tiny", "paper"] = field(default="tiny", metadata={"help": "with random_init: toy configs (tiny) or the real architectures (paper), for benchmarks"})
    seed: int = field(default=0, metadata={"help": "seed for random-init weights"})
    clip_model: str = field(default="vta-tiny-clip", metadata={"help": "open_clip model name"})
    clip_checkpoint: str = field(default="clip/open_clip_model.safetensors", metadata={"help": "open_clip checkpoint, relative to the weights folder"})
    clip_torchscript: bool = field(default=False, metadata={"help": "load the CLIP checkpoint as a TorchScript archive (OpenAI's original .pt files). This EXECUTES code from the file: use it only for OpenAI's original files you trust; otherwise checkpoints are read as plain tensors"})
    embed_dim: int = field(default=32, metadata={"help": "CLIP joint embedding size (ViT-L/14: 768)"})
    tagger: Literal["nltk", "pattern"] = field(default="pattern", metadata={"help": "part-of-speech tagger: nltk (needs its tagger data) or textblob's offline PatternTagger"})
    max_nouns: int = field(default=4, metadata={"help": "at most this many nouns per caption are grounded"})
    grounding_dir: str = field(default="grounding-dino", metadata={"help": "Grounding DINO in transformers format, relative to the weights folder"})
    grounding_short_side: int = field(default=64, metadata={"help": "Grounding DINO input: shortest edge"})
    grounding_long_side: int = field(default=96, metadata={"help": "Grounding DINO input: longest edge"})
    use_sam: bool = field(default=True, metadata={"help": "refine grounding probabilities with SAM's predicted IoU"})
    sam_floor: float = field(default=0.1, metadata={"help": "SAM refines only nouns whose detector score is at least this; below it the score is kept unrefined (iou 1.0), which changes no object embedding at an object threshold >= sam_floor, since those nouns count as 0 there anyway. 0: SAM on every detection"})
    sam_rel_pos: Literal["bias", "folded"] = field(default="folded", metadata={"help": "how SAM's image encoder adds its relative positions to attention: folded into extra query and key channels (the same logits, no bias tensor, wider attention heads; on an H200 in float16 1.16x the grounding step's frames/s and 11 GiB less peak memory at 64 frames per pass), or as transformers' dense (frames, heads, tokens, tokens) bias (0.375 GiB per frame in each global block in float16)"})
    sam_dir: str = field(default="sam", metadata={"help": "SAM in transformers format, relative to the weights folder"})
    audioldm_dir: str = field(default="audioldm", metadata={"help": "AudioLDM in diffusers format (vae/, vocoder/), relative to the weights folder"})
    latent_channels: int = field(default=8, metadata={"help": "AudioLDM VAE latent channels"})
    vae_downsample: int = field(default=4, metadata={"help": "AudioLDM VAE downsampling factor of the mel"})
    # --- batching / devices ----------------------------------------------------------------
    batch_clips: int = field(default=4, metadata={"help": "clips gathered before the encoders run"})
    frame_batch: int = field(default=64, metadata={"help": "frames per CLIP / Grounding DINO / SAM forward pass"})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda when there), 'cpu' or 'cuda[:N]'"})
    half: bool = field(default=True, metadata={"help": "float16 inference when on CUDA (ignored on the CPU)"})
    deformable_attention: Literal["pytorch", "triton"] = field(default="pytorch", metadata={"help": "how Grounding DINO's deformable attention samples its feature maps: transformers' PyTorch path (a grid_sample per level), or one fused Triton kernel (CUDA only; the same numbers up to float16 rounding; benchmarks/gpu.sh measures both)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile Grounding DINO and SAM's image encoder for fixed shapes: frames padded to a canvas of grounding_short_side x grounding_long_side (turned for portrait frames), each pass's frame count and prompt length to a few sizes; each new shape compiles once (about a minute on a GPU node), so it pays only over many clips; benchmarks/gpu.sh --compile measures it"})
    max_memory_gib: float = field(default=0.0, metadata={"help": "on CUDA, let stage one use at most this many GiB of the device (0: no cap); emulates a smaller card on a big one. The first frame batch is also sized from the free memory (an estimate per model); a pass that runs out of memory is halved and rerun, and the smaller batch kept"})
    # --- output ----------------------------------------------------------------------------
    shard_max_samples: int = field(default=8, metadata={"help": "samples per shard (a killed run loses at most the shard in progress)"})

    def __post_init__(self) -> None:
        choices = {"audio_backend": ("pyav", "decord"), "tagger": ("nltk", "pattern"), "random_size": ("tiny", "paper"),
                   "deformable_attention": ("pytorch", "triton"), "sam_rel_pos": ("bias", "folded")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (math.isfinite(self.fps) and math.isfinite(self.window_seconds)) or self.fps <= 0 or self.window_seconds <= 0:
            raise ValueError(f"fps and window_seconds must be positive numbers (got {self.fps}, {self.window_seconds})")
        if self.window_seconds > MAX_WINDOW_SECONDS:
            raise ValueError(f"window_seconds must be at most {MAX_WINDOW_SECONDS} (got {self.window_seconds})")
        if self.window_seconds * self.fps > MAX_FRAMES:
            raise ValueError(f"fps x window_seconds gives {self.window_seconds * self.fps:.0f} frames per clip; at most "
                             f"{MAX_FRAMES}")
        if not MIN_SAMPLE_RATE <= self.sample_rate <= MAX_SAMPLE_RATE:
            raise ValueError(f"sample_rate must be in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz, got {self.sample_rate}")
        for name in ("frame_short_side", "embed_dim", "grounding_short_side", "grounding_long_side", "latent_channels",
                     "vae_downsample", "batch_clips", "frame_batch", "shard_max_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 (decode in this process) or more, got {self.num_workers}")
        if self.max_nouns < 1:
            raise ValueError("max_nouns must be at least 1")
        if not (self.max_memory_gib >= 0 and math.isfinite(self.max_memory_gib)):  # NaN passed `< 0`
            raise ValueError(f"max_memory_gib must be 0 (no cap) or a positive number, got {self.max_memory_gib!r}")
        if not 0.0 <= self.sam_floor <= 1.0:
            raise ValueError(f"sam_floor must be in [0, 1], got {self.sam_floor!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """As `ConfigMethods.from_dict`; a field missing from a config written before it existed takes the value
        those runs had in effect (`BEFORE_FIELD`), not today's default."""
        return super().from_dict({**BEFORE_FIELD, **data})

    def frame_shape_error(self, height: int, width: int) -> str | None:
        """Why frames of this shape cannot be grounded, or None. Grounding DINO's image processor scales a frame
        so that its long side is at most `grounding_long_side`; a frame more than that many times longer than it
        is wide (or the reverse) would come out 0 px across, and the processor refuses it. SAM's input (1024 px
        long, 64 in the tiny preset, rounded half up) keeps at least 1 px at those shapes."""
        short, long = min(height, width), max(height, width)
        if short < 1 or long > self.grounding_long_side * short:
            return (f"frames of {width}x{height} are too narrow to ground: Grounding DINO's input is at most "
                    f"{self.grounding_long_side} px long, so the aspect ratio can be at most {self.grounding_long_side}:1")
        return None

    @property
    def num_frames(self) -> int:
        """Frames per clip; frame i covers [i, i+1) * window_seconds / num_frames."""
        return max(1, round(self.window_seconds * self.fps))

    @property
    def num_samples(self) -> int:
        return round(self.window_seconds * self.sample_rate)

    def frame_times(self) -> list[float]:
        """Centre of each frame's slot on the window, in seconds from the clip's start."""
        step = self.window_seconds / self.num_frames
        return [(i + 0.5) * step for i in range(self.num_frames)]

    def shard_spec(self) -> ShardSpec:
        return ShardSpec(
            num_frames=self.num_frames,
            embed_dim=self.embed_dim,
            max_nouns=self.max_nouns,
            latent_channels=self.latent_channels,
            latent_time=MEL_FRAMES // self.vae_downsample,
            latent_freq=MEL_BINS // self.vae_downsample,
            sample_rate=self.sample_rate,
            window_seconds=self.window_seconds,
        )

    def audio_models(self) -> AudioModelConfig:
        """What builds the AudioLDM VAE and vocoder of these features (`audio_models`)."""
        return AudioModelConfig.from_features(self.to_dict())


PRESETS: dict[str, FeatureConfig] = {
    "tiny": FeatureConfig(),
    "paper": FeatureConfig(
        preset="paper",
        fps=4.0,
        frame_short_side=800,
        num_workers=8,
        random_init=False,
        clip_model="ViT-L-14-quickgelu",  # OpenAI weights were trained with QuickGELU
        embed_dim=768,
        tagger="nltk",
        max_nouns=8,
        grounding_short_side=800,
        grounding_long_side=1333,
        batch_clips=16,
        frame_batch=64,
        # SAM is a third of stage one's GPU time; a detection scoring under 0.1 counts as 0 at every object
        # threshold of 0.1 and above (the paper's 0.35 among them), so refining it would change no condition
        sam_floor=0.1,
        shard_max_samples=1000,
    ),
}
assert all(math.isclose(p.window_seconds * p.sample_rate, p.num_samples) for p in PRESETS.values())
