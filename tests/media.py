"""Small media files for tests, written in-process with PyAV (no ffmpeg binary needed).

Every video frame carries its own index: the top half of the picture is 8 black/white blocks, left to
right the bits of `index % 256`, most significant first (`frame_index` reads them back, also from a
downscaled frame). Frame i of a constant-rate clip is presented at i / fps seconds. Files are tiny
(96x64, a few seconds, a few kB) so tests stay fast.
"""

from __future__ import annotations

import contextlib
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

BITS = 8
# make_vfr: presentation times (s) of its frames; the gaps vary 50 ms .. 800 ms.
VFR_TIMES = (0.0, 0.1, 0.2, 0.3, 1.0, 1.5, 2.0, 2.05, 2.1, 2.15, 2.2, 3.0)
AUDIO_CODEC = {".webm": "libopus"}  # everything else: AAC
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # the only rates libopus encodes
LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def tone_frequency(channel: int) -> float:
    """Hz of the sine that `audio="tone"` puts on `channel` (distinct per channel, so a test can tell them apart)."""
    return 440.0 + 110.0 * channel


def index_image(index: int, size: tuple[int, int], noise_seed: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB: top half = the bits of index % 256; bottom half grey, or noise when a seed is given
    (noise makes every frame cost about the same number of bytes, so a file cut in half loses half the frames)."""
    width, height = size
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    value = index % (1 << BITS)
    edges = np.linspace(0, width, BITS + 1).round().astype(int)
    for k in range(BITS):
        bit = (value >> (BITS - 1 - k)) & 1
        image[: height // 2, edges[k] : edges[k + 1]] = 255 if bit else 0
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
        image[height // 2 :] = rng.integers(0, 256, (height - height // 2, width, 3), dtype=np.uint8)
    return image


def frame_index(frame: np.ndarray) -> int:
    """Read back the index (mod 256) that `index_image` drew, from a decoded frame of any size (landscape)."""
    height, width = frame.shape[:2]
    luma = frame.astype(np.float32).mean(axis=2)
    value = 0
    for k in range(BITS):
        x0, x1 = int((k + 0.25) * width / BITS), max(int((k + 0.75) * width / BITS), int((k + 0.25) * width / BITS) + 1)
        y0, y1 = height // 8, max(height * 3 // 8, height // 8 + 1)
        value = (value << 1) | int(luma[y0:y1, x0:x1].mean() > 128)
    return value


class _Pipe:
    """A write-only file object: to PyAV, an output it cannot seek in (a pipe)."""

    def __init__(self, handle: Any):
        self.handle = handle

    def write(self, data: bytes) -> int:
        return self.handle.write(data)


def _write(
    path: Path,
    images: list[np.ndarray],
    pts_ms: list[int] | None,
    fps: float,
    codec: str,
    audio: str | None,
    seconds: float,
    sample_rate: int,
    channels: int,
    rotation: int = 0,
    faststart: bool = False,
    gop: int | None = None,
    piped: bool = False,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "+faststart"} if faststart else {}
    rate = Fraction(fps).limit_denominator(1001)
    with contextlib.ExitStack() as stack:
        if piped:  # through a sink that cannot seek, as `ffmpeg ... pipe:1 > file`: the muxer cannot go back to the header
            handle = stack.enter_context(open(path, "wb"))
            container = stack.enter_context(av.open(_Pipe(handle), "w", format=path.suffix.lstrip(".").lower()))
        else:
            container = stack.enter_context(av.open(str(path), "w", options=options))
        stream = container.add_stream({"h264": "libx264", "vp9": "libvpx-vp9"}[codec], rate=rate)
        assert isinstance(stream, av.VideoStream)
        stream.height, stream.width = images[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if codec == "h264":
            stream.options = {"crf": "12"}  # near-lossless: the index blocks survive
        if gop is not None:
            stream.codec_context.gop_size = gop
        if pts_ms is not None:  # variable frame rate: the pts of each frame is given, in ms
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        audio_stream: av.AudioStream | None = None
        if audio is not None:
            codec_name = AUDIO_CODEC.get(path.suffix.lower(), "aac")
            if codec_name == "libopus" and sample_rate not in OPUS_RATES:
                sample_rate = 48000
            added = container.add_stream(codec_name, rate=sample_rate)
            assert isinstance(added, av.AudioStream)
            added.layout = LAYOUTS[channels]
            audio_stream = added
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            else:
                frame.pts, frame.time_base = i, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if audio_stream is not None:
            n = round(seconds * sample_rate)
            t = np.arange(n) / sample_rate
            if audio == "tone":
                wave = np.stack([0.25 * np.sin(2 * np.pi * tone_frequency(c) * t) for c in range(channels)])
            elif audio == "silent":
                wave = np.zeros((channels, n))
            else:
                raise ValueError(f"audio must be 'tone', 'silent' or None, got {audio!r}")
            samples = av.AudioFrame.from_ndarray(wave.astype(np.float32), format="fltp", layout=LAYOUTS[channels])
            samples.sample_rate, samples.pts, samples.time_base = sample_rate, 0, Fraction(1, sample_rate)
            container.mux(audio_stream.encode(samples))  # PyAV cuts it into the encoder's frame size
            container.mux(audio_stream.encode())
    return path


def make_video(
    path: str | Path,
    seconds: float = 4.0,
    fps: float = 10,
    size: tuple[int, int] = (96, 64),
    audio: str | None = "tone",
    sample_rate: int = 44100,
    channels: int = 1,
    codec: str = "h264",
    *,
    faststart: bool = False,
    noise: bool = False,
    gop: int | None = None,
    piped: bool = False,
) -> Path:
    """A constant-rate clip: round(seconds * fps) frames of `size` (W, H), frame i at i / fps carrying index i.

    Container by suffix (.mp4, .mkv, .mov, .webm); `codec` "h264" or "vp9" (.webm needs "vp9").
    audio: "tone" (channel c: 0.25 * sin(2 pi f_c t), f_c = tone_frequency(c)), "silent" (zeros) or None
    (no audio stream); `seconds` long, `channels` 1, 2 or 6 (5.1). Audio is AAC at `sample_rate`, except
    Opus in .webm (Opus takes 8/12/16/24/48 kHz only: other rates become 48 kHz, as on YouTube).
    The video lasts round(seconds * fps) / fps seconds.
    gop: at most this many frames between keyframes (default: the encoder's, 250 for x264); noise: see index_image.
    piped: written as `ffmpeg ... pipe:1 > file` writes it, the muxer unable to go back and fill in its header
    (an .avi then announces 2**30 frames).
    """
    if channels not in LAYOUTS:
        raise ValueError(f"channels must be 1, 2 or 6, got {channels}")
    if codec not in ("h264", "vp9"):
        raise ValueError(f"codec must be 'h264' or 'vp9', got {codec!r}")
    count = max(1, round(seconds * fps))
    images = [index_image(i, size, noise_seed=i if noise else None) for i in range(count)]
    return _write(
        Path(path), images, None, fps, codec, audio, seconds, sample_rate, channels, faststart=faststart, gop=gop,
        piped=piped,
    )


def make_portrait(path: str | Path, seconds: float = 2.0, fps: float = 10, size: tuple[int, int] = (96, 64)) -> Path:
    """Landscape pixels (`size` W x H, index blocks as in make_video) stored with a display matrix that rotates
    them 90 degrees counter-clockwise (a phone held upright): displayed H wide and W tall. Undo the display
    rotation with `np.rot90(frame, k=-1)` to read the index. Silent AAC audio."""
    count = max(1, round(seconds * fps))
    images = [index_image(i, size) for i in range(count)]
    return _write(Path(path), images, None, fps, "h264", "silent", seconds, 44100, 1, rotation=90)


def make_vfr(path: str | Path, size: tuple[int, int] = (96, 64), audio: str | None = "tone") -> Path:
    """Variable frame rate H.264 mp4: frame i (carrying index i) is presented at VFR_TIMES[i] seconds
    (millisecond time base); the last frame starts at VFR_TIMES[-1]. Audio as in make_video (44.1 kHz mono),
    VFR_TIMES[-1] seconds long."""
    images = [index_image(i, size) for i in range(len(VFR_TIMES))]
    pts_ms = [round(t * 1000) for t in VFR_TIMES]
    return _write(Path(path), images, pts_ms, 10, "h264", audio, VFR_TIMES[-1], 44100, 1)


def make_51_48k(path: str | Path, seconds: float = 2.0) -> Path:
    """A 96x64 10 fps H.264 clip with 48 kHz 5.1 AAC audio; channel c carries a tone at tone_frequency(c)."""
    return make_video(path, seconds=seconds, audio="tone", sample_rate=48000, channels=6)


def make_truncated(path: str | Path, seconds: float = 4.0, faststart: bool = True, audio: str | None = "tone") -> Path:
    """A valid 10 fps noise-textured mp4 (see index_image; audio as in make_video) with only its first half of
    bytes kept.

    faststart=True (moov header at the front): the header is intact and the frames stored in the first half
    decode; the header still announces all round(seconds * 10) frames. faststart=False (moov at the end, the
    muxer's default): the header is lost and no decoder opens the file ("moov atom not found")."""
    path = Path(path)
    make_video(path, seconds=seconds, fps=10, audio=audio, faststart=faststart, noise=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_covered(path: str | Path, video: str | Path) -> Path:
    """An .mkv whose first video track is a one-frame 48x48 grey PNG (a cover picture) and whose second is
    `video`'s video, copied: what `ffmpeg -i video -i cover.png -map 1 -map 0 -c copy out.mkv` makes (Matroska
    keeps the picture as an ordinary track, where mp4 and mov move or drop it). Needs the ffmpeg program."""
    import subprocess

    import cv2

    path = Path(path)
    cover = path.with_name(path.stem + ".cover.png")
    cv2.imwrite(str(cover), np.full((48, 48, 3), 200, np.uint8))
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-i", str(cover), "-map", "1", "-map", "0", "-c", "copy",
                    str(path)], check=True)
    return path


def make_zero_bytes(path: str | Path) -> Path:
    """An empty file (0 bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def make_not_video(path: str | Path) -> Path:
    """A short UTF-8 text file (whatever the suffix says)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not a video, only a few words of text\n", encoding="utf-8")
    return path


def make_audio_only(path: str | Path, seconds: float = 2.0, sample_rate: int = 44100, channels: int = 2) -> Path:
    """An .m4a/.mp4 holding only an AAC audio stream (tones as in make_video), no video stream."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate)
        stream.layout = LAYOUTS[channels]
        t = np.arange(round(seconds * sample_rate)) / sample_rate
        wave = np.stack([0.25 * np.sin(2 * np.pi * tone_frequency(c) * t) for c in range(channels)]).astype(np.float32)
        samples = av.AudioFrame.from_ndarray(wave, format="fltp", layout=LAYOUTS[channels])
        samples.sample_rate, samples.pts, samples.time_base = sample_rate, 0, Fraction(1, sample_rate)
        container.mux(stream.encode(samples))
        container.mux(stream.encode())
    return path
