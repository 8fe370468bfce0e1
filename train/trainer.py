"""The training loop: accelerate (DDP, mixed precision), EMA, checkpoints, resume, logs.

Run folder (config.output):
    config.json                       the resolved TrainConfig (+ the shards' spec)
    checkpoints/step_00000100/        full resume state: accelerate save_state (model, optimizer, LR schedule,
                                      RNG of every rank) + EMA + step counters + data_rank<r>.json
    model/ema.safetensors, config.json  EMA inference weights: what `train.load_model` reads
    logs/                             TensorBoard
Resume = run the same command again: the newest complete checkpoint is loaded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import shards
from common.devices import tune_backends
from shards import ShardSpec
from train import data
from train.config import TrainConfig
from train.diffusion import diffusion_loss, noise_scheduler, sample_latents, training_target
from train.model import VTASAM
from train.speed import speed_up

# fields that may change when a run is resumed (they do not change what is being trained)
# (not channels_last: the optimizer's saved moments keep the layout they were made in, and fused AdamW needs
# them in the parameters' layout)
RESUMABLE_CHANGES = {"max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every", "max_bad_steps", "num_workers",
                     "compile"}
COMPLETE = "complete"  # marker file written last into a checkpoint folder


class ConfigError(RuntimeError):
    """A configuration that does not fit the data or the run folder (one line)."""


@dataclass
class Progress:
    """Counters saved with every checkpoint (registered with accelerate)."""

    step: int = 0  # optimizer steps taken
    skipped: int = 0  # optimizer steps skipped because of a non-finite loss or gradient
    samples: int = 0  # training samples consumed by all ranks
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped, "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.skipped, self.samples = state["step"], state["skipped"], state["samples"]


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


def check_inputs(config: TrainConfig, world_size: int) -> tuple[ShardSpec, list[Path], int]:
    """Everything that can be wrong with the data or the run folder, before any training starts."""
    spec, paths = data.check_shards(config)
    meta = Path(config.shards) / "meta.json"
    for name in ("embed_dim", "num_frames"):
        if getattr(spec, name) != getattr(config, name):
            raise ConfigError(f"{meta}: shards have {name} {getattr(spec, name)}, the {config.preset!r} preset expects "
                              f"{getattr(config, name)} (pick the preset of the features or pass --{name.replace('_', '-')})")
    if len(paths) < world_size:
        raise ConfigError(f"{config.shards}: {len(paths)} shard(s) for {world_size} ranks (each rank needs at least one)")
    count = data.count_split(Path(config.shards), config.split)
    if count < world_size * config.batch_size * config.grad_accumulation:
        raise ConfigError(f"{config.shards}: {count} sample(s) of split {config.split!r}, fewer than one step needs "
                          f"({world_size} ranks x batch {config.batch_size} x accumulation {config.grad_accumulation})")
    saved = Path(config.output) / "config.json"
    if saved.exists():
        old = json.loads(saved.read_text(encoding="utf-8"))
        mine = json.loads(json.dumps(config.to_dict()))
        differs = sorted(k for k in mine if k not in RESUMABLE_CHANGES and old.get(k) != mine[k])
        if differs and latest_checkpoint(Path(config.output)) is not None:
            raise ConfigError(f"{saved}: the run there was trained with other {', '.join(differs)}; "
                              "use another --output or the same settings to resume")
    return spec, paths, count


def latest_checkpoint(output: Path) -> Path | None:
    found = sorted(p for p in (output / "checkpoints").glob("step_*") if (p / COMPLETE).exists())
    return found[-1] if found else None


def resolved_json(config: TrainConfig, spec: ShardSpec) -> str:
    return json.dumps({**config.to_dict(), "spec": spec.to_dict()}, indent=2, sort_keys=True) + "\n"


def export_ema(ema: VTASAM, config: TrainConfig, spec: ShardSpec, output: Path) -> None:
    """model/ema.safetensors + model/config.json, written atomically, and model/features.json: the shards'
    meta.json (stage-one config and checkpoints), so generation can rebuild the same feature extractors after
    the run folder has moved away from its shards."""
    folder = output / "model"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in ema.state_dict().items()}
    safetensors.torch.save_file(tensors, str(folder / "ema.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(folder / "ema.safetensors.tmp", folder / "ema.safetensors")
    (folder / "config.json").write_text(resolved_json(config, spec), encoding="utf-8")
    meta = Path(config.shards) / shards.META_FILE
    if meta.is_file():
        (folder / "features.json.tmp").write_text(meta.read_text(encoding="utf-8"), encoding="utf-8")
        os.replace(folder / "features.json.tmp", folder / "features.json")


def save_checkpoint(accelerator: Accelerator, output: Path, progress: Progress, positions: dict[int, tuple[int, int]],
                    keep: int) -> Path:
    """Full resume state in checkpoints/step_N (written to step_N.tmp first, renamed when complete)."""
    final = output / "checkpoints" / f"step_{progress.step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    position_file = tmp / f"data_rank{accelerator.process_index}.json"
    position_file.write_text(json.dumps({str(w): list(p) for w, p in positions.items()}), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE).write_text(str(progress.step), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(p for p in final.parent.glob("step_*") if p.suffix != ".tmp")
        for stale in old[: max(0, len(old) - keep)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def batch_conditions(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The conditions of a batch on `device` (asynchronous copies from pinned memory on CUDA)."""
    return {name: batch[name].to(device, non_blocking=True) for name in shards.CONDITION_NAMES}


def train(config: TrainConfig, log: Any = print) -> int:
    """Train until config.max_steps (or epochs); returns the process exit code (0 ok, 1 stopped)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    spec, paths, count = check_inputs(config, world_size)
    cpu = config.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision="no" if cpu else config.mixed_precision,  # autocast to bf16 on the CPU is slow, not tested
        step_scheduler_with_optimizer=False,  # we step the LR schedule once per optimizer step ourselves
    )
    output = Path(config.output)
    steps_per_epoch = max(1, count // (accelerator.num_processes * config.batch_size * config.grad_accumulation))
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(resolved_json(config, spec), encoding="utf-8")

    set_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = VTASAM(config, spec)
    ema = copy.deepcopy(model).requires_grad_(False)
    tune_backends(accelerator.device)
    speed_up(model.to(accelerator.device), config.channels_last, config.compile)  # the EMA copy stays plain
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(config.adam_betas[0], config.adam_betas[1]),
                                  weight_decay=config.weight_decay,
                                  fused=accelerator.device.type == "cuda")  # one kernel for all parameters
    warmup = config.warmup_steps
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)
    ema.to(accelerator.device)
    progress = Progress()
    accelerator.register_for_checkpointing(ema, progress)

    # noise, timesteps and dropped conditions differ per rank; a resumed run restores these generators instead
    set_seed(config.seed + 1000 * accelerator.process_index)
    positions: dict[int, tuple[int, int]] = {}
    checkpoint = latest_checkpoint(output)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        position_file = checkpoint / f"data_rank{accelerator.process_index}.json"
        positions = {int(w): (p[0], p[1]) for w, p in json.loads(position_file.read_text(encoding="utf-8")).items()}
        if accelerator.is_main_process:
            log(f"resuming from {checkpoint} at step {progress.step}")
    loader = data.make_loader(paths, config, positions, pin_memory=accelerator.device.type == "cuda")

    scheduler = noise_scheduler(config)
    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output / "logs"))
        log(f"{count} {config.split} samples, {steps_per_epoch} steps per epoch, training to step {total_steps} "
            f"on {accelerator.num_processes} process(es), {accelerator.device}, mixed precision {accelerator.mixed_precision}")
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_main_process, desc="train")
    stream = iter(loader)
    id_log = None
    if config.record_ranks:
        (output / "ranks").mkdir(parents=True, exist_ok=True)
        id_log = open(output / "ranks" / f"ids_rank{accelerator.process_index}.txt", "a", encoding="utf-8")
    bad_in_row = 0
    last_saved = progress.step if checkpoint is not None else -1
    clock, window_samples = time.perf_counter(), 0
    while progress.step < total_steps:
        model.train()
        losses = []
        for micro in range(config.grad_accumulation):
            try:
                batch = next(stream)
            except StopIteration:
                raise data.DataError(f"{config.shards}: rank {accelerator.process_index} ran out of data") from None
            worker, epoch, consumed = (int(x) for x in batch["position"])
            positions[worker] = (epoch, consumed)
            if id_log is not None:
                id_log.write("".join(f"{epoch} {progress.step} {clip_id}\n" for clip_id in batch["id"]))
            mean = batch["latent_mean"].to(accelerator.device, non_blocking=True)
            std = batch["latent_std"].to(accelerator.device, non_blocking=True)
            z0 = sample_latents(mean, std if config.posterior_sample else None, config.vae_scaling_factor)
            noise = torch.randn_like(z0)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
            drop = torch.rand(z0.shape[0], device=z0.device) < config.uncond_probability
            noisy = scheduler.add_noise(z0, noise, timesteps)
            sync = micro == config.grad_accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                prediction = model(noisy, timesteps, batch_conditions(batch, accelerator.device), drop)
                loss = diffusion_loss(prediction, training_target(scheduler, z0, noise, timesteps), timesteps,
                                      scheduler, config.min_snr_gamma)
                # a NaN loss still goes backward (every rank must join DDP's all-reduce); the step is dropped below
                accelerator.backward(loss / config.grad_accumulation)
            losses.append(loss.detach())
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        step_loss = accelerator.gather(torch.stack(losses).mean()[None]).float()
        window_samples += config.batch_size * config.grad_accumulation * accelerator.num_processes
        if bool(torch.isfinite(step_loss).all()) and math.isfinite(float(grad_norm)):
            optimizer.step()
            lr_schedule.step()
            progress.step += 1
            ema_update(accelerator.unwrap_model(model), ema, ema_decay(config, progress.step))
            bad_in_row = 0
        else:
            progress.skipped += 1
            bad_in_row += 1
            if bad_in_row >= config.max_bad_steps:
                optimizer.zero_grad(set_to_none=True)
                if id_log is not None:
                    id_log.close()
                kept = latest_checkpoint(output)
                if accelerator.is_main_process:
                    log(f"error: {bad_in_row} non-finite losses in a row at step {progress.step}; stopped "
                        f"(last good checkpoint: {kept or 'none'}; lower --learning-rate or check the shards)")
                return 1
        optimizer.zero_grad(set_to_none=True)
        progress.samples += config.batch_size * config.grad_accumulation * accelerator.num_processes

        if writer is not None and bad_in_row == 0 and progress.step % config.log_every == 0:
            elapsed = time.perf_counter() - clock
            writer.add_scalar("train/loss", float(step_loss.mean()), progress.step)
            writer.add_scalar("train/learning_rate", lr_schedule.get_last_lr()[0], progress.step)
            writer.add_scalar("train/grad_norm", float(grad_norm), progress.step)
            writer.add_scalar("train/samples_per_second", window_samples / max(elapsed, 1e-9), progress.step)
            writer.add_scalar("train/skipped_steps", progress.skipped, progress.step)
            if torch.cuda.is_available() and not cpu:
                writer.add_scalar("train/gpu_memory_gib", torch.cuda.max_memory_allocated() / 2**30, progress.step)
            clock, window_samples = time.perf_counter(), 0
        bar.update(1 if bad_in_row == 0 else 0)
        bar.set_postfix(loss=f"{float(step_loss.mean()):.4f}", epoch=progress.step // steps_per_epoch)
        if bad_in_row == 0 and progress.step % config.checkpoint_every == 0 and progress.step != last_saved:
            save_checkpoint(accelerator, output, progress, positions, config.keep_checkpoints)
            last_saved = progress.step
            if accelerator.is_main_process:
                export_ema(ema, config, spec, output)
    if progress.step != last_saved:
        save_checkpoint(accelerator, output, progress, positions, config.keep_checkpoints)
    if accelerator.is_main_process:
        export_ema(ema, config, spec, output)
        if writer is not None:
            writer.close()
        log(f"done: step {progress.step}, {progress.skipped} skipped step(s); EMA weights in {output / 'model'}")
    bar.close()
    if id_log is not None:
        id_log.close()
        weights = {k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        safetensors.torch.save_file(weights, str(output / "ranks" / f"weights_rank{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def load_model(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[VTASAM, TrainConfig]:
    """The EMA model of a run (runs/<name>/model/ema.safetensors + config.json), in eval mode."""
    folder = Path(run_dir) / "model"
    if not (folder / "ema.safetensors").exists():
        raise FileNotFoundError(f"{folder / 'ema.safetensors'}: missing (has the run saved a checkpoint yet?)")
    resolved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = TrainConfig.from_dict(resolved)
    model = VTASAM(config, ShardSpec.from_dict(resolved["spec"]))
    model.load_state_dict(safetensors.torch.load_file(str(folder / "ema.safetensors"), device="cpu"))
    return model.to(device).eval(), config
