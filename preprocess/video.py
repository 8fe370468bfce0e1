"""Decode the frames stage one samples from a clip: decord first, PyAV as the fallback.

Time convention: t = 0 is the presentation time of the video stream's first frame (decord's
`get_frame_timestamp` origin; PyAV timestamps are shifted by the stream's `start_time` to match).
The frame for time t is the frame on screen at `start + t`: the last frame whose presentation
timestamp is <= start + t (real per-frame timestamps, so variable-frame-rate video works).

Why two backends (measured with decord 0.6.0 and PyAV on the files in tests/media.py):
- decord 0.6.0 indexes every packet on open and decodes a sorted batch quickly; with its default
  `num_threads` it stops after ~11 frames of VP9 (dmlc/decord#246), so it always runs with one thread.
- decord refuses some partly corrupt files (it fails while indexing) from which PyAV still recovers
  every frame up to the damage, so any decord failure falls back to PyAV, which gives the verdict.
- decord applies the rotation (display matrix) metadata; PyAV returns the stored frame, so PyAV frames
  are turned here by their display matrix and both backends return a portrait clip as portrait. A matrix that
  mirrors the picture (a selfie camera's, `ffmpeg -display_hflip`) decord reads as a half turn (a mirrored frame
  came back upside down and mirrored the other way): such files go to PyAV, which flips as the matrix says.

Frames are brought to their displayed shape (anamorphic pixels: `pixel_aspect`) and downscaled (never beyond
the displayed size) to a short side <= `short_side`, with OpenCV's INTER_AREA (INTER_LINEAR along an axis an
anamorphic frame is widened on), as they are decoded: a window never holds all its full-size frames (4K: 25 MB
each). decord's own resize (`width=`/`height=`) is not used because decord 0.6.0 fails on some sizes (48x32:
"DECORDArrayCopyFromTo: The size must exactly match"). Files decord gets wrong go to PyAV (`_read_header`: MPEG
program and transport streams, ASF, codecs outside DECORD_CODECS, H.264/HEVC whose keyframes are not all IDR
pictures, mirroring display matrices, absurd frame counts; and decord's own timestamps: an edit list's lead-in, no
timestamps at all, timestamps that do not advance).

PyAV seeks to the keyframe before a window's start, backing off where the container's seek lands late (MPEG
transport and program streams seek by bytes: `_seek_margins`); a transport stream whose timestamps jump
(`timestamp_jump`) is read from its start, and a window that reaches the jump is refused.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import av
import av.logging
import cv2
import numpy as np

from common.ffmpeg import decoded_frames, decord_log_dropped, media_path, moving_video_streams, pyav_reason, quiet_decord, video_stream

Backend = Literal["auto", "decord", "pyav"]
# A frame counts as shown at time t when its timestamp is <= t + EPSILON: decord's timestamps are float32
# (0.3 s is stored as 0.30000001), and 1 ms is far below any frame interval (240 fps: 4.2 ms).
EPSILON = 1e-3


class VideoDecodeError(Exception):
    """A clip whose frames cannot be read; the message is one line: `<file>: <reason>`."""


class DecordRefused(Exception):
    """A file decord is not given or whose frames it would misplace (a header that would make it end the process,
    MPEG program/transport streams, an edit list's lead-in, frames without timestamps); PyAV reads it instead."""


@dataclass(frozen=True)
class DecodedFrames:
    """Frames at the requested times that lie inside the video, plus what the pipeline needs to pad."""

    frames: np.ndarray  # (n_valid, H, W, 3) uint8 RGB; n_valid = number of requested times < duration
    duration: float  # seconds of video from `start`, capped at the window
    native_fps: float  # the stream's average frame rate
    backend: str  # "decord" or "pyav"


# ----------------------------------------------------------------------------------- helpers
def _target_size(height: int, width: int, short_side: int, stretch: tuple[float, float] = (1.0, 1.0)) -> tuple[int, int]:
    """(H, W) of the frame as displayed, with the short side at most `short_side`, never larger than displayed.
    stretch: (vertical, horizontal) factors from stored to displayed pixels (the pixel aspect ratio of anamorphic
    video: 720x480 at 32:27 is displayed 853x480)."""
    height_shown, width_shown = height * stretch[0], width * stretch[1]
    scale = min(1.0, short_side / min(height_shown, width_shown))
    return max(1, round(height_shown * scale)), max(1, round(width_shown * scale))


def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if frame.shape[:2] == size:
        return np.ascontiguousarray(frame)
    # INTER_AREA averages the source pixels under each output pixel: no aliasing when shrinking. An anamorphic
    # frame can be widened along one axis: there, linear interpolation.
    shrinking = size[0] <= frame.shape[0] and size[1] <= frame.shape[1]
    return cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


MAX_PIXEL_ASPECT = 4.0  # stored pixels at most this much wider or taller than square (real ones: 32:27, 8:9, 4:3, 2:1)


def pixel_aspect(stream: Any) -> float:
    """Width / height of one stored pixel (the sample aspect ratio), 1.0 when unknown or beyond MAX_PIXEL_ASPECT
    (a crafted 1000:1 would make frames 1000 times wider)."""
    ratio = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    value = float(ratio) if ratio else 1.0
    return value if 1 / MAX_PIXEL_ASPECT <= value <= MAX_PIXEL_ASPECT else 1.0


def _stretch(aspect: float, quarter_turns: int) -> tuple[float, float]:
    """(vertical, horizontal) stretch of a frame turned by `quarter_turns`: the stored width is then its height."""
    return (aspect, 1.0) if quarter_turns % 2 else (1.0, aspect)


def _check_request(path: Path, start: float, times: np.ndarray, window: float, short_side: int) -> None:
    if start < 0 or window <= 0 or short_side < 1:
        raise ValueError(f"{path}: need start >= 0, window > 0, short_side >= 1 (got {start}, {window}, {short_side})")
    if times.ndim != 1 or (times.size and (times.min() < 0 or np.any(np.diff(times) <= 0))):
        raise ValueError(f"{path}: times must be non-negative and increasing")


def _check_file(path: Path) -> None:
    if not path.is_file():
        kind = ("a folder" if path.is_dir() else "not a regular file (a pipe, a device...)" if path.exists()
                else "a broken link" if path.is_symlink() else None)
        raise VideoDecodeError(f"{path}: {kind}, not a video file" if kind else f"{path}: file not found")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: empty file")


def _available(path: Path, start: float, end: float, window: float) -> float:
    """Seconds of video from `start` (capped at the window), given the end of the last frame."""
    if end <= 0:
        raise VideoDecodeError(f"{path}: zero duration")
    if start >= end:
        raise VideoDecodeError(f"{path}: start {start:.2f} s is beyond the end of the video ({end:.2f} s)")
    return min(window, end - start)


def _open_pyav(path: Path) -> av.container.InputContainer:
    try:
        return av.open(media_path(path), metadata_errors="ignore")
    except av.FFmpegError:
        pass
    # Open again with FFmpeg's error log switched on, only to name the cause in the message
    # (PyAV keeps the log off by default; the level is process-wide, so it is restored at once).
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture():
            container = av.open(media_path(path), metadata_errors="ignore")
    except av.FFmpegError as error:
        raise VideoDecodeError(f"{path}: cannot be decoded ({pyav_reason(error)})") from None
    finally:
        av.logging.set_level(previous)
    return container  # opened the second time round (a transient failure): use it


# ----------------------------------------------------------------------------------- decord
MAX_HEADER_FRAMES = 1 << 24  # 78 hours at 60 fps: a frame count above this in a header is not believed
# Containers whose frames decord 0.6.0 returns at the wrong times (it seeks by byte position and ignores their
# clock's start): MPEG-TS (.ts, .m2ts, also when named .mp4) gave frames 16, 21, ... 46, 45, 43 for 0, 5, ... 55
# ASF/WMV: every timestamp 0 for H.264, WMV1/2 frames up to a second off
DECORD_MISPLACED_FORMATS = {"mpegts", "mpeg", "mpegvideo", "asf"}
# The codecs whose frames decord 0.6.0 was checked to place right (against PyAV, frame-numbered files in MP4, MOV,
# Matroska, WebM, AVI, FLV): any other one is read by PyAV. decord seeking in MPEG-1/2/4 Part 2 with B-frames came
# back up to 10 frames early in Matroska and 2 late in MP4; H.263+ in Matroska 10 frames off without B-frames;
# MS-MPEG4, WMV1/2 off by up to a second.
DECORD_CODECS = {"h264", "hevc", "vp8", "vp9", "av1", "mjpeg", "theora", "flv1", "prores"}


@dataclass(frozen=True)
class _Header:
    refused: str | None  # why decord must not open the file
    aspect: float  # pixel_aspect of the video stream
    stored: tuple[int, int]  # (width, height) of the stored frames, before any rotation
    lead: float = 0.0  # seconds before a time that decoding must start from (`_recovery_keyframes`)


FileVersion = tuple[str, int, int]  # (resolved path, size, modification time): a rewritten file is another version


def _file_version(path: Path) -> FileVersion:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _read_header(path: Path) -> _Header | None:
    """`_header_of`, read once per file version (the last few kept): each window of a long video asks."""
    return _header_of_version(_file_version(path))


@functools.lru_cache(maxsize=8)
def _header_of_version(version: FileVersion) -> _Header | None:
    return _header_of(Path(version[0]))


def _header_of(path: Path) -> _Header | None:
    """What decord's path needs from the header (PyAV; at most the first frame decoded); None when PyAV cannot open
    the file (left to decord). `refused`: decord 0.6.0 sizes its frame index by the frame count the header
    announces, and an absurd count ends the whole process (C++ std::bad_alloc, no exception to catch): an AVI
    written to a pipe announces 2**30 frames. A count far above duration x fps, or above MAX_HEADER_FRAMES, goes to
    PyAV instead, which reads frames as they come; so do the containers and streams whose frames decord misplaces
    (`_recovery_keyframes`)."""
    try:
        container = av.open(media_path(path), metadata_errors="ignore")
    except av.FFmpegError:
        return None
    with container:
        stream = video_stream(container)
        if stream is None:
            return None
        aspect, stored = pixel_aspect(stream), (stream.codec_context.width, stream.codec_context.height)
        refused = None
        orientation = _first_orientation(path, stream.index)
        moving = moving_video_streams(container)
        if len(moving) > 1:  # decord picks its own (MP4: by bitrate; Matroska: the first), not `video_stream`'s
            refused = f"it holds {len(moving)} video streams, of which decord may read another than the one chosen"
        elif orientation.mirrored:  # decord turns by the matrix's angle alone
            refused = "its display matrix mirrors the picture, which decord turns instead"
        elif aspect != 1.0 and stored[0] == stored[1] and orientation.transposed:
            # decord turns the frames by their display matrix; `_decord_size` tells from their shape whether the
            # stored width became the height, which a square frame does not show
            refused = "its square-stored frames of non-square pixels are turned a quarter"
        elif set(container.format.name.split(",")) & DECORD_MISPLACED_FORMATS:
            refused = f"decord misplaces the frames of {container.format.name} (MPEG program and transport streams, ASF)"
        elif stream.codec_context.codec.canonical_name not in DECORD_CODECS:
            refused = f"decord is not trusted to place {stream.codec_context.codec.canonical_name} frames"
        else:
            frames = stream.frames  # 0: not in the header (Matroska, WebM)
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = (container.duration or 0) / av.time_base
            plausible = 4 * seconds * fps + 1000 if seconds > 0 and fps > 0 else MAX_HEADER_FRAMES
            if frames > min(plausible, MAX_HEADER_FRAMES):
                refused = f"its header announces {frames} frames for {seconds:.1f} s at {fps:g} fps"
        # also where decord is refused for another reason: PyAV's seeks need the lead (intra refresh in MPEG-TS)
        recovery, lead = _recovery_keyframes(container, stream)
        return _Header(refused or recovery, aspect, stored, lead)


# NAL unit types of the pictures a decoder can start from with nothing before them (IDR); another keyframe is a
# recovery point: open GOP (H.264 I-frames with a recovery-point SEI, HEVC CRA/BLA pictures) or intra refresh
IDR_NAL_TYPES = {"h264": frozenset({5}), "hevc": frozenset({19, 20})}
CODEC_NAMES = {"h264": "H.264", "hevc": "HEVC"}
KEYFRAME_SCAN_SECONDS = 30.0  # of packets read for `_recovery_keyframes` (x264's 250-frame GOP at 10 fps: 25 s)


def _recovery_keyframes(container: Any, stream: Any) -> tuple[str | None, float]:
    """Why decord would misplace an H.264 or HEVC stream's frames: a keyframe within its first KEYFRAME_SCAN_SECONDS
    that is not an IDR picture (read from the packets' NAL unit types, nothing decoded), and then the longest time
    between two keyframes there: the picture at a recovery point may be whole only a keyframe interval later (intra
    refresh), so decoding starts that much before a time. decord 0.6.0 seeks to such a keyframe as if the pictures
    shown before it did not need the GOP before: open-GOP HEVC (x265's default) came back up to 2 s off in Matroska,
    4 frames in MP4; H.264 with intra refresh 10 frames off, some pictures broken; open-GOP H.264 two frames.
    (None, 0) for other codecs, IDR keyframes only, or packets that cannot be read."""
    codec = stream.codec_context.name
    if codec not in IDR_NAL_TYPES:
        return None, 0.0
    extradata = bytes(stream.codec_context.extradata or b"")
    # avcC / hvcC (MP4, Matroska): NAL units prefixed by their length, whose byte count the record gives; else Annex B
    at = {"h264": 4, "hevc": 21}[codec]
    length_size = (extradata[at] & 3) + 1 if len(extradata) > at and extradata[0] == 1 else 0
    time_base = float(stream.time_base or 0.0)
    first = None
    keyframes: list[float] = []
    recovery = False
    try:
        for packet in container.demux(stream):
            stamp = packet.pts if packet.pts is not None else packet.dts
            now = stamp * time_base if stamp is not None and time_base else None
            if now is not None:
                first = now if first is None else first
                if now - first > KEYFRAME_SCAN_SECONDS:
                    break
            if not packet.is_keyframe or not packet.size:
                continue
            if now is not None:
                keyframes.append(now)
            types = _nal_types(bytes(packet), length_size, codec)
            recovery = recovery or bool(types and not types & IDR_NAL_TYPES[codec])
    except av.FFmpegError:
        return None, 0.0
    if not recovery:
        return None, 0.0
    spacing = max(np.diff(sorted(keyframes)), default=KEYFRAME_SCAN_SECONDS)
    return (f"its {CODEC_NAMES[codec]} keyframes are not all IDR pictures (open GOP or intra refresh), whose frames "
            "decord misplaces"), float(spacing)


def _nal_types(data: bytes, length_size: int, codec: str) -> set[int]:
    """The NAL unit types in one packet: length-prefixed units (`length_size` bytes) or Annex B start codes (0)."""
    starts: list[int] = []
    if length_size:
        at = 0
        while at + length_size < len(data):
            starts.append(at + length_size)
            at += length_size + int.from_bytes(data[at : at + length_size], "big")
    else:
        at = data.find(b"\x00\x00\x01")
        while at >= 0 and at + 3 < len(data):
            starts.append(at + 3)
            at = data.find(b"\x00\x00\x01", at + 3)
    return {(data[i] & 0x1F) if codec == "h264" else (data[i] >> 1) & 0x3F for i in starts if i < len(data)}


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns (0-3) of a decoded frame's display matrix."""
    return round(frame.rotation / 90) % 4


@dataclass(frozen=True)
class _Orientation:
    """How a stored frame is displayed, by its display matrix rounded to a quarter turn (FFmpeg's matrix
    [[a, b, u], [c, d, v], [x, y, w]] shows stored pixel (p, q) at (a p + c q + x, b p + d q + y)): transposed
    (the stored rows become columns), then rows and/or columns reversed. A matrix of determinant < 0 mirrors."""

    transposed: bool = False
    flip_rows: bool = False
    flip_columns: bool = False

    @property
    def mirrored(self) -> bool:
        return self.transposed != (self.flip_rows != self.flip_columns)

    def show(self, image: np.ndarray) -> np.ndarray:
        """`image` (H, W, C) as displayed."""
        shown = image.transpose(1, 0, 2) if self.transposed else image
        return shown[::-1 if self.flip_rows else 1, ::-1 if self.flip_columns else 1]  # a view


def _orientation(frame: av.VideoFrame) -> _Orientation:
    """The display orientation of a decoded frame (FFmpeg attaches the stream's display matrix to each frame);
    none without a matrix, or with one that does not read."""
    for data in frame.side_data:
        if data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX and len(bytes(data)) == 36:
            a, b, _, c, d, _, _, _, _ = (float(v) for v in np.frombuffer(bytes(data), dtype="=i4"))
            if not all(map(math.isfinite, (a, b, c, d))) or max(abs(a), abs(b), abs(c), abs(d)) == 0:
                break
            if abs(a) + abs(d) >= abs(b) + abs(c):  # x' = a p, y' = d q
                return _Orientation(False, d < 0, a < 0)
            return _Orientation(True, b < 0, c < 0)  # x' = c q, y' = b p: rows of the transposed image are p
    return _Orientation()


def _first_orientation(path: Path, stream_index: int) -> _Orientation:
    """`_orientation` of the first frame of stream `stream_index` (a container of its own: the header's other
    reads walk the packets from the start); none when no frame decodes within the first KEYFRAME_SCAN_SECONDS of
    packets (a damaged file is not read to its end here)."""
    try:
        with av.open(media_path(path), metadata_errors="ignore") as container:
            stream = container.streams[stream_index]
            first = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0
            frame = next(decoded_frames(container, stream, [], give_up_after=first + KEYFRAME_SCAN_SECONDS), None)
    except av.FFmpegError:
        return _Orientation()
    return _Orientation() if frame is None else _orientation(frame)


def _first_turns(container: av.container.InputContainer, stream: Any) -> tuple[int, bool]:
    """(`_quarter_turns`, whether the display matrix mirrors) of the stream's first frame (the display matrix comes
    with the decoded frames, not the header); (0, False) when no frame decodes. av.FFmpegError when the demuxer
    fails."""
    frame = next(decoded_frames(container, stream, []), None)
    return (0, False) if frame is None else (_quarter_turns(frame), _orientation(frame).mirrored)


DECORD_CHUNK = 4  # frames decord hands over at a time, resized before the next: 4K frames are 25 MB each


def _decord_size(height: int, width: int, header: _Header | None, short_side: int) -> tuple[int, int]:
    """The output size of decord's frames of (height, width), which decord has turned by their display matrix."""
    aspect, stored = (header.aspect, header.stored) if header is not None else (1.0, (width, height))
    turned = (width, height) != stored and (height, width) == stored  # the stored width is now the height
    return _target_size(height, width, short_side, _stretch(aspect, int(turned)))


@dataclass
class _OpenReader:
    """A decord reader with what it read at opening: frame count, average rate, every frame's [begin, end] (s)."""

    key: tuple[str, int, int]  # (path, size, modification time): the file it read
    reader: Any
    count: int
    fps: float
    stamps: np.ndarray


_open_readers: list[_OpenReader] | None = None  # while `reading_windows` runs: the reader kept open


@contextlib.contextmanager
def reading_windows() -> Iterator[None]:
    """Keep the last video's decord reader open across `decode_frames` calls: a long video read window by window
    (vta-sam generate) was indexed again for every window (decord reads every packet's timestamp when it opens a
    file), a cost that grew with the square of its length. Stage one, which reads each clip once, does not use it."""
    global _open_readers
    previous, _open_readers = _open_readers, []
    try:
        yield
    finally:
        _open_readers = previous


def _decord_reader(path: Path) -> _OpenReader:
    decord = quiet_decord()
    key = _file_version(path)
    if _open_readers:
        if _open_readers[0].key == key:
            return _open_readers[0]
        _open_readers.clear()  # one video at a time: its reader (an FFmpeg context and the index) goes
    # One thread: with more, decord 0.6.0 stops after ~11 frames of VP9 (dmlc/decord#246).
    reader = decord.VideoReader(media_path(path), ctx=decord.cpu(0), num_threads=1)
    count = len(reader)
    stamps = np.asarray(reader.get_frame_timestamp(np.arange(count)), dtype=np.float64)  # (count, [begin, end]) s
    opened = _OpenReader(key, reader, count, float(reader.get_avg_fps()), stamps)
    if _open_readers is not None:
        _open_readers.append(opened)
    return opened


def _decode_decord(path: Path, start: float, times: np.ndarray, window: float, short_side: int) -> DecodedFrames:
    header = _read_header(path)
    if header is not None and header.refused:
        raise DecordRefused(header.refused)
    opened = _decord_reader(path)
    reader, count, fps, stamps = opened.reader, opened.count, opened.fps, opened.stamps
    try:
        begins = stamps[:, 0]
        # decord's "no timestamp" (AVI with packed B-frames: -9.2e15; a Matroska file of a few frames: +9.2e15), or
        # stamps that do not advance (H.264 in ASF: all 0): it cannot place the frames
        if not np.all(np.isfinite(stamps)) or np.abs(stamps).max() > 1e6:
            raise DecordRefused("decord has no timestamps for its frames")
        if count > 1 and begins[-1] <= begins[0]:
            raise DecordRefused("decord's timestamps of the frames do not advance")
        if begins[0] < -EPSILON:
            # frames before t = 0 are an edit list's lead-in, there only to decode what follows; decord returns
            # them in the place of later ones (frame 26 for 13 after `ffmpeg -ss 1.3 -c copy`): PyAV applies the list
            raise DecordRefused(f"an edit list starts the video {-begins[0]:.2f} s into its frames")
        last_end = stamps[-1, 1] if stamps[-1, 1] > stamps[-1, 0] else stamps[-1, 0] + 1.0 / max(fps, 1e-6)
        duration = _available(path, start, float(last_end), window)
        valid = times[times < duration - EPSILON]  # as in _decode_pyav
        # The frame on screen at start + t: the last one that began at or before it (the first one before that).
        indices = np.clip(np.searchsorted(begins, start + valid + EPSILON, side="right") - 1, 0, count - 1)
        # each frame once (a source slower than the times repeats frames: decord would seek back for a repeat that
        # starts a chunk), then in the order of the times
        unique, order = np.unique(indices, return_inverse=True)
        distinct: list[np.ndarray] = []
        size: tuple[int, int] | None = None
        for first in range(0, len(unique), DECORD_CHUNK):
            chunk = reader.get_batch(unique[first : first + DECORD_CHUNK].tolist()).asnumpy()  # (n, H, W, 3) RGB
            size = size or _decord_size(chunk.shape[1], chunk.shape[2], header, short_side)
            distinct.extend(_resize(frame, size) for frame in chunk)
            del chunk  # before the next one is decoded
        resized = [distinct[i] for i in order.ravel()]
        if size is None:  # no time inside the video: the size its frames would have
            shape = reader[0].shape
            size = _decord_size(shape[0], shape[1], header, short_side)
    finally:
        del reader, opened  # decord frees its FFmpeg context in __del__ (unless `reading_windows` keeps it)
    frames = np.stack(resized) if resized else np.zeros((0, *size, 3), np.uint8)
    return DecodedFrames(frames=frames, duration=duration, native_fps=fps, backend="decord")


# ----------------------------------------------------------------------------------- PyAV
# The PyAV path seeks to `start`, then further back (each margin thrice the last), until the first frame decoded
# lies at or before the first time asked for; when the margin reaches the file's start, it decodes from its first
# frame. MPEG transport and program streams seek to a byte position near the time, not to the keyframe before it:
# the decoder's first picture was 0.5-1 s late (every time before it got that later picture), or none came at all
# (a GOP longer than the margin). A pass that lands too late stops at its first frame, or (nothing decoding) once
# its packets are DECODER_DELAY past the time.
FIRST_MARGIN = 2.0
SEEK_FROM = 1.0  # seconds: a start before this is decoded from the file's first frame
DECODER_DELAY = 2.0  # seconds of packets a decoder may take in before its first picture (B-frame reordering)


def _seek_margins(start: float, lead: float = 0.0) -> Iterator[float]:
    """`lead`, then FIRST_MARGIN more, 3 x that more, ... while `start` less the margin is past SEEK_FROM."""
    extra = 0.0
    while start - (lead + extra) > SEEK_FROM:
        yield lead + extra
        extra = extra * 3 if extra else FIRST_MARGIN


@dataclass
class _Walk:
    """What one pass over the decoded frames found (`_walk_pyav`)."""

    picked: list[np.ndarray]
    previous: av.VideoFrame | None  # the last frame kept
    previous_rgb: np.ndarray | None  # it as displayed, once needed
    last_end: float
    damage: str | None
    skipped: list[str]
    size: tuple[int, int] | None
    # the display matrix of the walk's first frame shown (a stream has one; reading a frame's side data ties the
    # frame in a reference cycle, which kept every full-size frame until the garbage collector ran)
    orientation: _Orientation | None = None


def _decode_pyav(path: Path, start: float, times: np.ndarray, window: float, short_side: int) -> DecodedFrames:
    with contextlib.ExitStack() as stack:
        container = stack.enter_context(_open_pyav(path))
        stream = video_stream(container)
        if stream is None:
            raise VideoDecodeError(f"{path}: no video stream")
        # One thread, like decord: clips are decoded in parallel by DataLoader workers, and frame threads in
        # each would oversubscribe the cores (single-threaded, both take ~0.2 s per 10 s 360p H.264 clip).
        stream.thread_count = 1
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        time_base = float(stream.time_base or 0.0)
        origin = None if stream.start_time is None or not time_base else stream.start_time * time_base
        targets = start + times + EPSILON  # seconds from the first frame
        seekable = origin is not None
        if origin is not None and container.format.name in JUMPING_FORMATS:
            jump = timestamp_jump(path, stream.index)
            if jump is not None:  # a seek by time may land on either side of it: frames are read from the start
                where = jump[0] - origin
                if start + window > where:
                    raise VideoDecodeError(jump_problem(path, where, jump[1]))
                seekable = False
        seekable = seekable and start > SEEK_FROM
        header = _read_header(path) if seekable else None  # where decoding must start before a time (intra refresh)
        walk, sought = None, False
        for margin in _seek_margins(start, header.lead if header else 0.0) if seekable else ():
            # the keyframe at or before `start` instead of decoding the prefix
            sought = True
            container.seek(round(((origin or 0.0) + start - margin) / time_base), stream=stream, backward=True,
                           any_frame=False)
            walk = _walk_pyav(path, container, stream, targets, start + window, short_side, first_by=targets[0])
            if walk is not None and walk.previous is not None:
                break
            walk = None  # landed too late, or past every keyframe: nothing decoded
        if walk is None and sought:  # from the file's first frame, in a container opened afresh (a raw stream
            container.close()         # cannot seek back to its start)
            container = stack.enter_context(_open_pyav(path))
            stream = video_stream(container)
            stream.thread_count = 1
        if walk is None:
            walk = _walk_pyav(path, container, stream, targets, start + window, short_side)
        assert walk is not None  # a pass without `first_by` always returns
        previous = walk.previous
        if previous is None:
            why = walk.damage or (walk.skipped[0] if walk.skipped else None)
            reason = f"no frame could be decoded ({why})" if why else "no frame could be decoded"
            raise VideoDecodeError(f"{path}: {reason}")
        duration = _available(path, start, walk.last_end, window)
        # less EPSILON: with timestamps from 3600 s, 3605.9 - 3600 + 0.1 is 6.000000000000091, not 6
        n_valid = int(np.count_nonzero(times < duration - EPSILON))
        picked = walk.picked
        while len(picked) < n_valid:  # times after the last frame's start but before its end
            if walk.previous_rgb is None:
                walk.previous_rgb = _shown(previous, walk, short_side, pixel_aspect(stream))
            picked.append(walk.previous_rgb)
        picked = picked[:n_valid]
        if not picked:
            empty = _shown(previous, walk, short_side, pixel_aspect(stream))  # the size of the frames there would be
    frames = np.stack(picked) if picked else np.zeros((0, *empty.shape[:2], 3), np.uint8)
    return DecodedFrames(frames=frames, duration=duration, native_fps=fps, backend="pyav")


def _shown(frame: av.VideoFrame, walk: _Walk, short_side: int, aspect: float) -> np.ndarray:
    """The frame as displayed (RGB, turned and flipped by its display matrix) at the output size (the size and the
    orientation fixed by the walk's first frame: a stream may change size)."""
    if walk.orientation is None:
        walk.orientation = _orientation(frame)
    image = walk.orientation.show(frame.to_ndarray(format="rgb24"))
    if walk.size is None:
        height, width = image.shape[:2]
        walk.size = _target_size(height, width, short_side, _stretch(aspect, int(walk.orientation.transposed)))
    return _resize(image, walk.size)


# ASF stores a timestamp per packet in decoding order, not the picture's presentation time: with B-frames, the
# frames a decoder puts out in display order carry them out of order (40, 120, 160, 80 ms), and frames read by
# them came 1-3 frames early. There, the k-th frame out takes the k-th smallest timestamp, looking this many
# frames ahead (H.264 reorders at most 16).
DECODING_ORDER_FORMATS = ("asf",)
REORDER_DEPTH = 16


def _presentation_stamps(frames: Iterator[av.VideoFrame], reorder: int) -> Iterator[tuple[av.VideoFrame, int | None]]:
    """Each frame with its presentation timestamp (None: it has none). `reorder` > 0: the timestamps are the
    packets' in decoding order (DECODING_ORDER_FORMATS), and the k-th frame out takes the k-th smallest of them,
    looked up to `reorder` frames ahead (those frames are held meanwhile)."""
    if not reorder:
        for frame in frames:
            yield frame, frame.pts
        return
    held: collections.deque[av.VideoFrame] = collections.deque()
    stamps: list[int] = []
    for frame in frames:
        held.append(frame)
        if frame.pts is not None:
            heapq.heappush(stamps, frame.pts)
        if len(held) > reorder:
            out = held.popleft()
            yield out, heapq.heappop(stamps) if out.pts is not None and stamps else None
    while held:
        out = held.popleft()
        yield out, heapq.heappop(stamps) if out.pts is not None and stamps else None


def _walk_pyav(path: Path, container: Any, stream: Any, targets: np.ndarray, end: float, short_side: int,
               first_by: float | None = None) -> _Walk | None:
    """The frames on screen at each of `targets` (seconds from the first frame), decoded from where the container
    stands up to `end`. `first_by`: the pass is given up (None) when its first frame begins after this time (a seek
    that landed too late; one that decodes nothing ends with no `previous`). Frames are resized as they are picked,
    so the pass holds the picked frames only.
    VideoDecodeError when the timestamps of a transport stream jump (`jump_problem`) before `end`."""
    aspect = pixel_aspect(stream)
    fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    time_base = float(stream.time_base or 0.0)
    origin = None if stream.start_time is None or not time_base else stream.start_time * time_base
    jumping = container.format.name in JUMPING_FORMATS
    walk = _Walk(picked=[], previous=None, previous_rgb=None, last_end=-math.inf, damage=None, skipped=[], size=None)
    previous_time = 0.0
    try:
        give_up = None if first_by is None or origin is None else origin + first_by + DECODER_DELAY
        reorder = REORDER_DEPTH if container.format.name in DECODING_ORDER_FORMATS else 0
        for frame, stamp in _presentation_stamps(decoded_frames(container, stream, walk.skipped, give_up), reorder):
            if stamp is None and stream.start_time is not None:  # the stream has timestamps: a damaged frame
                continue
            if stream.start_time is None:
                # a raw elementary stream, decoded from its start: its timestamps, where there are any, are the
                # parser's guesses (MPEG-1/2's are a frame late from the second or the first frame on): each
                # frame follows the one before by its duration, or one frame period
                t = walk.last_end if walk.previous is not None else 0.0
            else:
                assert stamp is not None  # a stream with timestamps: frames without one were skipped above
                t = stamp * time_base - (origin or 0.0)
            if walk.previous is None and first_by is not None and t > first_by:
                return None
            if walk.previous is not None:
                # a step back: a restart (`timestamp_jump`, asked before any pass, also tells a held picture, which
                # steps forward, from a jump forward)
                if jumping and t - previous_time < -MAX_STEP_BACK:
                    raise VideoDecodeError(jump_problem(path, previous_time, t - previous_time))
                if t < previous_time:  # out-of-order output of a damaged stream: keep time moving forward
                    continue
                # Times before `frame` shows show the previous frame (times before the first frame: the first).
                while len(walk.picked) < len(targets) and targets[len(walk.picked)] < t:
                    if walk.previous_rgb is None:
                        walk.previous_rgb = _shown(walk.previous, walk, short_side, aspect)
                    walk.picked.append(walk.previous_rgb)
            walk.previous, walk.previous_rgb, previous_time = frame, None, t
            step = float(frame.duration) * time_base if frame.duration else 1.0 / max(fps, 1e-6)
            walk.last_end = t + step
            if t >= end or (len(walk.picked) == len(targets) and walk.last_end >= end):
                break
    except av.FFmpegError as error:
        walk.damage = pyav_reason(error)  # keep every frame decoded before the damage
    return walk


# ----------------------------------------------------------------------------------- public
def decode_frames(
    path: str | Path,
    start: float,
    times: Sequence[float],
    window: float,
    short_side: int,
    *,
    backend: Backend = "auto",
    log_file: Path | None = None,
) -> DecodedFrames:
    """Frames on screen at `start + t` for each t in `times` (seconds, increasing) that lies inside the video.

    duration = min(window, end of the last frame - start); only times < duration yield a frame, so a
    short clip returns fewer frames (the pipeline pads). `backend="auto"` tries decord and falls back to
    PyAV on any decord failure; "decord" / "pyav" force one (tests, benchmarks). `log_file`: where decord's stderr
    is held while it runs (`common.ffmpeg.decord_log_dropped`), for a process that may die in it.
    Raises VideoDecodeError (`<file>: <reason>`) for a missing or empty file, a file that is not media,
    one without a video stream, zero duration, or `start` beyond the end.
    """
    path = Path(path)
    times_array = np.asarray(times, dtype=np.float64)
    _check_request(path, start, times_array, window, short_side)
    _check_file(path)
    if backend in ("auto", "decord"):
        try:
            with decord_log_dropped(log_file):
                return _decode_decord(path, start, times_array, window, short_side)
        except VideoDecodeError:
            raise  # decord read the timestamps: the verdict (zero duration, start past the end) stands
        except Exception as error:  # noqa: BLE001 - decord raises RuntimeError, DECORDError, AssertionError...
            if backend == "decord":
                reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                raise VideoDecodeError(f"{path}: decord cannot decode it ({reason})") from None
            # An ImportError (decord not installed) lands here too: PyAV alone then.
    return _decode_pyav(path, start, times_array, window, short_side)


def _packets_end(path: Path, index: int) -> float:
    """Where the last packet of stream `index` ends (s, on the timestamps), read from the packets alone (nothing
    decoded; a file cut short: what precedes the cut); 0 when none has a timestamp."""
    end = 0.0
    with _open_pyav(path) as container:
        stream = container.streams[index]
        time_base = float(stream.time_base or 0.0)
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        try:
            for packet in container.demux(stream):
                if not packet.size:  # the demuxer's closing empty packet
                    continue
                step = packet.duration * time_base if packet.duration and time_base else 1.0 / max(fps, 1e-6)
                # a raw stream's packets carry no timestamps, or the parser's guesses (a frame late in MPEG-1/2):
                # each follows the one before
                raw = stream.start_time is None or packet.pts is None or not time_base
                begin = end if raw else packet.pts * time_base
                end = max(end, begin + step)
        except av.FFmpegError:
            pass
    return end


def is_still_image(format_name: str) -> bool:
    """Whether FFmpeg's demuxer `format_name` (probe_video's "format") reads a still image: image2, jpeg_pipe..."""
    return format_name == "image2" or format_name.endswith("_pipe")


MAX_TIMESTAMP_STEP = 60.0  # seconds between a transport stream's successive video packets: more is a jump
MAX_STEP_BACK = 1.0  # seconds a transport stream's timestamps may step back (damage): more is a jump (a restart)
JUMPING_FORMATS = ("mpegts",)  # demuxers whose timestamps may jump (`timestamp_jump`)


def _jumps(step: float) -> bool:
    """Whether a step between successive timestamps of a transport stream is a jump: forward by more than
    MAX_TIMESTAMP_STEP (a clock set back reads as 26 hours forward once FFmpeg unwraps its 33 bits), or back by more
    than MAX_STEP_BACK (an encoder restarted a few seconds behind)."""
    return step > MAX_TIMESTAMP_STEP or step < -MAX_STEP_BACK


def jump_problem(path: Path, where: float, by: float) -> str:
    """The one line refusing a video whose timestamps jump by `by` seconds after `where` seconds (of its own)."""
    return (f"{path}: its timestamps jump by {by:+.0f} s after {where:.1f} s (recordings joined into one stream, or a "
            f"restarted encoder); remux it first, e.g. ffmpeg -i {path.name} -c copy fixed.mp4")


def timestamp_jump(path: str | Path, index: int) -> tuple[float, float] | None:
    """(where, by how much) the timestamps of stream `index` first jump (`_jumps`) between successive packets (decode
    order; read from the packets alone), None when they never do; where: the latest presentation time before the
    jump (on the stream's clock). Transport streams joined from two recordings, or from an encoder that restarted,
    jump; FFmpeg may read a jump back as a 26-hour jump forward (its 33-bit clock wrapping), so the video seems to
    last a day. A long step forward that the packets of the file's other streams (its sound) bridge, none of
    them further apart than MAX_TIMESTAMP_STEP, is a picture held on screen, not a jump (a joined recording's
    sound jumps with its picture); without other streams it cannot be told from a jump, and counts as one. ffmpeg's command line mends such jumps when it remuxes (`-dts_delta_threshold`); the frames here are
    placed by their timestamps as they are. Read once per file version (the last few kept): every window of a long
    transport stream asks, and the answer takes a pass over all its packets."""
    return _timestamp_jump_of_version(_file_version(Path(path)), index)


@functools.lru_cache(maxsize=8)
def _timestamp_jump_of_version(version: FileVersion, index: int) -> tuple[float, float] | None:
    previous: float | None = None
    shown = -math.inf
    reached = -math.inf  # the latest time the packets of `index` and the other streams reach without a jump
    with _open_pyav(Path(version[0])) as container:
        stream = container.streams[index]
        time_base = float(stream.time_base or 0.0)
        if not time_base:
            return None
        try:
            for packet in container.demux():
                stamp = packet.dts if packet.dts is not None else packet.pts
                if stamp is None or not packet.size or packet.stream.time_base is None:
                    continue
                now = float(stamp * packet.stream.time_base)
                if packet.stream.index != index:  # no further from the last bridged time than a step may be
                    if reached < now <= reached + MAX_TIMESTAMP_STEP:
                        reached = now
                    continue
                if previous is not None and _jumps(now - previous) and not (
                        previous < now <= max(previous, reached) + MAX_TIMESTAMP_STEP):
                    return (shown if shown > -math.inf else previous), now - previous
                previous, reached = now, max(reached, now)
                if packet.pts is not None:  # where: the latest frame shown before the jump (decoding runs ahead)
                    shown = max(shown, packet.pts * time_base)
        except av.FFmpegError:
            pass
    return None


# demuxers whose stream duration FFmpeg guesses from the bit rate (raw elementary streams, MPEG program streams): a
# 3 s MPEG-1 stream read as 0.01 s; their duration comes from the packets instead
GUESSED_DURATION = frozenset({"mpegvideo", "mpeg", "h264", "hevc", "vvc", "m4v", "cavsvideo", "avs2", "avs3", "vc1",
                              "h261", "h263", "dirac", "obu", "mjpeg", "mjpeg_2000", "rawvideo"})


def probe_video(path: str | Path) -> dict[str, Any]:
    """Container facts via PyAV: duration (s), fps, width/height as displayed (after rotation), rotation
    (counter-clockwise degrees in {0, 90, 180, 270}), mirrored (the display matrix also mirrors), codec name, has_audio, format (the demuxer's name), and start:
    the timestamp (s) of the video stream's first frame, t = 0 of `decode_frames` (not 0 where another stream
    starts earlier, or where the timestamps start at 3600 s). Decodes one frame (the rotation lives in the display
    matrix that FFmpeg attaches to decoded frames)."""
    path = Path(path)
    _check_file(path)
    with _open_pyav(path) as container:
        stream = video_stream(container)
        if stream is None:
            raise VideoDecodeError(f"{path}: no video stream")
        start = 0.0
        if stream.start_time is not None and stream.time_base is not None:
            start = float(stream.start_time * stream.time_base)
        if stream.duration is not None and stream.time_base is not None and container.format.name not in GUESSED_DURATION:
            duration = float(stream.duration * stream.time_base)
        else:  # Matroska/WebM: the container's duration is its longest stream's (often the audio): the packets say
            duration = _packets_end(path, stream.index) - start
            if duration <= 0 and container.duration is not None:
                duration = (container.duration + (container.start_time or 0)) / av.time_base - start
        try:
            turns, mirrored = _first_turns(container, stream)
            rotation = 90 * turns
        except av.FFmpegError as error:
            raise VideoDecodeError(f"{path}: cannot be decoded ({pyav_reason(error)})") from None
        if stream.codec_context.height <= 0 or stream.codec_context.width <= 0:  # e.g. animated WebP in FFmpeg 5
            raise VideoDecodeError(f"{path}: no picture size in the stream's header "
                                   f"({stream.codec_context.width}x{stream.codec_context.height})")
        height, width = _target_size(stream.codec_context.height, stream.codec_context.width, 1 << 30,
                                     _stretch(pixel_aspect(stream), 0))  # as displayed: anamorphic pixels
        if rotation in (90, 270):
            width, height = height, width
        return {
            "index": stream.index,
            "start": start,
            "duration": duration,
            "fps": float(stream.average_rate or stream.guessed_rate or 0.0),
            "width": width,
            "height": height,
            "rotation": rotation,
            "mirrored": mirrored,  # the display matrix mirrors the picture (rotation: the angle it turns by)
            "codec": stream.codec_context.codec.canonical_name,  # "av1", not the decoder "libdav1d"
            "has_audio": bool(container.streams.audio),
            "format": container.format.name,  # the demuxer: "image2", "png_pipe"... for still images
        }
