"""Which clips an evaluation measures, and the files named after them.

A clip is a window of a source video (json 'source', from 'start' for 'duration' seconds) with its shard sample:
`shards.SampleMeta` is its json. The evaluated clips are those of one split (`evaluation_clips`):

- all of them (max_clips 0);
- or `max_clips` of them, the ids with the smallest sha256('<selection_seed>/<id>') (`select_clips`): a seeded
  sample that does not depend on the shards' order, on which other clips the split holds beyond the chosen ones
  (a clip's key is its own), nor on the system evaluated. The paper measures "1,000 samples from the official
  test set" without naming them; this rule makes the 1,000 the same for every run and every system;
- or exactly the ids listed in a file (`clip_ids`, one per line), e.g. another evaluation's clip_ids.txt.

Whatever the rule, the clips are measured in id order and their ids are written to <output>/clip_ids.txt
(`write_clip_ids`), so that another run can be scored on the same clips (--clip-ids). Each clip has at most one
generated WAV, <output>/wav/<id>.wav (`wav_path`). The shards are read here only through `shards`' readers;
their errors become `EvalError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

import shards
from eval.config import EvalConfig

WAV_DIR = "wav"
CLIP_IDS_FILE = "clip_ids.txt"  # in the output folder: the evaluated ids, one per line, in id order


class EvalError(RuntimeError):
    """Unusable evaluation input (run folder, shards, weights): one line naming the file and the reason."""


MAX_NAME_BYTES = 255  # a file name's limit on Linux, macOS and Windows file systems


def wav_path(out_dir: Path, clip_id: str) -> Path:
    """<out>/wav/<clip id>.wav ('/' in an id would nest folders: replaced by '_')."""
    return out_dir / WAV_DIR / (clip_id.replace("/", "_") + ".wav")


def wav_cut_short(path: Path) -> str | None:
    """Why a RIFF/RF64 WAV holds fewer sample bytes than its data chunk declares (a copy or a write cut short, which
    libsndfile reads as a shorter sound without a word), else None; also None for other files and for the sizes
    a WAV written to a pipe declares (0, or 0xFFFFFFFF: unknown)."""
    try:
        with open(path, "rb") as file:
            head = file.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
                return None
            size = os.fstat(file.fileno()).st_size
            position, long_size = 12, None
            while position + 8 <= size:
                file.seek(position)
                chunk = file.read(8)
                declared = int.from_bytes(chunk[4:8], "little")
                if chunk[:4] == b"ds64":  # RF64: the data chunk's real size (its own field reads 0xFFFFFFFF)
                    ds64 = file.read(16)
                    long_size = int.from_bytes(ds64[8:16], "little") if len(ds64) == 16 else None
                elif chunk[:4] == b"data":
                    if head[:4] == b"RF64" and declared == 0xFFFFFFFF and long_size is not None:
                        declared = long_size
                    held = size - position - 8
                    if declared in (0, 0xFFFFFFFF) or held >= declared:
                        return None
                    return f"its data chunk is cut short: {held} of {declared} bytes"
                position += 8 + declared + (declared & 1)
    except OSError:
        return None  # soundfile says why it cannot read it
    return None


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(samples,) float32 mono and its rate; ValueError naming the file when it cannot be used (also a WAV that
    holds less sound than its header declares: `wav_cut_short`)."""
    try:
        waveform, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise ValueError(f"{path}: unreadable WAV ({error})") from None
    cut = wav_cut_short(path)
    if cut:
        raise ValueError(f"{path}: {cut}")
    if waveform.shape[0] == 0:
        raise ValueError(f"{path}: empty WAV")
    if not np.isfinite(waveform).all():  # a float WAV can hold NaN or infinity: the embedders would pass it on
        raise ValueError(f"{path}: NaN or infinite samples")
    return waveform.mean(axis=1), rate


def missing_wav_failures(out_dir: Path, clips: list[shards.SampleMeta], failures: list[dict[str, Any]],
                         generated: bool) -> list[dict[str, Any]]:
    """A failure record (stage 'missing_wav') for each clip that has no WAV and no failure among `failures`
    yet, so that every clip left out of the measurement is listed with a reason, and listed once (a clip whose
    generation failed keeps that record alone). `generated` says whether this run generated the missing WAVs."""
    listed = {f.get("id") for f in failures}
    why = "not written by this run's generation" if generated else "generation was off (--no-generate)"
    return [{"id": c.id, "stage": "missing_wav", "reason": f"{wav_path(out_dir, c.id)}: no generated WAV ({why})"}
            for c in clips if c.id not in listed and not wav_path(out_dir, c.id).exists()]


def unreadable_wav_failures(out_dir: Path, clips: list[shards.SampleMeta], failures: list[dict[str, Any]]
                            ) -> list[dict[str, Any]]:
    """A failure record (stage 'read_wav') for each clip whose WAV exists but `read_wav` refuses, whatever metrics
    are measured (only the audio embedders' pass recorded them: with AV-Align alone such a clip counted as paired)."""
    listed = {(f.get("id"), f.get("stage")) for f in failures}
    records = []
    for clip in clips:
        path = wav_path(out_dir, clip.id)
        if (clip.id, "read_wav") in listed or not path.exists():
            continue
        try:
            read_wav(path)
        except ValueError as error:
            records.append({"id": clip.id, "stage": "read_wav", "reason": str(error)})
    return records


def read_split(folder: str | Path, split: str) -> list[shards.SampleMeta]:
    """The clips of `split`, in shard order, reading only the json member of each sample."""
    try:
        return shards.read_split(folder, split)
    except shards.ShardFormatError as error:
        raise EvalError(str(error)) from None


def selection_key(selection_seed: int, clip_id: str) -> str:
    """sha256('<selection_seed>/<clip id>') in hex: `select_clips` keeps the clips whose keys are smallest."""
    return hashlib.sha256(f"{selection_seed}/{clip_id}".encode()).hexdigest()


def sorted_unique(clips: list[shards.SampleMeta]) -> list[shards.SampleMeta]:
    """The clips in id order; EvalError when an id appears twice, or when two ids name one WAV (`wav_path` writes
    'a/b' as 'a_b.wav': the second clip would be scored on the first one's audio)."""
    ordered = sorted(clips, key=lambda c: c.id)
    for before, after in zip(ordered, ordered[1:]):
        if before.id == after.id:
            raise EvalError(f"clip id {before.id!r} appears twice in the split: WAVs are named by id")
    named: dict[str, str] = {}
    for clip in ordered:
        name = wav_path(Path(), clip.id).name
        if len((name + ".tmp").encode()) > MAX_NAME_BYTES:  # the WAV is written as <name>.tmp, then renamed
            raise EvalError(f"clip id {clip.id[:40]!r}... is too long to name its WAV ({len(name.encode())} bytes; "
                            f"at most {MAX_NAME_BYTES - 4} with .tmp)")
        if name in named:
            raise EvalError(f"clip ids {named[name]!r} and {clip.id!r} would share one WAV ({name}): rename one of them")
        named[name] = clip.id
    return ordered


def select_clips(clips: list[shards.SampleMeta], max_clips: int, selection_seed: int = 0) -> list[shards.SampleMeta]:
    """All clips in id order (max_clips 0), else the `max_clips` clips with the smallest
    `selection_key(selection_seed, id)`, in id order."""
    ordered = sorted_unique(clips)
    if not max_clips or max_clips >= len(ordered):
        return ordered
    chosen = {c.id for c in sorted(ordered, key=lambda c: selection_key(selection_seed, c.id))[:max_clips]}
    return [c for c in ordered if c.id in chosen]


def read_clip_ids(path: str | Path) -> list[str]:
    """The ids of a clip-id file, one per line (blank lines skipped, spaces around an id dropped), in file order;
    EvalError naming the file when it is missing, unreadable, empty or lists an id twice."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # a BOM (Windows editors) is not part of an id
    except FileNotFoundError:
        raise EvalError(f"{path}: clip-id file missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise EvalError(f"{path}: unreadable clip-id file ({error})") from None
    ids = [line.strip() for line in lines if line.strip()]
    if not ids:
        raise EvalError(f"{path}: no clip id in it (one id per line)")
    seen: set[str] = set()
    for clip_id in ids:
        if clip_id in seen:
            raise EvalError(f"{path}: clip id {clip_id!r} is listed twice")
        seen.add(clip_id)
    return ids


def listed_clips(clips: list[shards.SampleMeta], path: str | Path, where: str) -> list[shards.SampleMeta]:
    """The clips whose ids `path` lists, in id order; EvalError naming the file and the first ids that are not
    among `clips` (`where` says which split of which shards they are)."""
    ordered = sorted_unique(clips)
    by_id = {c.id: c for c in ordered}
    ids = read_clip_ids(path)
    missing = [i for i in ids if i not in by_id]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise EvalError(f"{path}: {len(missing)} of its {len(ids)} clip ids are not in {where}: {shown}")
    wanted = set(ids)
    return [c for c in ordered if c.id in wanted]


def evaluation_clips(config: EvalConfig, clips: list[shards.SampleMeta]) -> list[shards.SampleMeta]:
    """The clips `config` evaluates among `clips` (its split), in id order: those of config.clip_ids when set,
    else `select_clips(clips, config.max_clips, config.selection_seed)`."""
    if config.clip_ids:
        return listed_clips(clips, config.clip_ids, f"split {config.split!r} of {config.shards}")
    return select_clips(clips, config.max_clips, config.selection_seed)


def clip_ids_text(clips: list[shards.SampleMeta]) -> str:
    """The content of clip_ids.txt: one id per line, in the clips' order, each line ending in a newline."""
    return "".join(f"{c.id}\n" for c in clips)


def write_clip_ids(out_dir: Path, clips: list[shards.SampleMeta]) -> Path:
    """<out>/clip_ids.txt (`clip_ids_text`), written to a temporary name and renamed."""
    path = out_dir / CLIP_IDS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(clip_ids_text(clips), encoding="utf-8")
    os.replace(tmp, path)
    return path


def clip_selection(config: EvalConfig, clips: list[shards.SampleMeta]) -> dict[str, Any]:
    """What results.json's protocol states about the evaluated set: the rule that chose it and
    'clip_ids_sha256', the sha256 of clip_ids.txt (equal for two evaluations exactly when their clips are)."""
    if config.clip_ids:
        rule: dict[str, Any] = {"rule": "clip_ids", "clip_ids_file": str(config.clip_ids)}
    elif config.max_clips:
        rule = {"rule": "smallest sha256('<selection_seed>/<id>')", "max_clips": config.max_clips,
                "selection_seed": config.selection_seed}
    else:
        rule = {"rule": "all"}
    return {"clip_selection": rule, "clip_ids_sha256": hashlib.sha256(clip_ids_text(clips).encode()).hexdigest()}


def iterate_reference_audio(folder: str | Path, split: str, ids: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """(clip id, bytes of its `flac` member) for the clips `ids` of `split`, in shard order; only the json and
    flac members are read."""
    try:
        for meta, data in shards.iter_member(folder, split, shards.AUDIO_KEY, set(ids)):
            yield meta.id, data
    except shards.ShardFormatError as error:
        raise EvalError(str(error)) from None


def iterate_split_samples(folder: str | Path, split: str, ids: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of `split` (restricted to `ids` when given), in shard order; EvalError naming the shard when
    one cannot be read."""
    try:
        yield from shards.iter_split(folder, split, None if ids is None else set(ids))
    except shards.ShardFormatError as error:
        raise EvalError(str(error)) from None


def shards_config_sha256(folder: str | Path) -> str:
    """sha256 of the stage-one config in the shards' meta.json (canonical JSON): changes when the shards are
    rebuilt with other settings (weights, windows, sample rate, ...)."""
    meta = shards.read_meta(folder)
    return hashlib.sha256(json.dumps(meta.get("config"), sort_keys=True).encode()).hexdigest()
