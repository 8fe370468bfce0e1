"""Audio decoding of stage one: the 16 kHz mono waveform of a window of a video file.

`decode_audio` returns the waveform of a window [start, start + duration) of a clip, with PyAV (default) or
decord. With PyAV, mono is the plain average of all channels, also for 5.1 (FFmpeg's own downmix, which decord
applies, weights the channels and drops the LFE; AudioLDM itself keeps the first channel). benchmarks/RESULTS.md
compares the two. AudioLDM's front end (waveform -> log mel) is `audio_models.front_end`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import soxr  # librosa's resampler, installed with it

from common.ffmpeg import media_path, quiet_decord, video_stream

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
BACKENDS = ("pyav", "decord")

# PyAV seeks this much before `start` and decodes forward: AAC (MDCT overlap) and Opus (80 ms pre-roll) need
# the preceding packets to decode the first samples of the window correctly.
_PREROLL_SECONDS = 0.5
# Frame timestamps that disagree with the running sample count by less than this are rounding (WebM stores
# milliseconds, i.e. +-8 samples at 16 kHz); more than this is a gap (a lost packet) or an overlap.
_JITTER_SECONDS = 0.010
# Context decoded and resampled past each end of the window, so the resampler's filter sees real signal there.
_CONTEXT_SECONDS = 0.02
_PACKED_FROM_CHANNELS = 8  # see _pyav_read


class AudioDecodeError(Exception):
    """A file whose audio cannot be decoded; the message is one line naming the file and the reason."""

    def __init__(self, path: str | Path, reason: object) -> None:
        # FFmpeg's errors carry errno and the path again: keep only the reason, on one line.
        text = getattr(reason, "strerror", None) or str(reason)
        reason_text = " ".join(text.split()) or type(reason).__name__
        super().__init__(f"{path}: cannot decode audio ({reason_text})")
        self.path = str(path)


# ---------------------------------------------------------------------------------------------- decoding
def _audio_stream(container: Any) -> Any:
    """The audio stream read: FFmpeg's best one (av_find_best_stream, as the ffmpeg program and players choose: a
    track flagged default before the first one), None without audio. decord's backend, built on an older FFmpeg,
    may take another (of a silent stereo track and a default mono one, the stereo one)."""
    if not container.streams.audio:
        return None
    # related to the video read: in a transport stream of several programs, the audio of the same program
    return container.streams.best("audio", related=video_stream(container)) or container.streams.audio[0]


@contextlib.contextmanager
def _open_audio(path: str | Path) -> Iterator[tuple[Any, Any]]:
    """(container, its audio stream (`_audio_stream`) or None), the container closed on exit; AudioDecodeError
    when the file does not open."""
    try:
        container = av.open(media_path(path))
    except (av.FFmpegError, OSError) as error:
        raise AudioDecodeError(path, error) from None
    with container:
        yield container, _audio_stream(container)


def audio_stream_info(path: str | Path) -> dict[str, Any] | None:
    """Sample rate, channels, layout, codec, start and duration (s) of the audio stream read; None without one.

    Durations come from the container header (None when it does not say); nothing is decoded.
    """
    with _open_audio(path) as (container, stream):
        if stream is None:
            return None
        time_base = stream.time_base or Fraction(1, 1)
        duration = None
        if stream.duration is not None:
            duration = float(stream.duration * time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        return {
            "sample_rate": stream.codec_context.sample_rate,
            "channels": stream.codec_context.channels,
            "layout": stream.codec_context.layout.name,
            "codec": stream.codec_context.codec.canonical_name,  # "mp3", not the decoder "mp3float"
            "start": None if stream.start_time is None else float(stream.start_time * time_base),
            "duration": duration,
        }


def decode_audio(
    path: str | Path, start: float, duration: float, sample_rate: int = SAMPLE_RATE, backend: str = "pyav"
) -> np.ndarray | None:
    """Float32 mono waveform of [start, start + duration) seconds of `path`, resampled to `sample_rate`.

    Times are on the video's clock: t = 0 is the presentation time of the video stream's first frame (as in
    `preprocess.video`), so a window of frames and its window of audio are what a player shows and plays together,
    also where the streams do not start together (an audio track that starts before the picture, a container
    whose timestamps start at 3600 s, MPEG-TS). Without a video stream, t = 0 is the timestamps' zero. Mono is
    the average of all channels (backend "pyav"). The result is shorter than round(duration * sample_rate) when
    the file ends earlier, and empty when it ends before `start`; it is never padded at the end here. Returns None
    when the file has no audio stream; raises AudioDecodeError when the file cannot be opened or no audio at all
    can be decoded from it.

    backend "pyav": seeks to start - 0.5 s, decodes forward at the stream's own rate, places every frame by its
    timestamp, averages the channels and resamples the window once (soxr HQ), so the cut is sample-accurate
    (Opus in WebM: +1 ms after a seek, its timestamps are rounded to ms twice); an audio stream that begins
    after `start` is preceded by zeros (keeps A/V sync; FFmpeg starts LAME mp3 at 25 ms); corrupt packets are
    skipped (their time becomes zeros); a truncated file gives what precedes the damage.
    backend "decord": decodes the whole stream with decord's mono=True, i.e. FFmpeg's downmix (5.1: front
    0.71, centre 1, LFE 0, surround 0.5; stereo: the average, but 0.71 each for a WAV without a channel mask),
    resamples with its own resampler (whose timing jitters by a fraction of a sample to a few samples), and
    slices by index from the first decoded sample (placed by the audio stream's start time on the video's clock;
    later timestamps are not looked at, so a gap in the audio shifts what follows): its cut is ~18 samples late (the
    resampler's delay) and, for Opus, 104 more (the pre-skip is not dropped). See benchmarks/RESULTS.md.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if start < 0 or duration <= 0 or sample_rate <= 0:
        raise ValueError(f"need start >= 0, duration > 0, sample_rate > 0; got {start}, {duration}, {sample_rate}")
    if backend == "decord":
        first = round((start + _decord_lead(path)) * sample_rate)
        return _decode_decord(path, first, first + round(duration * sample_rate), sample_rate)
    return _decode_pyav(path, start, duration, sample_rate)


def _video_clock(container: Any) -> float:
    """Seconds of the timestamps at which the video's clock reads 0: the video stream's start time (the
    presentation time of its first frame; `common.ffmpeg.video_stream`), or 0 without one or a start time."""
    stream = video_stream(container)
    if stream is None or stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def _decode_pyav(path: str | Path, start: float, duration: float, sample_rate: int) -> np.ndarray | None:
    read = _pyav_read(path, start - _PREROLL_SECONDS, start + duration, seek=True)
    if read is None:
        return None
    timeline, clock, seeked = read
    if seeked and (timeline.origin is None or timeline.origin > round((clock + start) * timeline.rate)):
        # Nothing after the seek (the window starts after the end?), a seek that failed, or one that landed after
        # the window's start (a coarse or broken index): decode from the beginning instead.
        read = _pyav_read(path, 0.0, start + duration, seek=False)
        assert read is not None  # the same file: it has an audio stream
        timeline, clock, _ = read  # without a seek, a stream without frames raised: it has an origin
    return timeline.cut(clock + start, duration, sample_rate)


def _pyav_read(path: str | Path, seek_seconds: float, stop_seconds: float,
               seek: bool) -> tuple[_Timeline, float, bool] | None:
    """Decode the audio stream (`_audio_stream`) at its own rate from `seek_seconds` (with `seek`, else from the
    beginning) to a little past `stop_seconds`, both on the video's clock; returns the timeline (absolute
    timestamps), where the video's clock starts on them (`_video_clock`), and whether it seeked (then the caller
    checks where it landed).

    None without an audio stream; the timeline's origin is None when a seek found nothing to decode after it.
    """
    with _open_audio(path) as (container, stream):
        if stream is None:
            return None
        clock = _video_clock(container)
        seek_seconds, stop_seconds = clock + seek_seconds, clock + stop_seconds
        # Ogg's timestamps come from page granule positions, and FFmpeg gives some Vorbis packets times a block
        # (448 samples) off where the block size changes: there, samples are counted from the first frame instead
        timeline = _Timeline(stream.time_base, count_samples="ogg" in container.format.name.split(","))
        seeked = seek and seek_seconds > 0 and stream.time_base is not None
        if seeked:
            try:
                container.seek(int(seek_seconds / stream.time_base), stream=stream)
            except av.FFmpegError:  # unseekable: an empty timeline makes the caller decode from the beginning
                return timeline, clock, True
        # Only converts the sample format to float planar (AAC and Opus decode to it already: a passthrough).
        # Channels are averaged by us (FFmpeg's 'mono' downmix is weighted) and the rate changed once at the end:
        # FFmpeg's resampler costs a filter-graph call per frame, which made decoding 3x slower.
        to_float = av.AudioResampler(format="fltp")
        # 8 channels or more (7.1) as interleaved floats instead: PyAV's AudioFrame.planes reads one pointer past
        # FFmpeg's 8 inline plane pointers when all 8 are set, and the process dies (SIGSEGV)
        to_packed = av.AudioResampler(format="flt")
        bad_packets = 0
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError:  # a corrupt packet: skip it, keep going
                    bad_packets += 1
                    continue
                for frame in frames:
                    converter = to_packed if frame.layout.nb_channels >= _PACKED_FROM_CHANNELS else to_float
                    for converted in converter.resample(frame):
                        timeline.add(converted)
                if timeline.cursor is not None and timeline.cursor >= (stop_seconds + _CONTEXT_SECONDS) * timeline.rate:
                    break
        except _RateChange as error:  # the rest would be missing, and the clip written with zeros for it
            at = timeline.cursor / timeline.rate - clock if timeline.cursor is not None else 0.0
            raise AudioDecodeError(path, f"{error} at {at:.2f} s; one rate per file: convert it first") from None
        except (av.FFmpegError, ValueError) as error:  # a truncated file, or a format change mid-stream
            if timeline.cursor is None:
                raise AudioDecodeError(path, error) from None
            logger.warning("%s: audio ends early at %.2f s (%s)", path, timeline.cursor / timeline.rate - clock, error)
        if timeline.cursor is None and (not seeked or bad_packets):
            raise AudioDecodeError(path, f"{bad_packets} corrupt packets" if bad_packets else "no audio frames")
        if bad_packets:
            logger.warning("%s: skipped %d corrupt audio packets", path, bad_packets)
        return timeline, clock, seeked


class _RateChange(ValueError):
    """The stream's sample rate changes between frames (concatenated recordings)."""


class _Timeline:
    """Mono samples at the stream's own rate, placed by frame timestamps: rounding is ignored, gaps become zeros.

    The j-th sample added is at absolute sample index origin + j, i.e. at time (origin + j) / rate.
    """

    def __init__(self, time_base: Fraction | None, count_samples: bool = False) -> None:
        self.time_base = time_base
        self.count_samples = count_samples  # place only the first frame by its timestamp
        self.rate = 0
        self.origin: int | None = None
        self.cursor: int | None = None  # absolute index of the next sample
        self._pieces: list[np.ndarray] = []

    def add(self, frame: av.AudioFrame) -> None:
        if self.cursor is None:
            self.rate = frame.sample_rate
        elif frame.sample_rate != self.rate:
            raise _RateChange(f"sample rate changes from {self.rate} to {frame.sample_rate} Hz")
        channels = frame.layout.nb_channels
        if frame.format.name == "flt":  # interleaved (8 channels or more): one buffer, never `planes` past it
            packed = np.frombuffer(memoryview(frame.planes[0]), dtype=np.float32, count=frame.samples * channels)
            mono = packed.reshape(frame.samples, channels).mean(axis=1, dtype=np.float32)
        else:
            # fltp: one float32 buffer per channel; their average without to_ndarray's vstack (a third of the time)
            planes = frame.planes
            mono = np.frombuffer(memoryview(planes[0]), dtype=np.float32, count=frame.samples).copy()
            for plane in planes[1:]:
                mono += np.frombuffer(memoryview(plane), dtype=np.float32, count=frame.samples)
            if len(planes) > 1:
                mono /= len(planes)
        position = self.cursor
        # the frame's own time base: a converted frame's pts count samples (1/rate), not the stream's units
        time_base = frame.time_base or self.time_base
        if frame.pts is not None and time_base is not None and not (self.count_samples and self.cursor is not None):
            # integer maths: Fractions cost ~10 us a frame
            position = round(frame.pts * time_base.numerator * self.rate / time_base.denominator)
        if self.cursor is None:
            self.origin = self.cursor = position or 0
        elif position is not None and abs(position - self.cursor) > _JITTER_SECONDS * self.rate:
            if position > self.cursor:  # a gap (lost packets): silence keeps what follows at its time
                self._pieces.append(np.zeros(position - self.cursor, dtype=np.float32))
                self.cursor = position
            else:  # an overlap: keep what we have
                mono = mono[self.cursor - position :]
        self._pieces.append(mono)
        self.cursor += len(mono)

    def cut(self, start: float, duration: float, sample_rate: int) -> np.ndarray:
        """The window [start, start + duration) at `sample_rate`: zeros before the origin, short after the end.

        Resamples once with soxr (HQ), with >= 20 ms of context on both sides. The context is a whole number of
        blocks of rate/g input = sample_rate/g output samples (g = gcd), so output sample 0 is exactly at the
        input sample round(start * rate).
        """
        assert self.origin is not None and self.cursor is not None
        rate, samples = self.rate, np.concatenate(self._pieces) if self._pieces else np.zeros(0, np.float32)
        g = math.gcd(rate, sample_rate)
        blocks = math.ceil(_CONTEXT_SECONDS * sample_rate / (sample_rate // g))
        pad_in, pad_out = blocks * (rate // g), blocks * (sample_rate // g)
        first_in = round(start * rate)
        length = min(round(duration * sample_rate), (self.cursor - first_in) * sample_rate // rate)
        if length <= 0:
            return np.zeros(0, dtype=np.float32)
        lo, hi = first_in - pad_in, min(self.cursor, first_in + math.ceil(length * rate / sample_rate) + pad_in)
        segment = np.zeros(hi - lo, dtype=np.float32)
        src_lo, src_hi = max(lo, self.origin), min(hi, self.cursor)
        if src_hi > src_lo:
            segment[src_lo - lo : src_hi - lo] = samples[src_lo - self.origin : src_hi - self.origin]
        if rate == sample_rate:
            return segment[pad_in : pad_in + length]
        resampled = soxr.resample(segment, rate, sample_rate, quality="HQ")  # aligned: output 0 at input 0
        return np.ascontiguousarray(resampled[pad_out : pad_out + length], dtype=np.float32)


def _decord_lead(path: str | Path) -> float:
    """Seconds from the audio's first sample to t = 0 of the video's clock (negative when the audio starts later):
    decord counts samples from the first decoded one. 0 when the header does not say (or cannot be read)."""
    try:
        container = av.open(media_path(path))
    except (av.FFmpegError, OSError):
        return 0.0  # decord gives the verdict
    with container:
        stream = _audio_stream(container)
        if stream is None or stream.start_time is None or stream.time_base is None:
            return 0.0
        return _video_clock(container) - float(stream.start_time * stream.time_base)


def _decode_decord(path: str | Path, first: int, stop: int, sample_rate: int) -> np.ndarray | None:
    decord = quiet_decord()

    try:
        # mono=True is FFmpeg's weighted downmix, not our average; mono=False is broken in decord 0.6.0 for more
        # than one channel (channels come out shifted against each other, 5.1 holds NaN and garbage).
        reader = decord.AudioReader(media_path(path), ctx=decord.cpu(0), sample_rate=sample_rate, mono=True)
    except decord.DECORDError as error:
        if "Can't find audio stream" in str(error):
            return None
        # decord says "[time] source.cc:line: ERROR opening: <path>, <reason>": keep the reason
        reason = str(error).split(": ", 1)[-1].replace(f"ERROR opening: {path}, ", "")
        raise AudioDecodeError(path, reason) from None
    # reader._array is the decoded (1, samples) float32 array; the public reader[a:b] builds a Python list of
    # indices and takes longer than the decoding itself (17 ms of 28 ms for 10 s).
    samples = np.array(reader._array[0, max(0, first):max(0, stop)], dtype=np.float32)
    if first < 0:  # the window starts before the audio does: silence until it does, as with PyAV
        samples = np.concatenate([np.zeros(min(-first, stop - first), np.float32), samples])
    return samples
