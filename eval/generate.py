"""Generation for evaluation: one 16 kHz WAV per test clip, from the EMA or the raw weights of a training run
(`EvalConfig.model_weights`: model/ema.safetensors or model/raw.safetensors, read by `train.load_model`).

Per clip: the conditions of its shard sample (`shards.sample_conditions`: CLIP frames, caption, O_t of Eq. 1) ->
classifier-free-guided sampling (`train.sample` with the config's sampler: DDIM, ancestral DDPM as VTA-LDM, or
DPM-Solver++; latents in the VAE's scaled space) -> divided by the run's
`vae_scaling_factor` -> AudioLDM VAE decoder -> log mel (B, 1024, 64) -> AudioLDM HiFi-GAN -> waveform, cut to
the clip's length (json 'duration': seconds of video from 'start', capped at the window) -> scaled to
`peak` when the config asks (no preset does: published evaluators measure the vocoder's output as it is).

Reproducible: each clip's noise comes from a generator seeded with (seed, clip id), so a clip's audio does not
depend on which clips share its batch (up to float rounding), nor on how many were generated before a crash.
Resumable: clips whose WAV exists are skipped; WAVs are written under a temporary name and renamed. Because a
skipped WAV must have been made the way the new ones are, <output>/wav/manifest.json records every setting the
audio depends on (sampler, steps, guidance, seed, peak, checksums of the model, the VAE and the shards' config);
generating into a folder whose manifest differs is refused. The model's checksum is that of the weights file
actually loaded, so raw-weight WAVs are never added to a folder of EMA-weight WAVs (nor the reverse). The VAE
and vocoder are rebuilt from the stage-one config stored in the shards' meta.json (`random_init` tiny models, or
the weights folder).

Which clips are generated, and where their WAVs go: `eval.clips`. This module also reads back what a folder of
WAVs says about its generation (manifest, rate, recorded failures, which weights file and which timesteps) for
results.json.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import time
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from tqdm import tqdm

import shards
import train
from audio_models.config import AudioModelConfig
from audio_models.decoder import Decoder
from common.devices import precision_name, resolve_device, resolve_precision, tune_backends
from common.weights import sha256_file
from eval.clips import WAV_DIR, EvalError, iterate_split_samples, shards_config_sha256, wav_path
from eval.config import MODEL_WEIGHTS, EvalConfig, ModelWeights
from train.config import TrainConfig
from train.denoiser import release_graphs
from train.diffusion import sampling_scheduler, steps_problem
from train.speed import lower_precision_weights, sampling_channels_last, speed_up

MANIFEST_FILE = "manifest.json"  # in WAV_DIR: the settings that made its WAVs
log = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: the UNet's sampling precision is recorded
# recorded since (an older manifest without them is taken to say this run's, with a warning; a version bump would
# refuse every folder made before): the vocoder's weights and the decoder's config files
LATER_MANIFEST_KEYS = frozenset({"vocoder", "decoder_configs"})
GENERATION_FAILURES = "generation_failures.jsonl"
SAMPLING_BATCHES = (4, 8, 16, 32, 64)  # tried by `measure_sampling_batch` (--sampling-batch 0 on CUDA)
PROBE_STEPS = 4
# manifest settings that results.json's protocol repeats at its top level (table and report)
GENERATION_KNOBS = ("sampler", "steps", "guidance", "seed", "samples_per_clip", "peak", "checkpoint_sha256", "vae",
                    "vae_scaling_factor", "inputs", "scheme", "train_preset")


def clip_seed(seed: int, clip_id: str) -> int:
    """A 63-bit seed from (seed, clip id): the first 8 bytes of sha256('<seed>/<id>')."""
    digest = hashlib.sha256(f"{seed}/{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def audio_model_config(folder: str | Path) -> AudioModelConfig:
    """The VAE and vocoder of the stage-one config stored in meta.json: they made (and decode) the latents."""
    meta = shards.read_meta(folder)
    if "config" not in meta:
        raise EvalError(f"{Path(folder) / shards.META_FILE}: no stage-one 'config' in it; cannot tell which AudioLDM "
                        "VAE and vocoder decode these latents")
    config = meta["config"]
    try:
        if not isinstance(config, dict):
            raise TypeError(f"'config' is a {type(config).__name__}, not an object")
        return AudioModelConfig.from_features(config)
    except (TypeError, ValueError) as error:  # a field of another type (huggingface_hub's strict dataclasses too)
        reason = " ".join(str(error).split())[:300]
        raise EvalError(f"{Path(folder) / shards.META_FILE}: unreadable stage-one config ({reason})") from None


# ----------------------------------------------------------------------------------------------------------------
# Latents -> mel -> waveform
# ----------------------------------------------------------------------------------------------------------------
def load_decoder(cfg: AudioModelConfig, weights_dir: Path | None, device: torch.device, scaling_factor: float) -> Decoder:
    try:
        return Decoder(cfg, weights_dir, device, scaling_factor)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise EvalError(str(error).splitlines()[0]) from None


def check_decoder_checkpoint(folder: str | Path, checksum: str, weights: Path | None,
                             config_checksum: str | None = None) -> None:
    """EvalError unless the VAE loaded here is the one whose latents the shards hold (meta.json's
    models.vae.checksum, and its config_checksum where recorded): another AudioLDM VAE of the same shapes, or the
    same weights under another config.json, would decode them into other audio, silently."""
    recorded = shards.recorded_model(shards.read_meta(folder), "vae")
    want = recorded.get("checksum")
    where = f"the weights in {weights}" if weights is not None else "the random-init VAE"
    if want is not None and want != checksum:
        raise EvalError(f"{Path(folder) / shards.META_FILE}: the latents were made by VAE checkpoint {str(want)[:12]}..., "
                        f"but {where} hold {checksum[:12]}...: give the --weights folder stage one used")
    if shards.config_differs(recorded, config_checksum):
        raise EvalError(f"{Path(folder) / shards.META_FILE}: the latents were made by a VAE with another config.json "
                        f"than {where} hold (same weights): give the --weights folder stage one used")


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int, software: str = "", tmp: Path | None = None) -> None:
    """16-bit PCM mono WAV written to a temporary name (`tmp`, else `<name>.tmp`: a name of its own where another
    process may write the same file) and renamed (a crash never leaves half a WAV); `software`, when given, goes
    into its INFO chunk (ISFT), where a later run recognises its own files. The WAV is made in memory and written
    by Python, so a full or read-only disk is an OSError with its errno (libsndfile says only 'System error')."""
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", sample_rate, 1, "PCM_16", format="WAV") as handle:
        if software:
            handle.software = software
        handle.write(np.clip(waveform, -1.0, 1.0))
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(buffer.getvalue())
    except BaseException:  # also Ctrl-C: no half-written file stays behind (but never a folder of that name)
        if tmp.is_file():
            tmp.unlink()
        raise
    os.replace(tmp, path)


def sample_batch(model: train.VTASAM, conditions: dict[str, torch.Tensor], generators: list[torch.Generator],
                 config: EvalConfig, precision: torch.dtype | None = None, pad_to: int = 0,
                 cuda_graph: bool = False) -> torch.Tensor:
    """Latents for a batch whose row i draws its noise from generators[i] alone (one batched `train.sample` call;
    a single generator would make a clip's noise depend on its batch mates).

    pad_to: a batch with fewer rows is padded to this many (copies of its last row, with generators of their
    own) and the padding is dropped from the result, so that every call has the same shapes: a compiled UNet
    (--compile, static shapes) then never recompiles, and a CUDA graph (cuda_graph) is never captured again, for
    the last, smaller batch. Each real row's latents are those it gets unpadded (its noise comes from its own
    generator)."""
    rows = len(generators)
    if pad_to > rows:
        extra = pad_to - rows
        conditions = {k: torch.cat([v, v[-1:].expand(extra, *v.shape[1:])]) for k, v in conditions.items()}
        device = next(iter(conditions.values())).device
        generators = [*generators, *(torch.Generator(device).manual_seed(k) for k in range(extra))]
    latents = train.sample(model, conditions, steps=config.steps, guidance=config.guidance, scheduler=config.sampler,
                           generator=generators, precision=precision, cuda_graph=cuda_graph)
    return latents[:rows]


def pick_sampling_batch(seconds_per_clip: dict[int, float], tolerance: float = 0.03) -> int:
    """The smallest batch whose seconds per clip are within `tolerance` of the fastest's: a smaller batch pads
    less of the last batch and holds less memory for the same speed."""
    fastest = min(seconds_per_clip.values())
    return min(b for b, s in seconds_per_clip.items() if s <= fastest * (1 + tolerance))


def measure_sampling_batch(model: train.VTASAM, spec: shards.ShardSpec, config: EvalConfig,
                           precision: torch.dtype | None, device: torch.device, clips: int,
                           cuda_graph: bool) -> dict[str, Any]:
    """Seconds per clip and sampler step of the guided sampler (config's sampler, guidance and precision, random
    conditions) at each batch of SAMPLING_BATCHES up to `clips`, in increasing order, and the batch
    `pick_sampling_batch` chooses from them. A batch is timed over PROBE_STEPS steps after a warm-up call (which
    also captures its CUDA graph); the search stops at CUDA out-of-memory or at the first batch slower per clip
    than the best so far by more than 3%. The probe's graphs are released afterwards. Meant for CUDA, where a
    batch's cost is not proportional to its size; it costs a few seconds against minutes of sampling."""
    candidates = [b for b in SAMPLING_BATCHES if b <= clips] or [max(1, clips)]
    seconds: dict[int, float] = {}
    stopped = "tried every batch"
    for batch in candidates:
        g = torch.Generator().manual_seed(batch)
        conditions = {c.name: torch.randn(batch, *c.shape(spec), generator=g).to(device) for c in shards.CONDITIONS}

        def run(steps: int, rows: int = batch, conditions: dict[str, torch.Tensor] = conditions) -> None:
            generators = [torch.Generator(device).manual_seed(k) for k in range(rows)]
            train.sample(model, conditions, steps=steps, guidance=config.guidance, scheduler=config.sampler,
                         generator=generators, precision=precision, cuda_graph=cuda_graph)

        try:
            run(2)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run(PROBE_STEPS)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[batch] = (time.perf_counter() - start) / PROBE_STEPS / batch
        except torch.OutOfMemoryError:
            stopped = f"CUDA out of memory at batch {batch}"
            break
        finally:
            release_graphs(model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if seconds[batch] > min(seconds.values()) * 1.03:
            stopped = f"batch {batch} was slower per clip"
            break
    if not seconds:
        raise EvalError(f"CUDA out of memory sampling {candidates[0]} clip(s) at a time; free GPU memory")
    return {"sampling_batch": pick_sampling_batch(seconds), "probe_steps": PROBE_STEPS, "probe_stopped": stopped,
            "seconds_per_clip_step": {str(b): round(s, 6) for b, s in seconds.items()}}


# ----------------------------------------------------------------------------------------------------------------
# The manifest: what the WAVs of a folder were generated with
# ----------------------------------------------------------------------------------------------------------------
def generation_manifest(config: EvalConfig, train_config: Any, decoder: Decoder, spec: shards.ShardSpec,
                        precision: str = "fp32") -> dict[str, Any]:
    """Every setting a generated WAV depends on (JSON-normalised, so it compares equal to its file's copy)."""
    manifest = {
        "manifest_version": MANIFEST_VERSION, **run_info(config.run, config.model_weights),
        "vae": decoder.checksum, "vae_scaling_factor": train_config.vae_scaling_factor,
        "vocoder": decoder.vocoder_checksum, "decoder_configs": decoder.config_checksums,
        "object_threshold": train_config.object_threshold,
        "shards_config_sha256": shards_config_sha256(config.shards), "split": config.split,
        "sampler": config.sampler, "steps": config.steps, "guidance": config.guidance, "seed": config.seed,
        "samples_per_clip": 1, "peak": config.peak, "precision": precision,
        "sample_rate": decoder.sample_rate, "window_seconds": spec.window_seconds,
    }
    return json.loads(json.dumps(manifest))


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """<out>/wav/manifest.json, None when absent; EvalError when it cannot be read."""
    path = out_dir / WAV_DIR / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EvalError(f"{path}: unreadable ({error}); choose another --output or delete {path.parent}") from None
    if manifest is not None and not isinstance(manifest, dict):
        raise EvalError(f"{path}: unreadable (not a JSON object); choose another --output or delete {path.parent}")
    return manifest


def claim_wav_dir(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Refuse to add WAVs to a folder whose WAVs were made otherwise; then write `manifest` there (atomically).

    A folder with WAVs but no manifest was filled by something else (older code, a copy): its settings are
    unknown, so it is refused as well. An empty folder takes the new manifest whatever the old one said.
    """
    wav_dir = out_dir / WAV_DIR
    existing = recorded = read_manifest(out_dir)
    has_wavs = any(wav_dir.glob("*.wav"))
    fix = f"choose another --output or delete {wav_dir}"
    unrecorded = sorted(LATER_MANIFEST_KEYS - existing.keys()) if existing is not None else []
    if has_wavs and existing is not None and unrecorded:  # written before these were recorded: cannot be told apart
        log.warning("warning: %s does not record %s (written by an older version): its WAVs are taken as made with "
                    "this run's", wav_dir / MANIFEST_FILE, ", ".join(unrecorded))
        existing = {**existing, **{k: manifest.get(k) for k in unrecorded}}
    if has_wavs and existing is None:
        raise EvalError(f"{wav_dir}: holds WAVs but no {MANIFEST_FILE}, so the settings that made them are unknown; {fix}")
    if has_wavs and existing != manifest:
        assert existing is not None
        differs = [f"{k} {existing.get(k)!r} -> {manifest.get(k)!r}" for k in sorted(existing.keys() | manifest.keys())
                   if existing.get(k) != manifest.get(k)]
        raise EvalError(f"{wav_dir / MANIFEST_FILE}: its WAVs were generated with other settings "
                        f"({', '.join(differs)}); {fix}")
    if recorded != manifest:
        tmp = wav_dir / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, wav_dir / MANIFEST_FILE)


def generate(config: EvalConfig, clips: list[shards.SampleMeta], progress: bool = True,
             claimed: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write <output>/wav/<id>.wav for every clip that has none yet, after checking (or writing) the folder's
    manifest; `claimed` is called once the folder is known to take this run's WAVs, before any is generated.
    Returns {"manifest": the settings of the folder's WAVs, "written": WAVs written by this call, "speed": the
    sampling batch (measured on CUDA with --sampling-batch 0: `measure_sampling_batch`), whether CUDA graphs
    replay the sampler step, the device; "decoded": the ids of the clips whose samples were decoded (and so
    validated against the schema)}.

    Clips whose audio comes out non-finite are recorded in <output>/generation_failures.jsonl, not written.
    """
    out_dir = config.output_dir
    (out_dir / WAV_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / WAV_DIR).glob("*.tmp"):  # left by a killed run (`evaluate` holds the folder's lock)
        stale.unlink()
    device = resolve_device(config.device)
    try:
        precision = resolve_precision(config.precision, device)
    except ValueError as error:
        raise EvalError(str(error)) from None
    model, train_config = load_run(config.run, device, config.model_weights)
    problem = steps_problem(train_config, config.steps)
    if problem:
        raise EvalError(f"--steps {config.steps}: {config.run}: {problem}")
    tune_backends(device)
    lower_precision_weights(model, precision)  # this model only samples, always under autocast to `precision`
    speed_up(model, sampling_channels_last(config.channels_last, device), config.compile)
    spec = shards.read_spec(config.shards)
    check_compatible(config, model.spec, spec)
    audio = audio_model_config(config.shards)
    weights = None if audio.random_init else Path(config.weights)
    decoder = load_decoder(audio, weights, device, train_config.vae_scaling_factor)
    check_decoder_checkpoint(config.shards, decoder.checksum, weights, decoder.vae.config_checksum)
    manifest = generation_manifest(config, train_config, decoder, spec, precision_name(precision))
    claim_wav_dir(out_dir, manifest)
    if claimed is not None:
        claimed()
    graphs = config.cuda_graphs and device.type == "cuda" and not config.compile
    speed: dict[str, Any] = {"sampling_batch": config.sampling_batch or config.batch_size, "cuda_graphs": graphs,
                             "device": str(device)}
    info: dict[str, Any] = {"manifest": manifest, "written": 0, "speed": speed, "decoded": []}

    by_id = {c.id: c for c in clips}
    todo = [c.id for c in clips if not wav_path(out_dir, c.id).exists()]
    info["decoded"] = todo  # their samples are decoded, and so validated, on the way
    if not todo:
        return info
    if config.sampling_batch == 0 and device.type == "cuda" and not config.compile:  # compiling per batch: minutes
        speed |= measure_sampling_batch(model, spec, config, precision, device, len(todo), graphs)
    sampling = speed["sampling_batch"]
    failures_path = out_dir / GENERATION_FAILURES
    bar = tqdm(total=len(todo), unit="clip", desc="generating", disable=not progress, dynamic_ncols=True)
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        ids = [e["id"] for e in batch]
        conditions = shards.stack_conditions(batch, device)
        generators = [torch.Generator(device).manual_seed(clip_seed(config.seed, i)) for i in ids]
        # a compiled UNet and a CUDA graph keep one shape: the last batch is padded to the sampling batch
        latents = sample_batch(model, conditions, generators, config, precision,
                               pad_to=sampling if config.compile or graphs else 0, cuda_graph=graphs)
        waves = np.concatenate([decoder(part) for part in latents.split(config.batch_size)])
        for clip_id, wave in zip(ids, waves):
            length = min(wave.size, round(min(by_id[clip_id].duration, spec.window_seconds) * decoder.sample_rate))
            wave = wave[:length]
            if not np.isfinite(wave).all() or length == 0:
                shards.append_jsonl(failures_path, {"id": clip_id, "stage": "generate",
                                                    "reason": "non-finite or empty audio"})
                continue
            if config.peak > 0 and np.abs(wave).max() > 0:
                wave = wave * (config.peak / np.abs(wave).max())
            target = wav_path(out_dir, clip_id)
            try:
                write_wav(target, wave, decoder.sample_rate)
            except OSError as error:  # e.g. an id too long for a file name: this clip fails, the others go on
                with contextlib.suppress(OSError):
                    target.with_name(target.name + ".tmp").unlink(missing_ok=True)
                if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):  # nor the next
                    raise EvalError(f"{target}: cannot write ({error.strerror})") from None
                shards.append_jsonl(failures_path, {"id": clip_id, "stage": "generate",
                                                    "reason": f"cannot write {target.name} ({error.strerror or error})"})
                continue
            info["written"] += 1
        bar.update(len(batch))
        batch.clear()

    with bar:  # closed (its line ended) also when an error stops generation
        for sample in iterate_split_samples(config.shards, config.split, todo):
            # the conditions exactly as training derives them (`shards.conditions`)
            batch.append({"id": sample[shards.META_KEY]["id"],
                          **shards.sample_conditions(sample, train_config.object_threshold)})
            if len(batch) == sampling:
                flush()
        if batch:
            flush()
    return info


def load_run(run: str | Path, device: torch.device, model_weights: ModelWeights = "ema") -> tuple[Any, Any]:
    try:
        return train.load_model(run, device, weights=model_weights)
    except (FileNotFoundError, ValueError) as error:
        raise EvalError(str(error).splitlines()[0]) from None


def weights_file(run: str | Path, model_weights: ModelWeights) -> Path:
    """<run>/model/<ema|raw>.safetensors: the file `train.load_model(run, device, weights=model_weights)` reads."""
    return Path(run) / "model" / f"{model_weights}.safetensors"


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def weights_sha256(path: Path) -> str:
    """sha256_file of a weights file, computed once per (path, inode, size, modification time): generating, its
    manifest check and the report each ask for it, and a paper-size checkpoint takes seconds to hash. A new export
    is a new inode (written aside and renamed), so it is hashed afresh."""
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


def run_config(run: str | Path) -> dict[str, Any] | None:
    """The run's resolved training config (model/config.json), None when absent or unreadable."""
    try:
        resolved = json.loads((Path(run) / "model" / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return resolved if isinstance(resolved, dict) else None


def run_info(run: str | Path, model_weights: ModelWeights = "ema") -> dict[str, Any]:
    """What identifies the evaluated model: sha256 of the weights file that generates (`weights_file`) and its
    conditioning (model/config.json); empty when the run folder has no such file (the WAVs may come from
    elsewhere)."""
    path = weights_file(run, model_weights)
    if not path.exists():
        return {}
    info: dict[str, Any] = {"checkpoint_sha256": weights_sha256(path)}
    resolved = run_config(run)
    if resolved is None:
        return info
    info.update({k: resolved[k] for k in ("inputs", "scheme") if k in resolved})
    if "preset" in resolved:
        info["train_preset"] = resolved["preset"]
    return info


def spec_differences(trained: shards.ShardSpec, given: shards.ShardSpec) -> list[str]:
    """"<field> <trained> vs <given>" for each shape a model's conditions and latents depend on that differs."""
    fields = ("num_frames", "embed_dim", "latent_channels", "latent_time", "latent_freq", "sample_rate")
    return [f"{name} {getattr(trained, name)} vs {getattr(given, name)}" for name in fields
            if getattr(trained, name) != getattr(given, name)]


def check_compatible(config: EvalConfig, trained: shards.ShardSpec, test: shards.ShardSpec) -> None:
    """The model must have been trained on features shaped like the test shards'."""
    differs = spec_differences(trained, test)
    if differs:
        raise EvalError(f"{Path(config.shards) / shards.META_FILE}: the run {config.run} was trained on other features "
                        f"({', '.join(differs)})")


# ----------------------------------------------------------------------------------------------------------------
# What a folder of WAVs says about its generation (read by the evaluation, with or without generating)
# ----------------------------------------------------------------------------------------------------------------
def manifest_notes(config: EvalConfig, manifest: dict[str, Any] | None) -> list[str]:
    """Why the WAVs' settings may not be what results.json states: no manifest, or another checkpoint now."""
    if manifest is None:
        return [f"{WAV_DIR}/{MANIFEST_FILE} is missing: the settings that generated these WAVs are unknown"]
    now = run_info(config.run, config.model_weights).get("checkpoint_sha256")
    if now is not None and manifest.get("checkpoint_sha256") not in (None, now):
        return [f"the WAVs were generated by checkpoint {manifest.get('checkpoint_sha256')}, {config.run} now holds {now}"]
    return []


WAV_FORMATS = ("WAV", "WAVEX", "RF64", "W64")  # libsndfile's names of the WAV family


def wav_notes(out_dir: Path, clips: list[shards.SampleMeta], rate: int | None) -> list[str]:
    """What the WAVs' headers say that results.json's protocol does not: WAVs at another rate than `rate` (the
    generated_sample_rate recorded; they are resampled for each embedder, and drawn at their own rate), and files
    named .wav that are another format (libsndfile reads MP3, FLAC or Ogg too: a lossy copy is then scored).
    One line each, with a count and an example; unreadable WAVs are left to the failures."""
    other_rate: list[tuple[Path, int]] = []
    other_format: list[tuple[Path, str]] = []
    for clip in clips:
        path = wav_path(out_dir, clip.id)
        try:
            info = soundfile.info(path)
        except (soundfile.LibsndfileError, RuntimeError, OSError):
            continue
        if rate is not None and info.samplerate != rate:
            other_rate.append((path, int(info.samplerate)))
        if info.format not in WAV_FORMATS:
            other_format.append((path, str(info.format)))
    notes = []
    if other_rate:
        notes.append(f"{len(other_rate)} WAV(s) are at another rate than {rate} Hz (e.g. {other_rate[0][0]}: "
                     f"{other_rate[0][1]} Hz); each was resampled for the embedders")
    if other_format:
        notes.append(f"{len(other_format)} file(s) named .wav are another format (e.g. {other_format[0][0]}: "
                     f"{other_format[0][1]}); they were decoded and scored as they are")
    return notes


def generated_rate(out_dir: Path, clips: list[shards.SampleMeta], manifest: dict[str, Any] | None) -> int | None:
    """The rate of the generated WAVs: the manifest's, else the first readable WAV's header (None: no WAV)."""
    if manifest is not None and "sample_rate" in manifest:
        return int(manifest["sample_rate"])
    for clip in clips:
        try:
            return int(soundfile.info(wav_path(out_dir, clip.id)).samplerate)
        except (soundfile.LibsndfileError, RuntimeError, OSError):
            continue
    return None


def model_weights_of(config: EvalConfig, manifest: dict[str, Any] | None) -> str | None:
    """Which weights file of config.run made the WAVs: 'ema' or 'raw', the one whose sha256 is the manifest's
    checkpoint_sha256 (config.model_weights tried first); None when neither is (or there is no manifest)."""
    recorded = (manifest or {}).get("checkpoint_sha256")
    if recorded is None:
        return None
    for name in (config.model_weights, *(w for w in MODEL_WEIGHTS if w != config.model_weights)):
        if run_info(config.run, typing.cast(ModelWeights, name)).get("checkpoint_sha256") == recorded:
            return name
    return None


def sampler_schedule(train_config: TrainConfig, sampler: str, steps: int) -> dict[str, Any]:
    """The timesteps `train.sample` visits for this sampler and number of steps, and the diffusers settings
    that place them (timestep_spacing, steps_offset). Built as `train.sample` builds its solver
    (`sampling_scheduler`, then `set_timesteps(steps)`), so it states what the WAVs were sampled with.

    E.g. VTA-LDM's sampler (ariesssxu/vta-ldm, inference_from_video.py: DDPMScheduler.from_pretrained on SD 2.1's
    scheduler config, steps_offset 1, no timestep_spacing, so diffusers' default 'leading'; models.py
    AudioDiffusion.inference) at 300 steps over 1000 training steps: t = (1000 // 300) i + 1 for i = 299, ..., 0,
    from 898 down to 1 (diffusers, schedulers/scheduling_ddpm.py, DDPMScheduler.set_timesteps).
    """
    solver = sampling_scheduler(train_config, sampler)
    solver.set_timesteps(steps)
    timesteps = [int(t) for t in solver.timesteps]
    settings = solver.config
    return {"scheduler": type(solver).__name__, "num_train_timesteps": settings.num_train_timesteps,
            "timestep_spacing": settings.get("timestep_spacing"), "steps_offset": settings.get("steps_offset"),
            "variance_type": settings.get("variance_type"), "timesteps": len(timesteps),
            "first_timestep": timesteps[0], "last_timestep": timesteps[-1]}


def manifest_schedule(run: str | Path, manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """`sampler_schedule` of the manifest's sampler and steps with the run's noise schedule (model/config.json);
    None without a manifest or a readable run config."""
    resolved = run_config(run)
    if manifest is None or resolved is None or "sampler" not in manifest or "steps" not in manifest:
        return None
    try:
        return sampler_schedule(TrainConfig.from_dict(resolved), manifest["sampler"], int(manifest["steps"]))
    except (TypeError, ValueError):  # a config or sampler this version does not know
        return None


def generation_protocol(config: EvalConfig, clips: list[shards.SampleMeta], manifest: dict[str, Any] | None) -> dict[str, Any]:
    """What results.json's protocol states about generation: the WAVs' rate, the manifest's settings, which
    weights file of the run made them (`model_weights_of`) and the timesteps of their sampler
    (`manifest_schedule`); null when there is no manifest."""
    return {"generated_sample_rate": generated_rate(config.output_dir, clips, manifest),
            **{k: (manifest or {}).get(k) for k in GENERATION_KNOBS},
            "model_weights": model_weights_of(config, manifest),
            "sampler_schedule": manifest_schedule(config.run, manifest), "generation_manifest": manifest}


def unique_failures(failures: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (clip id, stage), the last one kept (generation_failures.jsonl grows over resumed runs),
    in the order of first appearance."""
    by_key: dict[tuple[Any, Any], dict[str, Any]] = {}
    for record in failures:
        key = (record.get("id"), record.get("stage"))
        by_key[key] = record
    return list(by_key.values())


def standing_failures(out_dir: Path, clips: list[shards.SampleMeta]) -> list[dict[str, Any]]:
    """The recorded generation failures of `clips` that still have no WAV (a later run may have written it)."""
    wanted = {c.id for c in clips}
    return [f for f in unique_failures(shards.read_jsonl(out_dir / GENERATION_FAILURES))
            if f.get("id") in wanted and not wav_path(out_dir, f["id"]).exists()]
