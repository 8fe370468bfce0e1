"""Stage-three configuration: one frozen dataclass and named presets.

`demo` evaluates the CPU demo model (runs/demo on data/shards/demo) with few DDIM steps and random-weight
embedders when the official checkpoints are absent; `paper` is the published protocol (guidance 3, 300 denoising
steps, one sample per clip, official PANNs Cnn14 and VGGish checkpoints from weights/eval/).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.config import ConfigMethods
from common.devices import PRECISIONS, Precision

Sampler = Literal["ddim", "ddpm", "dpmsolver++"]
SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)
EmbedderSize = Literal["tiny", "paper"]


@dataclass(frozen=True)
class EvalConfig(ConfigMethods):
    """Everything `python -m eval` needs; each evaluation writes it (resolved) to <output>/config.json."""

    preset: str = field(default="demo", metadata={"help": "name of the preset this config started from"})
    # --- what is evaluated -------------------------------------------------------------------
    run: str = field(default="runs/demo", metadata={"help": "training run folder holding model/ema.safetensors + model/config.json"})
    shards: str = field(default="data/shards/demo", metadata={"help": "stage-one output folder (meta.json + *.tar) holding the test clips"})
    split: str = field(default="test", metadata={"help": "evaluate the clips whose json 'split' is this"})
    name: str = field(default="", metadata={"help": "name of this evaluation in tables and listening tests (results.json 'run_name'); empty: the run folder's name"})
    output: str = field(default="", metadata={"help": "output folder (wav/, results.json, report.md, figure.png); empty: <run>/eval"})
    max_clips: int = field(default=0, metadata={"help": "evaluate the first N clip ids in sorted order (0: all clips of the split)"})
    # --- generation ----------------------------------------------------------------------------
    generate: bool = field(default=True, metadata={"help": "generate the missing WAVs first (off: measure the WAVs already in <output>/wav)"})
    sampler: Sampler = field(default="ddim", metadata={"help": f"denoising sampler, one of {SAMPLERS} (DPM-Solver++ needs ~25 steps)"})
    steps: int = field(default=25, metadata={"help": "denoising steps (paper protocol: 300)"})
    guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance scale (paper protocol: 3)"})
    seed: int = field(default=0, metadata={"help": "base seed; each clip's noise is seeded from (seed, clip id)"})
    batch_size: int = field(default=4, metadata={"help": "clips per sampling / decoding batch"})
    precision: Precision = field(default="auto", metadata={"help": f"UNet precision while sampling, one of {PRECISIONS} (auto: bf16 on CUDA, fp32 on the CPU; recorded in the WAV manifest)"})
    channels_last: bool = field(default=False, metadata={"help": "UNet in NHWC memory format while sampling (train.speed)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet before sampling (pays off over many clips; train.speed)"})
    peak: float = field(default=0.0, metadata={"help": "scale each generated WAV to this peak (0: keep the vocoder's level, as published evaluators measure it)"})
    weights: str = field(default="weights", metadata={"help": "weights folder of stage one (AudioLDM VAE + vocoder) when the shards were made with real weights"})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda when there), 'cpu' or 'cuda[:N]'"})
    # --- metrics ---------------------------------------------------------------------------------
    embedder_weights: str = field(default="weights/eval", metadata={"help": "folder with Cnn14_16k_mAP=0.438.pth and vggish-10086976.pth"})
    random_embedders: bool = field(default=True, metadata={"help": "use seeded random-weight embedders when the checkpoints are absent (numbers not comparable to published ones)"})
    random_embedder_size: EmbedderSize = field(default="tiny", metadata={"help": "width of random-weight embedders: tiny (fast) or paper"})
    embedder_seed: int = field(default=0, metadata={"help": "seed of the random-weight embedders (independent of the generation seed)"})
    duration: float = field(default=10.0, metadata={"help": "seconds every clip is cut or zero-padded to before embedding (0: as it is)"})
    min_paired: float = field(default=0.9, metadata={"help": "FD/FAD/KL are refused when fewer than this fraction of the clips have a readable WAV"})
    av_align: bool = field(default=True, metadata={"help": "compute AV-Align against the source videos (json 'source')"})
    workers: int = field(default=1, metadata={"help": "processes computing AV-Align (optical flow over the source videos)"})
    cache_dir: str = field(default="", metadata={"help": "folder of the ground-truth embedding cache (HDF5); empty: <shards>/eval_cache"})
    figure_clips: int = field(default=3, metadata={"help": "clips shown in figure.png (0: no figure)"})

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.random_embedder_size not in ("tiny", "paper"):
            raise ValueError(f"random_embedder_size must be tiny or paper, got {self.random_embedder_size!r}")
        if self.steps < 1 or self.batch_size < 1 or self.workers < 1:
            raise ValueError("steps, batch_size and workers must be at least 1")
        if not 0.0 <= self.min_paired <= 1.0:
            raise ValueError(f"min_paired must be a fraction in [0, 1], got {self.min_paired}")
        if self.duration < 0 or self.max_clips < 0 or self.figure_clips < 0 or self.peak < 0:
            raise ValueError("duration, max_clips, figure_clips and peak must not be negative")

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path(self.run) / "eval"

    @property
    def run_name(self) -> str:
        return self.name or Path(self.run).resolve().name

    @property
    def cache_folder(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.shards) / "eval_cache"

    @property
    def metric_duration(self) -> float | None:
        """The cut/pad length handed to the embedders (None: each clip as it is)."""
        return self.duration or None



PRESETS: dict[str, EvalConfig] = {
    "demo": EvalConfig(),
    "paper": EvalConfig(
        preset="paper",
        run="runs/paper",
        shards="data/shards/paper",
        steps=300,  # VTA-LDM's inference protocol: 300 steps, guidance 3, one sample per clip
        guidance=3.0,
        batch_size=16,
        random_embedders=False,  # published numbers need the official checkpoints
        random_embedder_size="paper",
        workers=8,
    ),
}
