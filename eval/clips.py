"""Which clips an evaluation measures, and the files named after them.

A clip is a window of a source video (json 'source', from 'start' for 'duration' seconds) with its shard sample:
`shards.SampleMeta` is its json. The evaluated clips are those of one split, sorted by id so that `max_clips`
takes the same subset on every run; each has at most one generated WAV, <output>/wav/<id>.wav (`wav_path`).
The shards are read here only through `shards`' readers; their errors become `EvalError`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

import shards

WAV_DIR = "wav"


class EvalError(RuntimeError):
    """Unusable evaluation input (run folder, shards, weights): one line naming the file and the reason."""


def wav_path(out_dir: Path, clip_id: str) -> Path:
    """<out>/wav/<clip id>.wav ('/' in an id would nest folders: replaced by '_')."""
    return out_dir / WAV_DIR / (clip_id.replace("/", "_") + ".wav")


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(samples,) float32 mono and its rate; ValueError naming the file when it cannot be used."""
    try:
        waveform, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise ValueError(f"{path}: unreadable WAV ({error})") from None
    if waveform.shape[0] == 0:
        raise ValueError(f"{path}: empty WAV")
    return waveform.mean(axis=1), rate


def read_split(folder: str | Path, split: str) -> list[shards.SampleMeta]:
    """The clips of `split`, in shard order, reading only the json member of each sample."""
    try:
        return shards.read_split(folder, split)
    except shards.ShardFormatError as error:
        raise EvalError(str(error)) from None


def select_clips(clips: list[shards.SampleMeta], max_clips: int) -> list[shards.SampleMeta]:
    """The first `max_clips` clips by id (all when 0); sorted by id so that a subset is the same on every run."""
    ordered = sorted(clips, key=lambda c: c.id)
    ids = [c.id for c in ordered]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise EvalError(f"clip id {duplicate!r} appears twice in the split: WAVs are named by id")
    return ordered[:max_clips] if max_clips else ordered


def iterate_reference_audio(folder: str | Path, split: str, ids: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """(clip id, bytes of its `flac` member) for the clips `ids` of `split`, in shard order; only the json and
    flac members are read."""
    try:
        for meta, data in shards.iter_member(folder, split, shards.AUDIO_KEY, set(ids)):
            yield meta.id, data
    except shards.ShardFormatError as error:
        raise EvalError(str(error)) from None


def iterate_split_samples(folder: str | Path, split: str, ids: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of `split` (restricted to `ids` when given), in shard order."""
    return shards.iter_split(folder, split, None if ids is None else set(ids))


def shards_config_sha256(folder: str | Path) -> str:
    """sha256 of the stage-one config in the shards' meta.json (canonical JSON): changes when the shards are
    rebuilt with other settings (weights, windows, sample rate, ...)."""
    meta = shards.read_meta(folder)
    return hashlib.sha256(json.dumps(meta.get("config"), sort_keys=True).encode()).hexdigest()
