"""What stage one processes: a VGGSound-style CSV plus a video folder, or a plain folder of videos."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shards import ShardFormatError, id_problem, sample_key

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts",
                  ".3gp", ".ogv", ".wmv")
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # split names become shard file names: {split}-{rank}-{index}.tar
# start_seconds as written by people and spreadsheets: ASCII digits, an optional fraction, an optional exponent.
# float() alone also takes '5_0' (50), '\u0665' (an Arabic-Indic 5), 'infinity' and surrounding white space.
SECONDS = re.compile(r"\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


class ManifestError(ValueError):
    """The CSV, captions file or video folder cannot be used (one line: file and reason)."""


@dataclass(frozen=True)
class Clip:
    id: str
    path: Path | None  # None: the CSV names a clip whose file is not in the video folder
    start: float  # seconds into the file where the clip's window starts
    label: str
    caption: str
    split: str


def _index_videos(video_dir: Path) -> dict[str, Path]:
    """File stem -> path for the videos in a folder (one directory scan, also for 200k files). Where several
    files share a stem (x.mp4 and x.mov), the first by name is used, whatever order the directory lists them in,
    and one warning line names them."""
    if not video_dir.is_dir():
        raise ManifestError(f"{video_dir}: {'a file, not a folder' if video_dir.exists() else 'video folder not found'}")
    found: dict[str, list[str]] = {}
    unusable: list[str] = []  # named like a video but not a file: a broken link, a folder
    with os.scandir(video_dir) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if not suffix and stem.lower() in VIDEO_SUFFIXES:  # '.mp4': a video whose id would be empty
                stem, suffix = "", stem
            if suffix.lower() in VIDEO_SUFFIXES:
                try:
                    is_file = entry.is_file()
                except OSError:  # a symbolic link loop (ELOOP), a name too long once resolved
                    is_file = False
                if is_file:
                    found.setdefault(stem, []).append(entry.name)
                else:
                    unusable.append(entry.name)
    if unusable:
        unusable.sort()
        print(f"warning: {video_dir}: {len(unusable)} entries named like videos are not files (a broken link, a link "
              f"loop or a folder) and are left out: {', '.join(unusable[:3])}{' ...' if len(unusable) > 3 else ''}", file=sys.stderr)
    shared = {stem: sorted(names) for stem, names in found.items() if len(names) > 1}
    if shared:
        examples = "; ".join(f"{names[0]} (not {', '.join(names[1:])})" for _, names in sorted(shared.items())[:3])
        print(f"warning: {video_dir}: {len(shared)} clip id(s) have several video files; using the first by name: "
              f"{examples}{' ...' if len(shared) > 3 else ''}", file=sys.stderr)
    return {stem: video_dir / min(names) for stem, names in found.items()}


def from_vggsound_csv(csv_path: Path, video_dir: Path) -> list[Clip]:
    """Rows `youtube_id, start_seconds, label, split` (VGGSound's CSV, no header).

    A file named `{ytid}_{start:06d}.*` holds the trimmed clip (window from 0); a file named `{ytid}.*`
    holds the whole video (window from start_seconds). Clip ids are `{ytid}_{start:06d}`.
    """
    if not csv_path.exists() or csv_path.is_dir():  # a pipe is read (--csv <(...))
        raise ManifestError(f"{csv_path}: {'a folder, not a CSV file' if csv_path.is_dir() else 'CSV not found'}")
    index = _index_videos(video_dir)
    clips: list[Clip] = []
    first = True  # the first row that is not blank or a comment may be a header
    for line_number, row in _csv_rows(csv_path, _read_text(csv_path)):
        if not row or row[0].startswith("#"):
            continue
        header, first = first and row[0].strip().lower() in {"youtube_id", "ytid", "id"}, False
        if header:
            continue
        if len(row) != 4:  # a fifth field: a label with an unquoted comma, whose second half would be the split
            raise ManifestError(f"{csv_path}:{line_number}: expected 4 fields `youtube_id,start_seconds,label,split`, got "
                                f"{len(row)} {row} (quote a label that holds a comma)")
        ytid, start_text, label, split = (field.strip() for field in row)
        if not ytid:
            raise ManifestError(f"{csv_path}:{line_number}: empty youtube_id")
        start = float(start_text) if SECONDS.fullmatch(start_text) else math.nan
        if not math.isfinite(start):
            raise ManifestError(f"{csv_path}:{line_number}: start_seconds {start_text!r} is not a number of seconds >= 0")
        if not SPLIT_NAME.match(split):
            raise ManifestError(f"{csv_path}:{line_number}: split {split!r} must be letters, digits or '_'")
        clip_id = f"{ytid}_{int(start):06d}"
        if clip_id in index:
            path, offset = index[clip_id], 0.0
        elif ytid in index:
            path, offset = index[ytid], start
        else:
            path, offset = None, 0.0
        clips.append(Clip(clip_id, path, offset, label, label, split))
    _warn_about_split_case(csv_path, {clip.split for clip in clips})
    clips = usable_ids(clips, csv_path)
    check_sample_keys(clips, csv_path)
    return clips


def _warn_about_split_case(source: Path, splits: set[str]) -> None:
    """One warning line when split names differ only in case (`Train`, `train`): they are separate splits, and
    training and evaluation read one by its exact name."""
    by_folded: dict[str, list[str]] = {}
    for split in sorted(splits):
        by_folded.setdefault(split.lower(), []).append(split)
    alike = [names for names in by_folded.values() if len(names) > 1]
    if alike:
        print(f"warning: {source}: split names that differ only in case are separate splits "
              f"({'; '.join(' and '.join(repr(n) for n in names) for names in alike)}); training and evaluation read "
              "one split by its exact name", file=sys.stderr)


def _read_text(path: Path) -> str:
    """A manifest's text: UTF-8, with or without the byte-order mark spreadsheet programs write."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each row of a CSV text (a quoted field may hold a newline); ManifestError naming the
    line for what the csv module refuses (a field over its 128 kB limit, a NUL byte)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as error:
        raise ManifestError(f"{path}:{reader.line_num}: not readable as CSV ({error})") from None


def _read_captions(captions_path: Path) -> dict[str, str]:
    """A JSON object {name: caption} or a CSV with rows `name,caption`, a name being a video's stem or file name
    (`_caption_stem`). A JSON null is no caption."""
    if not captions_path.exists() or captions_path.is_dir():  # a pipe is read (--captions <(...))
        raise ManifestError(f"{captions_path}: "
                            f"{'a folder, not a captions file' if captions_path.is_dir() else 'captions file not found'}")
    text = _read_text(captions_path)
    if captions_path.suffix.lower() == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_JsonObject)
        except json.JSONDecodeError as error:
            raise ManifestError(f"{captions_path}: not valid JSON ({error})") from None
        except RecursionError:
            raise ManifestError(f"{captions_path}: not valid JSON (nested too deeply)") from None
        if not isinstance(data, _JsonObject):
            raise ManifestError(f"{captions_path}: expected a JSON object mapping video name to caption")
        for name, value in data:
            if value is not None and not isinstance(value, str):
                kind = "object" if isinstance(value, _JsonObject) else type(value).__name__
                raise ManifestError(f"{captions_path}: the caption of {name!r} is a {kind}, not a string")
        pairs = [(name, value if isinstance(value, str) else "") for name, value in data]  # a key twice: two pairs
    else:
        pairs = []
        for line_number, row in _csv_rows(captions_path, text):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 2:  # a caption with an unquoted comma would be cut at it
                raise ManifestError(f"{captions_path}:{line_number}: expected 2 fields `name,caption`, got {len(row)} "
                                    f"{row} (quote a caption that holds a comma)")
            pairs.append((row[0].strip(), row[1].strip()))
    captions: dict[str, str] = {}
    named: dict[str, str] = {}
    for name, caption in pairs:
        stem = _caption_stem(name)
        if stem in captions and captions[stem] != caption:  # "x.mp4" and "x", or "a/x.mp4" and "b/x.mkv"
            raise ManifestError(f"{captions_path}: {named[stem]!r} and {name!r} both name video {stem!r}, with other "
                                f"captions ({captions[stem]!r}, {caption!r}); keep one")
        captions[stem], named[stem] = caption, name
    return captions


class _JsonObject(list[tuple[str, object]]):
    """A JSON object as its (key, value) pairs in file order: `json.loads` keeps only the last of a key written
    twice, and a captions file that gives one video two captions is refused, not read as whichever came last."""


def _caption_stem(name: str) -> str:
    """The video stem a captions file's name means: a file name with a video suffix (`x.mp4`, also under a folder)
    means its stem; any other name is the stem itself (`take.2` is video take.2.mp4, not take.mp4)."""
    path = Path(name)
    return path.stem if path.suffix.lower() in VIDEO_SUFFIXES else path.name


def from_folder(video_dir: Path, captions_path: Path | None = None, split: str = "train") -> list[Clip]:
    """Every video in a folder, each with its caption (or none), window from the file's start."""
    if not SPLIT_NAME.match(split):
        raise ManifestError(f"split {split!r} must be letters, digits or '_'")
    index = _index_videos(video_dir)
    captions = _read_captions(captions_path) if captions_path else {}
    if captions_path:
        _check_coverage(captions_path, captions, index)
    clips = [Clip(stem, path, 0.0, captions.get(stem, ""), captions.get(stem, ""), split) for stem, path in sorted(index.items())]
    clips = usable_ids(clips, video_dir)
    check_sample_keys(clips, video_dir)
    return clips


def _check_coverage(captions_path: Path, captions: dict[str, str], index: dict[str, Path]) -> None:
    """ManifestError when the captions file names none of the videos; else one warning line for the videos it
    leaves without a caption (their nouns are none, so their object embedding is zero) and one for captions that
    name no video: both usually mean its names are spelled differently from the files'."""
    uncaptioned = sorted(stem for stem in index if not captions.get(stem))
    unmatched = sorted(stem for stem in captions if stem not in index)
    if index and captions and len(unmatched) == len(captions):  # another folder's captions, or names spelled otherwise
        raise ManifestError(f"{captions_path}: its {len(captions)} captions name none of the {len(index)} videos of the "
                            f"folder (e.g. {unmatched[0]!r}; names are video stems or file names)")
    for names, what in ((uncaptioned, f"of {len(index)} videos have no caption there"),
                        (unmatched, "captions name no video in the folder")):
        if names:
            print(f"warning: {captions_path}: {len(names)} {what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}",
                  file=sys.stderr)


def dedupe(clips: list[Clip]) -> tuple[list[Clip], int]:
    """Keep the first clip of each id (VGGSound's CSV has repeated rows); returns clips and count dropped. Rows
    that share an id but not the rest (another label, or a start that differs in its fraction: 1700 and 1700.5
    are both clip x_001700) are dropped too, with one warning line naming the first few."""
    first: dict[str, Clip] = {}
    kept = []
    conflicts: list[str] = []
    for clip in clips:
        earlier = first.setdefault(clip.id, clip)
        if earlier is clip:
            kept.append(clip)
        elif differences := _differences(earlier, clip):
            conflicts.append(f"{clip.id} ({differences})")
    if conflicts:
        print(f"warning: {len(conflicts)} manifest rows share a clip id with an earlier, different row and are left "
              f"out (the first row is used): {'; '.join(conflicts[:3])}{' ...' if len(conflicts) > 3 else ''}",
              file=sys.stderr)
    return kept, len(clips) - len(kept)


def _differences(kept: Clip, dropped: Clip) -> str:
    """'start 1700.0 kept, 1700.5 left out, ...' for the fields in which two rows of one clip id differ (the caption
    only where it is not the label, as it is in a VGGSound CSV)."""
    names = [name for name in ("path", "start", "label", "split", "caption") if getattr(kept, name) != getattr(dropped, name)]
    if "label" in names and kept.caption == kept.label and dropped.caption == dropped.label:
        names.remove("caption")
    return ", ".join(f"{name} {getattr(kept, name)} kept, {getattr(dropped, name)} left out" for name in names)


def usable_ids(clips: list[Clip], source: object) -> list[Clip]:
    """The clips whose ids can name a clip (`shards.id_problem`); each other one is left out with a warning line
    naming it and why (a video named 'x .mp4' or with a line break in its name), and the others go on."""
    kept = []
    for clip in clips:
        problem = id_problem(clip.id)
        if problem:
            print(f"warning: {source}: clip id {clip.id!r} {problem}; left out (rename the video or the manifest's id)",
                  file=sys.stderr)
        else:
            kept.append(clip)
    return kept


def check_sample_keys(clips: list[Clip], source: object) -> None:
    """ManifestError naming both ids when two different clip ids give the same shard sample key.

    `shards.sample_key` replaces '.' and '/' by '_' (WebDataset splits member names at the first dot), so `x.1`
    and `x_1` would share a key, and verification then rejects the whole shard. This is refused rather than
    disambiguated: a suffix chosen by which other ids are present would give one clip different keys in
    different runs (another --limit, another manifest), and resuming, which skips clips by key, would then
    write a clip twice or skip one that was never written. The same id repeated (VGGSound's repeated rows) is
    not a clash. `source` names the manifest in the message."""
    first_id: dict[str, str] = {}
    for clip in clips:
        problem = id_problem(clip.id)
        if problem:
            raise ManifestError(f"{source}: clip id {clip.id!r} {problem}; rename the video (or the manifest's id)")
        try:
            key = sample_key(clip.id)
        except ShardFormatError:
            raise ManifestError(f"{source}: clip id {clip.id!r} gives an empty sample key") from None
        other = first_id.setdefault(key, clip.id)
        if other != clip.id:
            raise ManifestError(f"{source}: clip ids {other!r} and {clip.id!r} both become shard sample key {key!r} "
                                "('.' and '/' are written as '_'); rename one of them")


def partition(clips: list[Clip], rank: int, world_size: int) -> list[Clip]:
    """This rank's clips: a fixed round-robin over the id-sorted manifest, disjoint across ranks."""
    if not 0 <= rank < world_size:
        raise ManifestError(f"rank {rank} outside [0, {world_size})")
    ordered = sorted(clips, key=lambda c: c.id)
    return ordered[rank::world_size]
