"""Frames of a clip's window at a fixed rate, as ffmpeg's `fps` filter picks them: what av-benchmark's video
embedders see (hkchengrex/av-benchmark, av_bench/data/video_dataset.py: torio's StreamingMediaDecoder with
`add_basic_video_stream(frame_rate=...)`, which inserts `fps=<rate>` into ffmpeg's filter graph).

The `fps` filter (libavfilter/vf_fps.c, default rounding 'near', start at the first frame) rescales every input
timestamp to the output rate, t -> round(t * rate) (halves away from zero), and fills output slot n with the last
input frame whose rescaled timestamp is <= n. At 0.5 fps from a 25 fps video, slot 0 is the frame at 0.96 s and
slot 1 the one at 2.96 s; at 25 fps from a 25 fps video every frame is kept; from 30 fps some are dropped.

av-benchmark reads the test clips from their start and keeps the first rate x duration frames; here a clip starts
at `start` in its source video, timestamps counted from there (as `ffmpeg -ss start -i video` gives them). Frames are decoded
with PyAV, converted to RGB with swscale's bicubic filter (what an ffmpeg filter graph's implicit conversion
uses) and, with `short_side`, resized right away with torchvision's v2 bicubic resize (antialiased), the first
step of both embedders' transforms; resizing again to the same size changes nothing, so the embedders' own
transforms then give what they give on the full frames, without holding full-size frames in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from common.ffmpeg import decoded_frames, media_path, video_stream

# a frame counts as inside the window when it starts at most this much before `start` (timestamp rounding)
START_TOLERANCE = 1e-3


class VideoReadError(ValueError):
    """A source video that cannot give the frames of its window (one line, naming the file)."""


def round_half_away(x: Fraction) -> int:
    """ffmpeg's AV_ROUND_NEAR_INF: to the nearest integer, halves away from zero."""
    return int(math.floor(abs(x) + Fraction(1, 2))) * (1 if x >= 0 else -1)


def fps_filter_indices(times: list[Fraction], rate: Fraction, slots: int, end: Fraction | None = None) -> list[int]:
    """Which of the frames at `times` (seconds from the window's start, increasing, exact) fill `slots` output
    frames at `rate` frames per second, as ffmpeg's fps filter picks them: the first output slot is the first
    frame's rescaled timestamp, slot n holds the last frame whose rescaled timestamp is <= n, and the last frame
    is repeated up to the rescaled end of the stream `end` (default: the last frame's own timestamp). Fewer than
    `slots` when the frames run out."""
    rescaled = [round_half_away(t * rate) for t in times]
    if not rescaled:
        return []
    stop = round_half_away(end * rate) if end is not None else rescaled[-1] + 1  # first slot past the stream
    picked: list[int] = []
    frame = 0
    for slot in range(rescaled[0], min(rescaled[0] + slots, stop)):
        while frame + 1 < len(rescaled) and rescaled[frame + 1] <= slot:
            frame += 1
        picked.append(frame)
    return picked


def resize_short_side(frame: np.ndarray, short_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H', W', 3) uint8 with min(H', W') = short_side: torchvision v2.Resize(short_side,
    bicubic) on the uint8 image, as av-benchmark's transforms start."""
    image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)  # (3, H, W)
    resized = TF.resize(image, [short_side], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return resized.permute(1, 2, 0).numpy()


def window_frames(path: str | Path, start: float, duration: float, rates: Mapping[str, float],
                  short_side: int | None = None) -> dict[str, np.ndarray]:
    """{name: (T_name, H, W, 3) uint8}: for each named rate, the first T_name = int(rate * duration) frames that
    ffmpeg's fps filter outputs from `path` read from `start` on (as `ffmpeg -ss start -i path -vf fps=rate`
    gives them; av-benchmark likewise takes the first T frames of its reader's fps-filtered stream); one decoding
    pass, which stops as soon as every rate's frames are decided.

    Raises VideoReadError (one line naming the file) when the file has no video stream, cannot be decoded, or
    ends before a rate has its frames (av-benchmark refuses such a clip too: 'video too short').
    """
    path = Path(path)
    wanted = {name: int(rate * duration) for name, rate in rates.items()}
    times: list[Fraction] = []  # exact timestamps, as the filter rescales integer pts
    frames: list[np.ndarray] = []
    try:
        with av.open(media_path(path)) as container:
            stream = video_stream(container)  # the one stage one and generation read, not a cover picture
            if stream is None:  # none, or only an audio file's cover picture
                raise VideoReadError(f"{path}: no video stream")
            stream.thread_type = "AUTO"
            # `start` counts from the file's start time, as ffmpeg's -ss does (a file's first timestamp need not be 0)
            first = Fraction(container.start_time, 1_000_000) if container.start_time is not None else Fraction(0)
            origin = first + Fraction(repr(float(start)))
            if start > 0 and stream.time_base is not None:
                container.seek(int(origin / Fraction(stream.time_base)), stream=stream, backward=True, any_frame=False)
            exact_rates = {name: Fraction(repr(float(rate))) for name, rate in rates.items()}
            stream_end: Fraction | None = None  # where the stream ends, from `start`; None: it goes on
            # a packet the decoder refuses is skipped, as ffmpeg does (Theora's empty packet for an unchanged frame)
            for frame in decoded_frames(container, stream, []):
                if frame.pts is None or frame.time_base is None or frame.time < origin - START_TOLERANCE:
                    continue
                times.append(max(Fraction(0), frame.pts * Fraction(frame.time_base) - origin))
                step = frame.duration * Fraction(frame.time_base) if frame.duration else (
                    1 / Fraction(stream.average_rate) if stream.average_rate else Fraction(0))
                stream_end = times[-1] + step
                rgb = frame.to_ndarray(format="rgb24", interpolation="BICUBIC")
                frames.append(resize_short_side(rgb, short_side) if short_side else rgb)
                if all(round_half_away(times[-1] * r) >= round_half_away(times[0] * r) + wanted[name]
                       for name, r in exact_rates.items()):
                    stream_end = None  # this frame lies past every rate's last slot: those slots are decided
                    break
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError) as error:
        raise VideoReadError(f"{path}: cannot decode ({type(error).__name__}: {error})") from None
    if not frames:
        raise VideoReadError(f"{path}: no frame in the window [{start:g}, {start + duration:g}) s")
    out = {}
    for name, rate in exact_rates.items():
        index = fps_filter_indices(times, rate, wanted[name], stream_end)
        if len(index) < wanted[name]:
            raise VideoReadError(f"{path}: the window [{start:g}, {start + duration:g}) s gives {len(index)} frames "
                                 f"at {float(rate):g} fps, {wanted[name]} needed")
        out[name] = np.stack([frames[i] for i in index])
    return out
