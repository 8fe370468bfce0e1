"""FFmpeg: which video stream every reader takes and how its packets are decoded (through PyAV), and calling the
ffmpeg program: paths it cannot misread, and the line of its error output that says what is wrong."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av

# decord's own C++ log line: '[20:00:37] /path/to/src/video/video_reader.cc:83: ERROR opening: x.mp4, Invalid data'
DECORD_LOG_LINE = re.compile(rb"^\[\d{2}:\d{2}:\d{2}\] \S+\.(?:cc|h|hpp|cpp):\d+: ")


def moving_video_streams(container: Any) -> list[Any]:
    """The video streams of an open PyAV container that are not an attached cover picture."""
    return [stream for stream in container.streams.video if not stream.disposition & av.stream.Disposition.attached_pic]


def video_stream(container: Any) -> Any:
    """The video stream every part of the project reads (stage one's frames and audio clock, generation's muxing,
    evaluation's frames) from an open PyAV container: FFmpeg's best one, as the ffmpeg program picks it (not an
    attached cover picture, nor a still-image track stored before the video); None without one (also for an audio
    file whose only picture is its cover). decord picks its own, so stage one gives a file of several to PyAV."""
    moving = moving_video_streams(container)
    if not moving:  # none, or only the cover picture of an audio file: no video to give sound to
        return None
    best = container.streams.best("video")
    return best if best in moving else moving[0]


def decoded_frames(container: Any, stream: Any, skipped: list[str], give_up_after: float | None = None
                   ) -> Iterator[av.VideoFrame]:
    """The stream's decoded frames from where the container stands (after a seek: from there). A packet the decoder
    refuses is skipped (its reason appended to `skipped`), as the ffmpeg program does: Theora codes an unchanged
    frame as an empty packet, which FFmpeg's decoder answers with EINVAL (a still scene gave 10 frames of 120, and
    the clip ended after its first), and one damaged packet should not end a clip. An error of the demuxer (a file
    cut short) ends the frames: it is raised. `give_up_after` (seconds on the stream's clock): the frames end when
    a packet stamped later than this is read before any frame came out (a seek past the last keyframe before a
    time: nothing would decode until the next keyframe, maybe the file's end)."""
    time_base = float(stream.time_base or 0.0)
    produced = False
    for packet in container.demux(stream):
        stamp = packet.pts if packet.pts is not None else packet.dts
        if give_up_after is not None and not produced and stamp is not None and stamp * time_base > give_up_after:
            return
        try:
            frames = packet.decode()
        except av.FFmpegError as error:
            skipped.append(pyav_reason(error))
            continue
        produced = produced or bool(frames)
        yield from frames


def quiet_decord() -> Any:
    """The decord module, its bundled FFmpeg's log switched off (process-wide for that copy of FFmpeg, not
    PyAV's): it would print demuxer messages such as '[matroska,webm @ 0x..] Read error' straight to stderr,
    next to the one-line errors that already name the file and the reason. decord's exceptions still say what it
    fails on. ImportError where decord is not installed."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    return decord


@contextlib.contextmanager
def decord_log_dropped(log_file: Path | None = None) -> Iterator[None]:
    """Run decord calls with its own C++ log lines ('[hh:mm:ss] .../video_reader.cc:83: ERROR opening: ...') kept
    off stderr: decord writes them to file descriptor 2 from C++, where `quiet_decord` cannot reach, next to the
    one-line error that already names the file and the reason (decord's exception carries the same text). File
    descriptor 2 goes to a temporary file meanwhile; whatever else was written there (Python's own stderr, another
    thread's) is written back afterwards, in order. Without a usable descriptor 2 the calls run as they are.

    `log_file`: that temporary file, named, for a process that may die in the calls (a native decoder's abort): what
    it printed last (`last_words`) stays there for the process that started it. Emptied when the calls return."""
    try:  # any failure to set this up (stderr closed, no room for a temporary file): the calls run as they are
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.flush()  # None when the process has no stderr
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        capture = tempfile.TemporaryFile() if log_file is None else open(log_file, "w+b")  # noqa: SIM115 - closed below
        os.dup2(capture.fileno(), 2)
    except OSError:
        os.close(saved)
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        capture.seek(0)
        kept = b"".join(line for line in capture.read().splitlines(keepends=True) if not DECORD_LOG_LINE.match(line))
        if log_file is not None:
            with contextlib.suppress(OSError):
                capture.truncate(0)
        capture.close()
        with contextlib.suppress(OSError):
            while kept:
                kept = kept[os.write(2, kept):]


def last_words(log_file: Path, limit: int = 300) -> str:
    """What a process that died in `decord_log_dropped`'s calls printed last into its `log_file` ("terminate called
    after throwing an instance of 'std::bad_alloc' what(): std::bad_alloc"), in one line of at most `limit`
    characters: the last two lines before Python's fault report, if any (else its first line), leaving out
    decord's own log lines; '' when there is nothing or the file cannot be read."""
    try:
        lines = log_file.read_bytes().splitlines()
    except OSError:
        return ""
    said = [line for line in lines if line.strip() and not DECORD_LOG_LINE.match(line)]
    report = next((i for i, line in enumerate(said) if line.startswith(b"Fatal Python error")), len(said))
    chosen = said[max(0, report - 2):report] or said[report:report + 1]
    return " ".join(b" ".join(chosen).decode("utf-8", "replace").split())[:limit]


def pyav_reason(error: av.FFmpegError) -> str:
    """FFmpeg's own explanation when PyAV logged one (e.g. 'moov atom not found'), else the error text."""
    log = error.log  # (level, component, message) of FFmpeg's last error, when the log was on
    if log and len(log) == 3 and str(log[2]).strip():
        return str(log[2]).strip().splitlines()[0]
    return error.strerror or str(error)


def media_path(path: Path | str) -> str:
    """`path` as FFmpeg's libraries (PyAV, decord) should be given it: a relative one behind './', so that a name
    with a colon ('a:b.mp4') is not read as protocol 'a' ('/' is in no protocol name). Not made absolute, which
    would fold 'link/..' by its text instead of by the file system."""
    text = os.fspath(path)
    return text if os.path.isabs(text) or text.startswith(("./", "../")) else os.path.join(os.curdir, text)


def file_url(path: Path | str) -> str:
    """`path` as ffmpeg's file: URL: a bare 'a:b.mp4' would be read as protocol 'a', and '-x.mp4' as an option."""
    return f"file:{path}"


def error_reason(stderr: str) -> str:
    """What went wrong, in one line: the first message of a component ('[webm @ 0x55..] Only VP8 or VP9 ...'),
    without its prefix, when there is one (the lines after it are consequences: 'Could not write header ...'),
    else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("[") and "] " in line:
            return line.split("] ", 1)[1]
    return lines[-1] if lines else "ffmpeg failed"
