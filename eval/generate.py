"""Generation for evaluation: one 16 kHz WAV per test clip, from the EMA weights of a training run.

Per clip: the conditions of its shard sample (`train.data.to_example`: CLIP frames, caption, O_t of Eq. 1) ->
classifier-free-guided sampling (`train.sample`; latents in the VAE's scaled space) -> divided by the run's
`vae_scaling_factor` -> AudioLDM VAE decoder -> log mel (B, 1024, 64) -> AudioLDM HiFi-GAN -> waveform, cut to
the clip's length (json 'duration': seconds of video from 'start', capped at the window) -> scaled to
`peak` when the config asks (no preset does: published evaluators measure the vocoder's output as it is).

Reproducible: each clip's noise comes from a generator seeded with (seed, clip id), so a clip's audio does not
depend on which clips share its batch (up to float rounding), nor on how many were generated before a crash.
Resumable: clips whose WAV exists are skipped; WAVs are written under a temporary name and renamed. Because a
skipped WAV must have been made the way the new ones are, <output>/wav/manifest.json records every setting the
audio depends on (sampler, steps, guidance, seed, peak, checksums of the model, the VAE and the shards' config);
generating into a folder whose manifest differs is refused. The VAE and vocoder are rebuilt from the stage-one
config stored in the shards' meta.json (`random_init` tiny models, or the weights folder).
"""

from __future__ import annotations

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
from train.speed import precision_name, resolve_precision, speed_up, tune_backends

WAV_DIR = "wav"
MANIFEST_FILE = "manifest.json"  # in WAV_DIR: the settings that made its WAVs
MANIFEST_VERSION = 2  # 2: the UNet's sampling precision is recorded
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


def iterate_reference_audio(folder: str | Path, split: str, ids: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """(clip id, bytes of its `flac` member) for the clips `ids` of `split`, in shard order; only the json and
    flac members are read (tarfile seeks over the features). WebDataset groups a sample's members by key (in
    sorted extension order, so `flac` comes before `json`): a sample is complete when the key changes."""
    wanted = set(ids)
    kept = ("." + shards.AUDIO_KEY, "." + shards.META_KEY)

    def complete(members: dict[str, Any]) -> tuple[str, bytes] | None:
        meta = members.get(kept[1])
        if meta is None or kept[0] not in members or meta.get("split") != split or meta["id"] not in wanted:
            return None
        return meta["id"], members[kept[0]]

    for path in split_shards(Path(folder), split):
        try:
            with tarfile.open(path, "r") as tar:
                key: str | None = None
                members: dict[str, Any] = {}
                for member in tar:
                    name_key, dot, ext = member.name.partition(".")
                    if name_key != key:
                        if (done := complete(members)) is not None:
                            yield done
                        key, members = name_key, {}
                    if dot + ext not in kept:
                        continue
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    members[dot + ext] = json.loads(data) if dot + ext == kept[1] else data
                if (done := complete(members)) is not None:
                    yield done
        except (tarfile.TarError, OSError, json.JSONDecodeError, KeyError) as error:
            raise EvalError(f"{path}: unreadable shard ({error})") from None


def shards_config_sha256(folder: str | Path) -> str:
    """sha256 of the stage-one config in the shards' meta.json (canonical JSON): changes when the shards are
    rebuilt with other settings (weights, windows, sample rate, ...)."""
    meta = shards.read_meta(folder)
    return hashlib.sha256(json.dumps(meta.get("config"), sort_keys=True).encode()).hexdigest()


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
    return FeatureConfig.from_dict(meta["config"])


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


def sample_batch(model: train.VTASAM, conditions: dict[str, torch.Tensor], generators: list[torch.Generator],
                 config: EvalConfig, precision: torch.dtype | None = None) -> torch.Tensor:
    """Latents for a batch whose row i draws its noise from generators[i] alone (one batched `train.sample` call;
    a single generator would make a clip's noise depend on its batch mates)."""
    return train.sample(model, conditions, steps=config.steps, guidance=config.guidance, scheduler=config.sampler,
                        generator=generators, precision=precision)


# ----------------------------------------------------------------------------------------------------------------
# The manifest: what the WAVs of a folder were generated with
# ----------------------------------------------------------------------------------------------------------------
def generation_manifest(config: EvalConfig, train_config: Any, decoder: Decoder, spec: shards.ShardSpec,
                        precision: str = "fp32") -> dict[str, Any]:
    """Every setting a generated WAV depends on (JSON-normalised, so it compares equal to its file's copy)."""
    manifest = {
        "manifest_version": MANIFEST_VERSION, **run_info(config.run),
        "vae": decoder.checksum, "vae_scaling_factor": train_config.vae_scaling_factor,
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
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvalError(f"{path}: unreadable ({error}); choose another --output or delete {path.parent}") from None


def claim_wav_dir(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Refuse to add WAVs to a folder whose WAVs were made otherwise; then write `manifest` there (atomically).

    A folder with WAVs but no manifest was filled by something else (older code, a copy): its settings are
    unknown, so it is refused as well. An empty folder takes the new manifest whatever the old one said.
    """
    wav_dir = out_dir / WAV_DIR
    existing = read_manifest(out_dir)
    has_wavs = any(wav_dir.glob("*.wav"))
    fix = f"choose another --output or delete {wav_dir}"
    if has_wavs and existing is None:
        raise EvalError(f"{wav_dir}: holds WAVs but no {MANIFEST_FILE}, so the settings that made them are unknown; {fix}")
    if has_wavs and existing != manifest:
        assert existing is not None
        differs = [f"{k} {existing.get(k)!r} -> {manifest.get(k)!r}" for k in sorted(existing.keys() | manifest.keys())
                   if existing.get(k) != manifest.get(k)]
        raise EvalError(f"{wav_dir / MANIFEST_FILE}: its WAVs were generated with other settings "
                        f"({', '.join(differs)}); {fix}")
    if existing != manifest:
        tmp = wav_dir / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, wav_dir / MANIFEST_FILE)


def generate(config: EvalConfig, clips: list[TestClip], progress: bool = True) -> dict[str, Any]:
    """Write <output>/wav/<id>.wav for every clip that has none yet, after checking (or writing) the folder's
    manifest. Returns {"manifest": the settings of the folder's WAVs, "written": WAVs written by this call}.

    Clips whose audio comes out non-finite are recorded in <output>/generation_failures.jsonl, not written.
    """
    out_dir = config.output_dir
    (out_dir / WAV_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / WAV_DIR).glob("*.tmp"):  # left by a killed run
        stale.unlink()
    device = resolve_device(config.device)
    try:
        precision = resolve_precision(config.precision, device)
    except ValueError as error:
        raise EvalError(str(error)) from None
    model, train_config = load_run(config.run, device)
    tune_backends(device)
    speed_up(model, config.channels_last, config.compile)
    spec = shards.read_spec(config.shards)
    check_compatible(config, model.spec, spec)
    features = feature_config(config.shards)
    weights = None if features.random_init else Path(config.weights)
    decoder = Decoder(features, weights, device, train_config.vae_scaling_factor)
    manifest = generation_manifest(config, train_config, decoder, spec, precision_name(precision))
    claim_wav_dir(out_dir, manifest)
    info: dict[str, Any] = {"manifest": manifest, "written": 0}

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
        waves = decoder(sample_batch(model, conditions, generators, config, precision))
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
            info["written"] += 1
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
