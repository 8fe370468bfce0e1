"""Stage-three configuration: one frozen dataclass and named presets.

`demo` evaluates the CPU demo model (runs/demo on data/shards/demo, every test clip) with few DDIM steps and
random-weight embedders when the official checkpoints are absent; `paper` is the published protocol: VTA-LDM's
sampler (ancestral DDPM, 300 steps, guidance 3, one sample per clip; ariesssxu/vta-ldm inference_from_video.sh and
inference_from_video.py), 1,000 clips of the test split ("1,000 samples from the official test set", chosen by the
seeded rule of `eval.clips.select_clips` and written to <output>/clip_ids.txt), official PANNs Cnn14 and VGGish
checkpoints from weights/eval/; `av-benchmark` generates as `paper` and measures as hkchengrex/av-benchmark does
for the systems published since (MMAudio and later): every test clip, 8 s, its audio front end and its columns
(FD on PaSST, PANNs and VGGish; KL on PANNs and PaSST; IS on PANNs and PaSST; ImageBind score; DeSync).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.config import ConfigMethods
from common.devices import PRECISIONS, Precision

Sampler = Literal["ddim", "ddpm", "dpmsolver++"]
SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)
EmbedderSize = Literal["tiny", "paper"]
AudioProtocol = Literal["mean-cut", "audioldm-eval", "av-benchmark"]  # how audio is brought to the embedders (eval.audio_embedding)
AUDIO_PROTOCOLS: tuple[str, ...] = typing.get_args(AudioProtocol)
ModelWeights = Literal["ema", "raw"]
MODEL_WEIGHTS: tuple[str, ...] = typing.get_args(ModelWeights)


MAX_DURATION = 600.0  # seconds: far beyond any clip's window (10.24 s), short of the memory a typo would ask for


@dataclass(frozen=True)
class EvalConfig(ConfigMethods):
    """Everything `python -m eval` needs; each evaluation writes it (resolved) to <output>/config.json."""

    preset: str = field(default="demo", metadata={"help": "name of the preset this config started from"})
    # --- what is evaluated -------------------------------------------------------------------
    run: str = field(default="runs/demo", metadata={"help": "training run folder holding model/config.json and model/ema.safetensors (or raw.safetensors: --model-weights)"})
    shards: str = field(default="data/shards/demo", metadata={"help": "stage-one output folder (meta.json + *.tar) holding the test clips"})
    split: str = field(default="test", metadata={"help": "evaluate the clips whose json 'split' is this"})
    name: str = field(default="", metadata={"help": "name of this evaluation in tables and listening tests (results.json 'run_name'); empty: the run folder's name"})
    output: str = field(default="", metadata={"help": "output folder (wav/, results.json, report.md, figure.png); empty: <run>/eval"})
    max_clips: int = field(default=0, metadata={"help": "evaluate N clips of the split: the N ids with the smallest sha256('<selection_seed>/<id>'), measured in id order and listed in <output>/clip_ids.txt (0: all clips)"})
    selection_seed: int = field(default=0, metadata={"help": "seed of the max_clips selection: the same seed picks the same clips on every run and for every system"})
    clip_ids: str = field(default="", metadata={"help": "file of clip ids, one per line (e.g. another evaluation's clip_ids.txt): exactly these clips are evaluated, whatever max_clips says (empty: max_clips decides)"})
    # --- generation ----------------------------------------------------------------------------
    generate: bool = field(default=True, metadata={"help": "generate the missing WAVs first (off: measure the WAVs already in <output>/wav)"})
    sampler: Sampler = field(default="ddim", metadata={"help": f"denoising sampler, one of {SAMPLERS} (paper protocol: ddpm, ancestral, as VTA-LDM; DPM-Solver++ needs ~25 steps)"})
    steps: int = field(default=25, metadata={"help": "denoising steps (paper protocol: 300)"})
    guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance scale (paper protocol: 3)"})
    seed: int = field(default=0, metadata={"help": "base seed; each clip's noise is seeded from (seed, clip id)"})
    model_weights: ModelWeights = field(default="ema", metadata={"help": f"which weights of the run generate, one of {MODEL_WEIGHTS}: model/ema.safetensors (the exponential moving average) or model/raw.safetensors (the optimizer's weights, what VTA-LDM evaluates)"})
    batch_size: int = field(default=4, metadata={"help": "clips per decoding and embedding batch; also per sampling batch on the CPU"})
    sampling_batch: int = field(default=0, metadata={"help": "clips per sampling batch (0: on CUDA, the fastest per clip of 4, 8, ..., 64, measured at the start and recorded in results.json; batch_size on the CPU and with --compile)"})
    cuda_graphs: bool = field(default=True, metadata={"help": "on CUDA, replay the guided sampler step from a CUDA graph captured once (train.denoiser; not with --compile); the last batch is padded to the sampling batch"})
    precision: Precision = field(default="auto", metadata={"help": f"UNet precision while sampling, one of {PRECISIONS} (auto: bf16 on CUDA, fp32 on the CPU; recorded in the WAV manifest)"})
    channels_last: bool = field(default=True, metadata={"help": "on CUDA, the UNet in NHWC memory format while sampling (train.speed: 1.13x at batch 1 on an H200); the CPU keeps the trained layout"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet before sampling (pays off over many clips; train.speed)"})
    peak: float = field(default=0.0, metadata={"help": "scale each generated WAV to this peak (0: keep the vocoder's level, as published evaluators measure it)"})
    weights: str = field(default="weights", metadata={"help": "weights folder of stage one (AudioLDM VAE + vocoder) when the shards were made with real weights (the diffusion model's: --model-weights)"})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda when there), 'cpu' or 'cuda[:N]'"})
    # --- metrics ---------------------------------------------------------------------------------
    embedder_weights: str = field(default="weights/eval", metadata={"help": "folder of the embedders' official checkpoints (Cnn14_16k_mAP=0.438.pth, vggish-10086976.pth, passt-s-f128-p16-s10-ap.476-swa.pt, imagebind_huge.pth, synchformer_state_dict.pth: README, Weights)"})
    random_embedders: bool = field(default=True, metadata={"help": "use seeded random-weight embedders when the checkpoints are absent (numbers not comparable to published ones)"})
    random_embedder_size: EmbedderSize = field(default="tiny", metadata={"help": "width of random-weight embedders: tiny (fast) or paper"})
    embedder_seed: int = field(default=0, metadata={"help": "seed of the random-weight embedders (independent of the generation seed)"})
    duration: float = field(default=10.0, metadata={"help": "seconds every clip is cut or zero-padded to before embedding under --audio-protocol mean-cut, cut to under av-benchmark (0: as it is); also the window of the source video that ImageBind and Synchformer see (0: each clip's own duration)"})
    audio_protocol: AudioProtocol = field(default="mean-cut", metadata={"help": f"how reference and generated audio reach the PANNs and VGGish embedders, one of {AUDIO_PROTOCOLS}: mean-cut (channels averaged, cut or zero-padded to --duration), audioldm-eval (first channel, DC offset removed, full length, zero-padded to at least 2 s, as audioldm_eval's WaveDataset; --duration unused) or av-benchmark (channels averaged, DC offset removed, torchaudio's resampler, cut to --duration, not padded, as av-benchmark's AudioDataset)"})
    metrics: str = field(default="paper", metadata={"help": "which metrics to compute: 'paper' (FD, FAD, KL, KL-sigmoid, IS, AV-Align, AV-Align 2023), 'av-benchmark' (FD-PaSST, FD-PANNs, FD-VGG, KL-PANNs, KL-PaSST, IS-PANNs, IS-PaSST, IB-score, DeSync), 'all', or a comma-separated list of results.json keys and these group names"})
    min_paired: float = field(default=0.9, metadata={"help": "FD/FAD/KL are refused when fewer than this fraction of the clips have a readable WAV"})
    av_align: bool = field(default=True, metadata={"help": "compute AV-Align against the source videos (json 'source')"})
    workers: int = field(default=1, metadata={"help": "processes computing AV-Align (optical flow over the source videos)"})
    cache_dir: str = field(default="", metadata={"help": "folder of the ground-truth embedding cache (HDF5); empty: <shards>/eval_cache"})
    figure_clips: int = field(default=3, metadata={"help": "clips shown in figure.png (0: no figure)"})

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.model_weights not in MODEL_WEIGHTS:
            raise ValueError(f"model_weights must be one of {MODEL_WEIGHTS}, got {self.model_weights!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.random_embedder_size not in ("tiny", "paper"):
            raise ValueError(f"random_embedder_size must be tiny or paper, got {self.random_embedder_size!r}")
        if self.audio_protocol not in AUDIO_PROTOCOLS:
            raise ValueError(f"audio_protocol must be one of {AUDIO_PROTOCOLS}, got {self.audio_protocol!r}")
        if self.steps < 1 or self.batch_size < 1 or self.workers < 1:
            raise ValueError("steps, batch_size and workers must be at least 1")
        if self.sampling_batch < 0:
            raise ValueError(f"sampling_batch must be 0 (measured) or a batch size, got {self.sampling_batch}")
        if not 0.0 <= self.min_paired <= 1.0:
            raise ValueError(f"min_paired must be a fraction in [0, 1], got {self.min_paired}")
        if self.duration < 0 or self.max_clips < 0 or self.figure_clips < 0 or self.peak < 0:
            raise ValueError("duration, max_clips, figure_clips and peak must not be negative")
        # NaN passed every check above and failed after all the WAVs were generated (or made every clip's audio
        # non-finite and exited 0); a duration of hours asked for petabytes
        if not (math.isfinite(self.guidance) and math.isfinite(self.peak) and math.isfinite(self.duration)):
            raise ValueError(f"guidance, peak and duration must be finite numbers, got {self.guidance!r}, "
                             f"{self.peak!r} and {self.duration!r}")
        if self.duration > MAX_DURATION:
            raise ValueError(f"duration must be at most {MAX_DURATION:g} s, got {self.duration:g}")
        if self.peak > 1:
            raise ValueError(f"peak must be at most 1 (full scale; 0 keeps the vocoder's level), got {self.peak:g}")

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
        """The cut/pad length handed to the embedders (None: each clip as it is; always None under the
        audioldm-eval audio protocol, which keeps the full length)."""
        return None if self.audio_protocol == "audioldm-eval" else self.duration or None



PRESETS: dict[str, EvalConfig] = {
    "demo": EvalConfig(),
    "paper": EvalConfig(
        preset="paper",
        run="runs/paper",
        shards="data/shards/paper",
        max_clips=1000,  # "1,000 samples from the official test set"
        sampler="ddpm",  # VTA-LDM's inference protocol: DDPMScheduler, 300 steps, guidance 3, one sample per clip
        model_weights="raw",  # VTA-LDM keeps no EMA: its inference loads the optimizer's weights
        steps=300,
        guidance=3.0,
        batch_size=16,
        random_embedders=False,  # published numbers need the official checkpoints
        random_embedder_size="paper",
        workers=8,
    ),
    "av-benchmark": EvalConfig(
        preset="av-benchmark",
        run="runs/paper",
        shards="data/shards/paper",
        sampler="ddpm",
        model_weights="raw",
        steps=300,
        guidance=3.0,
        batch_size=16,
        random_embedders=False,
        random_embedder_size="paper",
        workers=8,
        # hkchengrex/av-benchmark as MMAudio and later systems report VGGSound-test: every test clip, 8 s (MMAudio
        # runs it with --audio_length 8), its audio front end, its nine columns
        metrics="av-benchmark",
        audio_protocol="av-benchmark",
        duration=8.0,
    ),
}
