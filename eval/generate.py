"""Generation for evaluation: one 16 kHz WAV per test clip, from the EMA weights of a training run.

Per clip: the conditions of its shard sample (`train.data.to_example`: CLIP frames, caption, O_t of Eq. 1) ->
classifier-free-guided sampling (`train.sample`; latents in the VAE's scaled space) -> divided by the run's
`vae_scaling_factor` -> AudioLDM VAE decoder -> log mel (B, 1024, 64) -> AudioLDM HiFi-GAN -> waveform, cut to
the clip's length (json 'duration': seconds of video from 'start', capped at the window) -> scaled to
`peak` when the config asks (the demo does: the random tiny vocoder's output, ~1e-10, is below one 16-bit step).

Reproducible: each clip's noise comes from a generator seeded with (seed, clip id), so a clip's audio does not
depend on which clips share its batch (up to float rounding), nor on how many were generated before a crash. Resumable: clips whose
WAV exists are skipped; WAVs are written under a temporary name and renamed. The VAE and vocoder are rebuilt
from the stage-one config stored in the shards' meta.json (`random_init` tiny models, or the weights folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from tqdm import tqdm

import shards
import train
from eval.config import EvalConfig
from preprocess.config import FeatureConfig
from preprocess.encoders import AudioVAE, load_vocoder
from train.data import to_example

WAV_DIR = "wav"
GENERATION_FAILURES = "generation_failures.jsonl"


class EvalError(RuntimeError):
    """Unusable evaluation input (run folder, shards, weights): one line naming the file and the reason."""


@dataclass(frozen=True)
class TestClip:
    """What evaluation keeps of a test sample besides its features (the json of the shard sample)."""

    id: str
    source: str  # path of the original video
    start: float  # seconds into `source` where the window starts
    duration: float  # seconds of video from `start`, capped at the window
    caption: str
    nouns: tuple[str, ...]


def wav_path(out_dir: Path, clip_id: str) -> Path:
    """<out>/wav/<clip id>.wav ('/' in an id would nest folders: replaced by '_')."""
    return out_dir / WAV_DIR / (clip_id.replace("/", "_") + ".wav")


def clip_seed(seed: int, clip_id: str) -> int:
    """A 63-bit seed from (seed, clip id): the first 8 bytes of sha256('<seed>/<id>')."""
    digest = hashlib.sha256(f"{seed}/{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------------
# Reading the test split
# ----------------------------------------------------------------------------------------------------------------
def split_shards(folder: Path, split: str) -> list[Path]:
    """Shards that may hold `split`: stage one names its shards after the split (`{split}-...tar`); a folder whose
    shards are named otherwise is read whole (samples are then selected by their json 'split')."""
    named = shards.list_shards(folder, split)
    return named or shards.list_shards(folder)


def read_split(folder: str | Path, split: str) -> list[TestClip]:
    """The clips of `split`, in shard order, reading only the json member of each sample."""
    folder = Path(folder)
    if not (folder / shards.META_FILE).exists():
        raise EvalError(f"{folder / shards.META_FILE}: missing (not a stage-one output folder?)")
    clips = []
    for path in split_shards(folder, split):
        try:
            with tarfile.open(path, "r") as tar:
                for member in tar:
                    if not member.name.endswith("." + shards.META_KEY):
                        continue
                    handle = tar.extractfile(member)
                    meta = json.loads(handle.read()) if handle is not None else {}
                    if meta.get("split") == split:
                        clips.append(TestClip(
                            id=meta["id"], source=meta.get("source", ""), start=float(meta.get("start", 0.0)),
                            duration=float(meta["duration"]), caption=meta.get("caption", ""),
                            nouns=tuple(meta.get("nouns", ()))))
        except (tarfile.TarError, OSError, json.JSONDecodeError, KeyError) as error:
            raise EvalError(f"{path}: unreadable shard ({error})") from None
    return clips


def select_clips(clips: list[TestClip], max_clips: int) -> list[TestClip]:
    """The first `max_clips` clips by id (all when 0); sorted by id so that a subset is the same on every run."""
    ordered = sorted(clips, key=lambda c: c.id)
    ids = [c.id for c in ordered]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise EvalError(f"clip id {duplicate!r} appears twice in the split: WAVs are named by id")
    return ordered[:max_clips] if max_clips else ordered


def iterate_split_samples(folder: str | Path, split: str, ids: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of `split` (restricted to `ids` when given), in shard order."""
    wanted = None if ids is None else set(ids)
    for sample in shards.iterate_samples(split_shards(Path(folder), split)):
        meta = sample[shards.META_KEY]
        if meta.get("split") == split and (wanted is None or meta["id"] in wanted):
            yield sample


def feature_config(folder: str | Path) -> FeatureConfig:
    """The stage-one config stored in meta.json: it says which VAE and vocoder made the latents."""
    meta = shards.read_meta(folder)
    if "config" not in meta:
        raise EvalError(f"{Path(folder) / shards.META_FILE}: no stage-one 'config' in it; cannot tell which AudioLDM "
                        "VAE and vocoder decode these latents")
    names = {f.name for f in dataclasses.fields(FeatureConfig)}
    return FeatureConfig(**{k: v for k, v in meta["config"].items() if k in names})


# ----------------------------------------------------------------------------------------------------------------
# Latents -> mel -> waveform
# ----------------------------------------------------------------------------------------------------------------
class Decoder:
    """AudioLDM VAE decoder + HiFi-GAN vocoder of the stage-one config: scaled latents -> waveforms."""

    def __init__(self, features: FeatureConfig, weights_dir: Path | None, device: torch.device, scaling_factor: float):
        try:
            self.vae = AudioVAE.from_config(features, weights_dir, device)
            self.vocoder = load_vocoder(features, weights_dir, device)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise EvalError(str(error).splitlines()[0]) from None
        self.scaling_factor = scaling_factor
        self.sample_rate = features.sample_rate
        self.checksum = self.vae.checksum

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (B, C, T, F) in the diffusion model's scaled space -> waveforms (B, samples) float32."""
        mel = self.vae.decode(latents / self.scaling_factor)  # mel: (B, T * ds, 64), AudioLDM's log mel
        vocoder_device = next(self.vocoder.parameters()).device
        waveform = self.vocoder(mel.to(vocoder_device, torch.float32))  # (B, T * ds * 160 + ...)
        return waveform.float().cpu().numpy()


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM mono WAV written to a temporary name and renamed (a crash never leaves half a WAV)."""
    tmp = path.with_name(path.name + ".tmp")
    soundfile.write(tmp, np.clip(waveform, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def sample_batch(model: torch.nn.Module, conditions: dict[str, torch.Tensor], generators: list[torch.Generator],
                 config: EvalConfig) -> torch.Tensor:
    """Latents for a batch whose row i uses generators[i] alone.

    `train.sample` draws a batch's noise from one generator, which would make a clip's noise depend on its batch
    mates; so a generator list (diffusers' convention) is handed over when `train.sample` takes one, and
    otherwise each clip is sampled on its own (its conditional and unconditional passes still share a batch).
    """
    def run(rows: dict[str, torch.Tensor], generator: Any) -> torch.Tensor:
        return train.sample(model, rows, steps=config.steps, guidance=config.guidance, scheduler=config.sampler,
                            generator=generator)

    if len(generators) > 1:
        try:
            return run(conditions, generators)
        except TypeError:  # this train.sample takes a single generator
            pass
    rows = [run({k: v[i : i + 1] for k, v in conditions.items()}, g) for i, g in enumerate(generators)]
    return torch.cat(rows)


def generate(config: EvalConfig, clips: list[TestClip], progress: bool = True) -> dict[str, Any]:
    """Write <output>/wav/<id>.wav for every clip that has none yet; returns the VAE's checksum and scaling.

    Clips whose audio comes out non-finite are recorded in <output>/generation_failures.jsonl, not written.
    """
    out_dir = config.output_dir
    (out_dir / WAV_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / WAV_DIR).glob("*.wav.tmp"):  # left by a killed run
        stale.unlink()
    device = resolve_device(config.device)
    model, train_config = load_run(config.run, device)
    spec = shards.read_spec(config.shards)
    check_compatible(config, model.spec, spec)
    features = feature_config(config.shards)
    weights = None if features.random_init else Path(config.weights)
    decoder = Decoder(features, weights, device, train_config.vae_scaling_factor)
    info = {"vae": decoder.checksum, "vae_scaling_factor": train_config.vae_scaling_factor}

    by_id = {c.id: c for c in clips}
    todo = [c.id for c in clips if not wav_path(out_dir, c.id).exists()]
    if not todo:
        return info
    failures_path = out_dir / GENERATION_FAILURES
    bar = tqdm(total=len(todo), unit="clip", desc="generating", disable=not progress, dynamic_ncols=True)
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        ids = [e["id"] for e in batch]
        conditions = {k: torch.stack([e[k] for e in batch]).to(device) for k in ("video", "objects", "caption")}
        generators = [torch.Generator(device).manual_seed(clip_seed(config.seed, i)) for i in ids]
        waves = decoder(sample_batch(model, conditions, generators, config))
        for clip_id, wave in zip(ids, waves):
            length = min(wave.size, round(min(by_id[clip_id].duration, spec.window_seconds) * decoder.sample_rate))
            wave = wave[:length]
            if not np.isfinite(wave).all() or length == 0:
                shards.append_jsonl(failures_path, {"id": clip_id, "stage": "generate",
                                                    "reason": "non-finite or empty audio"})
                continue
            if config.peak > 0 and np.abs(wave).max() > 0:
                wave = wave * (config.peak / np.abs(wave).max())
            write_wav(wav_path(out_dir, clip_id), wave, decoder.sample_rate)
        bar.update(len(batch))
        batch.clear()

    for sample in iterate_split_samples(config.shards, config.split, todo):
        batch.append(to_example(sample, train_config.object_threshold))
        if len(batch) == config.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    return info


def load_run(run: str | Path, device: torch.device) -> tuple[Any, Any]:
    try:
        return train.load_model(run, device)
    except FileNotFoundError as error:
        raise EvalError(str(error)) from None


def run_info(run: str | Path) -> dict[str, Any]:
    """What identifies the evaluated model: sha256 of its EMA weights and its conditioning (model/config.json);
    empty when the run folder has no exported weights (the WAVs may come from elsewhere)."""
    from preprocess.weights import sha256_file

    folder = Path(run) / "model"
    if not (folder / "ema.safetensors").exists():
        return {}
    info: dict[str, Any] = {"checkpoint_sha256": sha256_file(folder / "ema.safetensors")}
    try:
        resolved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return info
    info.update({k: resolved[k] for k in ("inputs", "scheme") if k in resolved})
    if "preset" in resolved:
        info["train_preset"] = resolved["preset"]
    return info


def check_compatible(config: EvalConfig, trained: shards.ShardSpec, test: shards.ShardSpec) -> None:
    """The model must have been trained on features shaped like the test shards'."""
    fields = ("num_frames", "embed_dim", "latent_channels", "latent_time", "latent_freq", "sample_rate")
    differs = [f"{name} {getattr(trained, name)} vs {getattr(test, name)}" for name in fields
               if getattr(trained, name) != getattr(test, name)]
    if differs:
        raise EvalError(f"{Path(config.shards) / shards.META_FILE}: the run {config.run} was trained on other features "
                        f"({', '.join(differs)})")
