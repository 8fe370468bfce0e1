"""Stage-two configuration: one frozen dataclass and named presets.

`tiny` trains a very small UNet on the CPU in minutes (tests, the demo); `paper` is Tango's UNet
(diffusers `UNet2DConditionModel`, blocks 320/640/1280/1280, SD 2.1's attention layout) with the
training setup of the paper (batch 8 per GPU on 4 GPUs, i.e. a global batch of 32, kept on any GPU count by
gradient accumulation; AdamW, lr 3e-5, no warmup, 40 epochs) and the loss weighting and learning-rate decay of the
training code it builds on (VTA-LDM's and Tango's train.py / models.py).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from common.config import ConfigMethods
from shards.conditions import BY_LETTER

Inputs = Literal["T", "V", "V+T", "V+O", "V+O+T"]
Scheme = Literal["Z@V", "Z@(V+O)", "Z@O+V", "Z@V+O"]
SnrWeighting = Literal["vta-ldm", "min-snr-v", "none"]
LrSchedule = Literal["constant", "linear", "cosine"]
INPUTS: tuple[str, ...] = typing.get_args(Inputs)
SCHEMES: tuple[str, ...] = typing.get_args(Scheme)
SNR_WEIGHTINGS: tuple[str, ...] = typing.get_args(SnrWeighting)
LR_SCHEDULES: tuple[str, ...] = typing.get_args(LrSchedule)
# scheme -> (letters that are cross-attention keys, letter added to the attention output)
PLACEMENT: dict[str, tuple[tuple[str, ...], str | None]] = {
    "Z@V": (("V",), None),
    "Z@(V+O)": (("V", "O"), None),
    "Z@O+V": (("O",), "V"),
    "Z@V+O": (("V",), "O"),
}


def route(inputs: str, scheme: str) -> tuple[list[str], str | None]:
    """Which conditions are cross-attention keys/values and which one is added to the attention output.

    Letters (`shards.conditions`): V = per-frame CLIP image embeddings, O = per-frame object embedding (Eq. 1),
    T = the CLIP text embedding of the caption (one token). `inputs` (Table III) says which are used; `scheme`
    (Table IV) says where V and O go; T is always a key/value token.

    - "Z@V":      the latent Z attends to V only; O is not used even when loaded (Table IV baseline).
    - "Z@(V+O)":  Z attends to V and O concatenated along the sequence axis (2 x frames key tokens).
    - "Z@O+V":    Z attends to O; V is projected and added, time-aligned, to the attention output.
    - "Z@V+O":    Z attends to V; O is projected and added, time-aligned, to the attention output (default).

    A condition the inputs lack is dropped: inputs "V" with "Z@V+O" attend to V and add nothing. A pair that
    leaves no key at all (inputs "V" with "Z@O+V": V would only be added) is refused with ValueError, and
    TrainConfig refuses it when it is built.
    Returns (key condition names in order, added condition name or None).
    """
    present = set(inputs.split("+"))
    unknown = present - set(BY_LETTER)
    if unknown or scheme not in PLACEMENT:
        raise ValueError(f"unknown inputs {inputs!r} or scheme {scheme!r} (letters {', '.join(BY_LETTER)}; schemes {SCHEMES})")
    key_letters, added_letter = PLACEMENT[scheme]
    keys = [BY_LETTER[c].name for c in key_letters if c in present]
    added = BY_LETTER[added_letter].name if added_letter in present else None
    if "T" in present:
        keys.append(BY_LETTER["T"].name)
    if not keys:
        raise ValueError(f"inputs {inputs!r} with scheme {scheme!r} leave no cross-attention keys "
                         f"({scheme} only adds {added_letter}); use scheme Z@V or Z@V+O")
    return keys, added


@dataclass(frozen=True)
class TrainConfig(ConfigMethods):
    """Everything stage two needs; every run writes it (resolved) to runs/<name>/config.json."""

    preset: str = field(default="tiny", metadata={"help": "name of the preset this config started from"})
    # --- data ------------------------------------------------------------------------------
    shards: str = field(default="data/shards/demo", metadata={"help": "stage-one output folder (meta.json + *.tar shards)"})
    split: str = field(default="train", metadata={"help": "train on samples whose json 'split' is this"})
    output: str = field(default="runs/demo", metadata={"help": "run folder: checkpoints/, logs/, model/"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per rank reading shards"})
    shuffle_buffer: int = field(default=64, metadata={"help": "samples held in the shuffle buffer of each data stream"})
    embed_dim: int = field(default=32, metadata={"help": "CLIP embedding size the shards must have (meta.json spec)"})
    num_frames: int = field(default=20, metadata={"help": "frames per clip the shards must have (meta.json spec)"})
    object_threshold: float = field(default=0.0, metadata={"help": "in [0, 1]: p_tk counts as 0 in Eq. (1) where Grounding DINO's score of noun k's box in frame t (detector.npy, before SAM's IoU) is below this; version-1 shards threshold p_tk itself; 0 keeps every detection (the ablation)"})
    # --- conditioning (Tables III and IV of the paper) ---------------------------------------
    inputs: Inputs = field(default="V+O", metadata={"help": f"conditions used, one of {INPUTS} (T: caption, V: video frames, O: objects)"})
    scheme: Scheme = field(default="Z@V+O", metadata={"help": f"how V and O enter the UNet, one of {SCHEMES} (see train.config.route)"})
    frame_positions: bool = field(default=False, metadata={"help": "add a sinusoidal embedding of the frame index to per-frame key tokens (VTA-LDM: off)"})
    # --- model -----------------------------------------------------------------------------
    block_channels: tuple[int, ...] = field(default=(32, 64), metadata={"help": "UNet channels per resolution"})
    cross_attention_blocks: tuple[bool, ...] = field(default=(False, True), metadata={"help": "per resolution: True for a Transformer (self-attn, cross-attn, FF) block"})
    layers_per_block: int = field(default=1, metadata={"help": "ResNet (+ Transformer) layers per UNet block"})
    attention_heads: tuple[int, ...] = field(default=(2, 2), metadata={"help": "attention heads per resolution (diffusers' attention_head_dim)"})
    cross_attention_dim: int = field(default=64, metadata={"help": "width of the cross-attention keys/values (paper: 1024)"})
    norm_groups: int = field(default=8, metadata={"help": "GroupNorm groups in the UNet"})
    upcast_attention: bool = field(default=False, metadata={"help": "float32 attention scores (SD 2.1 / Tango)"})
    # --- diffusion -------------------------------------------------------------------------
    train_timesteps: int = field(default=1000, metadata={"help": "DDPM steps"})
    beta_start: float = field(default=0.00085, metadata={"help": "scaled_linear betas from this (SD 2.1, as Tango / VTA-LDM)"})
    beta_end: float = field(default=0.012, metadata={"help": "scaled_linear betas to this"})
    prediction: Literal["v_prediction", "epsilon"] = field(default="v_prediction", metadata={"help": "network target (Tango / VTA-LDM: v)"})
    # tiny: none. The Min-SNR v-form weights a step's loss by min(snr, gamma) / (snr + 1), ~snr at high noise,
    # where the coarse structure (the loudness envelope) is decided; in a few hundred CPU steps the tiny model then
    # never learns it (science check, benchmarks/RESULTS.md: envelope correlation 0.07 with gamma 5, 0.32 without).
    # vta-ldm keeps weight 1 there and only scales the low-noise steps down (not measured on tiny)
    snr_weighting: SnrWeighting = field(default="none", metadata={"help": f"per-timestep loss weight, one of {SNR_WEIGHTINGS} (train.diffusion.loss_weights; vta-ldm: min(SNR, gamma) / SNR, as VTA-LDM and Tango train)"})
    min_snr_gamma: float = field(default=0.0, metadata={"help": "gamma of --snr-weighting (> 0 unless none; VTA-LDM: 5)"})
    uncond_probability: float = field(default=0.1, metadata={"help": "probability that all conditions of a sample are zeroed (classifier-free guidance)"})
    posterior_sample: bool = field(default=False, metadata={"help": "train on a draw from the VAE posterior, mean + std * eps (AudioLDM, Tango), instead of its mean; off for the random tiny VAE, whose posterior std (~0.95) buries the mean (std ~0.2)"})
    # tiny: the random VAE's posterior mean has std ~0.2; 5 brings the latents to unit variance (Stable Diffusion's
    # reason for its scaling factor)
    vae_scaling_factor: float = field(default=5.0, metadata={"help": "latents z are multiplied by this (a trained VAE's config.scaling_factor, AudioLDM-S: 0.9228)"})
    # --- optimisation ----------------------------------------------------------------------
    batch_size: int = field(default=4, metadata={"help": "samples per rank per micro-batch"})
    grad_accumulation: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    global_batch: int = field(default=0, metadata={"help": "samples per optimizer step over all ranks; the trainer derives grad_accumulation = global_batch / (batch_size x ranks) at start and refuses a global batch that does not divide exactly (train.trainer.resolve_global_batch); 0: batch_size x grad_accumulation x ranks as given"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    adam_betas: tuple[float, ...] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    warmup_steps: int = field(default=0, metadata={"help": "linear learning-rate warmup (optimizer steps)"})
    lr_schedule: LrSchedule = field(default="constant", metadata={"help": f"learning rate after the warmup, one of {LR_SCHEDULES}: linear and cosine decay to 0 at the run's last step (train.trainer.LearningRateSchedule; Tango / VTA-LDM: linear)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this"})
    epochs: int = field(default=40, metadata={"help": "passes over the split (ignored when max_steps > 0)"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps in total (0: derived from epochs)"})
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay (warmed up as min(decay, (1+n)/(10+n)))"})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={"help": "autocast precision ('no' is forced on the CPU)"})
    channels_last: bool = field(default=False, metadata={"help": "UNet weights and input in NHWC memory format (tensor-core convolutions; train.speed); fixed for a run's lifetime"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet (minutes of compilation at start; train.speed)"})
    seed: int = field(default=0, metadata={"help": "seed of weights, data order, noise"})
    # --- bookkeeping -----------------------------------------------------------------------
    checkpoint_every: int = field(default=100, metadata={"help": "save the full resume state every this many optimizer steps"})
    keep_checkpoints: int = field(default=2, metadata={"help": "resume states kept on disk"})
    log_every: int = field(default=10, metadata={"help": "TensorBoard scalars every this many optimizer steps"})
    max_bad_steps: int = field(default=20, metadata={"help": "stop after this many non-finite losses in a row"})
    record_ranks: bool = field(default=False, metadata={"help": "write each rank's consumed sample ids and final weights to <output>/ranks/ (tests)"})
    cpu: bool = field(default=False, metadata={"help": "train on the CPU even when CUDA is there"})

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {self.inputs!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        route(self.inputs, self.scheme)  # refuses a pair that leaves the UNet nothing to attend to
        if not len(self.block_channels) == len(self.cross_attention_blocks) == len(self.attention_heads):
            raise ValueError("block_channels, cross_attention_blocks and attention_heads need one entry per resolution")
        if not any(self.cross_attention_blocks):
            raise ValueError("at least one UNet resolution needs cross-attention blocks")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.prediction not in ("v_prediction", "epsilon"):
            raise ValueError(f"prediction must be v_prediction or epsilon, got {self.prediction!r}")
        if not 0 <= self.uncond_probability < 1:
            raise ValueError("uncond_probability must be in [0, 1)")
        if not 0 <= self.object_threshold <= 1:  # a detector score is a sigmoid: outside [0, 1] is a typo
            raise ValueError(f"object_threshold must be in [0, 1] (a detector score), got {self.object_threshold}")
        if self.batch_size < 1 or self.grad_accumulation < 1:
            raise ValueError("batch_size and grad_accumulation must be at least 1")
        if self.global_batch < 0:
            raise ValueError(f"global_batch must be >= 0 (0: batch_size x grad_accumulation x ranks), got {self.global_batch}")
        if self.keep_checkpoints < 1 or self.checkpoint_every < 1:
            raise ValueError("keep_checkpoints and checkpoint_every must be at least 1 (resume needs a checkpoint)")
        if self.snr_weighting not in SNR_WEIGHTINGS:
            raise ValueError(f"snr_weighting must be one of {SNR_WEIGHTINGS}, got {self.snr_weighting!r}")
        if not (self.min_snr_gamma > 0 or self.snr_weighting == "none" and self.min_snr_gamma >= 0):
            raise ValueError(f"min_snr_gamma must be > 0 with snr_weighting {self.snr_weighting!r} (>= 0 with none), "
                             f"got {self.min_snr_gamma!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Values that passed --dry-run and failed deep inside a run (a ZeroDivisionError after the first step, a
        torch ValueError, 20 steps of NaN losses), or trained something meaningless (a scaling factor of 0, an
        untrained model exported at --max-steps -1): refused here, in one line."""
        at_least_one = {"log_every": self.log_every, "train_timesteps": self.train_timesteps,
                        "norm_groups": self.norm_groups, "layers_per_block": self.layers_per_block,
                        "max_bad_steps": self.max_bad_steps, "shuffle_buffer": self.shuffle_buffer,
                        "cross_attention_dim": self.cross_attention_dim}
        if not self.max_steps:  # epochs decide the run's length only then
            at_least_one["epochs"] = self.epochs
        for name, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.num_workers < 0 or self.max_steps < 0:
            raise ValueError(f"num_workers and max_steps must be >= 0, got {self.num_workers} and {self.max_steps}")
        if any(c < 1 or c % self.norm_groups for c in self.block_channels):
            raise ValueError(f"block_channels must be positive multiples of norm_groups ({self.norm_groups}), got "
                             f"{list(self.block_channels)}")
        if any(h < 1 for h in self.attention_heads):
            raise ValueError(f"attention_heads must be at least 1, got {list(self.attention_heads)}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        positive = {"learning_rate": self.learning_rate, "grad_clip": self.grad_clip,
                    "vae_scaling_factor": self.vae_scaling_factor, "beta_start": self.beta_start,
                    "beta_end": self.beta_end}
        for name, number in positive.items():
            if not (math.isfinite(number) and number > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {number!r}")
        if not self.beta_start <= self.beta_end < 1:
            raise ValueError(f"beta_start <= beta_end < 1 is needed, got {self.beta_start!r} and {self.beta_end!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """As `ConfigMethods.from_dict`; a run config written before `snr_weighting` existed loads as what it trained
        with: min_snr_gamma > 0 was the Min-SNR v-form (min-snr-v), 0 no weighting."""
        if "snr_weighting" not in data:
            gamma = data.get("min_snr_gamma", 0.0)
            data = {**data, "snr_weighting": "min-snr-v" if isinstance(gamma, (int, float)) and gamma > 0 else "none"}
        return super().from_dict(data)


PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(),
    "paper": TrainConfig(
        preset="paper",
        shards="data/shards/paper",  # where `python -m preprocess --preset paper` writes and evaluation reads
        output="runs/paper",
        num_workers=4,
        shuffle_buffer=1000,
        embed_dim=768,  # CLIP ViT-L/14
        num_frames=41,  # 4 fps over 10.24 s (preprocess PRESETS['paper'])
        # Grounding DINO keeps a box whose score passes box_threshold 0.35 (IDEA-Research/GroundingDINO README.md,
        # "Running with Python"; groundingdino/util/inference.py predict); tiny keeps 0: its random detector's
        # scores mean nothing
        object_threshold=0.35,
        block_channels=(320, 640, 1280, 1280),
        cross_attention_blocks=(True, True, True, False),
        layers_per_block=2,
        attention_heads=(5, 10, 20, 20),  # SD 2.1's attention_head_dim (= heads in diffusers' naming)
        cross_attention_dim=1024,
        norm_groups=32,
        upcast_attention=True,
        posterior_sample=True,  # a trained VAE's posterior is narrow; Tango samples it (get_first_stage_encoding)
        vae_scaling_factor=0.9227914214134216,  # audioldm-s-full-v2 vae/config.json; check your weights folder
        snr_weighting="vta-ldm",  # VTA-LDM / Tango models.py: min(snr, gamma) / snr with --snr_gamma 5
        min_snr_gamma=5.0,
        # the paper trains 8 per GPU on 4 A100s, a global batch of 32: global_batch keeps 32 on any number of GPUs
        # (8 per rank: 1 GPU -> grad_accumulation 4, 2 -> 2, 4 -> 1; train.trainer.resolve_global_batch)
        batch_size=8,
        global_batch=32,
        learning_rate=3e-5,
        lr_schedule="linear",  # Tango / VTA-LDM train.py: get_scheduler(--lr_scheduler_type linear), no warmup
        weight_decay=1e-2,
        epochs=40,
        max_steps=0,
        ema_decay=0.9999,
        mixed_precision="bf16",
        checkpoint_every=2000,
        log_every=50,
    ),
}
