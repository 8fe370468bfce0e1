"""The training loop: accelerate (DDP, mixed precision), EMA, checkpoints, resume, logs.

Run folder (config.output):
    config.json                       the resolved TrainConfig (+ the shards' spec)
    checkpoints/step_00000100/        full resume state: accelerate save_state (model.safetensors, optimizer.bin,
                                      scheduler.bin), ema.safetensors, progress.json (step counters),
                                      rng_rank<r>.safetensors and data_rank<r>.json (every rank), manifest.json
                                      (size and SHA-256 of every file), `complete` (written last)
    model/ema.safetensors, config.json  EMA inference weights: what `train.load_model` reads (its default)
    model/raw.safetensors             the online (raw) weights of the same moment: `load_model(..., weights="raw")`
    logs/                             TensorBoard
Resume = run the same command again: the newest complete checkpoint that matches its manifest is loaded (a broken one
is reported, kept, and the one before it is used).

Nothing in a checkpoint can run code when it is loaded: the weights, EMA and generator states are safetensors, the
counters and data positions JSON, and the optimizer and LR schedule files (accelerate's torch.save pickles) are read
with `weights_only=True`, torch's restricted unpickler that builds tensors and plain containers and refuses any other
object. accelerate's own pickled generator file is not kept, and nothing is registered with
`register_for_checkpointing` (accelerate unpickles those files without restriction). A checkpoint written in that older
format is refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import safetensors
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import set_seed
from accelerate.utils.constants import RNG_STATE_NAME

import shards
from common.devices import tune_backends
from common.lock import LOCK_FILE, FolderBusy, folder_lock
from common.signals import STOP_SIGNALS
from common.weights import is_float_dtype, non_finite_tensor, one_line, safetensors_header, sha256_file
from shards import ShardSpec
from train import data
from train.config import TrainConfig
from train.diffusion import noise_scheduler, training_loss
from train.model import VTASAM
from train.speed import speed_up

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

# fields that may change when a run is resumed (they do not change what is being trained)
# (not channels_last: the optimizer's saved moments keep the layout they were made in, and fused AdamW needs
# them in the parameters' layout)
# (output: a run folder may be moved; record_ranks only writes what each rank saw; shards, the folder's path, may
# change too when the data there is the same: `data_fingerprint`)
# (global_batch: what it trains is the grad_accumulation it resolves to (`resolve_global_batch`), which is compared;
# a run saved before the field existed, or with the accumulation given by hand, resumes when that agrees)
# (not num_workers: a rank's data position is kept per data stream, one per DataLoader worker, and the streams share
# out each epoch's samples, so another count would repeat some samples of the epoch and skip others)
RESUMABLE_CHANGES = {"max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every", "max_bad_steps",
                     "compile", "output", "record_ranks", "global_batch"}
# ...except these when the run's learning rate decays to 0 at its last step (lr_schedule linear or cosine)
RUN_LENGTH = {"max_steps", "epochs"}
COMPLETE = "complete"  # marker file written last into a checkpoint folder
MANIFEST = "manifest.json"  # {"format": CHECKPOINT_FORMAT, "step": N, "files": {name: {"size", "sha256"}}}
CHECKPOINT_FORMAT = 1
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"  # accelerate's name for the weights of its one prepared model
PROGRESS_FILE = "progress.json"
STEP_FOLDER = re.compile(r"step_\d{8}")  # a checkpoint; step_N.tmp is being written, step_N.broken was set aside
PARTIAL_FOLDER = re.compile(r"step_\d{8}\.tmp")
SCALING_TOLERANCE = 1e-6  # relative: the VAE scaling factors of the shards and of the run agree
# why a run folder may have no model/ yet: a run stopped (SIGTERM, Ctrl-C) before its first export
NOT_EXPORTED = ("no weights exported yet: training writes them every --checkpoint-every steps and at its end; run "
                "the same training command again to go on")


class ConfigError(RuntimeError):
    """A configuration that does not fit the data or the run folder (one line). `own_rank`: found in a file of this
    rank's own (its RNG state or data position), so this rank says it, not only rank 0."""

    def __init__(self, message: str, own_rank: bool = False):
        super().__init__(message)
        self.own_rank = own_rank


class BrokenCheckpoint(Exception):
    """A checkpoint folder that does not match its manifest; the message says which file and how (one line)."""


class LearningRateSchedule:
    """Factor on config.learning_rate before optimizer step s + 1 (s = steps taken; the LambdaLR's lambda).

    Warmup first: min(1, (s + 1) / W) for s < W; then, with T = the run's total steps,
    - "constant": 1;
    - "linear":   max(0, (T - s) / (T - W)): transformers' get_linear_schedule_with_warmup past the warmup, what
                  Tango and VTA-LDM train with (train.py: get_scheduler(--lr_scheduler_type linear), 0 warmup steps);
    - "cosine":   0.5 (1 + cos(pi min(1, (s - W) / (T - W)))): transformers' get_cosine_schedule_with_warmup.
    A callable object rather than a lambda so that the LambdaLR's state_dict (the checkpoint) carries kind, W and T and
    a resumed run decays towards the horizon it started with; the factor depends on the step alone.
    """

    def __init__(self, kind: str, warmup: int, total: int):
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_schedule must be constant, linear or cosine, got {kind!r}")
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return min(1.0, (step + 1) / self.warmup)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def run_length(config: TrainConfig, count: int, samples_per_step: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of a run over `count` samples of its split."""
    steps_per_epoch = max(1, count // samples_per_step)
    return steps_per_epoch, config.max_steps or config.epochs * steps_per_epoch


def resolve_global_batch(config: TrainConfig, world_size: int) -> TrainConfig:
    """The config with grad_accumulation = global_batch / (batch_size x world_size) when config.global_batch > 0
    (unchanged when it is 0): the same global batch, samples per optimizer step over all ranks, on any number of ranks
    (paper preset: 32 = 8 per rank x 1 rank x 4 accumulation, or x 4 ranks x 1 accumulation).

    ConfigError (one line, naming the numbers) when global_batch is not a multiple of batch_size x world_size, or when
    grad_accumulation was set to a value other than 1 (the default) that disagrees with the derived one.
    """
    if config.global_batch == 0:
        return config
    per_micro_batch = config.batch_size * world_size
    accumulation, remainder = divmod(config.global_batch, per_micro_batch)
    if remainder:  # also a global batch smaller than one micro-batch over the ranks
        raise ConfigError(f"global_batch {config.global_batch} is not a multiple of batch_size {config.batch_size} x "
                          f"{world_size} rank(s) = {per_micro_batch}; pick a global batch that is, another --batch-size, "
                          "or --global-batch 0 to use --grad-accumulation as given")
    if config.grad_accumulation not in (1, accumulation):
        raise ConfigError(f"global_batch {config.global_batch} = batch_size {config.batch_size} x {world_size} rank(s) x "
                          f"accumulation {accumulation}, but grad_accumulation is {config.grad_accumulation}; give one of "
                          "the two (--global-batch 0 keeps --grad-accumulation)")
    return config.replace(grad_accumulation=accumulation)


def global_batch_line(config: TrainConfig, world_size: int) -> str:
    """'global batch 32 = 8 per rank x 1 rank x 4 accumulation': what one optimizer step trains on (the start log)."""
    total = config.batch_size * world_size * config.grad_accumulation
    ranks = "rank" if world_size == 1 else "ranks"
    return f"global batch {total} = {config.batch_size} per rank x {world_size} {ranks} x {config.grad_accumulation} accumulation"


def check_scaling_factor(config: TrainConfig, meta_path: Path) -> None:
    """The run's vae_scaling_factor is the one of the VAE that encoded the shards (meta.json: models.vae.scaling_factor),
    unless that VAE had random weights (config.random_init): the tiny preset scales those latents on purpose."""
    meta = shards.read_meta(meta_path.parent)  # an object, or ShardFormatError naming the file
    config_part = meta.get("config")
    random_init = config_part.get("random_init") if isinstance(config_part, dict) else None
    factor = shards.recorded_model(meta, "vae").get("scaling_factor")
    if random_init is not False or factor is None:
        return  # random VAE weights, or a folder that does not say which VAE it used
    if not isinstance(factor, (int, float)):
        raise ConfigError(f"{meta_path}: models.vae.scaling_factor is not a number ({factor!r})")
    if not math.isclose(factor, config.vae_scaling_factor, rel_tol=SCALING_TOLERANCE):
        raise ConfigError(f"{meta_path}: the shards were encoded by a trained VAE with scaling_factor {factor}, the run "
                          f"scales latents by vae_scaling_factor {config.vae_scaling_factor} (pass --vae-scaling-factor "
                          f"{factor})")


def sam_floor_note(config: TrainConfig) -> str | None:
    """A line when the object threshold is below the SAM floor the shards were made with (meta.json: config.sam_floor,
    with use_sam): stage one sent SAM only the noun-frames scored at or above the floor, so below it p_tk is the
    detector's score unrefined, not its product with SAM's IoU (an ablation at --object-threshold 0 wants shards made
    with --sam-floor 0). None otherwise, when meta.json does not say, or for random-weight detectors (the tiny
    preset's demo: their scores mean nothing)."""
    try:
        stage_one = shards.read_meta(config.shards).get("config")
    except shards.ShardFormatError:
        return None
    if not isinstance(stage_one, dict) or stage_one.get("use_sam") is False or stage_one.get("random_init") is not False:
        return None
    floor = stage_one.get("sam_floor")
    if not isinstance(floor, (int, float)) or isinstance(floor, bool) or config.object_threshold >= floor:
        return None
    return (f"note: object threshold {config.object_threshold:g} is below the shards' SAM floor {floor:g}: noun-frames "
            f"scored under {floor:g} count with their detector score unrefined by SAM (stage one skipped them); for "
            "SAM's refinement everywhere, make the shards with --sam-floor 0")


def data_fingerprint(folder: Path, paths: list[Path], checksums: bool = True) -> str:
    """SHA-256 over the shard folder's meta.json (byte for byte) and the names, sizes and (`checksums`) recorded
    SHA-256 of its shard files: unchanged when the folder is copied or moved, changed by another stage-one run or a
    shard added, removed or replaced, also by another of the same size (the checksum its record holds: no shard is
    read, cheap for any data size). A run's config.json keeps it as "data_fingerprint"; runs before checksums were
    folded in kept the one of `checksums=False`."""
    digest = hashlib.sha256((folder / shards.META_FILE).read_bytes())
    for path in sorted(paths, key=lambda p: p.name):
        line = f"\n{path.name} {path.stat().st_size}"
        if checksums:
            try:
                record = shards.read_record(path)
            except shards.ShardFormatError:
                record = None  # the readers say what is wrong with it
            line += f" {record['sha256']}" if record else ""
        digest.update(line.encode())
    return digest.hexdigest()


RUN_PARTS = ("checkpoints", "logs", "model")  # the folders training writes into its output folder
RUN_CONFIG_FIELDS = ("shards", "output", "learning_rate", "seed")  # what every run's config.json has had


def check_output_folder(output: Path) -> None:
    """ConfigError unless `output` can take this run's files without overwriting someone else's: absent, empty (of
    all but what this project puts there before config.json), or a training run's folder (its config.json,
    `saved_config`, is checked by the caller). A folder holding other files but no config.json is another
    program's (or a user's), and a file where the folder or one of its parts (RUN_PARTS) goes would fail the run
    at its first checkpoint."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: exists and is not a folder; give --output a folder")
    if not output.is_dir():
        return
    if not (output / "config.json").exists():
        # not someone else's: the lock, config.json.tmp (a first start killed while writing it, or another rank's
        # first start writing it now), and eval/ (evaluation's default folder, made by an evaluation run too early)
        held = sorted(p.name for p in output.iterdir() if p.name not in (LOCK_FILE, "config.json.tmp", "eval"))
        if held:
            shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            raise ConfigError(f"{output}: holds {shown} but no training run (no config.json); give a new or empty "
                              "--output")
    for part in RUN_PARTS:
        if (output / part).exists() and not (output / part).is_dir():
            raise ConfigError(f"{output / part}: a file where the run's {part} folder goes; move it away")


def saved_config(path: Path) -> dict[str, Any]:
    """A run folder's config.json as this version reads it (fields it lacks take what they meant then), as JSON."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: unreadable ({error}); restore it or train into another --output") from None
    if not isinstance(old, dict) or not all(name in old for name in RUN_CONFIG_FIELDS):
        raise ConfigError(f"{path}: not a training run's configuration (no {', '.join(RUN_CONFIG_FIELDS)}); "
                          "give a new or empty --output")
    try:
        return {**old, **json.loads(json.dumps(TrainConfig.from_dict(old).to_dict()))}
    except (TypeError, ValueError):
        return old  # values this version refuses: compared as written


@dataclass
class Progress:
    """Counters saved with every checkpoint (progress.json)."""

    step: int = 0  # optimizer steps taken
    skipped: int = 0  # optimizer steps skipped because of a non-finite loss or gradient
    samples: int = 0  # training samples consumed by all ranks
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped, "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """ValueError for a counter that is not a whole number >= 0."""
        values = [state[name] for name in ("step", "skipped", "samples")]
        bad = [value for value in values if isinstance(value, bool) or not isinstance(value, int) or value < 0]
        if bad:
            raise ValueError(f"counters must be whole numbers >= 0, got {bad[0]!r}")
        self.step, self.skipped, self.samples = values


@torch.no_grad()
def ema_update(model: torch.nn.Module, averaged: torch.nn.Module, decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * model; buffers copied (k-diffusion's ema_update)."""
    model_params = dict(model.named_parameters())
    for name, param in averaged.named_parameters():
        param.lerp_(model_params[name].detach().to(param.dtype), 1 - decay)
    model_buffers = dict(model.named_buffers())
    for name, buffer in averaged.named_buffers():
        buffer.copy_(model_buffers[name])


def ema_decay(config: TrainConfig, step: int) -> float:
    """Warm-up so that early weights do not dominate: min(decay, (1 + n) / (10 + n))."""
    return min(config.ema_decay, (1 + step) / (10 + step))


def check_inputs(config: TrainConfig, world_size: int) -> tuple[ShardSpec, list[Path], list[tuple[Path, int]]]:
    """Everything that can be wrong with the data or the run folder, before any training starts. Returns the spec,
    the shards and their counts of the split's samples (`data.split_index`)."""
    spec, paths = data.check_shards(config)
    meta = Path(config.shards) / "meta.json"
    for name in ("embed_dim", "num_frames"):
        if getattr(spec, name) != getattr(config, name):
            raise ConfigError(f"{meta}: shards have {name} {getattr(spec, name)}, the {config.preset!r} preset expects "
                              f"{getattr(config, name)} (pick the preset of the features or pass --{name.replace('_', '-')})")
    check_scaling_factor(config, meta)
    index = data.split_index(paths, config.split, Path(config.shards))
    count = sum(found for _, found in index)
    if count < world_size * config.batch_size * config.grad_accumulation:
        raise ConfigError(f"{config.shards}: {count} sample(s) of split {config.split!r}, fewer than one step needs "
                          f"({world_size} ranks x batch {config.batch_size} x accumulation {config.grad_accumulation})")
    if data.epoch_batches(count, world_size, config.num_workers, config.batch_size) == 0:
        workers = max(1, config.num_workers)
        raise ConfigError(f"{config.shards}: {count} sample(s) of split {config.split!r}, fewer than one batch for each "
                          f"of the {world_size * workers} data streams ({world_size} ranks x {workers} DataLoader "
                          f"workers x batch {config.batch_size}); give fewer --num-workers")
    output = Path(config.output)
    check_output_folder(output)
    saved = output / "config.json"
    if saved.exists():
        old = saved_config(saved)
        mine = json.loads(json.dumps(config.to_dict()))
        # a decaying learning rate reaches 0 at the run's last step: that step is part of what is trained
        fixed = RUN_LENGTH if config.lr_schedule != "constant" else set()
        differs = sorted(k for k in mine if (k not in RESUMABLE_CHANGES or k in fixed) and old.get(k) != mine[k])
        recorded = old.get("data_fingerprint")
        fingerprints = {data_fingerprint(Path(config.shards), paths, checksums) for checksums in (True, False)}
        if "shards" in differs and recorded in fingerprints:
            differs.remove("shards")  # the same data at another path (a moved or copied folder)
        changed_data = "shards" not in differs and recorded is not None and recorded not in fingerprints
        if changed_data:  # the same path, other files: the epochs and data positions would not be the run's
            differs = sorted([*differs, "shards"])
        if differs and latest_checkpoint(Path(config.output)) is not None:
            reason = (f" (its learning rate decays to 0 at its last step, --lr-schedule {config.lr_schedule})"
                      if set(differs) <= fixed else "")
            if changed_data:
                reason += f" (the shard files in {config.shards} changed: names, sizes or contents)"
            if "num_workers" in differs:
                reason += " (data positions are kept per DataLoader worker: another count would repeat samples)"
            if "grad_accumulation" in differs and config.global_batch:
                before = f" with {old['world_size']} rank(s)" if isinstance(old.get("world_size"), int) else ""
                reason += (f" (--global-batch {config.global_batch} derives grad_accumulation {config.grad_accumulation} "
                           f"here with {world_size} rank(s); it was {old.get('grad_accumulation')}{before})")
            values = [f"{k} {json.dumps(old.get(k))} there vs {json.dumps(mine[k])} now" for k in differs
                      if k in mine and k != "shards"][:4]  # the path alone says little about shards: the reasons do
            shown = f" ({'; '.join(values)})" if values else ""
            raise ConfigError(f"{saved}: the run there was trained with other {', '.join(differs)}{shown}{reason}; "
                              "use another --output or the same settings to resume")
    return spec, paths, index


def step_folders(output: Path) -> list[Path]:
    """Checkpoint folders step_N, oldest first, complete or not (not step_N.tmp or step_N.broken)."""
    folder = output / "checkpoints"
    return sorted(p for p in folder.iterdir() if STEP_FOLDER.fullmatch(p.name)) if folder.is_dir() else []


def remove_partial_checkpoints(output: Path) -> list[Path]:
    """Delete the checkpoints/step_N.tmp folders a killed run left (SIGKILL while one was written, as a scheduler
    sends after its grace period): no step folder, never loaded or pruned, each the size of a resume state. Only the
    run holding the folder's lock calls this, so none is being written."""
    folder = output / "checkpoints"
    partial = sorted(p for p in folder.iterdir() if p.is_dir() and PARTIAL_FOLDER.fullmatch(p.name)) \
        if folder.is_dir() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def complete_checkpoints(output: Path) -> list[Path]:
    """Checkpoint folders with their `complete` marker, oldest first."""
    return [p for p in step_folders(output) if (p / COMPLETE).exists()]


def latest_checkpoint(output: Path) -> Path | None:
    found = complete_checkpoints(output)
    return found[-1] if found else None


RNG_FILE_PATTERN = re.compile(r"rng_rank\d+\.safetensors")


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def data_file(rank: int) -> str:
    return f"data_rank{rank}.json"


def save_rng_state(path: Path) -> None:
    """This process's Python, NumPy, torch CPU and CUDA generator states as safetensors (tensors plus a JSON metadata
    entry for the scalars): what accelerate keeps in a pickle, in a file that holds data only."""
    python_version, python_state, python_gauss = random.getstate()
    numpy_kind, numpy_state, numpy_pos, numpy_has_gauss, numpy_cached = np.random.get_state(legacy=True)
    tensors = {"python": torch.tensor(python_state, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(numpy_state, dtype=np.int64)), "torch": torch.get_rng_state()}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors.update({f"cuda{i}": state for i, state in enumerate(cuda)})
    scalars = {"python_version": python_version, "python_gauss": python_gauss, "numpy_kind": numpy_kind,
               "numpy_pos": numpy_pos, "numpy_has_gauss": numpy_has_gauss, "numpy_cached_gaussian": numpy_cached,
               "cuda_devices": len(cuda)}
    safetensors.torch.save_file(tensors, str(path), metadata={"scalars": json.dumps(scalars)})


def load_rng_state(path: Path) -> None:
    """Restore what `save_rng_state` wrote (CUDA generators: those of the devices present both then and now)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if "scalars" not in metadata:
            raise ValueError("no 'scalars' metadata entry: not a file written by training")
        scalars = json.loads(metadata["scalars"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
    absent = [name for name in ("python", "numpy", "torch") if name not in tensors]
    if absent or not isinstance(scalars, dict):
        raise ValueError(f"lacks the {absent[0]} generator state" if absent else "its 'scalars' entry is not an object")
    random.setstate((int(scalars["python_version"]), tuple(int(x) for x in tensors["python"].tolist()),
                     scalars["python_gauss"]))
    np.random.set_state((str(scalars["numpy_kind"]), tensors["numpy"].numpy().astype(np.uint32),
                         int(scalars["numpy_pos"]), int(scalars["numpy_has_gauss"]),
                         float(scalars["numpy_cached_gaussian"])))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        for i in range(min(int(scalars["cuda_devices"]), torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"cuda{i}"], i)


def write_manifest(folder: Path, step: int) -> None:
    """manifest.json: the size and SHA-256 of every file in a checkpoint folder being written."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(folder.iterdir())
             if p.is_file() and p.name not in (MANIFEST, COMPLETE)}
    manifest = {"format": CHECKPOINT_FORMAT, "step": step, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def verify_checkpoint(folder: Path, world_size: int) -> None:
    """BrokenCheckpoint unless the folder holds exactly the files its manifest lists, each of the size and SHA-256
    written: a truncated, corrupt, missing or added file is found before anything is loaded. ConfigError for a
    checkpoint of the older pickled format (refused, never read) and for one written by another number of processes
    (every rank needs its own generator and data-position files). Every rank reaches the same verdict on the same
    files, so all ranks resume from the same checkpoint."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        if any(folder.glob("custom_checkpoint_*.pkl")) or any(folder.glob(f"{RNG_STATE_NAME}_*.pkl")):
            raise ConfigError(f"{folder}: the checkpoint predates the safe checkpoint format (its state is pickled, "
                              "and loading a pickle can run code); resume it with the version that wrote it, or train "
                              "into another --output")
        raise BrokenCheckpoint(f"{MANIFEST} missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = {str(name): (int(entry["size"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
        written_format = manifest.get("format")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise BrokenCheckpoint(f"{MANIFEST} unreadable ({error})") from None
    if written_format != CHECKPOINT_FORMAT:
        raise BrokenCheckpoint(f"{MANIFEST} says format {written_format!r}, this version reads {CHECKPOINT_FORMAT}")
    added = sorted({p.name for p in folder.iterdir()} - {MANIFEST, COMPLETE} - listed.keys())
    if added:
        raise BrokenCheckpoint(f"{added[0]} is not in its manifest (a file that training did not write)")
    written_by = sum(1 for name in listed if RNG_FILE_PATTERN.fullmatch(name))
    if written_by != world_size or any(data_file(r) not in listed for r in range(world_size)):
        raise ConfigError(f"{folder}: written by {written_by} process(es), this run has {world_size}; resume with "
                          f"{written_by} process(es)")
    for name, (size, digest) in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            raise BrokenCheckpoint(f"{name} missing")
        if path.stat().st_size != size:
            raise BrokenCheckpoint(f"{name} is truncated or overwritten ({path.stat().st_size} bytes, {size} written)")
        if sha256_file(path) != digest:
            raise BrokenCheckpoint(f"{name} is corrupt (its SHA-256 differs from the one written)")


def resolved_json(config: TrainConfig, spec: ShardSpec, **extra: Any) -> str:
    return json.dumps({**config.to_dict(), "spec": spec.to_dict(), **extra}, indent=2, sort_keys=True) + "\n"


class WriteFailed(ConfigError):
    """A checkpoint or weights file that could not be written (`writing`), with the reason alone in `reason`."""

    def __init__(self, what: Path, reason: str):
        super().__init__(f"{what}: cannot be written ({reason}); the checkpoints and weights before it are kept: free "
                         "the cause and run the same command again")
        self.reason = reason


@contextlib.contextmanager
def writing(tmp: Path, what: Path) -> Iterator[None]:
    """Around the writing of `tmp` (a file or a folder, renamed into `what` when whole): a failure to write (a full
    disk: OSError, safetensors' own error, torch.save's RuntimeError) removes `tmp`, which would hold the space
    until that step came again, and is one WriteFailed naming `what`; what was complete before stays."""
    try:
        yield
    except (OSError, RuntimeError, safetensors.SafetensorError) as error:
        if isinstance(error, WriteFailed):  # a file inside `tmp`
            reason = error.reason
        elif isinstance(error, OSError) and error.strerror:
            reason = error.strerror
        elif isinstance(error, RuntimeError) and not any(mark in str(error) for mark in TORCH_WRITE_FAILURES):
            raise  # not a write that failed
        else:  # torch's or safetensors' own words ('unexpected pos 2314688 vs 2314576'): say when the disk is full
            reason = " ".join(str(error).split())[:200]
            if _nearly_full(tmp.parent):
                reason = f"No space left on device: {reason}"
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise WriteFailed(what, reason) from None


FULL_BELOW = 16 << 20  # bytes free under which a write that failed without an errno is said to have met a full disk


def _nearly_full(folder: Path) -> bool:
    """Whether the file system of `folder` has less than FULL_BELOW bytes free (False when that cannot be read)."""
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


# what torch.save's RuntimeError says when its file cannot be written (PyTorchStreamWriter on a full disk)
TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos")


def write_atomically(path: Path, text: str) -> None:
    """Write to path.tmp, then rename: a reader (or a resumed run) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp, path):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def save_weights(model: torch.nn.Module, path: Path, float32: bool = True, step: int | None = None) -> None:
    """A module's state as float32 safetensors (float32=False: in its own dtypes, bit for bit), written to path.tmp and
    renamed (readers never see half a file); `step`, the training step of the weights, in the file's metadata."""
    tensors = {k: (v.detach().float() if float32 else v.detach()).cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp, path):
        metadata = {"format": "pt"} | ({} if step is None else {"step": str(step)})
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors makes its files 0600: others could not load the model
        os.replace(tmp, path)


def current_umask() -> int:
    """The process's file-creation mask: from /proc/self/status on Linux, else read by setting it and setting it
    back (a file another thread creates at that instant gets 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_model(ema: VTASAM, raw: torch.nn.Module, config: TrainConfig, spec: ShardSpec, output: Path,
                 step: int) -> None:
    """model/ema.safetensors (the EMA), model/raw.safetensors (the online weights: VTA-LDM keeps no EMA and evaluates
    these) and model/config.json, each written atomically, and model/features.json: the shards' meta.json (stage-one
    config and checkpoints), so generation can rebuild the same feature extractors after the run folder has moved
    away from its shards. raw: the unwrapped training model (compiled in place, channels_last or not: same keys).
    Both weight files record `step`: an export cut short between them leaves two steps, which `load_model` says."""
    folder = output / "model"
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(ema, folder / "ema.safetensors", step=step)
    save_weights(raw, folder / "raw.safetensors", step=step)
    write_atomically(folder / "config.json", resolved_json(config, spec))
    meta = Path(config.shards) / shards.META_FILE
    if meta.is_file():
        write_atomically(folder / "features.json", meta.read_text(encoding="utf-8"))


def set_aside(folder: Path) -> None:
    """Rename a checkpoint folder to step_N.broken (step_N.broken-2, ... when taken): kept, never loaded or pruned."""
    aside, n = folder.with_name(folder.name + ".broken"), 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.broken-{n}")
    os.replace(folder, aside)


def save_checkpoint(accelerator: Accelerator, output: Path, progress: Progress, positions: dict[int, tuple[int, int]],
                    keep: int, ema: torch.nn.Module) -> Path:
    """Full resume state in checkpoints/step_N (written to step_N.tmp first, renamed when complete).

    Every rank writes its generator states and data position; the main process the EMA, the counters, then the
    manifest and the `complete` marker. A checkpoint folder of this or a later step already there can only be one that
    resume found broken and skipped: it is set aside (`set_aside`), not deleted. The oldest step folders beyond `keep`
    are deleted, never the one just written."""
    final = output / "checkpoints" / f"step_{progress.step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing(tmp, final):
        accelerator.save_state(str(tmp))
        (tmp / f"{RNG_STATE_NAME}_{rank}.pkl").unlink(missing_ok=True)  # a pickle: kept in rng_rank<r>.safetensors
        save_rng_state(tmp / rng_file(rank))
        (tmp / data_file(rank)).write_text(json.dumps({"streams": {str(w): list(p) for w, p in positions.items()}}),
                                           encoding="utf-8")
        if accelerator.is_main_process:
            save_weights(ema, tmp / EMA_FILE, float32=False)
            (tmp / PROGRESS_FILE).write_text(json.dumps(progress.state_dict()), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with writing(tmp, final):
            write_manifest(tmp, progress.step)
            (tmp / COMPLETE).write_text(str(progress.step), encoding="utf-8")
        for skipped in step_folders(output):
            if skipped.name >= final.name:
                set_aside(skipped)
        os.replace(tmp, final)
        old = step_folders(output)
        for stale in old[: max(0, len(old) - keep)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@dataclass
class Run:
    """One run's prepared objects: what `start_run` builds (and resumes) and the training loop steps."""

    config: TrainConfig
    spec: ShardSpec
    accelerator: Accelerator
    model: torch.nn.Module  # the UNet as accelerate prepared it (DDP-wrapped across ranks)
    ema: VTASAM
    optimizer: torch.optim.Optimizer
    lr_schedule: AcceleratedScheduler
    progress: Progress = field(default_factory=Progress)
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)  # data position per data stream
    resumed_from: Path | None = None  # the checkpoint loaded, None for a fresh run
    older_positions: bool = False  # the checkpoint's data positions are of whole-shard streams (an older version)

    @property
    def output(self) -> Path:
        return Path(self.config.output)

    @property
    def samples_per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accumulation * self.accelerator.num_processes


def make_accelerator(config: TrainConfig) -> Accelerator:
    cpu = config.cpu or not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu,
        mixed_precision="no" if cpu else config.mixed_precision,  # autocast to bf16 on the CPU is slow, not tested
        step_scheduler_with_optimizer=False,  # we step the LR schedule once per optimizer step ourselves
    )


def start_run(config: TrainConfig, spec: ShardSpec, accelerator: Accelerator, log: Any, count: int) -> Run:
    """Model, EMA, AdamW and LR schedule (`LearningRateSchedule` over the run's length on `count` samples) prepared by
    accelerate, then the newest complete checkpoint loaded, if any."""
    set_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = VTASAM(config, spec)
    ema = copy.deepcopy(model).requires_grad_(False)
    tune_backends(accelerator.device)
    speed_up(model.to(accelerator.device), config.channels_last, config.compile)  # the EMA copy stays plain
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(config.adam_betas[0], config.adam_betas[1]),
                                  weight_decay=config.weight_decay,
                                  fused=accelerator.device.type == "cuda")  # one kernel for all parameters
    samples_per_step = config.batch_size * config.grad_accumulation * accelerator.num_processes
    schedule = LearningRateSchedule(config.lr_schedule, config.warmup_steps, run_length(config, count, samples_per_step)[1])
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    prepared, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)
    run = Run(config, spec, accelerator, prepared, ema.to(accelerator.device), optimizer, lr_schedule)
    resume(run, log)
    return run


def resume(run: Run, log: Any) -> None:
    """Seed this rank's noise; when the run folder has a complete checkpoint, load the newest one that matches its
    manifest (weights, optimizer, LR schedule, EMA, counters, every generator, this rank's data position).

    A newer checkpoint that does not match its manifest (a truncated, empty, corrupt, missing or added file) is
    skipped with a warning naming it and the file: resuming from the one before it repeats those steps bit for bit,
    whereas resuming with a lost generator state would silently train on other noise. Every rank checks the same files
    and so picks the same checkpoint. ConfigError (one line) when checkpoints exist but none is usable, for a
    checkpoint of the older pickled format, and when a checkpoint that matched its manifest still does not load."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        removed = remove_partial_checkpoints(run.output)
        if removed:
            log(f"removed {len(removed)} checkpoint folder(s) an interrupted run left half written "
                f"({', '.join(p.name for p in removed)})")
    # noise, timesteps and dropped conditions differ per rank; a resumed run restores these generators instead
    set_seed(run.config.seed + 1000 * accelerator.process_index)
    problems = []
    for checkpoint in reversed(complete_checkpoints(run.output)):
        try:
            verify_checkpoint(checkpoint, accelerator.num_processes)
        except BrokenCheckpoint as error:
            problems.append(f"{checkpoint.name}: {error}")
            if accelerator.is_main_process:
                log(f"warning: {checkpoint} is not usable, {error}; trying the checkpoint before it (the broken one is "
                    "kept, renamed to *.broken when training reaches its step again)")
            continue
        load_checkpoint(run, checkpoint)
        if accelerator.is_main_process:
            log(f"resuming from {checkpoint} at step {run.progress.step}")
            if run.older_positions:
                log(f"warning: {checkpoint}: data positions of an older version, whose data streams took whole shards; "
                    "they are read as positions of today's streams, so the samples from here on are not those an "
                    "uninterrupted run would have seen (and a run of --epochs may count its steps slightly otherwise)")
        return
    if problems:
        raise ConfigError(f"{run.output / 'checkpoints'}: no usable checkpoint ({'; '.join(problems)}); move the "
                          "folder away to train from the start")


def accelerate_culprit(checkpoint: Path) -> str | None:
    """The first of accelerate's files in a checkpoint that does not load on its own (safetensors files opened,
    torch.save files unpickled with weights_only=True), or None when each loads alone (then they disagree with the
    model or optimizer instead). Only called after accelerate's load_state failed, to name the file."""
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.name == MODEL_FILE:
                safetensors.torch.load_file(str(path), device="cpu")
            elif path.suffix == ".bin":
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - whatever stops it loading makes it the culprit
            return path.name
    return None


def non_float_tensor(header: dict[str, tuple[str, tuple[int, ...]]], floating: set[str]) -> str | None:
    """A message when a safetensors file (its `common.weights.safetensors_header`) stores one of the `floating`
    tensor names as integers or booleans (which load_state_dict would cast into float weights without a word),
    else None."""
    bad = sorted(name for name in floating & set(header) if not is_float_dtype(header[name][0]))
    if not bad:
        return None
    return (f"{bad[0]} is stored as {header[bad[0]][0]}, where the model has float weights ({len(bad)} such tensors): "
            "not the weights of a trained model")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    for index, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                yield f"parameter {index} {key}", value


def load_checkpoint(run: Run, checkpoint: Path) -> None:
    """Load a verified checkpoint into the run: accelerate's files with weights_only=True, the rest from safetensors
    and JSON (module docstring). ConfigError (one line naming the file) when one of them does not load, when the
    weights are stored as integers, or when the weights, EMA or optimizer state hold NaN or infinities (a run that
    diverged before the checkpoint: resuming would only skip every step)."""
    accelerator, rank = run.accelerator, run.accelerator.process_index
    model = accelerator.unwrap_model(run.model)
    floating = {name for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    for name in (MODEL_FILE, EMA_FILE):
        try:
            problem = non_float_tensor(safetensors_header(checkpoint / name), floating)
        except (OSError, safetensors.SafetensorError):
            continue  # the loaders below say what is wrong with it
        if problem:
            raise ConfigError(f"{checkpoint / name}: {problem}")
    try:
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    except Exception as error:  # any failure of accelerate's loaders (a refused pickle, a shape or key mismatch...)
        culprit = accelerate_culprit(checkpoint)
        where = checkpoint / culprit if culprit else f"{checkpoint} (model.safetensors, optimizer.bin, scheduler.bin)"
        raise ConfigError(f"{where}: does not load ({one_line(error)})") from None
    name = EMA_FILE
    try:
        # read onto the CPU (a CPU rank's device reads "cpu:0", which safetensors refuses), copied into the EMA's
        run.ema.load_state_dict(safetensors.torch.load_file(str(checkpoint / name), device="cpu"))
        name = PROGRESS_FILE
        run.progress.load_state_dict(json.loads((checkpoint / name).read_text(encoding="utf-8")))
        if f"step_{run.progress.step:08d}" != checkpoint.name:
            raise ValueError(f"step {run.progress.step} is not the step of its folder")
        name = rng_file(rank)
        load_rng_state(checkpoint / name)
        name = data_file(rank)
        positions = json.loads((checkpoint / name).read_text(encoding="utf-8"))
        run.older_positions = "streams" not in positions  # {worker: position} of whole-shard streams
        positions = positions.get("streams", positions)
        run.positions = {int(w): (int(p[0]), int(p[1])) for w, p in positions.items()}
        if any(min(worker, *position) < 0 for worker, position in run.positions.items()):
            raise ValueError(f"a data position below 0: {positions}")
    except Exception as error:  # any failure of the loaders (a shape or key mismatch, a malformed file...): one line
        raise ConfigError(f"{checkpoint / name}: does not load ({one_line(error)})",
                          own_rank=name in (rng_file(rank), data_file(rank))) from None
    for name, tensors in ((MODEL_FILE, model.state_dict().items()), (EMA_FILE, run.ema.state_dict().items()),
                          ("optimizer.bin", optimizer_tensors(run.optimizer))):
        bad = non_finite_tensor(tensors)
        if bad:
            raise ConfigError(f"{checkpoint / name}: {bad} holds NaN or infinite values (the run diverged before this "
                              "checkpoint); move this step folder away to resume from the one before it")
    run.resumed_from = checkpoint


def next_batch(stream: Iterator[dict[str, Any]], run: Run) -> tuple[dict[str, Any], int]:
    """The next batch of this rank and its epoch; records the data position it came from."""
    try:
        batch = next(stream)
    except StopIteration:
        raise data.DataError(f"{run.config.shards}: rank {run.accelerator.process_index} ran out of data",
                             own_rank=True) from None
    worker, epoch, consumed = (int(x) for x in batch["position"])
    run.positions[worker] = (epoch, consumed)
    return batch, epoch


def optimizer_step(run: Run, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Optimizer, LR schedule and EMA step when every rank's loss and the gradient norm are finite, else a skipped step
    (counted); the gradients are cleared either way. Returns whether the step was taken."""
    finite = bool(torch.isfinite(step_loss).all()) and math.isfinite(float(grad_norm))
    if finite:
        run.optimizer.step()
        run.lr_schedule.step()
        run.progress.step += 1
        ema_update(run.accelerator.unwrap_model(run.model), run.ema, ema_decay(run.config, run.progress.step))
    else:
        run.progress.skipped += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.progress.samples += run.samples_per_step
    return finite


class StopRequests:
    """The STOP_SIGNALS this process received while training, as a context manager: on entry (main thread only) each
    signal's handler notes the signal instead of ending the process, on exit the previous handlers are put back.

    `agreed` is the stop that every rank takes at a step boundary: the largest signal number any rank received, shared
    by an all-reduce (a signal may reach one rank only, or the ranks at different steps), 0 when none. DataLoader
    workers ignore these signals (`common.signals`): a job's whole process group receives them, and a worker
    that died of one would stop the run before its checkpoint."""

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self.note) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def note(self, signum: int, frame: object) -> None:
        self.received = self.received or signum

    def agreed(self, accelerator: Accelerator) -> int:
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([self.received], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


class Bookkeeping:
    """Everything after an optimizer step that is not training: TensorBoard scalars and the progress bar (main
    process), checkpoints with the EMA export, and the stop after config.max_bad_steps non-finite steps in a row."""

    def __init__(self, run: Run, count: int, trained: int, log: Any):
        from tqdm.auto import tqdm

        self.run, self.log = run, log
        config, accelerator, main = run.config, run.accelerator, run.accelerator.is_main_process
        self.steps_per_epoch, self.total_steps = run_length(config, trained, run.samples_per_step)
        self.writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run logs again the steps after its checkpoint (a start again, all of them): TensorBoard drops
            # the killed run's events of those steps (purge_step), so no step shows twice and none goes missing
            self.writer = SummaryWriter(str(run.output / "logs"), purge_step=run.progress.step + 1)
            left = (f" ({count - trained} left out of each epoch, other ones each time: each data stream gives the "
                    "same number of full batches)" if trained < count else "")
            log(f"{count} {config.split} samples{left}, {self.steps_per_epoch} steps per epoch, training to step "
                f"{self.total_steps} on {accelerator.num_processes} process(es), {accelerator.device}, mixed precision "
                f"{accelerator.mixed_precision}")
        self.bar = tqdm(total=self.total_steps, initial=run.progress.step, disable=not main, desc="train")
        self.bad_in_row = 0
        self.last_saved = run.progress.step if run.resumed_from is not None else -1
        self.clock, self.window_samples = time.perf_counter(), 0

    def after_step(self, stepped: bool, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Log, show and checkpoint a step; False when the run must stop (too many non-finite steps in a row)."""
        run, config, step = self.run, self.run.config, self.run.progress.step
        self.window_samples += run.samples_per_step
        self.bad_in_row = 0 if stepped else self.bad_in_row + 1
        if not stepped and self.bad_in_row >= config.max_bad_steps:
            if run.accelerator.is_main_process:
                self.log(f"error: {self.bad_in_row} non-finite losses in a row at step {step}; stopped "
                         f"(last good checkpoint: {latest_checkpoint(run.output) or 'none'}; lower --learning-rate "
                         "or check the shards)")
            return False
        if self.writer is not None and stepped and step % config.log_every == 0:
            self.write_scalars(float(step_loss.mean()), float(grad_norm))
        self.bar.update(1 if stepped else 0)
        self.bar.set_postfix(loss=f"{float(step_loss.mean()):.4f}", epoch=step // self.steps_per_epoch)
        if stepped and step % config.checkpoint_every == 0 and step != self.last_saved:
            self.checkpoint(export=True)
        return True

    def write_scalars(self, loss: float, grad_norm: float) -> None:
        assert self.writer is not None
        run, step = self.run, self.run.progress.step
        elapsed = time.perf_counter() - self.clock
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/learning_rate", run.lr_schedule.get_last_lr()[0], step)
        self.writer.add_scalar("train/grad_norm", grad_norm, step)
        self.writer.add_scalar("train/samples_per_second", self.window_samples / max(elapsed, 1e-9), step)
        self.writer.add_scalar("train/skipped_steps", run.progress.skipped, step)
        if run.accelerator.device.type == "cuda":
            self.writer.add_scalar("train/gpu_memory_gib", torch.cuda.max_memory_allocated() / 2**30, step)
        self.clock, self.window_samples = time.perf_counter(), 0

    def checkpoint(self, export: bool) -> None:
        """The resume state (every rank), then the EMA and raw weights in model/ (main process) when `export`."""
        run = self.run
        save_checkpoint(run.accelerator, run.output, run.progress, run.positions, run.config.keep_checkpoints, run.ema)
        self.last_saved = run.progress.step
        if export and run.accelerator.is_main_process:
            self.export()

    def export(self) -> None:
        run = self.run
        export_model(run.ema, run.accelerator.unwrap_model(run.model), run.config, run.spec, run.output,
                     run.progress.step)

    def stop(self, signum: int) -> None:
        """Stop on a signal (`StopRequests`): a checkpoint of the step reached, unless it has one or none was taken, then
        the line that says how to go on. The weights in model/ stay those of the last export (writing them could
        outlast the time a scheduler leaves between its signal and SIGKILL)."""
        run, step = self.run, self.run.progress.step
        if step not in (0, self.last_saved):
            self.checkpoint(export=False)
        self.close()
        if run.accelerator.is_main_process:
            saved = latest_checkpoint(run.output)
            self.log(f"stopped by {signal.Signals(signum).name} at step {step}"
                     f"{f'; resume state in {saved}' if saved else ''}: run the same command again to go on")

    def finish(self) -> None:
        """The final checkpoint (unless this step has one), the weights export and the closing log line."""
        run = self.run
        if run.progress.step != self.last_saved:
            self.checkpoint(export=False)
        if run.accelerator.is_main_process:
            self.export()
            self.log(f"done: step {run.progress.step}, {run.progress.skipped} skipped step(s); EMA and raw weights in "
                     f"{run.output / 'model'}")
        self.close()

    def close(self) -> None:
        """End the progress bar's line and flush the TensorBoard events: also when training stops on an error, whose
        line would otherwise land on the bar's."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


class RankRecorder:
    """--record-ranks (tests): what each rank trained on, to check data parallelism from outside.

    <output>/ranks/ids_rank{r}.txt: a line "epoch step clip_id" per sample consumed (appended across resumes);
    <output>/ranks/weights_rank{r}.safetensors: the rank's final weights, written by `save_weights` when a run ends
    normally. Use it as a context manager (the id file is closed on the way out, whatever happens)."""

    def __init__(self, output: Path, rank: int):
        self.folder, self.rank = output / "ranks", rank
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ids = open(self.folder / f"ids_rank{rank}.txt", "a", buffering=1,  # noqa: SIM115 - closed by __exit__
                        encoding="utf-8")  # line by line: a killed run keeps the lines of its steps

    def __enter__(self) -> RankRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.ids.close()

    def on_batch(self, epoch: int, step: int, clip_ids: list[str]) -> None:
        self.ids.write("".join(f"{epoch} {step} {clip_id}\n" for clip_id in clip_ids))

    def save_weights(self, model: torch.nn.Module) -> None:
        save_weights(model, self.folder / f"weights_rank{self.rank}.safetensors", float32=False)


def train_step(run: Run, micro_batches: Iterator[dict[str, Any]], scheduler: DDPMScheduler) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """One optimizer step over config.grad_accumulation micro-batches of this rank: (stepped, step loss, grad norm).

    Each micro-batch's `training_loss` goes backward divided by the accumulation count A, so the summed gradient is
    the gradient of the mean loss over all A x batch_size x ranks samples: the step of one batch that size (DDP
    averages over ranks). The gradients are all-reduced on the last micro-batch only; then the global norm is clipped
    to config.grad_clip and `optimizer_step` runs. step loss: the mean of the micro-batch losses, gathered from every
    rank (one entry per rank); grad norm: the total norm before clipping."""
    model, accelerator, config = run.model, run.accelerator, run.config
    model.train()
    losses = []
    for micro in range(config.grad_accumulation):
        batch = next(micro_batches)
        last = micro == config.grad_accumulation - 1  # gradients are all-reduced on the last micro-batch only
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = training_loss(model, scheduler, batch, config, device=accelerator.device)
            # a NaN loss still goes backward (every rank must join DDP's all-reduce); the step is dropped below
            accelerator.backward(loss / config.grad_accumulation)
        losses.append(loss.detach())
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
    step_loss = accelerator.gather(torch.stack(losses).mean()[None]).float()
    return optimizer_step(run, step_loss, grad_norm), step_loss, grad_norm


def train(config: TrainConfig, log: Any = print) -> int:
    """Train until config.max_steps (or epochs); returns the process exit code (0 ok, 1 stopped, 128 + the signal
    number when a STOP_SIGNALS signal stopped it at a step boundary with a checkpoint: `StopRequests`).

    config.global_batch > 0 sets grad_accumulation for the number of ranks launched (`resolve_global_batch`); the
    resolved config is what config.json records and what a resumed run is compared with."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config = resolve_global_batch(config, world_size)
    spec, paths, index = check_inputs(config, world_size)
    accelerator = make_accelerator(config)
    # one training per output folder: a second one would interleave its checkpoints with the first's
    lock = folder_lock(Path(config.output), "training") if accelerator.is_main_process else contextlib.nullcontext()
    try:
        with lock, StopRequests() as stops:
            return _train(config, accelerator, spec, paths, index, log, stops)
    except FolderBusy as error:
        raise ConfigError(str(error)) from None


def _train(config: TrainConfig, accelerator: Accelerator, spec: ShardSpec, paths: list[Path],
           index: list[tuple[Path, int]], log: Any, stops: StopRequests) -> int:
    count = sum(found for _, found in index)
    world = accelerator.num_processes
    trained = data.samples_per_epoch(count, world, config.num_workers, config.batch_size)  # P batches a stream
    run = start_run(config, spec, accelerator, log, trained)  # a checkpoint it cannot resume: config.json as it was
    if accelerator.is_main_process:
        fingerprint = data_fingerprint(Path(config.shards), paths)
        write_atomically(Path(config.output) / "config.json",
                         resolved_json(config, spec, data_fingerprint=fingerprint, world_size=accelerator.num_processes))
        log(global_batch_line(config, accelerator.num_processes))
        floor_note = sam_floor_note(config)
        if floor_note:
            log(floor_note)
    progress, rank = run.progress, accelerator.process_index
    stream = iter(data.make_loader(paths, config, run.positions, pin_memory=accelerator.device.type == "cuda",
                                   ignore_stop_signals=True, rank=rank, world=world, index=index))
    scheduler = noise_scheduler(config)
    books = Bookkeeping(run, count, trained, log)
    # the loader's workers end with the loop, also on an error: they ignore SIGTERM, and the interpreter's exit,
    # which would terminate and join them, waited for them forever while the traceback held the loader
    with contextlib.closing(cast(Any, stream)), contextlib.closing(books), RankRecorder(run.output, rank) if config.record_ranks else contextlib.nullcontext() as ranks:

        def micro_batches() -> Iterator[dict[str, Any]]:
            while True:
                batch, epoch = next_batch(stream, run)
                if ranks is not None:
                    ranks.on_batch(epoch, progress.step, batch["id"])
                yield batch

        batches = micro_batches()
        while progress.step < books.total_steps:
            signum = stops.agreed(accelerator)
            if signum:
                books.stop(signum)
                return 128 + signum
            stepped, step_loss, grad_norm = train_step(run, batches, scheduler)
            if not books.after_step(stepped, step_loss, grad_norm):
                return 1
        books.finish()
        if ranks is not None:
            ranks.save_weights(accelerator.unwrap_model(run.model))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def exported_step(path: Path) -> int | None:
    """The training step recorded in an exported weight file (None: not recorded, or the file does not read)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            step = (file.metadata() or {}).get("step")
    except (OSError, safetensors.SafetensorError):
        return None
    return int(step) if step is not None and step.isdigit() else None


def _warn_of_another_step(path: Path, other: Path) -> None:
    """One warning line when the run's other weight file records another step: an export was cut short between
    the two (a crash, a full disk), and the file loaded may be the older one."""
    mine, theirs = exported_step(path), exported_step(other) if other.exists() else None
    if mine is not None and theirs is not None and mine != theirs:
        print(f"warning: {path} holds the weights of step {mine}, {other.name} beside it those of step {theirs} (an "
              "export was cut short); run the training command again to export both", file=sys.stderr)


def load_model(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu",
               weights: Literal["ema", "raw"] = "ema") -> tuple[VTASAM, TrainConfig]:
    """A run's model in eval mode: its EMA (model/ema.safetensors, the default) or its raw online weights
    (model/raw.safetensors, what VTA-LDM evaluates), with the run's config (model/config.json)."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be ema or raw, got {weights!r}")
    folder = Path(run_dir) / "model"
    path = folder / f"{weights}.safetensors"
    if not path.exists():
        if weights == "raw" and (folder / "ema.safetensors").exists():
            raise FileNotFoundError(f"{path}: missing (the run exported only its EMA weights; train or resume it once "
                                    "more to export the raw weights)")
        raise FileNotFoundError(f"{path}: missing ({NOT_EXPORTED})")
    _warn_of_another_step(path, folder / f"{'raw' if weights == 'ema' else 'ema'}.safetensors")
    config_path = folder / "config.json"
    try:
        resolved = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(resolved, dict) or not isinstance(resolved.get("spec"), dict):
            raise ValueError("not a run's model config (no 'spec' object)")
        config = TrainConfig.from_dict(resolved)
        spec = ShardSpec.from_dict(resolved["spec"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_path}: missing ({NOT_EXPORTED})") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:  # JSONDecodeError too
        raise ValueError(f"{config_path}: unreadable ({one_line(error)})") from None
    # the file's tensor names and shapes against the model's, before the model takes memory: a config with
    # absurd sizes, or weights of another model, is refused here
    try:
        with torch.device("meta"):
            shell = VTASAM(config, spec)
    # sizes the UNet cannot be built with (not divisible by its groups; too large for a tensor: torch's RuntimeError)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{config_path}: describes no buildable model ({one_line(error)})") from None
    shell_state = shell.state_dict()
    expected = {name: tuple(tensor.shape) for name, tensor in shell_state.items()}
    try:
        header = safetensors_header(path)
    except (OSError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path}: unreadable ({one_line(error)})") from None
    stored = {name: shape for name, (_, shape) in header.items()}
    not_float = non_float_tensor(header, {name for name, tensor in shell_state.items() if tensor.is_floating_point()})
    if not_float:
        raise ValueError(f"{path}: {not_float}")
    if stored != expected:
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        shapes = sorted(k for k in set(stored) & set(expected) if stored[k] != expected[k])
        first = (f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model does not" if extra
                 else f"{shapes[0]} is {list(stored[shapes[0]])}, the model's {list(expected[shapes[0]])}")
        raise ValueError(f"{path}: not the weights of the model in {config_path} ({first}; {len(missing)} missing, "
                         f"{len(extra)} unknown, {len(shapes)} of other shapes)")
    model = VTASAM(config, spec)
    try:
        state = safetensors.torch.load_file(str(path), device="cpu")
    except (OSError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path}: unreadable ({one_line(error)})") from None
    model.load_state_dict(state)
    return model.to(device).eval(), config
