"""Stage one: clips -> decoded frames and audio (worker processes) -> encoders (batched) -> shards.

Decoding runs in DataLoader workers that overlap the encoders. Each rank writes its own shards
(`{split}-{rank}-{NNNNNN}.tar`), so N processes on M nodes never collide. Re-running the same command
skips clips already in complete shards or in failures.jsonl.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Collection, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import shards
from audio_models.front_end import MelFrontEnd, audioldm_waveform
from audio_models.vae import AudioVAE
from common.devices import resolve_device
from common.ffmpeg import last_words
from common.lock import FolderBusy, folder_lock
from common.signals import die_with_parent, ignore_stop_signals
from common.versions import software_versions
from preprocess.audio import AudioDecodeError, decode_audio
from preprocess.config import BEFORE_FIELD, FeatureConfig
from preprocess.encoders import CLIPEncoder, Grounder, cap_cuda_memory
from preprocess.manifest import Clip
from preprocess.nouns import LABEL_NOUNS_FILE, NounCache, label_nouns_sha256
from preprocess.video import VideoDecodeError, decode_frames, is_still_image, probe_video

# Fields that must agree between runs writing into one output folder (batch sizes, devices may differ). A field
# missing from an older meta.json compares as the value those runs used (`preprocess.config.BEFORE_FIELD`).
COMPATIBLE_FIELDS = (
    "window_seconds", "fps", "sample_rate", "frame_short_side", "audio_backend", "clip_model", "embed_dim",
    "tagger", "max_nouns", "grounding_short_side", "grounding_long_side", "use_sam", "sam_floor", "latent_channels",
    "vae_downsample",
)


class FeatureError(RuntimeError):
    """Stage one cannot start (incompatible output folder, bad weights...). One line."""


# ----------------------------------------------------------------------------------- decoding
def shared_memory_room(cfg: FeatureConfig, prefetch: int, folder: str = "/dev/shm") -> tuple[bool, str]:
    """Whether the decoding workers' queued clips fit in shared memory, and a line saying why not.

    A DataLoader hands tensors over through shared memory (/dev/shm); containers often give it 64 MB (Docker's
    default), where `num_workers x prefetch` paper-preset clips (~140 MB of frames each) do not fit and the
    workers would die with a bus error. Counted as an upper bound: 16:9 frames at the largest short side
    (`frame_short_side`; smaller videos are not upscaled)."""
    if cfg.num_workers == 0:
        return True, ""
    side = cfg.frame_short_side
    needed = cfg.num_workers * prefetch * cfg.num_frames * side * round(side * 16 / 9) * 3
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return True, ""  # no /dev/shm to ask (not Linux): torch picks its own way
    if free >= needed:
        return True, ""
    return False, (f"{folder}: {free / 2**20:.0f} MiB free, the decoding workers may queue ~{needed / 2**20:.0f} MiB of "
                   "frames; handing them over as numpy arrays (slower; give the container more shared memory, e.g. "
                   "docker --shm-size 16g, or lower --num-workers)")


LAST_WORDS = ".stderr"  # beside a worker's note (named by its pid): what decord printed while it ran (a crash's message)


class DecodeDataset(Dataset):
    """Decodes one clip per item in a worker process: frames, true duration, waveform, log mel.

    tensors: frames and mel as torch tensors (moved to the main process through shared memory) or numpy arrays
    (pickled through a pipe; for a small /dev/shm, see `shared_memory_room`)."""

    def __init__(self, clips: list[Clip], cfg: FeatureConfig, tensors: bool = True):
        self.clips = clips
        self.cfg = cfg
        self.tensors = tensors
        self.times = cfg.frame_times()
        self.front_end: MelFrontEnd | None = None
        self.owner = os.getpid()  # the process that iterates the DataLoader: workers die with it
        # a folder where each worker notes the index of the clip it is decoding (a file named by its pid, emptied
        # when the clip is done), so that a worker killed by a crash in the decoders names the file it died on
        self.markers: Path | None = None

    def _exit_if_orphaned(self) -> None:
        """In a worker whose parent died (SIGKILL, OOM killer), exit at once instead of decoding on: nothing would
        take the clip, and the frames it holds in shared memory would outlive the run."""
        if os.getpid() != self.owner and os.getppid() != self.owner:
            os._exit(1)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{"clip", "frames": uint8 tensor (T, H, W, 3), "duration", "waveform": float32 array, "mel": float32
        tensor (1024, 64), "silent"}, or {"clip", "error": (stage, reason)}."""
        self._exit_if_orphaned()
        if self.markers is None:
            return self._decode(index)
        marker = self.markers / str(os.getpid())
        marker.write_text(str(index))
        try:
            return self._decode(index)
        finally:
            marker.write_text("")

    def _decode(self, index: int) -> dict[str, Any]:
        clip = self.clips[index]
        cfg = self.cfg
        if clip.path is None:
            ytid = clip.id.rsplit("_", 1)[0]  # a CSV row's clip id is {youtube_id}_{start:06d}
            return {"clip": clip, "error": ("input", f"video file not found in the video folder (no {clip.id}.* or "
                                                     f"{ytid}.* of a video suffix)")}
        try:
            log_file = None if self.markers is None else self.markers / f"{os.getpid()}{LAST_WORDS}"
            video = decode_frames(clip.path, clip.start, self.times, cfg.window_seconds, cfg.frame_short_side,
                                  log_file=log_file)
        except VideoDecodeError as error:
            return {"clip": clip, "error": ("video", str(error))}
        if len(video.frames) == 0:
            try:
                still = is_still_image(probe_video(clip.path)["format"])
                if not still:  # shorter than the first sampling time: its first frame stands in (as in vta-sam generate)
                    video = decode_frames(clip.path, clip.start, [0.0], cfg.window_seconds, cfg.frame_short_side)
            except VideoDecodeError:
                still = False
            if still:
                return {"clip": clip, "error": ("video", f"{clip.path}: a still image, not a video")}
        if len(video.frames) == 0:
            return {"clip": clip, "error": ("video", f"{clip.path}: no frame inside the window")}
        shape_error = cfg.frame_shape_error(*video.frames.shape[1:3])
        if shape_error is not None:
            return {"clip": clip, "error": ("video", f"{clip.path}: {shape_error}")}
        try:
            waveform = decode_audio(clip.path, clip.start, cfg.window_seconds, cfg.sample_rate, cfg.audio_backend)
        except AudioDecodeError as error:
            return {"clip": clip, "error": ("audio", str(error))}
        if waveform is None:
            return {"clip": clip, "error": ("audio", f"{clip.path}: no audio stream (skipped for training)")}
        if not np.isfinite(waveform).all():  # float PCM can hold them; every feature of the window would be NaN
            bad = int(np.count_nonzero(~np.isfinite(waveform)))
            return {"clip": clip, "error": ("audio", f"{clip.path}: {bad} audio samples in the window are NaN or infinite")}
        # sound past the last frame is padding, as the frames there are (SampleMeta.duration): a video whose audio
        # track runs on (3 s of picture, 8 s of sound) would teach the model sound over blank frames
        picture = round(min(video.duration, cfg.window_seconds) * cfg.sample_rate)
        if len(waveform) > picture:
            waveform = waveform.copy()
            waveform[picture:] = 0.0
        if self.front_end is None:
            self.front_end = MelFrontEnd(sample_rate=cfg.sample_rate)
        normalised = audioldm_waveform(waveform, cfg.num_samples)
        with torch.inference_mode():
            mel = self.front_end(torch.from_numpy(normalised)[None])[0].numpy()
        # frames and mel as tensors: a DataLoader moves tensors to the main process through shared memory, while
        # numpy arrays are pickled through a pipe (paper-size frames: ~100 MB per clip; benchmarks/RESULTS.md)
        return {
            "clip": clip,
            "frames": torch.from_numpy(video.frames) if self.tensors else video.frames,
            "duration": min(video.duration, cfg.window_seconds),
            "waveform": waveform[: cfg.num_samples],
            "mel": torch.from_numpy(mel) if self.tensors else mel,
            "silent": bool(np.abs(waveform).max(initial=0.0) < 1e-6),
        }


def _identity(item: Any) -> Any:
    return item


def _kill_workers(iterator: Any) -> None:
    """SIGKILL a DataLoader iterator's live worker processes (what they were decoding is made again on resume), first
    taking their pids off PyTorch's SIGCHLD check, which would report each death as "DataLoader worker (pid N) is
    killed by signal" from the iterator's __del__ (a traceback on stderr)."""
    if getattr(iterator, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    for worker in getattr(iterator, "_workers", ()):
        if worker.is_alive():
            worker.kill()


def _worker_init(_: int) -> None:
    """Set up one decoding worker: a single thread (the encoders in the main process want the cores); death with the
    parent, so a SIGKILLed run leaves no worker behind holding shared memory; and the stop signals left to the parent
    (`common.signals`)."""
    torch.set_num_threads(1)
    die_with_parent()  # a parent that died before the request: `DecodeDataset._exit_if_orphaned`
    ignore_stop_signals()
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, DecodeDataset):
        info.dataset._exit_if_orphaned()


class _WorkerDied(Exception):
    """Raised in the main thread by `decode_clips`' SIGCHLD handler, only while it waits for the next decoded clip,
    when a decoding worker has died."""


class _WaitGuard:
    """decode_clips' SIGCHLD handler (`on_child`). PyTorch's raises a worker's death wherever the main thread happens
    to be (in the encoders, half-way through handing samples to the writer); this one raises it only while the
    main thread waits for a clip (`waiting`). That wait must be interruptible: a worker killed half-way through
    writing a clip into the pipe (its queue's feeder thread writes while the worker decodes the next clip) leaves
    a message whose read would never end, since this process holds the pipe's other end. A death while the main
    thread is elsewhere is found before its next read (`_dead_workers`)."""

    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator
        self.waiting = False

    def on_child(self, signum: int, frame: Any) -> None:
        if self.waiting and _dead_workers(self.iterator):
            raise _WorkerDied


def _dead_workers(iterator: Any) -> dict[int, int]:
    """{pid: exit code} of the DataLoader iterator's workers that have ended with an error or a signal (a worker
    ends with 0 only when the iterator shuts it down)."""
    dead = {}
    for worker in getattr(iterator, "_workers", []):  # multiprocessing.Process objects
        code = worker.exitcode  # reaps it (waitpid, WNOHANG) when it has ended
        if code not in (None, 0):
            dead[worker.pid] = code
    return dead


def _died_on(dead: dict[int, int], markers: Path) -> dict[int, str]:
    """{index of the clip: reason} for the decoding workers `dead` ({pid: exit code}), from the notes they left in
    `markers`. FeatureError when one died between clips (its note is empty): then it was not a file that killed it
    (out of memory, a signal from outside), and no clip is to blame."""
    died: dict[int, str] = {}
    for pid, code in dead.items():
        try:
            note = (markers / str(pid)).read_text().strip()
        except OSError:
            note = ""
        how = f"exit code {code}"
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:  # a real-time signal without a name
                how = f"killed by signal {-code}"
        if not note:
            raise FeatureError(f"a decoding worker (pid {pid}) died between clips ({how}): not a file's doing (out of "
                               "memory? a signal from outside?); run the same command again to go on")
        said = last_words(markers / f"{pid}{LAST_WORDS}")  # a crash in decord: its message, held off stderr
        died[int(note)] = (f"the decoding worker died while decoding this file ({how}"
                           + (f"; it printed: {said}" if said else "") + "): a crash in the video or audio decoder; "
                           "were it the machine (out of memory), delete this line and run again")
    return died


def decode_clips(clips: list[Clip], cfg: FeatureConfig, tensors: bool, prefetch: int,
                 markers: Path | None) -> Generator[dict[str, Any], None, None]:
    """DecodeDataset's items for `clips`, in order, from `cfg.num_workers` worker processes (or this one).

    A worker killed by a crash in a native decoder (a file that makes decord or FFmpeg abort or segfault) costs
    only the clip it was decoding: that clip comes out as a failure naming the file, and the workers start again
    on the clips after the last one delivered, so that a resumed run does not meet the same crash again. The
    workers note what they decode in the folder `markers` (emptied first, removed at the end). Needs workers:
    with num_workers 0 (or no `markers`) such a crash ends the process."""
    if cfg.num_workers == 0:
        markers = None
    remaining = clips
    try:
        while remaining:
            if markers is not None:  # notes of a killed run, or of the workers before a crash (indices of other lists)
                shutil.rmtree(markers, ignore_errors=True)
                markers.mkdir(parents=True)
            dataset = DecodeDataset(remaining, cfg, tensors)
            dataset.markers = markers
            loader = DataLoader(
                dataset,
                batch_size=None,
                shuffle=False,
                num_workers=cfg.num_workers,
                collate_fn=_identity,
                worker_init_fn=_worker_init if cfg.num_workers > 0 else None,
                prefetch_factor=prefetch if cfg.num_workers > 0 else None,
                persistent_workers=False,
            )
            iterator = iter(loader)  # PyTorch installs its SIGCHLD handler here, once per process
            guard = _WaitGuard(iterator)
            sigchld = None
            if markers is not None and threading.current_thread() is threading.main_thread():
                sigchld = signal.signal(signal.SIGCHLD, guard.on_child)  # put back below
            delivered = 0
            died: dict[int, str] = {}
            try:
                while True:
                    dead: dict[int, int] = {}
                    try:
                        guard.waiting = True  # first: a death from here on is raised, or found just below
                        dead = _dead_workers(iterator) if markers is not None else {}
                        if not dead:
                            item = next(iterator)
                    except StopIteration:
                        return
                    except (_WorkerDied, RuntimeError, OSError):
                        # also DataLoader's "worker exited unexpectedly", and a clip whose shared tensors the dead
                        # worker can no longer hand over (ConnectionResetError)
                        dead = _dead_workers(iterator) if markers is not None else {}
                        if not dead:
                            raise
                    finally:
                        guard.waiting = False
                    if dead:
                        assert markers is not None
                        died = _died_on(dead, markers)
                        break
                    delivered += 1
                    yield item
            finally:
                guard.waiting = False
                if sigchld is not None:
                    signal.signal(signal.SIGCHLD, sigchld)
                if sys.exc_info()[0] is not None:
                    # leaving on a signal or an error: the workers ignore SIGTERM (common.signals), and DataLoader's
                    # shutdown would wait up to 5 s for each busy one before the shard in progress is closed
                    _kill_workers(iterator)
                del guard, iterator  # shuts its workers down
            for index, reason in sorted(died.items()):
                clip = remaining[index]
                yield {"clip": clip, "error": ("video", f"{clip.path}: {reason}")}
            remaining = [clip for index, clip in enumerate(remaining) if index >= delivered and index not in died]
    finally:
        if markers is not None:
            shutil.rmtree(markers, ignore_errors=True)


# ----------------------------------------------------------------------------------- bookkeeping
@dataclass
class Summary:
    written: int = 0
    resumed: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    wall_seconds: float = 0.0
    # of wall_seconds: until the first batch of decoded clips reached the encoders (building the encoders unless
    # given, output checks, decoding workers starting, the first clips decoded), and after the last batch left them
    # (the writer finishing, workers stopping): costs of a run, not of a clip, which a long run spreads thin. A
    # compiled detector's compilation (--compile) happens on the first passes, so it counts in between.
    startup_seconds: float = 0.0
    drain_seconds: float = 0.0
    shards: list[str] = field(default_factory=list)

    @property
    def clips_per_second(self) -> float:
        done = self.written + sum(self.failed.values())
        return done / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def lines(self) -> list[str]:
        failed = ", ".join(f"{stage}: {n}" for stage, n in sorted(self.failed.items())) or "none"
        return [
            f"written {self.written} clips into {len(self.shards)} new shards; already done before this run: {self.resumed}",
            f"failed or skipped: {sum(self.failed.values())} ({failed})"
            f"{'; see failures.jsonl' if self.failed else ''}",
            f"wall time {self.wall_seconds:.1f} s, {self.clips_per_second:.2f} clips/s (start-up {self.startup_seconds:.1f} s, "
            f"finishing {self.drain_seconds:.1f} s; in between {self.steady_clips_per_second:.2f} clips/s)",
        ]

    @property
    def steady_clips_per_second(self) -> float:
        """Clips per second between the first batch reaching the encoders and the last leaving them: the rate a long
        run approaches (its start-up and finishing spread over many clips)."""
        seconds = self.wall_seconds - self.startup_seconds - self.drain_seconds
        done = self.written + sum(self.failed.values())
        return done / seconds if seconds > 0 else 0.0


def build_meta(cfg: FeatureConfig, checksums: dict[str, str], vae_scaling_factor: float,
               config_checksums: dict[str, str | None] | None = None) -> dict[str, Any]:
    """meta.json's content. Each model's entry has the checksum of its weights and "config_checksum": that of its
    config, preprocessor and tokenizer files (`common.weights.sha256_configs`), which shape the features without
    being weights; null for a random-init model and a CLIP file without open_clip_config.json. (A folder written
    before this field existed has no such key: `shards.config_differs` then compares nothing.)"""
    models: dict[str, dict[str, Any]] = {
        "clip": {"name": cfg.clip_model, "checksum": checksums["clip"]},
        "grounding": {"name": "GroundingDinoForObjectDetection" + (" + SamModel" if cfg.use_sam else ""), "checksum": checksums["grounding"]},
        "vae": {"name": "AudioLDM AutoencoderKL", "checksum": checksums["vae"], "scaling_factor": vae_scaling_factor},
    }
    for name, config_checksum in (config_checksums or {}).items():
        models[name]["config_checksum"] = config_checksum
    return {
        "schema_version": shards.SCHEMA_VERSION,
        "spec": cfg.shard_spec().to_dict(),
        "config": dataclasses.asdict(cfg),
        "frame_rate": cfg.fps,
        "frame_times": cfg.frame_times(),
        "audio": {
            "sample_rate": cfg.sample_rate, "mono": "mean of channels", "window_seconds": cfg.window_seconds,
            "n_fft": 1024, "hop": 160, "window": 1024, "n_mels": 64, "fmin": 0, "fmax": 8000,
            "mel_frames": 1024, "front_end": "AudioLDM (mean removed, peak 0.5, pad, peak 0.5; log magnitude mel)",
        },
        "models": models,
        # which nouns a VGGSound label is grounded with (informational: not part of the "made differently" check)
        "label_nouns": {"file": LABEL_NOUNS_FILE.name, "sha256": label_nouns_sha256()},
        "software": software_versions(),
    }


def prepare_output(out_dir: Path, meta: dict[str, Any], rank: int) -> None:
    """Create the folder and meta.json, or check that an existing one describes the same features.

    Every rank does this, so a rank that starts alone in a fresh folder still leaves a meta.json that the folder
    can be verified against. The file appears atomically and is never clobbered: each rank writes its own
    temporary file and hard-links it to meta.json, which fails if another rank's meta.json appeared meanwhile;
    then the meta.json in place, whoever wrote it, is compared with this run's. (Where the file system has no
    hard links, the temporary file is renamed over a meta.json found absent just before: a rank starting at the
    same instant may then replace an equal-or-different one, which the comparison of the later rank reports.)
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / shards.META_FILE
    # this rank's own, of a run killed between writing and linking it (the caller holds the rank's lock: no live
    # process of this rank writes one; another rank's, maybe on another machine, is not ours to judge)
    leftover = re.compile(rf"\.{re.escape(shards.META_FILE)}\.{rank}\.\d+\.[0-9a-f]{{32}}\.tmp")
    for old in out_dir.glob(f".{shards.META_FILE}.{rank}.*.tmp"):
        if leftover.fullmatch(old.name):
            old.unlink(missing_ok=True)
    if not path.exists():
        tmp = out_dir / f".{shards.META_FILE}.{rank}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another rank's meta.json appeared meanwhile: compared below
        except OSError:  # no hard links here
            if not path.exists():
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    _check_meta(path, meta)


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """FeatureError (one line) unless the meta.json at `path` describes the features `meta` describes."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FeatureError(f"{path}: unreadable ({error}); move it away to start over") from None
    except OSError as error:  # a folder of that name
        raise FeatureError(f"{path}: unreadable ({error.strerror or error}); move it away to start over") from None
    if not isinstance(old, dict):
        raise FeatureError(f"{path}: unreadable (not a JSON object); move it away to start over")
    config: dict[str, Any] = old["config"] if isinstance(old.get("config"), dict) else {}
    config = {**BEFORE_FIELD, **config}  # written before a field existed: what those runs did
    models: dict[str, Any] = old["models"] if isinstance(old.get("models"), dict) else {}
    # without SAM the floor changes nothing (and a use_sam that differs is reported by itself)
    without_sam = config.get("use_sam") is False or meta["config"]["use_sam"] is False
    differences = [
        f"{name}: {config.get(name)!r} there vs {meta['config'][name]!r} now"
        for name in COMPATIBLE_FIELDS
        if config.get(name) != meta["config"][name] and not (name == "sam_floor" and without_sam)
    ]
    if old.get("schema_version") != meta["schema_version"]:
        differences.insert(0, f"schema_version: {old.get('schema_version')} there vs {meta['schema_version']} now")
    # the shapes every sample is checked against, which the config makes: said where the config does not explain
    # them (an edited spec made `verify` and training refuse every sample this run added)
    spec: dict[str, Any] = old["spec"] if isinstance(old.get("spec"), dict) else {}
    if not differences:
        differences = [f"spec {name}: {spec.get(name)!r} there vs {value!r} now" for name, value in meta["spec"].items()
                       if spec.get(name) != value]
    for model, info in meta["models"].items():
        recorded = models.get(model)
        if not isinstance(recorded, dict) or recorded.get("checksum") != info["checksum"]:
            differences.append(f"{model} checkpoint differs")
        elif "config_checksum" in info and shards.config_differs(recorded, info["config_checksum"]):
            differences.append(f"{model} configuration differs (config.json, preprocessor or tokenizer files)")
    if differences:
        raise FeatureError(f"{path}: this folder holds features made differently ({'; '.join(differences)}); use another --out")


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def completed_ids(out_dir: Path, retry: Collection[str] = (), retried: set[str] | None = None,
                  stored: dict[str, shards.SampleMeta] | None = None, mine: Collection[str] = ()) -> dict[str, str | None]:
    """Sample keys of clips in complete shards (any rank) or recorded in failures.jsonl, each with the split it was
    made for (from the shard's file name, or the failure record's "split"; None where that does not say). A clip
    recorded only as failed for a missing video file (stage 'input') whose key is in `retry` (its file is there
    now) is not done: it goes into `retried` and is tried again. `stored` receives the SampleMeta of each clip of
    `mine` (sample keys: this rank's) in the shards, read in the same pass (`shards.shard_index`), for
    `warn_about_changes`.

    Bad input here is reported, one warning line each, never a crash: a shard that cannot be read (a zero-byte
    `.tar` left by a copy interrupted elsewhere, a torn one) is left in place untouched and its clips are not
    counted as done, so they are written again into new shards; a failures.jsonl line that is not an object
    with a clip id is skipped (its clip, if any, is tried again)."""
    done: dict[str, str | None] = {}
    for path in shards.list_shards(out_dir):
        split = path.name.split("-", 1)[0]  # list_shards' names are {split}-{rank}-{index}.tar (no '-' in a split)
        try:
            index = shards.shard_index(path)
        # any error: shards/ owns the tar format (today tarfile's errors); counting no clip of the shard as done
        # is the safe answer to all of them
        except Exception as error:  # noqa: BLE001
            size = path.stat().st_size if path.exists() else 0
            reason = "empty file" if size == 0 else " ".join(str(error).split())[:200]
            _warn(f"{path}: unreadable shard ({reason}); its clips are not counted as done and are written again "
                  "into new shards: move the file away once this run is over")
            continue
        done.update(dict.fromkeys(index, split))
        if stored is not None:
            stored.update((key, meta) for key, meta in index.items() if meta is not None and key in mine)
    failures = out_dir / shards.FAILURES_FILE
    try:
        records = shards.read_jsonl(failures)
    except (OSError, UnicodeDecodeError) as error:
        raise FeatureError(f"{failures}: unreadable ({error}); move it away to try its clips again") from None
    missing: set[str] = set()  # failed for a missing file that is there now
    failed: dict[str, str | None] = {}
    for record in records:
        clip_id = record.get("id") if isinstance(record, dict) else None
        key = shards.sample_key(clip_id) if isinstance(clip_id, str) and clip_id else None
        if key is None:
            _warn(f"{failures}: skipped a line without a clip id: {json.dumps(record)[:200]}")
            continue
        if record.get("stage") == "input" and key in retry:
            missing.add(key)
            continue
        recorded = record.get("split")
        failed.setdefault(key, recorded if isinstance(recorded, str) else None)
    if retried is not None:
        retried.update(missing - done.keys() - failed.keys())  # not if it was written, or failed otherwise since
    return failed | done


def source_stamp(path: Path) -> str:
    """"<size>:<mtime in ns>" of a video file (SampleMeta.source_stamp): a file replaced at the same path has
    another one; "" when it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def warn_about_changes(out_dir: Path, wanted: dict[str, Clip], stored: dict[str, shards.SampleMeta]) -> None:
    """Say which clips already in the folder (`wanted`, by sample key; `stored`: their SampleMeta in its shards, from
    `completed_ids`) were made with another caption or window start than the manifest gives now, or from a video
    file replaced since at the same path; they are kept as they are (a clip is made once per folder). A clip of
    another id under the same sample key (`x.1` made before, `x_1` now) is a FeatureError: it would be taken as
    made."""
    stored = {key: meta for key, meta in stored.items() if key in wanted}
    clash = next(((meta.id, wanted[key].id) for key, meta in stored.items() if meta.id != wanted[key].id), None)
    if clash:
        raise FeatureError(f"{out_dir}: clip {clash[1]!r} has the shard sample key of clip {clash[0]!r} made there "
                           "before ('.' and '/' are written as '_'); rename its video (or give another --out)")
    moved = [wanted[key] for key, meta in stored.items() if abs(meta.start - wanted[key].start) > 1e-6]
    if moved:  # the same id from another start (1.2 and 1.7 s are both clip x_000001)
        first = moved[0]
        _warn(f"{out_dir}: {len(moved)} clip(s) there were made from another window start than this manifest gives "
              f"(e.g. {first.id}: {stored[shards.sample_key(first.id)].start:g} s there, {first.start:g} s now); they "
              "are kept as they are: give another --out (or move their shards away) to make them from these starts")
    changed = [wanted[key] for key, meta in stored.items() if meta.caption != wanted[key].caption]
    if changed:  # captions fixed in the manifest after a first run reach only the clips not made yet
        first = changed[0]
        _warn(f"{out_dir}: {len(changed)} clip(s) there were made with another caption than this manifest gives "
              f"(e.g. {first.id}: {stored[shards.sample_key(first.id)].caption!r} there, {first.caption!r} now); "
              "they are kept as they are: give another --out (or move their shards away) to make them with these "
              "captions")
    replaced = []
    for key, meta in stored.items():
        path = wanted[key].path
        if meta.source_stamp and path is not None and meta.source == str(path.absolute()) \
                and source_stamp(path) not in ("", meta.source_stamp):
            replaced.append(wanted[key])
    if replaced:
        _warn(f"{out_dir}: {len(replaced)} clip(s) there were made from a video file that has changed since (its size "
              f"or modification time; e.g. {replaced[0].path}); they are kept as they are: give another --out (or "
              "move their shards away) to make them from the files as they are now")


# ----------------------------------------------------------------------------------- encoding
class Encoders:
    """The frozen models of stage one, built once per process (`audio=False`: the visual ones only, for generation)."""

    def __init__(self, cfg: FeatureConfig, weights_dir: Path | None, device: torch.device, audio: bool = True):
        self.cfg = cfg
        cap_cuda_memory(cfg.max_memory_gib, device)
        self.clip_encoder = CLIPEncoder.from_config(cfg, weights_dir, device)
        self.grounder = Grounder.from_config(cfg, weights_dir, device)
        self.vae = AudioVAE.from_config(cfg.audio_models(), weights_dir, device) if audio else None
        # every model is resident now: what is still free is what the frame batches may use
        for model in (self.clip_encoder, self.grounder):
            model.batches.fit_free_memory(device, model.gib_per_frame, cfg.max_memory_gib)
        self._text_cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    @property
    def checksums(self) -> dict[str, str]:
        sums = {"clip": self.clip_encoder.checksum, "grounding": self.grounder.checksum}
        return sums | ({"vae": self.vae.checksum} if self.vae is not None else {})

    @property
    def config_checksums(self) -> dict[str, str | None]:
        """Of each model's config, preprocessor and tokenizer files (None: random init, or none beside CLIP's file)."""
        sums = {"clip": self.clip_encoder.config_checksum, "grounding": self.grounder.config_checksum}
        return sums | ({"vae": self.vae.config_checksum} if self.vae is not None else {})

    def texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        """CLIP text embeddings, each distinct text encoded once (LRU of 50k texts bounds memory) and alone: in a
        batch, its last bits would depend on its batch mates (the kernels a batch's shape picks), so a resumed
        stage one, or a video generated after others, would condition on slightly other numbers. A few
        milliseconds per new text on a GPU, the same work on a CPU."""
        for text in sorted({t for t in texts if t not in self._text_cache}):
            self._text_cache[text] = self.clip_encoder.encode_texts([text])[0].float().cpu().numpy()
        for text in texts:
            self._text_cache.move_to_end(text)
        while len(self._text_cache) > 50_000:
            self._text_cache.popitem(last=False)
        return {t: self._text_cache[t] for t in texts}

    def visual(self, frames: Sequence[np.ndarray | torch.Tensor], captions: list[str],
               nouns: list[list[str]]) -> list[dict[str, np.ndarray]]:
        """Per clip: CLIP embeddings of its frames, p_tk and its two factors (Grounding DINO's score, SAM's IoU),
        e_k and the caption's embedding, each padded to the config's frame count (frames past a clip's end: zeros),
        keyed by shard member. frames[i]: uint8 (T_i, H, W, 3), T_i <= num_frames."""
        cfg = self.cfg
        tensors = [torch.as_tensor(f) for f in frames]
        # CLIP: one pass over all frames of all clips of the same frame size
        image_embeddings: list[torch.Tensor | None] = [None] * len(tensors)
        by_size: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
        for i, f in enumerate(tensors):
            by_size[tuple(f.shape[1:])].append(i)
        for indices in by_size.values():
            embedded = self.clip_encoder.encode_frames(torch.cat([tensors[i] for i in indices])).float().cpu()
            for i, chunk in zip(indices, embedded.split([len(tensors[i]) for i in indices])):
                image_embeddings[i] = chunk
        detections = self.grounder.detections(tensors, nouns)
        text_vectors = self.texts(list(captions) + [n for ns in nouns for n in ns])
        out = []
        for i, caption in enumerate(captions):
            valid = len(tensors[i])
            image_array = np.zeros((cfg.num_frames, cfg.embed_dim), np.float32)
            image_array[:valid] = image_embeddings[i].numpy()  # type: ignore[union-attr]
            per_frame = {}
            for key, values in ((shards.PROBS_KEY, detections[i].probs), (shards.DETECTOR_KEY, detections[i].detector),
                                (shards.IOU_KEY, detections[i].iou)):
                per_frame[key] = np.zeros((cfg.num_frames, len(nouns[i])), np.float32)
                per_frame[key][:valid] = values.float().cpu().numpy()
            noun_array = np.stack([text_vectors[n] for n in nouns[i]]) if nouns[i] else np.zeros((0, cfg.embed_dim), np.float32)
            out.append({"clip.npy": image_array, "caption.npy": text_vectors[caption], "nouns.npy": noun_array, **per_frame})
        return out

    def encode(self, items: list[dict[str, Any]], nouns: list[list[str]]) -> list[dict[str, np.ndarray]]:
        """Every feature of a batch of decoded clips (visual ones and the VAE posterior of their mels)."""
        assert self.vae is not None, "built with audio=False"
        features = self.visual([item["frames"] for item in items], [item["clip"].caption for item in items], nouns)
        means, stds = self.vae.encode(torch.stack([torch.as_tensor(item["mel"]) for item in items]))
        for i, arrays in enumerate(features):
            arrays["latent_mean.npy"] = means[i].float().cpu().numpy()
            arrays["latent_std.npy"] = stds[i].float().cpu().numpy()
        return features


# ----------------------------------------------------------------------------------- writing
class ShardSink:
    """Encodes finished clips into samples and appends them to one shard writer per split, in a background thread.

    The thread overlaps FLAC encoding, `np.save` and tar writes with the encoders working on the next batch
    (the GIL is free while they wait on the GPU or run C code). At most `depth` batches wait in the queue.
    `close()` writes everything already handed over, then closes the shards; so an interrupted run (Ctrl-C,
    SIGTERM) keeps every clip whose features were computed. An error in the thread (a full disk) is raised by the
    next `put` or by `close`. threaded=False writes in the caller's thread (the benchmark's "before").
    """

    def __init__(self, out_dir: Path, rank: int, cfg: FeatureConfig, threaded: bool = True, depth: int = 2):
        self.out_dir, self.rank, self.cfg, self.spec = out_dir, rank, cfg, cfg.shard_spec()
        self.writers: dict[str, shards.ShardWriter] = {}
        self.written = 0
        self.error: BaseException | None = None
        self.queue: queue.Queue[list[tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]] | None] = queue.Queue(depth)
        self.thread = threading.Thread(target=self._loop, name="shard-writer", daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()

    def put(self, samples: list[tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]]) -> None:
        """samples: (json meta, feature arrays, waveform) per clip."""
        if self.error is not None:
            raise self.error
        if self.thread is None:
            self._write(samples)
        else:
            self.queue.put(samples)

    def _loop(self) -> None:
        while (samples := self.queue.get()) is not None:
            if self.error is None:  # after an error, drain the queue without writing so that put() never blocks
                try:
                    self._write(samples)
                except BaseException as error:  # noqa: BLE001 - handed to the main thread
                    self.error = error

    def _write(self, samples: list[tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]]) -> None:
        for meta, arrays, waveform in samples:
            sample = shards.encode_sample(self.spec, meta, arrays, waveform)
            split = meta["split"]
            if split not in self.writers:
                self.writers[split] = shards.ShardWriter(self.out_dir, split, self.rank, self.cfg.shard_max_samples)
            writer = self.writers[split]
            try:
                writer.write(sample)
            except BaseException:
                self.written -= writer.pending  # lost with the shard
                writer.abort()  # half a sample in the tar: drop this shard, keep the others
                del self.writers[split]
                raise
            self.written += 1

    def close(self) -> list[Path]:
        """Write what was handed over, close every shard; returns the shards completed. Raises a writing error."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        completed: list[Path] = []
        for writer in self.writers.values():  # every split's, also after one fails (a full disk)
            try:
                writer.close()
            except BaseException as error:  # noqa: BLE001 - raised below, after the other writers are closed
                self.written -= writer.pending  # lost with the shard
                writer.abort()
                self.error = self.error or error
            completed.extend(writer.completed)
        self.writers.clear()
        if self.error is not None:
            raise self.error
        return completed


# ----------------------------------------------------------------------------------- the run
def _batches(items: Iterator[dict[str, Any]], size: int, on_failure: Any) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        if "error" in item:
            on_failure(item)
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(
    cfg: FeatureConfig,
    clips: list[Clip],
    out_dir: Path,
    weights_dir: Path | None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    encoders: Encoders | None = None,
    threaded_writer: bool = True,
) -> Summary:
    """Process this rank's share of `clips` into `out_dir`; safe to re-run after any interruption.

    threaded_writer: encode and write samples in a background thread (`ShardSink`), overlapping the encoders."""
    from preprocess.manifest import ManifestError, check_sample_keys, partition

    started = time.perf_counter()
    summary = Summary()
    try:  # before anything is built or written: a bad rank or a clash of sample keys is one line
        check_sample_keys(clips, "the manifest")
        mine = partition(clips, rank, world_size)
    except ManifestError as error:
        raise FeatureError(str(error)) from None
    # fails early when a caption needs the tagger and it is unavailable
    nouns_of = NounCache(cfg.tagger, cfg.max_nouns, (clip.caption for clip in mine))
    try:
        device = resolve_device(cfg.device)
    except ValueError as error:
        raise FeatureError(f"--{error}") from None
    if out_dir.exists() and not out_dir.is_dir():  # before any model is built
        raise FeatureError(f"{out_dir}: exists and is not a folder; give --out a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file where a folder above it goes, no permission
        raise FeatureError(f"{out_dir}: cannot be made ({error.strerror or error})") from None
    # one process per rank: two of one rank would write the same shard names and delete each other's partial
    # shards and notes (two launches without --rank, a requeued job while the first still runs)
    try:
        with folder_lock(out_dir, f"stage one of rank {rank}", f".lock-rank{rank:03d}"):
            return _run(cfg, mine, out_dir, weights_dir, rank, device, nouns_of, progress, encoders, threaded_writer,
                        started, summary)
    except FolderBusy as error:
        raise FeatureError(f"{error} (processes sharing a folder each need their own --rank)") from None


def _run(cfg: FeatureConfig, mine: list[Clip], out_dir: Path, weights_dir: Path | None, rank: int, device: torch.device,
         nouns_of: NounCache, progress: bool, encoders: Encoders | None, threaded_writer: bool, started: float,
         summary: Summary) -> Summary:
    """`run` once it holds the folder's lock of its rank."""
    try:
        encoders = encoders or Encoders(cfg, weights_dir, device)
    except ValueError as error:  # a checkpoint refused or of the wrong size: the loaders name file and reason
        raise FeatureError(str(error)) from None
    if encoders.vae is None:
        raise FeatureError("stage one needs the audio VAE (Encoders built with audio=False)")
    prepare_output(out_dir, build_meta(cfg, encoders.checksums, encoders.vae.scaling_factor, encoders.config_checksums),
                   rank)
    shards.remove_partial(out_dir, rank)
    retried: set[str] = set()
    stored: dict[str, shards.SampleMeta] = {}
    done = completed_ids(out_dir, {shards.sample_key(c.id) for c in mine if c.path is not None}, retried, stored,
                         {shards.sample_key(c.id) for c in mine})
    if retried:
        print(f"note: {len(retried)} clip(s) recorded as failed for a missing video file have one now: trying them "
              "again", file=sys.stderr)
    todo = [c for c in mine if shards.sample_key(c.id) not in done]
    elsewhere = [c for c in mine if done.get(shards.sample_key(c.id), c.split) not in (None, c.split)]
    if elsewhere:  # a clip is made once per folder: resuming skips it by its key, whatever split it went to
        first = elsewhere[0]
        _warn(f"{out_dir}: {len(elsewhere)} clip(s) of this manifest are there already for another split (e.g. "
              f"{first.id}: {done[shards.sample_key(first.id)]} there, {first.split} now); they are kept as they are: "
              f"give another --out to make them for split {first.split}")
    wanted = {shards.sample_key(c.id): c for c in mine if shards.sample_key(c.id) in done}
    if wanted:
        warn_about_changes(out_dir, wanted, stored)
    summary.resumed = len(mine) - len(todo)

    failures_path = out_dir / shards.FAILURES_FILE
    bar = tqdm(total=len(todo), unit="clip", disable=not progress, dynamic_ncols=True, desc=f"features rank {rank}")

    def record_failure(item: dict[str, Any]) -> None:
        stage, reason = item["error"]
        clip = item["clip"]
        shards.append_jsonl(failures_path, {"id": clip.id, "split": clip.split, "stage": stage, "reason": reason})
        summary.failed[stage] += 1
        bar.update(1)
        bar.set_postfix(failed=sum(summary.failed.values()))

    prefetch = 4
    tensors, why_not = shared_memory_room(cfg, prefetch)
    if not tensors:
        print(f"warning: {why_not}", file=sys.stderr)
    sink = ShardSink(out_dir, rank, cfg, threaded=threaded_writer)
    items = decode_clips(todo, cfg, tensors, prefetch, out_dir / f".decoding-{rank:03d}")
    last_batch_done = None
    nounless: list[Clip] = []
    try:
        for batch in _batches(items, cfg.batch_clips, record_failure):
            if last_batch_done is None:
                summary.startup_seconds = time.perf_counter() - started
            nouns = [nouns_of(item["clip"].caption) for item in batch]
            nounless += [item["clip"] for item, found in zip(batch, nouns) if not found]
            features = encoders.encode(batch, nouns)
            samples = []
            for item, arrays, clip_nouns in zip(batch, features, nouns):
                clip = item["clip"]
                broken = sorted(name for name, array in arrays.items() if not np.isfinite(array).all())
                if broken:  # a model that overflowed (float16) on this clip: its sample would fail the schema
                    record_failure({"clip": clip, "error": ("features", f"{clip.path}: non-finite values in {', '.join(broken)}")})
                    continue
                meta = shards.SampleMeta(
                    id=clip.id, caption=clip.caption, label=clip.label, split=clip.split,
                    duration=round(float(item["duration"]), 4), valid_frames=len(item["frames"]),
                    # absolute: evaluation reads the source video from wherever it runs
                    nouns=tuple(clip_nouns), source=str(Path(clip.path).absolute()), start=clip.start,
                    silent=item["silent"], source_stamp=source_stamp(Path(clip.path)),
                )
                samples.append((meta.to_json(), arrays, item["waveform"]))
            sink.put(samples)
            bar.update(len(samples))  # a failed clip was counted by record_failure
            bar.set_postfix(failed=sum(summary.failed.values()))
            last_batch_done = time.perf_counter()
    finally:
        # every sample handed to the sink is complete, so closing makes the shards in progress visible; only a
        # writer interrupted half-way through a sample drops its shard (ShardSink._write)
        items.close()  # stops the decoding workers
        try:
            summary.shards.extend(str(p) for p in sink.close())
        finally:
            summary.written = sink.written
            bar.close()
            summary.wall_seconds = time.perf_counter() - started
            if last_batch_done is not None:
                summary.drain_seconds = summary.wall_seconds - (last_batch_done - started)
    if nounless:  # said once, at the end: the tagger runs as the batches come
        _warn(f"{len(nounless)} clip(s) have a caption in which the tagger finds no noun (e.g. {nounless[0].id}: "
              f"{nounless[0].caption!r}): their object embedding is zero, nothing of them was grounded")
    return summary


def print_summary(summary: Summary, stream: Any = None) -> None:
    for line in summary.lines():
        print(line, file=stream or sys.stdout)
