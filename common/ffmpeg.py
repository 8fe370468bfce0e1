"""FFmpeg: which video stream every reader takes (through PyAV), and calling the ffmpeg program: paths it cannot
misread, and the line of its error output that says what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def video_stream(container: Any) -> Any:
    """The video stream every part of the project reads (stage one's frames and audio clock, generation's muxing,
    evaluation's frames) from an open PyAV container: FFmpeg's best one, as decord and the ffmpeg program pick it
    (not an attached cover picture, nor a still-image track stored before the video); None without one."""
    if not container.streams.video:
        return None
    return container.streams.best("video") or container.streams.video[0]


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
