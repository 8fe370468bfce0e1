"""Audio decoding (PyAV and decord) and the AudioLDM front end.

Every media file is written here with PyAV's encoders (no ffmpeg binary needed); the front end is checked against
independent numpy/librosa references of AudioLDM's wav_to_fbank.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import librosa
import numpy as np
import pytest
import torch

from audio_models.front_end import AUDIOLDM_NUM_SAMPLES, MelFrontEnd, audioldm_waveform, log_mel
from preprocess.audio import AudioDecodeError, audio_stream_info, decode_audio

SR = 16000
BACKENDS = ("pyav", "decord")
CLICK_TIMES = [0.5 + k for k in range(11)]  # seconds
LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}
FIVE_ONE_TONES = [300.0, 500.0, 700.0, 100.0, 1100.0, 1300.0]  # FL FR FC LFE BL BR (FFmpeg's 5.1 order)


# ------------------------------------------------------------------------------------------- media helpers
def write_media(
    path: Path,
    audio: np.ndarray | None,
    rate: int = 48000,
    codec: str = "aac",
    video_seconds: float = 0.0,
    audio_delay: float = 0.0,
    video_delay: float = 0.0,
) -> Path:
    """Write `audio` (channels, samples) with `codec`, starting at `audio_delay` s, and, if video_seconds > 0,
    a small 10 fps video track starting at `video_delay` s."""
    with av.open(str(path), "w") as container:
        video = None
        audio_stream: av.AudioStream | None = None
        if video_seconds:  # every stream is added before the first packet is written
            video = container.add_stream("libvpx-vp9" if path.suffix in (".webm", ".mkv") else "libx264", rate=10)
            video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        if audio is not None:
            layout = LAYOUTS[audio.shape[0]]
            added = container.add_stream(codec, rate=rate, layout=layout)
            assert isinstance(added, av.AudioStream)
            audio_stream = added
        if video is not None:
            for i in range(round(video_seconds * 10)):
                image = np.full((32, 32, 3), (i * 23) % 256, dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts, frame.time_base = i + round(video_delay * 10), Fraction(1, 10)
                container.mux(video.encode(frame))
            container.mux(video.encode())
        if audio is not None and audio_stream is not None:
            for i in range(0, audio.shape[1], 1024):
                chunk = np.ascontiguousarray(audio[:, i : i + 1024], dtype=np.float32)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
                frame.sample_rate, frame.pts = rate, i + round(audio_delay * rate)
                container.mux(audio_stream.encode(frame))
            container.mux(audio_stream.encode())
    return path


def tones(freqs: list[float], rate: int, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return np.stack([amplitude * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)


def clicks(rate: int, seconds: float, channels: int) -> np.ndarray:
    """Silence with a 0.5 ms click at each of CLICK_TIMES (on every channel)."""
    audio = np.zeros((channels, round(rate * seconds)), dtype=np.float32)
    for t in CLICK_TIMES:
        i = round(t * rate)
        audio[:, i : i + rate // 2000] = 0.9
    return audio


def sound_scene(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """A VGGSound-like mono scene: a harmonic tone with vibrato, a 300 -> 3000 Hz chirp and decaying knocks.

    No broadband noise: AAC codes it with perceptual noise substitution, which each decoder fills with its own
    random noise, so two decoders would disagree by construction.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(round(rate * seconds)) / rate
    f0 = rng.uniform(150.0, 400.0) * (1 + 0.03 * np.sin(2 * np.pi * 0.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.15 * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t))
    x = x + 0.1 * np.sin(2 * np.pi * (300.0 * t + 2700.0 / (2 * seconds) * t**2))
    for onset in np.arange(rng.uniform(0.0, 0.5), seconds, 0.7):
        after = t >= onset
        since = t[after] - onset
        x[after] += 0.3 * np.exp(-since * 30) * np.sin(2 * np.pi * rng.uniform(500.0, 2000.0) * since)
    return x.astype(np.float32)


def resample(audio: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    return librosa.resample(audio, orig_sr=rate, target_sr=new_rate).astype(np.float32)


def click_offsets(waveform: np.ndarray, start: float) -> list[int]:
    """Sample offset of each click in the window from where it should be (its peak after resampling)."""
    offsets = []
    for t in CLICK_TIMES:
        expected = round((t - start) * SR)
        if 400 <= expected <= len(waveform) - 400:
            segment = np.abs(waveform[expected - 400 : expected + 400])
            assert segment.max() > 0.1, f"no click near {t} s"
            offsets.append(int(np.argmax(segment)) - 400)
    assert offsets, "the window holds no click"
    return offsets


def tone_amplitude(waveform: np.ndarray, freq: float) -> float:
    """Amplitude of the `freq` component (Hann-windowed DFT, exact for a bin-centred tone)."""
    window = np.hanning(len(waveform))
    spectrum = np.abs(np.fft.rfft(waveform * window)) * 2 / window.sum()
    bins = np.fft.rfftfreq(len(waveform), 1 / SR)
    return float(spectrum[np.argmin(np.abs(bins - freq))])


def best_lag_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 200) -> tuple[int, float]:
    """Lag of b against a (|lag| <= max_lag) with the highest Pearson correlation, and that correlation."""
    n = min(len(a), len(b)) - 2 * max_lag
    best = (0, -1.0)
    for lag in range(-max_lag, max_lag + 1):
        x, y = a[max_lag : max_lag + n], b[max_lag + lag : max_lag + lag + n]
        r = float(np.corrcoef(x, y)[0, 1])
        best = max(best, (lag, r), key=lambda pair: pair[1])
    return best


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    scene = sound_scene(44100, 6.0)
    stereo = np.stack([scene, 0.7 * scene + 0.05 * np.sin(2 * np.pi * 1234.0 * np.arange(scene.size) / 44100)])
    return {
        "sine_wav": write_media(root / "sine.wav", tones([440.0, 1000.0], 44100, 4.0), 44100, "pcm_s16le"),
        "surround": write_media(root / "surround.mp4", tones(FIVE_ONE_TONES, 48000, 4.0), 48000, "aac"),
        "no_audio": write_media(root / "no_audio.mp4", None, video_seconds=2.0),
        "short": write_media(root / "short.mp4", tones([440.0, 440.0], 44100, 3.0), 44100, "aac", video_seconds=3.0),
        "clicks_mp4": write_media(root / "clicks.mp4", clicks(44100, 12.0, 2), 44100, "aac"),
        "clicks_webm": write_media(root / "clicks.webm", clicks(48000, 12.0, 2), 48000, "libopus", video_seconds=12.0),
        "scene_mp4": write_media(root / "scene.mp4", stereo, 44100, "aac", video_seconds=6.0),
        "scene_webm": write_media(root / "scene.webm", resample(stereo, 44100, 48000), 48000, "libopus"),
    }


# ------------------------------------------------------------------------------------------------ decoding
def test_stereo_sine_wav_is_the_average_of_the_channels(media: dict[str, Path]) -> None:
    waveform = decode_audio(media["sine_wav"], 1.0, 2.0)
    assert waveform is not None and waveform.dtype == np.float32 and waveform.shape == (2 * SR,)
    # left 440 Hz, right 1 kHz, amplitude 0.3 each: the mono average holds both at 0.15.
    assert tone_amplitude(waveform, 440.0) == pytest.approx(0.15, rel=0.02)
    assert tone_amplitude(waveform, 1000.0) == pytest.approx(0.15, rel=0.02)
    assert tone_amplitude(waveform, 700.0) < 1e-3


def test_decord_stereo_wav_holds_both_channels_equally(media: dict[str, Path]) -> None:
    """decord's FFmpeg downmix keeps both channels, at 0.71 each for a WAV without a channel mask (not 0.5)."""
    waveform = decode_audio(media["sine_wav"], 1.0, 2.0, backend="decord")
    assert waveform is not None and waveform.shape == (2 * SR,)
    left, right = tone_amplitude(waveform, 440.0), tone_amplitude(waveform, 1000.0)
    assert left == pytest.approx(right, rel=0.02) and left > 0.1


def test_surround_aac_downmix_averages_all_six_channels(media: dict[str, Path]) -> None:
    info = audio_stream_info(media["surround"])
    assert info is not None
    assert (info["sample_rate"], info["channels"], info["layout"], info["codec"]) == (48000, 6, "5.1", "aac")
    assert info["duration"] == pytest.approx(4.0, abs=0.05)
    waveform = decode_audio(media["surround"], 1.0, 2.0)
    assert waveform is not None
    for freq in FIVE_ONE_TONES:  # every channel, the LFE included, at 1/6 of its amplitude
        assert tone_amplitude(waveform, freq) == pytest.approx(0.3 / 6, rel=0.05), freq


def test_decord_surround_downmix_is_ffmpegs_weighted_one(media: dict[str, Path]) -> None:
    """Documents why the backends differ on 5.1: decord's mono=True drops the LFE and weights the rest."""
    waveform = decode_audio(media["surround"], 1.0, 2.0, backend="decord")
    assert waveform is not None
    names = ["FL", "FR", "FC", "LFE", "BL", "BR"]
    amplitudes = {name: tone_amplitude(waveform, f) for name, f in zip(names, FIVE_ONE_TONES, strict=True)}
    assert amplitudes["LFE"] < 1e-3
    assert amplitudes["FC"] > amplitudes["FL"] > amplitudes["BL"] > 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_without_audio_gives_none(media: dict[str, Path], backend: str) -> None:
    assert decode_audio(media["no_audio"], 0.0, 10.24, backend=backend) is None
    assert audio_stream_info(media["no_audio"]) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_and_missing_files_raise_naming_the_file(tmp_path: Path, backend: str) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    for path in (garbage, tmp_path / "missing.mp4"):
        with pytest.raises(AudioDecodeError) as caught:
            decode_audio(path, 0.0, 10.24, backend=backend)
        message = str(caught.value)
        assert str(path) in message and "\n" not in message and "(" in message
        with pytest.raises(AudioDecodeError, match="cannot decode audio"):
            audio_stream_info(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_file_is_returned_short_not_padded(media: dict[str, Path], backend: str) -> None:
    waveform = decode_audio(media["short"], 0.0, 10.24, backend=backend)
    assert waveform is not None
    assert len(waveform) / SR == pytest.approx(3.0, abs=0.05)
    assert np.abs(waveform[-SR // 2 :]).max() > 0.1  # the end is the tone, not padding
    after_the_end = decode_audio(media["short"], 5.0, 2.0, backend=backend)
    assert after_the_end is not None and after_the_end.shape == (0,)


@pytest.mark.parametrize("name", ["clicks_mp4", "clicks_webm"])
@pytest.mark.parametrize("start", [0.0, 0.3, 3.37, 7.91])
def test_pyav_start_cut_is_sample_accurate(media: dict[str, Path], name: str, start: float) -> None:
    """Clicks land within 1 ms of their time (2 ms in WebM after a seek: its timestamps are in ms)."""
    waveform = decode_audio(media[name], start, 4.0)
    assert waveform is not None and waveform.shape == (4 * SR,)
    tolerance = 0.002 if name.endswith("webm") and start > 0.5 else 0.001
    offsets = click_offsets(waveform, start)
    assert max(abs(o) for o in offsets) <= tolerance * SR, offsets


@pytest.mark.parametrize("name", ["clicks_mp4", "clicks_webm"])
def test_decord_start_cut_is_within_ten_ms(media: dict[str, Path], name: str) -> None:
    """decord ignores timestamps: ~18 samples late (resampler delay), Opus 104 more (pre-skip kept)."""
    waveform = decode_audio(media[name], 3.37, 4.0, backend="decord")
    assert waveform is not None
    offsets = click_offsets(waveform, 3.37)
    assert max(abs(o) for o in offsets) <= 0.010 * SR, offsets
    assert max(offsets) - min(offsets) <= 0.0005 * SR  # a constant shift, up to a few samples of jitter


@pytest.mark.parametrize("name", ["scene_mp4", "scene_webm"])
def test_backends_agree_up_to_a_small_shift(media: dict[str, Path], name: str) -> None:
    """Measured: correlation 0.975-0.99 after the shift, not > 0.99: decord's 16 kHz resampling jitters by a
    fraction of a sample to a few samples, which costs correlation in proportion to frequency (its native-rate
    decode equals PyAV's exactly). On the AudioLDM log mel the difference is small."""
    pyav = decode_audio(media[name], 1.0, 4.0, backend="pyav")
    decord = decode_audio(media[name], 1.0, 4.0, backend="decord")
    assert pyav is not None and decord is not None and len(pyav) == len(decord)
    lag, correlation = best_lag_correlation(pyav, decord)
    assert 0 < lag <= 200 and correlation > 0.97, (lag, correlation)
    frames = (len(pyav) - lag) // 160 - 1
    difference = np.abs(log_mel(pyav[: len(pyav) - lag]) - log_mel(decord[lag:]))[:frames]
    assert difference.mean() < 0.05, difference.mean()


def test_audio_stream_starting_late_is_preceded_by_zeros(tmp_path: Path) -> None:
    """Sample i is at time start + i / rate of the stream's timestamps, also when the audio begins at 1 s."""
    path = write_media(tmp_path / "late.mp4", clicks(44100, 4.0, 2), 44100, "aac", video_seconds=5.0, audio_delay=1.0)
    waveform = decode_audio(path, 0.0, 4.0)
    assert waveform is not None and waveform.shape == (4 * SR,)
    assert np.abs(waveform[: round(0.95 * SR)]).max() == 0.0
    shifted = np.concatenate([waveform[SR:], np.zeros(SR, dtype=np.float32)])  # the clicks' own time axis
    assert max(abs(o) for o in click_offsets(shifted[: 3 * SR], 0.0)) <= 0.001 * SR


@pytest.mark.parametrize("codec", ["pcm_s16le", "flac", "mp2"])
def test_codecs_that_decode_to_other_sample_formats_stay_in_place(tmp_path: Path, codec: str) -> None:
    """PCM, FLAC and MP2 decode to integer or interleaved samples that are converted to float planar first; the
    converted frames count time in samples, not in the stream's units (Matroska: ms): every click in place."""
    path = write_media(tmp_path / f"{codec}.mkv", clicks(44100, 12.0, 2), 44100, codec, video_seconds=12.0)
    waveform = decode_audio(path, 0.0, 10.24)
    assert waveform is not None and waveform.shape == (round(10.24 * SR),)
    assert max(abs(o) for o in click_offsets(waveform, 0.0)) <= 0.001 * SR
    later = decode_audio(path, 3.3, 5.0)
    assert later is not None and max(abs(o) for o in click_offsets(later, 3.3)) <= 0.001 * SR


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("suffix", "audio_delay", "video_delay"),
                         [(".mkv", 0.0, 1.3), (".mp4", 0.0, 1.3), (".mkv", 3600.0, 3600.0), (".mkv", 0.7, 0.0)])
def test_audio_is_on_the_videos_clock(tmp_path: Path, suffix: str, audio_delay: float, video_delay: float,
                                      backend: str) -> None:
    """t = 0 is the first video frame, as for the frames: a picture that starts 1.3 s after the sound, timestamps
    that start at 3600 s, a sound that starts 0.7 s after the picture (the clicks are 1 s apart: the offsets are
    not whole seconds). Each click comes where a player plays it against the picture."""
    path = write_media(tmp_path / f"clock{suffix}", clicks(44100, 8.0, 2), 44100, "aac", video_seconds=8.0,
                       audio_delay=audio_delay, video_delay=video_delay)
    with av.open(str(path)) as container:  # the file holds the offset the test means
        streams = {s.type: s for s in container.streams}
        video_start = float(streams["video"].start_time * streams["video"].time_base)
        audio_start = float(streams["audio"].start_time * streams["audio"].time_base)
    assert video_start - audio_start == pytest.approx(video_delay - audio_delay, abs=0.05)
    shift = audio_start - video_start  # where the audio's time 0 is on the video's clock
    for start in (0.0, 2.2):
        waveform = decode_audio(path, start, 4.0, backend=backend)
        assert waveform is not None
        on_audio_clock = start - shift  # the window's start in the clicks' own time
        if on_audio_clock < 0:  # before the sound starts: zeros, then the clicks
            lead = round(-on_audio_clock * SR)
            assert np.abs(waveform[: lead - round(0.05 * SR)]).max() == 0.0
            waveform, on_audio_clock = waveform[lead:], 0.0
        # decord keeps AAC's encoder delay in Matroska (1024 samples, 23 ms late), as it keeps Opus's pre-skip
        tolerance = 0.002 if backend == "pyav" else 0.03
        assert max(abs(o) for o in click_offsets(waveform, on_audio_clock)) <= tolerance * SR


@pytest.mark.parametrize(("layout", "codec", "suffix"), [("7.1", "aac", ".mp4"), ("hexadecagonal", "pcm_s16le", ".mkv")])
def test_eight_channels_and_more(tmp_path: Path, layout: str, codec: str, suffix: str) -> None:
    """7.1 AAC and 16-channel PCM: PyAV's AudioFrame.planes reads past FFmpeg's 8 inline plane pointers and the
    process dies (SIGSEGV), so such audio is converted to interleaved floats first. A tone starting at 1.5 s on
    every channel comes out starting at 1.5 s. Decoded in a child process: a regression fails the test instead
    of ending the test run."""
    import subprocess
    import sys

    path = tmp_path / f"many{suffix}"
    tone = f"aevalsrc='if(gte(t,1.5),0.5*sin(2*PI*440*t),0)':s=48000:d=4:c={layout}"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=10:duration=4", "-f", "lavfi",
                    "-i", tone, "-c:v", "libx264", "-c:a", codec, str(path)], check=True)
    script = f"""
import numpy as np
from preprocess.audio import decode_audio
waveform = decode_audio({str(path)!r}, 0.0, 4.0)
print(len(waveform), int(np.argmax(np.abs(waveform) > 0.05)), float(np.abs(waveform[-16000:]).max()))
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-300:]}"
    length, onset, level = child.stdout.split()
    assert abs(int(length) - 4 * SR) <= SR // 50
    assert abs(int(onset) - round(1.5 * SR)) <= 0.002 * SR
    assert 0.3 < float(level) < 0.8  # the average of 8 or 16 channels carrying the same 0.5 tone (AAC: +-0.15)


def test_the_track_flagged_default_is_the_one_read(tmp_path: Path) -> None:
    """Two audio tracks, a silent stereo one first and the sound second, mono and flagged default (a dubbed or
    described video): the one a player and the ffmpeg program choose is read, and audio_stream_info describes it.
    (decord 0.6.0, built on an older FFmpeg, takes the stereo track: its backend is not held to this.)"""
    backend = "pyav"
    import subprocess

    path = tmp_path / "two.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=10:duration=4", "-f", "lavfi",
                    "-i", "anullsrc=r=44100:cl=stereo", "-f", "lavfi", "-i", "sine=f=440:sample_rate=22050", "-map", "0",
                    "-map", "1", "-map", "2", "-t", "4", "-c:v", "libx264", "-c:a", "aac", "-disposition:a:0", "0",
                    "-disposition:a:1", "default", str(path)], check=True)
    waveform = decode_audio(path, 0.0, 4.0, backend=backend)
    assert waveform is not None and np.abs(waveform[SR : 3 * SR]).max() > 0.05
    info = audio_stream_info(path)
    assert info is not None and (info["sample_rate"], info["channels"]) == (22050, 1)


def test_vorbis_in_ogg_stays_in_place(tmp_path: Path) -> None:
    """FFmpeg gives some Vorbis packets in Ogg times a block off (448 samples) where the block size changes;
    placed by them, the clicks came out ~7.5 ms late with damage at the first one. Counted samples: in place."""
    import subprocess

    wav = write_media(tmp_path / "clicks.wav", clicks(44100, 12.0, 2), 44100, "pcm_s16le")
    ogg = tmp_path / "clicks.ogg"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "libvorbis", str(ogg)], check=True)
    for start in (0.0, 3.3):
        waveform = decode_audio(ogg, start, 6.0)
        assert waveform is not None and max(abs(o) for o in click_offsets(waveform, start)) <= 0.001 * SR


def test_a_sample_rate_change_is_the_clips_failure(tmp_path: Path) -> None:
    """Two recordings joined (48 kHz, then 22.05 kHz): the audio after the change was missing and the clip was
    written with zeros for it, with only a log line. Now one error naming the file, the rates and the time."""
    import subprocess

    parts = []
    for rate in (48000, 22050):
        part = tmp_path / f"{rate}.ts"
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=10:duration=3", "-f", "lavfi",
                        "-i", f"sine=f=440:sample_rate={rate}:duration=3", "-c:v", "libx264", "-c:a", "aac", str(part)],
                       check=True)
        parts.append(part.read_bytes())
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(parts))
    with pytest.raises(AudioDecodeError, match=r"joined.ts: cannot decode audio \(sample rate changes from 48000 to 22050 Hz "
                                               r"at 3\.\d\d s; one rate per file: convert it first\)"):
        decode_audio(joined, 0.0, 6.0)


def test_a_failed_seek_on_a_late_clock_decodes_from_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MPEG-TS starts its clock at 1.4 s: a window at 0.2 s seeks (to 1.1 s on the timestamps). A seek that fails
    (an unseekable input) gave an empty timeline that nothing retried, and stage one died on an AssertionError.
    It decodes from the beginning instead: the same samples as when the seek works."""
    import subprocess

    path = tmp_path / "plain.ts"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=10:duration=4", "-f", "lavfi",
                    "-i", "sine=f=440:duration=4", "-c:v", "libx264", "-c:a", "aac", str(path)], check=True)
    expected = decode_audio(path, 0.2, 2.0)
    real_open = av.open

    class Unseekable:
        def __init__(self, container: Any) -> None:
            self.container = container

        def __getattr__(self, name: str) -> Any:
            return getattr(self.container, name)

        def __enter__(self) -> Unseekable:
            return self

        def __exit__(self, *exc: object) -> None:
            self.container.close()

        def seek(self, *args: Any, **kwargs: Any) -> None:
            raise av.FFmpegError(29, "Illegal seek")

    monkeypatch.setattr(av, "open", lambda *args, **kwargs: Unseekable(real_open(*args, **kwargs)))
    waveform = decode_audio(path, 0.2, 2.0)
    assert expected is not None and waveform is not None
    np.testing.assert_array_equal(waveform, expected)


def test_corrupt_packets_are_skipped_and_later_audio_stays_in_place(media: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(media["clicks_webm"].read_bytes())
    middle = len(data) // 3
    data[middle : middle + 3000] = np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.webm"
    damaged.write_bytes(bytes(data))
    waveform = decode_audio(damaged, 0.0, 12.0)
    assert waveform is not None and waveform.shape == (12 * SR,)
    assert max(abs(o) for o in click_offsets(waveform[8 * SR :], 8.0)) <= 0.002 * SR  # after the damage


def test_invalid_arguments_raise_value_error(media: dict[str, Path]) -> None:
    with pytest.raises(ValueError):
        decode_audio(media["sine_wav"], 0.0, 1.0, backend="ffmpeg")
    with pytest.raises(ValueError):
        decode_audio(media["sine_wav"], -1.0, 1.0)
    with pytest.raises(ValueError):
        decode_audio(media["sine_wav"], 0.0, 0.0)


# ------------------------------------------------------------------------------------------------ front end
def reference_log_mel(x: np.ndarray) -> np.ndarray:
    """AudioLDM's wav_to_fbank written with librosa in float64: |STFT| -> Slaney mel -> log -> 1024 frames."""
    spec = np.abs(
        librosa.stft(
            x.astype(np.float64), n_fft=1024, hop_length=160, win_length=1024, window="hann", center=True,
            pad_mode="reflect",
        )
    )
    mel_basis = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=64, fmin=0.0, fmax=8000.0, htk=False, norm="slaney")
    return np.log(np.maximum(mel_basis @ spec, 1e-5)).T[:1024]


def conv1d_log_mel(x: np.ndarray) -> np.ndarray:
    """AudioLDM's own STFT path (TacotronSTFT: a conv1d with a windowed Fourier basis), in float64."""
    n_fft, cutoff = 1024, 513
    fourier = np.fft.fft(np.eye(n_fft))
    basis = np.vstack([np.real(fourier[:cutoff]), np.imag(fourier[:cutoff])]) * np.hanning(n_fft + 1)[:-1]
    signal = torch.nn.functional.pad(torch.from_numpy(x.astype(np.float64))[None, None], (512, 512), mode="reflect")
    out = torch.nn.functional.conv1d(signal, torch.from_numpy(basis)[:, None, :], stride=160)[0].numpy()
    magnitude = np.sqrt(out[:cutoff] ** 2 + out[cutoff:] ** 2)
    mel_basis = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=64, fmin=0.0, fmax=8000.0)
    return np.log(np.maximum(mel_basis @ magnitude, 1e-5)).T[:1024]


def test_log_mel_matches_independent_references() -> None:
    rng = np.random.default_rng(3)
    t = np.arange(7 * SR) / SR  # 7 s: the last 3.24 s are AudioLDM's zero padding
    waveform = 0.3 * np.sin(2 * np.pi * 523.0 * t) + 0.05 * rng.standard_normal(t.size) + 0.1
    mel = log_mel(waveform)
    assert mel.shape == (1024, 64) and mel.dtype == np.float32
    x = audioldm_waveform(waveform)
    for reference in (reference_log_mel(x), conv1d_log_mel(x)):
        assert np.abs(mel - reference).max() < 2e-3


def test_sine_log_mel_peaks_in_the_nearest_slaney_bin_at_every_frame() -> None:
    t = np.arange(AUDIOLDM_NUM_SAMPLES) / SR
    mel = log_mel(np.sin(2 * np.pi * 1000.0 * t))
    centres = librosa.mel_frequencies(n_mels=66, fmin=0.0, fmax=8000.0, htk=False)[1:-1]
    expected_bin = int(np.argmin(np.abs(centres - 1000.0)))
    inner = mel[1:-1]  # the first and last frames reach into the reflect padding, which breaks the sine's phase
    assert (inner.argmax(axis=1) == expected_bin).all()
    assert inner[:, expected_bin].std() < 0.05


def test_mel_front_end_batches_and_pads_with_zeros_after_the_log() -> None:
    front_end = MelFrontEnd()
    rng = np.random.default_rng(4)
    clips = np.stack([audioldm_waveform(rng.standard_normal(SR * 10)) for _ in range(2)])
    with torch.inference_mode():
        batch = front_end(torch.from_numpy(clips))
        single = front_end(torch.from_numpy(clips[1:]))
        short = front_end(torch.from_numpy(clips[:, : SR]))  # 1 s -> 101 frames, then AudioLDM's ZeroPad2d
    assert batch.shape == (2, 1024, 64)
    torch.testing.assert_close(batch[1:], single, atol=1e-5, rtol=0)
    assert short.shape == (2, 1024, 64)
    assert (short[:, 101:] == 0).all() and (short[:, :101] != 0).any()


def test_silent_and_empty_clips_give_zeros_and_finite_log_mel() -> None:
    for silent in (np.zeros(SR * 5), np.full(SR * 5, 0.2), np.zeros(0)):
        x = audioldm_waveform(silent)
        assert x.shape == (AUDIOLDM_NUM_SAMPLES,) and not x.any()
        mel = log_mel(silent)
        assert np.isfinite(mel).all()
        np.testing.assert_allclose(mel, np.log(1e-5), rtol=1e-6)


def test_audioldm_normalisation_removes_mean_peaks_at_half_and_pads() -> None:
    rng = np.random.default_rng(5)
    waveform = 0.02 * rng.standard_normal(SR * 4) + 0.3  # quiet, with a DC offset
    x = audioldm_waveform(waveform)
    assert x.dtype == np.float32 and x.shape == (AUDIOLDM_NUM_SAMPLES,)
    assert np.abs(x).max() == pytest.approx(0.5, abs=1e-7)
    kept = x[: waveform.size]
    assert abs(kept.mean()) < 1e-6  # the first stage removed the mean; the second only rescales
    np.testing.assert_allclose(kept / kept.std(), (waveform - waveform.mean()) / waveform.std(), atol=1e-4)
    assert not x[waveform.size :].any()
    # The mean and first peak come from the whole clip, before the cut (AudioLDM's order): a loud DC tail
    # past 10.24 s shifts what is kept.
    head = 0.1 * np.sin(np.arange(AUDIOLDM_NUM_SAMPLES) * 0.01)
    long = np.concatenate([head, np.full(AUDIOLDM_NUM_SAMPLES, 0.8)])
    y = audioldm_waveform(long)
    assert y.shape == (AUDIOLDM_NUM_SAMPLES,) and np.abs(y).max() == pytest.approx(0.5, abs=1e-7)
    expected = head - long.mean()
    np.testing.assert_allclose(y, expected / np.abs(expected).max() * 0.5, atol=1e-6)
    with pytest.raises(ValueError):
        audioldm_waveform(np.zeros((2, 100)))
