"""decode_frames / probe_video on normal and edge-case media (tests/media.py), with both backends."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from preprocess.video import Backend, VideoDecodeError, decode_frames, probe_video, timestamp_jump
from tests import media

BACKENDS: tuple[Backend, ...] = ("decord", "pyav", "auto")
WINDOW = 10.24


def slot_centres(fps: float, window: float = WINDOW) -> list[float]:
    """The pipeline's frame times: centres of round(window * fps) equal slots."""
    count = round(window * fps)
    return [(i + 0.5) * window / count for i in range(count)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    return {
        "normal": media.make_video(folder / "normal.mp4", seconds=4.0, fps=10, gop=7),  # keyframes: seeking matters
        "short": media.make_video(folder / "short.mp4", seconds=2.0, fps=10, audio=None),
        "vp9": media.make_video(folder / "vp9.webm", seconds=4.0, fps=10, codec="vp9", sample_rate=48000),
        "portrait": media.make_portrait(folder / "portrait.mp4"),
        "vfr": media.make_vfr(folder / "vfr.mp4"),
        "surround": media.make_51_48k(folder / "surround.mp4"),
        "truncated": media.make_truncated(folder / "truncated.mp4", faststart=True),
        "truncated_moov_at_end": media.make_truncated(folder / "truncated_end.mp4", faststart=False),
        "zero": media.make_zero_bytes(folder / "zero.mp4"),
        "text": media.make_not_video(folder / "notes.mp4"),
        "audio_only": media.make_audio_only(folder / "audio_only.m4a"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_picks_the_frame_shown_at_each_time(files: dict[str, Path], backend: Backend) -> None:
    times = slot_centres(fps=2.0)
    result = decode_frames(files["normal"], 0.0, times, WINDOW, 96, backend=backend)
    expected = [math.floor(t * 10) for t in times if t < 4.0]  # frame i is shown during [i/10, (i+1)/10)
    assert result.frames.shape == (len(expected), 64, 96, 3) and result.frames.dtype == np.uint8
    assert [media.frame_index(f) for f in result.frames] == expected
    assert result.duration == pytest.approx(4.0, abs=1e-3)
    assert result.native_fps == pytest.approx(10.0)
    assert result.backend == ("decord" if backend == "auto" else backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start", [1.0, 2.5])  # PyAV seeks for start > 1 s
def test_start_offset_shifts_the_window(files: dict[str, Path], backend: Backend, start: float) -> None:
    times = [0.05, 0.55, 1.25, 2.95, 3.5]
    result = decode_frames(files["normal"], start, times, WINDOW, 96, backend=backend)
    assert result.duration == pytest.approx(4.0 - start, abs=1e-3)
    expected = [math.floor((start + t) * 10) for t in times if start + t < 4.0]
    assert [media.frame_index(f) for f in result.frames] == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_clip_gives_fewer_frames_and_its_true_duration(files: dict[str, Path], backend: Backend) -> None:
    times = slot_centres(fps=4.0)
    result = decode_frames(files["short"], 0.0, times, WINDOW, 96, backend=backend)
    assert result.duration == pytest.approx(2.0, abs=1e-3)
    assert len(result.frames) == sum(t < 2.0 for t in times) == 8


def test_window_caps_the_duration(files: dict[str, Path]) -> None:
    result = decode_frames(files["normal"], 0.0, [0.1, 0.9, 1.6], 1.0, 96)
    assert result.duration == pytest.approx(1.0)
    assert [media.frame_index(f) for f in result.frames] == [1, 9]


@pytest.mark.parametrize("backend", ("decord", "pyav"))
def test_portrait_comes_out_portrait_in_both_backends(files: dict[str, Path], backend: Backend) -> None:
    result = decode_frames(files["portrait"], 0.0, [0.05, 0.65, 1.45], WINDOW, 96, backend=backend)
    assert result.frames.shape == (3, 96, 64, 3)  # stored 96x64 landscape, displayed rotated by 90 degrees
    # Undoing a counter-clockwise quarter turn must give back the stored picture (wrong direction: bits reversed).
    assert [media.frame_index(np.rot90(f, k=-1)) for f in result.frames] == [0, 6, 14]


def test_backends_agree_on_pixels(files: dict[str, Path]) -> None:
    for name, times in (("normal", [0.25, 1.25, 3.05]), ("portrait", [0.25, 1.25])):
        a = decode_frames(files[name], 0.0, times, WINDOW, 40, backend="decord").frames
        b = decode_frames(files[name], 0.0, times, WINDOW, 40, backend="pyav").frames
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 3.0  # same pictures up to YUV->RGB rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate_uses_real_timestamps(files: dict[str, Path], backend: Backend) -> None:
    times = [0.05, 0.25, 0.9, 1.2, 1.7, 2.12, 2.6, 3.01]
    expected = [max(i for i, start in enumerate(media.VFR_TIMES) if start <= t) for t in times]
    result = decode_frames(files["vfr"], 0.0, times, WINDOW, 96, backend=backend)
    fps = result.native_fps
    # The test can fail: assuming a constant rate (index = floor(t * average fps)) picks other frames.
    assert [math.floor(t * fps) for t in times] != expected
    assert [media.frame_index(f) for f in result.frames] == expected
    assert 3.0 < result.duration < 3.5


@pytest.mark.parametrize("backend", ("decord", "auto"))
def test_vp9_webm_gets_every_frame(files: dict[str, Path], backend: Backend) -> None:
    # decord's default threading stops after ~11 VP9 frames of some files (dmlc/decord#246); all 40 must come.
    times = [(i + 0.5) / 10 for i in range(40)]
    result = decode_frames(files["vp9"], 0.0, times, 4.0, 96, backend=backend)
    assert result.backend == "decord"
    assert [media.frame_index(f) for f in result.frames] == list(range(40))


def test_51_48k_clip_decodes_and_has_the_promised_audio(files: dict[str, Path]) -> None:
    assert len(decode_frames(files["surround"], 0.0, [0.5, 1.5], WINDOW, 96).frames) == 2
    with av.open(str(files["surround"])) as container:
        audio = container.streams.audio[0]
        assert (audio.rate, audio.channels, audio.codec_context.name) == (48000, 6, "aac")


def test_truncated_file_decodes_partly_through_the_pyav_fallback(files: dict[str, Path]) -> None:
    """Documented behaviour: decord refuses the cut file (it fails indexing the packets), PyAV decodes the
    frames stored before the cut, so decode_frames returns a shorter clip with correct frames."""
    times = slot_centres(fps=4.0)
    with pytest.raises(VideoDecodeError, match="truncated.mp4: decord"):
        decode_frames(files["truncated"], 0.0, times, WINDOW, 96, backend="decord")
    result = decode_frames(files["truncated"], 0.0, times, WINDOW, 96)
    assert result.backend == "pyav"
    assert 0.5 < result.duration < 3.5  # the header announces 4 s; about half of it is left
    assert 0 < len(result.frames) == sum(t < result.duration for t in times)
    assert [media.frame_index(f) for f in result.frames] == [math.floor(t * 10) for t in times[: len(result.frames)]]


def test_decord_prints_nothing_of_its_own_on_a_damaged_file(files: dict[str, Path],
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    """decord's bundled FFmpeg wrote demuxer messages ('stream 1, offset 0x..: partial file') straight to stderr,
    next to the project's own one-line errors; its log is off now, and the frames still come (through PyAV)."""
    capfd.readouterr()
    result = decode_frames(files["truncated"], 0.0, [0.5, 1.0], WINDOW, 96)
    assert len(result.frames) == 2
    assert capfd.readouterr().err == ""


def test_decords_own_log_lines_stay_off_stderr_and_nothing_else_is_lost(tmp_path: Path,
                                                                        capfd: pytest.CaptureFixture[str]) -> None:
    """decord's C++ code printed '[hh:mm:ss] .../video_reader.cc:83: ERROR opening: <file>, ...' on stderr before
    the project's one-line error said the same; now only that one line is left. Other output written to stderr
    meanwhile is kept, in order."""
    from common.ffmpeg import decord_log_dropped

    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    capfd.readouterr()
    with pytest.raises(VideoDecodeError, match="junk.mp4"):
        decode_frames(junk, 0.0, [0.5], WINDOW, 96)
    assert capfd.readouterr().err == ""
    with decord_log_dropped():
        print("kept 1", file=sys.stderr)
        os.write(2, b"[20:00:37] /src/video/video_reader.cc:83: ERROR opening: x.mp4, Invalid data\n")
        os.write(2, b"kept 2\n")
    assert capfd.readouterr().err == "kept 1\nkept 2\n"


def test_truncated_file_without_header_is_an_error(files: dict[str, Path]) -> None:
    path = files["truncated_moov_at_end"]
    with pytest.raises(VideoDecodeError, match="moov atom not found") as caught:
        decode_frames(path, 0.0, [0.5], WINDOW, 96)
    assert str(caught.value).startswith(f"{path}: ")


UNUSABLE = [("zero", "empty file"), ("text", "cannot be decoded"), ("audio_only", "no video stream")]


@pytest.mark.parametrize(("name", "reason"), UNUSABLE)
def test_unusable_files_raise_one_line_naming_the_file(files: dict[str, Path], name: str, reason: str) -> None:
    path = files[name]
    for call in (lambda: decode_frames(path, 0.0, [0.5], WINDOW, 96), lambda: probe_video(path)):
        with pytest.raises(VideoDecodeError) as caught:
            call()
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and reason in message and "\n" not in message


def test_missing_file_and_start_beyond_the_end(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError, match="file not found"):
        decode_frames(tmp_path / "nowhere.mp4", 0.0, [0.5], WINDOW, 96)
    for backend in BACKENDS:
        with pytest.raises(VideoDecodeError, match="beyond the end"):
            decode_frames(files["normal"], 5.0, [0.5], WINDOW, 96, backend=backend)


@pytest.mark.parametrize("backend", ("decord", "pyav"))
def test_downscales_but_never_upscales(files: dict[str, Path], backend: Backend) -> None:
    small = decode_frames(files["normal"], 0.0, [0.25, 2.25], WINDOW, 32, backend=backend)
    assert small.frames.shape[1:] == (32, 48, 3)  # short side 64 -> 32, aspect 3:2 kept
    assert [media.frame_index(f) for f in small.frames] == [2, 22]
    large = decode_frames(files["normal"], 0.0, [0.25], WINDOW, 400, backend=backend)
    assert large.frames.shape[1:] == (64, 96, 3)
    portrait = decode_frames(files["portrait"], 0.0, [0.25], WINDOW, 32, backend=backend)
    assert portrait.frames.shape[1:] == (48, 32, 3)


def test_probe_reports_displayed_size_and_rotation(files: dict[str, Path]) -> None:
    normal = probe_video(files["normal"])
    assert normal["duration"] == pytest.approx(4.0, abs=0.05) and normal["fps"] == pytest.approx(10.0)
    assert (normal["width"], normal["height"], normal["rotation"]) == (96, 64, 0)
    assert (normal["codec"], normal["has_audio"]) == ("h264", True)
    portrait = probe_video(files["portrait"])
    assert (portrait["width"], portrait["height"], portrait["rotation"]) == (64, 96, 90)
    assert probe_video(files["vp9"])["codec"] == "vp9"
    assert probe_video(files["short"])["has_audio"] is False


def test_rejects_times_that_are_not_increasing(files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="increasing"):
        decode_frames(files["normal"], 0.0, [1.0, 0.5], WINDOW, 96)


def test_decord_runs_single_threaded(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The VP9 workaround itself: the bug (dmlc/decord#246) does not show on these tiny files, so check the call."""
    import decord

    calls: list[dict] = []
    real = decord.VideoReader

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(decord, "VideoReader", spy)
    decode_frames(files["vp9"], 0.0, [0.5], WINDOW, 96, backend="decord")
    assert calls and calls[0].get("num_threads") == 1


def test_a_header_that_would_end_the_process_in_decord_goes_to_pyav(tmp_path: Path) -> None:
    """An AVI written to a pipe announces 2**30 frames, and decord 0.6.0 sizes its index by that count: a
    std::bad_alloc that ends the whole process. Such a header is read by PyAV instead (decord forced: one line).
    Run in a child process, so that a regression fails this test instead of ending the test run."""
    import subprocess
    import sys

    video = media.make_video(tmp_path / "piped.avi", seconds=3.0, fps=10, piped=True)
    with av.open(str(video)) as container:
        assert container.streams.video[0].frames == 2**30
    script = f"""
from preprocess.video import VideoDecodeError, decode_frames
times = [0.05, 1.05, 2.95, 3.5]
result = decode_frames({str(video)!r}, 0.0, times, 10.24, 96)
alone = decode_frames({str(video)!r}, 0.0, times, 10.24, 96, backend="pyav")
print(result.backend, result.duration == alone.duration, (result.frames == alone.frames).all(), len(result.frames))
try:
    decode_frames({str(video)!r}, 0.0, times, 10.24, 96, backend="decord")
except VideoDecodeError as error:
    print(error)
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert child.returncode == 0, child.stderr[-500:]
    lines = child.stdout.splitlines()
    assert lines[0] == "pyav True True 3"
    assert lines[1].startswith(f"{video}: decord cannot decode it (its header announces 1073741824 frames for ")


def test_files_whose_frames_decord_misplaces_go_to_pyav(tmp_path: Path) -> None:
    """MPEG-TS (also when named .mp4) and an mp4 cut with `ffmpeg -ss 1.3 -c copy` (an edit list: the frames from
    the keyframe before 1.3 s are stored, those before 1.3 s only to decode what follows): decord 0.6.0 returns
    the wrong frames for both, so `auto` reads them with PyAV and gets the frame shown at each time."""
    import shutil
    import subprocess

    times = [0.05, 0.55, 1.25, 2.95]
    transport = media.make_video(tmp_path / "clip.ts", seconds=4.0, fps=10, audio=None)
    renamed = shutil.copy(transport, tmp_path / "transport.mp4")
    for path in (transport, Path(renamed)):
        result = decode_frames(path, 0.0, times, WINDOW, 96)
        assert result.backend == "pyav"
        assert [media.frame_index(f) for f in result.frames] == [0, 5, 12, 29]

    source = media.make_video(tmp_path / "gop.mp4", seconds=6.0, fps=10, audio=None, gop=10)
    cut = tmp_path / "cut.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-ss", "1.3", "-i", str(source), "-c", "copy", str(cut)], check=True)
    result = decode_frames(cut, 0.0, times, WINDOW, 96)
    assert result.backend == "pyav"
    assert [media.frame_index(f) for f in result.frames] == [13, 18, 25, 42]
    assert result.duration == pytest.approx(4.7, abs=1e-3)


def test_timestamps_far_from_zero_give_no_frame_past_the_end(tmp_path: Path) -> None:
    """PyAV's frame times minus a start of 3600 s are off by ~1e-13 (6.000000000000091 for 6): the time 6.0 is
    still past the end of a 6 s video, for both backends."""
    import subprocess

    source = media.make_video(tmp_path / "v.mp4", seconds=6.0, fps=10, audio=None)
    late = tmp_path / "late.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), "-c", "copy", "-output_ts_offset", "3600", str(late)],
                   check=True)
    for backend in BACKENDS:
        result = decode_frames(late, 0.0, [0.5, 5.95, 6.0, 6.5], WINDOW, 96, backend=backend)
        assert [media.frame_index(f) for f in result.frames] == [5, 59], backend


def test_anamorphic_frames_are_returned_as_displayed(tmp_path: Path) -> None:
    """Stored 96x64 with pixels twice as wide as tall (sample aspect ratio 2:1, set in the H.264 stream without
    re-encoding): displayed 192x64, by both backends and by probe_video."""
    import subprocess

    import cv2

    square = media.make_video(tmp_path / "square.mp4", seconds=2.0, fps=10, audio=None)
    wide = tmp_path / "wide.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(square), "-c:v", "copy", "-bsf:v",
                    "h264_metadata=sample_aspect_ratio=2/1", str(wide)], check=True)
    results = {}
    for backend in ("decord", "pyav"):
        result = decode_frames(wide, 0.0, [0.05, 1.05], WINDOW, 96, backend=backend)
        assert result.frames.shape == (2, 64, 192, 3), backend
        unstretched = [cv2.resize(f, (96, 64), interpolation=cv2.INTER_AREA) for f in result.frames]
        assert [media.frame_index(f) for f in unstretched] == [0, 10], backend
        assert decode_frames(wide, 0.0, [0.05], WINDOW, 32, backend=backend).frames.shape == (1, 32, 96, 3)
        results[backend] = result.frames.astype(int)
    assert np.abs(results["decord"] - results["pyav"]).mean() < 2
    assert (probe_video(wide)["width"], probe_video(wide)["height"]) == (192, 64)


def test_a_still_picture_track_before_the_video_is_not_the_video(tmp_path: Path) -> None:
    """An mkv whose first video track is a one-frame cover picture (what `ffmpeg -i video -i cover.png -map 1 -map 0`
    makes): frames, clock and probe_video all come from the real video, by both backends."""
    video = media.make_video(tmp_path / "v.mp4", seconds=3.0, fps=10, audio=None)
    both = media.make_covered(tmp_path / "covered.mkv", video)
    with av.open(str(both)) as container:
        assert [s.codec_context.name for s in container.streams.video] == ["png", "h264"]
    for backend in ("pyav", "auto"):
        result = decode_frames(both, 0.0, [0.05, 1.05, 2.95], WINDOW, 96, backend=backend)
        assert [media.frame_index(f) for f in result.frames] == [0, 10, 29], backend
        assert result.duration == pytest.approx(3.0, abs=1e-3)
    with pytest.raises(VideoDecodeError, match="it holds 2 video streams, of which decord may read another"):
        decode_frames(both, 0.0, [0.05], WINDOW, 96, backend="decord")  # it picks its own: PyAV reads such files
    probe = probe_video(both)
    assert (probe["index"], probe["codec"], probe["width"]) == (1, "h264", 96)


def test_large_frames_are_resized_as_they_come(tmp_path: Path) -> None:
    """1920x1080 frames (6.2 MB each as RGB) downscaled to a short side of 96: PyAV decoding 24 of them holds a few
    full-size frames at a time, not all 24 (150 MB), so 4K sources do not multiply a worker's memory. Measured as
    the growth of the peak resident memory of a child process over a warm-up decode of the same file (Linux).
    decord is not held to this bound: its own buffers grow by 120-180 MB here whatever the batch (its frames are
    now taken DECORD_CHUNK at a time, which halved its growth from 280 MB)."""
    backend = "pyav"
    import subprocess
    import sys

    video = media.make_video(tmp_path / "big.mp4", seconds=2.4, fps=10, size=(1920, 1080), audio=None, gop=5)
    # the peak resident memory of this address space (VmHWM): ru_maxrss would carry over the forking parent's
    script = f"""
from pathlib import Path
from preprocess.video import decode_frames
def peak():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
decode_frames({str(video)!r}, 0.0, [0.05], 10.24, 96, backend={backend!r})  # codecs and buffers in place
before = peak()
result = decode_frames({str(video)!r}, 0.0, [0.05 + 0.1 * i for i in range(24)], 10.24, 96, backend={backend!r})
print(result.frames.shape, peak() - before)
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert child.returncode == 0, child.stderr[-500:]
    shape, growth = child.stdout.strip().rsplit(" ", 1)
    assert shape == "(24, 96, 171, 3)"
    assert int(growth) < 8 * 1920 * 1080 * 3, f"{int(growth) / 2**20:.0f} MiB"


def test_packets_the_decoder_refuses_are_skipped_not_the_end(tmp_path: Path) -> None:
    """Theora codes an unchanged frame as an empty packet, which FFmpeg's decoder refuses (EINVAL): a 6 s video
    whose picture changes once a second ended after its first frame. Skipped packets keep the frame before."""
    import subprocess

    video = tmp_path / "still.ogv"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=1:duration=6", "-r", "10",
                    "-c:v", "libtheora", str(video)], check=True)
    result = decode_frames(video, 0.0, [0.5, 1.5, 2.5], WINDOW, 96, backend="pyav")
    assert result.duration > 5.0 and len(result.frames) == 3
    assert not np.array_equal(result.frames[0], result.frames[2])  # testsrc's counter moved on


def test_probe_of_webm_and_av1(tmp_path: Path) -> None:
    """WebM stores no duration per stream, and the container's is its longest stream's (here the Opus audio's, 8 ms
    more): probe_video gives where the video's packets end, where the frames end (vta-sam generate lays its windows
    out by it). An AV1 stream is named av1, not by its decoder (libdav1d)."""
    import subprocess

    webm = media.make_video(tmp_path / "v.webm", seconds=4.0, fps=10, codec="vp9", sample_rate=48000)
    frames_end = decode_frames(webm, 0.0, [0.05], WINDOW, 96, backend="pyav").duration
    assert probe_video(webm)["duration"] == pytest.approx(frames_end, abs=1e-3)
    av1 = tmp_path / "v_av1.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=10:duration=1", "-c:v",
                    "libaom-av1", "-cpu-used", "8", str(av1)], check=True)
    assert probe_video(av1)["codec"] == "av1"


def test_a_source_slower_than_the_times_repeats_its_frames(files: dict[str, Path]) -> None:
    """Times 8 per second on a 10 fps clip of which every frame is asked for once or twice: both backends give
    the frame shown at each time (decord decodes each distinct frame once)."""
    times = [0.01 + 0.06 * i for i in range(60)]
    expected = [math.floor(t * 10) for t in times if t < 4.0]
    for backend in ("decord", "pyav"):
        result = decode_frames(files["normal"], 0.0, times, WINDOW, 96, backend=backend)
        assert [media.frame_index(f) for f in result.frames] == expected, backend


def test_avi_frames_without_timestamps_in_decord_go_to_pyav(tmp_path: Path) -> None:
    """MPEG-4 Part 2 with B-frames in AVI: decord has no timestamps for its frames (a sentinel of -6e17 s) and
    returned frames 50, 53, 56 for 1, 5, 9; that file is read by PyAV, and the reason says so (decord is not given
    MPEG-4 Part 2 at all now: `test_codecs_and_containers_decord_misplaces_are_read_by_pyav`)."""
    import subprocess

    avi = tmp_path / "packed.avi"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=10:duration=4", "-c:v", "mpeg4",
                    "-bf", "2", str(avi)], check=True)
    with pytest.raises(VideoDecodeError, match="decord is not trusted to place mpeg4 frames"):
        decode_frames(avi, 0.0, [0.15, 0.55], WINDOW, 96, backend="decord")
    assert decode_frames(avi, 0.0, [0.15, 0.55], WINDOW, 96).backend == "pyav"


def test_square_stored_anamorphic_frames_turned_a_quarter(tmp_path: Path) -> None:
    """Stored 64x64 with pixels twice as wide as tall (displayed 128x64), then turned 90 degrees by the display
    matrix: displayed 64 wide and 128 tall by both backends. decord's turned frames are still 64x64, so their
    shape cannot say which axis the pixels stretch; such a file is read by PyAV (before: decord's came out 128
    wide and 64 tall)."""
    import subprocess

    portrait = media.make_portrait(tmp_path / "square.mp4", size=(64, 64))
    wide = tmp_path / "wide.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(portrait), "-c:v", "copy", "-bsf:v",
                    "h264_metadata=sample_aspect_ratio=2/1", str(wide)], check=True)
    auto = decode_frames(wide, 0.0, [0.05], WINDOW, 96)
    assert auto.backend == "pyav" and auto.frames.shape == (1, 128, 64, 3)
    assert decode_frames(wide, 0.0, [0.05], WINDOW, 96, backend="pyav").frames.shape == (1, 128, 64, 3)
    with pytest.raises(VideoDecodeError, match="turned a quarter"):
        decode_frames(wide, 0.0, [0.05], WINDOW, 96, backend="decord")
    assert (probe_video(wide)["width"], probe_video(wide)["height"]) == (64, 128)
    unturned = media.make_video(tmp_path / "plain.mp4", seconds=1.0, fps=10, audio=None, size=(64, 64))
    plain_wide = tmp_path / "plain_wide.mp4"  # square-stored anamorphic, not turned: decord still reads it
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(unturned), "-c:v", "copy", "-bsf:v",
                    "h264_metadata=sample_aspect_ratio=2/1", str(plain_wide)], check=True)
    result = decode_frames(plain_wide, 0.0, [0.05], WINDOW, 96, backend="decord")
    assert result.backend == "decord" and result.frames.shape == (1, 64, 128, 3)


def test_a_folder_a_pipe_and_an_audio_file_with_a_cover_are_said_as_such(tmp_path: Path) -> None:
    """Each said "file not found" or "no frame could be decoded"."""
    import subprocess

    (tmp_path / "folder.mp4").mkdir()
    os.mkfifo(tmp_path / "pipe.mp4")
    cover = tmp_path / "cover.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=d=2", "-f", "lavfi", "-i",
                    "testsrc2=size=64x64:d=0.04", "-map", "0:a", "-map", "1:v", "-c:a", "aac", "-c:v", "mjpeg",
                    "-disposition:v:0", "attached_pic", str(cover)], check=True)
    for name, reason in (("folder.mp4", "a folder, not a video file"), ("pipe.mp4", "not a regular file"),
                         ("cover.mp4", "no video stream")):
        with pytest.raises(VideoDecodeError, match=reason):
            decode_frames(tmp_path / name, 0.0, [0.5], WINDOW, 96)
        with pytest.raises(VideoDecodeError, match=reason):
            probe_video(tmp_path / name)
    from eval.video_frames import VideoReadError, window_frames

    with pytest.raises(VideoReadError, match="cover.mp4: no video stream"):  # evaluation's reader: not an AttributeError
        window_frames(cover, 0.0, 1.0, {"a": 4}, 0)


def test_media_paths_keep_the_file_systems_reading_and_decord_runs_without_stderr(files: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    """A relative name goes behind './' (not made absolute: 'link/..' is resolved by the file system, not folded
    by its text); with the process's stderr closed, decord still decodes (the fd-2 redirection must not fail it
    into the PyAV fallback)."""
    import subprocess

    from common.ffmpeg import media_path

    assert media_path("a:b.mp4") == "./a:b.mp4" and media_path("link/../x.mp4") == "./link/../x.mp4"
    assert media_path("/abs/x.mp4") == "/abs/x.mp4" and media_path("../x.mp4") == "../x.mp4"
    script = ("import sys; from preprocess.video import decode_frames; "
              f"r = decode_frames({str(files['normal'])!r}, 0.0, [0.5], 2.0, 32); print(r.backend)")
    result = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
                            preexec_fn=lambda: os.close(2))
    assert result.stdout.strip() == "decord"


@pytest.mark.parametrize("codec", ["mpeg1video", "mpeg2video"])
def test_raw_mpeg_elementary_streams_are_timed_by_counting_frames(tmp_path: Path, codec: str) -> None:
    """A raw MPEG-1/2 stream has no timestamps of its own, only the parser's guesses, which run a frame late (from
    the second frame on in MPEG-1, from the first in MPEG-2): its frames came out a frame late and it lasted a
    frame (40 ms) too long, in decoding and in probe_video (whose length vta-sam generate gives its sound)."""
    import subprocess

    source = media.make_video(tmp_path / "source.mp4", seconds=2.0, fps=25, audio=None)
    raw = tmp_path / "raw.m2v"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), "-c:v", codec, "-q:v", "2", "-f", codec, str(raw)],
                   check=True)
    assert probe_video(raw)["duration"] == pytest.approx(2.0, abs=1e-6)
    decoded = decode_frames(raw, 0.0, [(k + 0.5) / 25 for k in range(60)], WINDOW, 64)
    assert decoded.duration == pytest.approx(2.0, abs=1e-6)
    assert [media.frame_index(frame) for frame in decoded.frames] == list(range(50))


def test_last_words_are_the_crash_message_not_decords_log_or_pythons_fault_report(tmp_path: Path) -> None:
    from common.ffmpeg import last_words

    log = tmp_path / "123.stderr"
    log.write_bytes(b"[10:00:00] /src/video/video_reader.cc:83: ERROR opening\n"
                    b"terminate called after throwing an instance of 'std::bad_alloc'\n  what():  std::bad_alloc\n"
                    b"Fatal Python error: Aborted\n\nCurrent thread 0x01 (most recent call first):\n  File \"x.py\"\n")
    assert last_words(log) == "terminate called after throwing an instance of 'std::bad_alloc' what(): std::bad_alloc"
    log.write_bytes(b"Fatal Python error: Segmentation fault\n\nCurrent thread 0x01:\n  File \"x.py\"\n")
    assert last_words(log) == "Fatal Python error: Segmentation fault"
    log.write_bytes(b"[10:00:00] /src/video/video_reader.cc:83: ERROR opening\n")
    assert last_words(log) == "" and last_words(tmp_path / "missing") == ""


def test_windows_of_one_video_share_one_decord_reader_and_decode_the_same(tmp_path, monkeypatch):
    """vta-sam generate reads a long video window by window; decord indexed the whole file again for each window
    (a cost that grew with the square of the length: 600 s for the 874 windows of a 2-hour video). Inside
    `reading_windows` one reader serves every window of the video, and the frames are those of a fresh reader."""
    import decord

    from preprocess.video import reading_windows

    video = media.make_video(tmp_path / "long.mp4", seconds=30.0, fps=10, audio=None)
    other = media.make_video(tmp_path / "other.mp4", seconds=12.0, fps=10, audio=None)
    times = [0.25 + 0.5 * i for i in range(20)]
    starts = [0.0, 8.24, 16.48, 19.76]
    fresh = [decode_frames(video, start, times, 10.24, 64, backend="decord") for start in starts]
    opened = []
    real = decord.VideoReader

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(decord, "VideoReader", Counting)
    with reading_windows():
        for _ in range(3):  # three passes, as a caption-free video is read
            shared = [decode_frames(video, start, times, 10.24, 64, backend="decord") for start in starts]
            for a, b in zip(fresh, shared):
                assert b.backend == "decord" and b.duration == a.duration and np.array_equal(a.frames, b.frames)
        decode_frames(other, 0.0, times, 10.24, 64, backend="decord")  # another video: its own reader
    assert len(opened) == 2
    decode_frames(video, 0.0, times, 10.24, 64, backend="decord")
    assert len(opened) == 3  # outside, each call opens its own (stage one reads each clip once)


@pytest.mark.parametrize("gop", [10, None])  # a keyframe each second; one for the whole file (x264's 250 frames)
def test_a_window_of_a_transport_stream_starts_at_its_time(tmp_path: Path, gop: int | None) -> None:
    """MPEG-TS seeks to a byte position near the time, not to the keyframe before it: the first picture decoded
    after the seek came 0.5-1 s late (the window's first times all showed it), and with one keyframe for the whole
    file nothing decoded ('no frame could be decoded'). The seek now backs off until the first picture is in time."""
    import subprocess

    source = media.make_video(tmp_path / "source.ts", seconds=8.0, fps=10, audio=None, gop=gop)
    clip = tmp_path / "clip.ts"  # broadcast clocks do not start at zero
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), "-c", "copy", "-f", "mpegts", "-output_ts_offset", "100",
                    str(clip)], check=True)
    for start in (2.0, 5.35):
        result = decode_frames(clip, start, [0.0, 0.5, 1.0], 1.5, 96)
        first = math.floor(start * 10 + 1e-6)  # frame i shows from i / 10 s
        assert [media.frame_index(f) for f in result.frames] == [first, first + 5, first + 10], start


@pytest.mark.parametrize("second_offset, jump", [(0, r"\+\d+"), (91, "-13")])
def test_a_window_across_a_timestamp_jump_is_refused(tmp_path: Path, second_offset: float, jump: str) -> None:
    """Two recordings joined into one MPEG-TS, the second's clock behind the first's: 104 s behind, FFmpeg reads it
    as a 26-hour jump forward; 13 s behind (an encoder restarted), as 13 s back. A window across the jump showed the
    last frame before it until the window's end (stage one made its features from that frozen picture); with the
    jump back, a seek landed in the second recording, whose frames were returned for the first's times. A window
    across or after the jump is refused, naming it; one before it is read from the file's start."""
    import subprocess

    def segment(name: str, offset: float) -> Path:
        made = media.make_video(tmp_path / f"{name}.mp4", seconds=4.0, fps=10, audio=None, gop=10)
        path = tmp_path / f"{name}.ts"
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(made), "-c", "copy", "-f", "mpegts", "-output_ts_offset",
                        str(offset), str(path)], check=True)
        return path

    joined = tmp_path / "joined.ts"
    joined.write_bytes(segment("a", 100).read_bytes() + segment("b", second_offset).read_bytes())
    before = decode_frames(joined, 0.0, [0.0, 1.0, 2.0, 3.0], 3.5, 96)
    assert [media.frame_index(f) for f in before.frames] == [0, 10, 20, 30]
    later = decode_frames(joined, 2.05, [0.0, 0.5, 1.0], 1.5, 96)
    assert [media.frame_index(f) for f in later.frames] == [20, 25, 30]
    for start, window in ((0.0, 10.24), (2.0, 3.0), (6.0, 2.0)):  # across the jump at 4 s, and wholly after it
        with pytest.raises(VideoDecodeError, match=rf"{joined}: its timestamps jump by {jump} s after 3\.9 s "
                                                   r"\(recordings joined.*remux it first"):
            decode_frames(joined, start, [0.0, 0.5], window, 96)


def test_a_picture_held_over_a_minute_with_sound_going_on_is_not_a_jump(tmp_path: Path) -> None:
    """A transport stream whose picture stays still for 70 s (variable frame rate) while its sound goes on was
    refused as a timestamp jump, in stage one and in `vta-sam generate`. The sound's packets bridge the step, so the
    still picture is shown for its 70 s; without sound the step cannot be told from a jump, and still counts as
    one."""
    import subprocess

    made = media.make_video(tmp_path / "a.mp4", seconds=4.0, fps=10, audio=None, gop=10)

    def held(name: str, sound: bool) -> Path:
        path = tmp_path / name
        audio = ["-f", "lavfi", "-i", "sine=frequency=440:duration=80"] if sound else []
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(made), *audio, "-vf", "setpts='if(gte(N,20),PTS+70/TB,PTS)'",
                        "-fps_mode", "passthrough", "-c:v", "libx264", "-g", "10", *(["-c:a", "aac"] if sound else []),
                        "-f", "mpegts", str(path)], check=True)
        return path

    still = held("still.ts", sound=True)
    index = probe_video(still)["index"]
    assert timestamp_jump(still, index) is None
    assert [media.frame_index(f) for f in decode_frames(still, 1.0, [0.0, 0.9, 30.0], 31.0, 96).frames] == [10, 19, 19]
    assert [media.frame_index(f) for f in decode_frames(still, 71.0, [0.0, 1.0, 1.5], 2.0, 96).frames] == [19, 20, 25]
    silent = held("silent.ts", sound=False)
    assert timestamp_jump(silent, probe_video(silent)["index"]) is not None
    with pytest.raises(VideoDecodeError, match="its timestamps jump by"):
        decode_frames(silent, 71.0, [0.0], 2.0, 96)


def test_a_pass_past_every_keyframe_stops_soon_after_its_time(tmp_path: Path) -> None:
    """A transport stream with one keyframe, sought to 4 s: nothing decodes until the file's end, and each backed-off
    seek read every remaining packet before giving up. With `give_up_after` the pass stops once its packets are
    past that time, having made no frame."""
    import av

    from common.ffmpeg import decoded_frames

    path = media.make_video(tmp_path / "clip.ts", seconds=20.0, fps=10, audio=None)  # x264: one keyframe in 250
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        origin = float(stream.start_time * stream.time_base)
        container.seek(round((origin + 4.0) / stream.time_base), stream=stream, backward=True, any_frame=False)
        read: list[float] = []

        class Counting:  # the container, noting the time of each packet it hands over
            def demux(self, *args):
                for packet in container.demux(*args):
                    if packet.pts is not None:
                        read.append(float(packet.pts * stream.time_base) - origin)
                    yield packet

        assert list(decoded_frames(Counting(), stream, [], give_up_after=origin + 6.0)) == []
    assert read and max(read) < 7.0  # not the 16 s of packets after the seek


@pytest.mark.parametrize("name, encoder", [
    ("open_gop_hevc.mkv", ["-c:v", "libx265", "-x265-params", "keyint=50:log-level=error"]),  # x265: open GOP
    ("open_gop_hevc.mp4", ["-c:v", "libx265", "-x265-params", "keyint=50:log-level=error", "-tag:v", "hvc1"]),
    ("intra_refresh.mp4", ["-c:v", "libx264", "-x264-params", "intra-refresh=1:keyint=50"]),
    ("intra_refresh.mkv", ["-c:v", "libx264", "-x264-params", "intra-refresh=1:keyint=50"]),
    ("intra_refresh.ts", ["-c:v", "libx264", "-x264-params", "intra-refresh=1:keyint=50"]),  # PyAV anyway: the lead
])
def test_keyframes_that_are_no_idr_pictures_go_to_pyav(tmp_path: Path, name: str, encoder: list[str]) -> None:
    """decord 0.6.0 seeks to an open GOP's or an intra refresh's keyframe as if the frames shown before it were
    whole: x265's default open GOP in Matroska came back 46 frames early (4 for 50), in MP4 4 frames late; H.264
    with intra refresh 15 frames late. Such streams are read with PyAV, at the frames shown at each time; with
    intra refresh the picture after a recovery point is whole only a keyframe interval later (a window starting
    just after one got green frames), so PyAV starts decoding that much earlier."""
    import subprocess

    source = media.make_video(tmp_path / "source.mp4", seconds=24.0, fps=25, audio=None, gop=1)
    path = tmp_path / name
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), *encoder, "-pix_fmt", "yuv420p", str(path)], check=True)
    times = [0.0, 1.1, 2.1, 8.0, 9.92]
    result = decode_frames(path, 2.0, times, 10.24, 96)
    assert [media.frame_index(f) for f in result.frames] == [math.floor((2.0 + t) * 25 + 1e-6) % 256 for t in times]
    assert result.backend == "pyav"
    for start in (14.1, 14.69):  # just after a keyframe (every 2 s)
        late = decode_frames(path, start, [0.0, 0.2, 0.52, 1.04], 2.5, 96)
        assert [media.frame_index(f) for f in late.frames] == [math.floor((start + t) * 25 + 1e-6) % 256
                                                                for t in (0.0, 0.2, 0.52, 1.04)], start


# The eight display matrices of quarter turns and mirrors, [a, b, c, d] of FFmpeg's [[a, b, u], [c, d, v], [x, y, w]]
DISPLAY_MATRICES = {"none": (1, 0, 0, 1), "hflip": (-1, 0, 0, 1), "vflip": (1, 0, 0, -1), "half turn": (-1, 0, 0, -1),
                    "quarter": (0, 1, -1, 0), "three quarters": (0, -1, 1, 0), "transpose": (0, 1, 1, 0),
                    "anti-transpose": (0, -1, -1, 0)}


@pytest.mark.parametrize("name", DISPLAY_MATRICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_are_shown_as_their_display_matrix_says_mirrors_too(tmp_path: Path, name: str, backend: Backend) -> None:
    """A mirrored display matrix (a selfie camera's; `ffmpeg -display_hflip`) was read as a half turn by both
    backends: the frame came back upside down and mirrored the other way. The reference is the ffmpeg program,
    which turns and flips by the matrix."""
    import subprocess

    a, b, c, d = DISPLAY_MATRICES[name]
    width, height = 96, 64  # decord 0.6.0 cannot copy out some sizes (48x32)
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)  # a red top-left quarter and a green top-right one
    image[: height // 2, width // 2 :] = (0, 255, 0)
    path = tmp_path / "m.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        one = 1 << 16
        stream.set_display_matrix([a * one, b * one, 0, c * one, d * one, 0, 0, 0, 1 << 30])
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    shown = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt",
                            "rgb24", "-"], capture_output=True, check=True).stdout
    side = (height, width) if name in ("none", "hflip", "vflip", "half turn") else (width, height)
    expected = np.frombuffer(shown, np.uint8).reshape(*side, 3)
    if backend == "decord" and a * d - b * c < 0:  # decord would turn it: PyAV reads it (backend "auto")
        with pytest.raises(VideoDecodeError, match="its display matrix mirrors the picture, which decord turns"):
            decode_frames(path, 0.0, [0.1], WINDOW, 64, backend=backend)
        return
    frames = decode_frames(path, 0.0, [0.1], WINDOW, 64, backend=backend).frames
    assert frames.shape == (1, *side, 3)
    corners = [(2, 2), (2, -3), (-3, 2), (-3, -3)]
    assert [tuple(frames[0][r, c] > 128) for r, c in corners] == [tuple(expected[r, c] > 128) for r, c in corners]


@pytest.mark.parametrize("name, args", [
    ("mpeg4_bf.mkv", ["-c:v", "mpeg4", "-q:v", "2", "-bf", "2"]),  # decord: up to 10 frames early
    ("mpeg2_bf.mp4", ["-c:v", "mpeg2video", "-q:v", "2", "-bf", "2"]),  # decord: 2 frames late
    ("h263p.mkv", ["-c:v", "h263p", "-q:v", "2", "-vf", "scale=128:96"]),  # decord: 10 frames early
    ("wmv2.wmv", ["-c:v", "wmv2", "-q:v", "2"]),  # decord: up to a second off
    ("h264.wmv", ["-c:v", "libx264", "-crf", "12"]),  # decord: every timestamp 0, "start beyond the end (0.04 s)"
])
def test_codecs_and_containers_decord_misplaces_are_read_by_pyav(tmp_path: Path, name: str, args: list[str]) -> None:
    """decord placed these frames wrongly when it seeks (33 of stage one's 41 frames wrong for MPEG-4 Part 2 with
    B-frames in Matroska), silently; it is now trusted only with the codecs checked against PyAV."""
    import subprocess

    source = media.make_video(tmp_path / "src.mp4", seconds=6.0, fps=25, audio=None, gop=1)
    path = tmp_path / name
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), *args, str(path)], check=True)
    times = [0.1 + 0.37 * i for i in range(12)]
    result = decode_frames(path, 1.0, times, WINDOW, 64)
    assert result.backend == "pyav"
    assert [media.frame_index(f) for f in result.frames] == [math.floor((1.0 + t) * 25) for t in times]


def test_a_matroska_file_of_one_frame_is_one_frame_long(tmp_path: Path) -> None:
    """decord's 'no timestamp' is +9.2e15 there (-9.2e15 in AVI): it claimed the whole window, four copies of the
    frame for four times."""
    import subprocess

    source = media.make_video(tmp_path / "src.mp4", seconds=1.0, fps=10, audio=None)
    path = tmp_path / "one.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), "-frames:v", "1", str(path)], check=True)
    result = decode_frames(path, 0.0, [0.05, 1.0, 5.0, 9.0], WINDOW, 64)
    assert result.duration == pytest.approx(0.1) and len(result.frames) == 1


def test_without_decord_pyav_reads_everything(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """decord has x86-64 wheels only, and the package does not require it elsewhere (aarch64, Apple silicon):
    every video is then read by PyAV, the same frames."""
    expected = decode_frames(files["normal"], 0.0, [0.25, 1.25], WINDOW, 40, backend="pyav").frames
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` raises ImportError
    result = decode_frames(files["normal"], 0.0, [0.25, 1.25], WINDOW, 40)
    assert result.backend == "pyav" and np.array_equal(result.frames, expected)


def test_asf_frames_with_b_frames_are_placed_by_their_presentation_order(tmp_path: Path) -> None:
    """ASF's timestamps are the packets' in decoding order: with B-frames, the frames a decoder puts out carry them
    out of order (40, 120, 160, 80 ms), and PyAV's frames came 1-3 frames early (26 for 28)."""
    import subprocess

    source = media.make_video(tmp_path / "src.mp4", seconds=6.0, fps=25, audio=None, gop=1)
    path = tmp_path / "b.wmv"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), "-f", "lavfi", "-i", "sine=d=6", "-c:v", "libx264",
                    "-crf", "12", "-bf", "3", "-c:a", "wmav2", "-shortest", str(path)], check=True)
    frames = [3, 10, 28, 34, 53, 71, 100]
    times = [(k + 0.5) / 25 - 1.0 for k in frames]  # the middle of each frame's time, from a start of 1 s
    result = decode_frames(path, 1.0, [t for t in times if t >= 0], WINDOW, 64)
    assert [media.frame_index(f) for f in result.frames] == [k for k, t in zip(frames, times) if t >= 0]
    result = decode_frames(path, 0.0, [(k + 0.5) / 25 for k in frames], WINDOW, 64)
    assert [media.frame_index(f) for f in result.frames] == frames


def test_a_file_of_two_video_streams_is_read_from_the_chosen_one(tmp_path: Path) -> None:
    """decord reads the stream it picks (MP4: by bitrate), not the one the rest of the project uses (`video_stream`:
    the audio clock, generation's copy): the frames came from the other picture."""
    import subprocess

    both = tmp_path / "both.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=s=160x96:r=25:d=3", "-f", "lavfi", "-i",
                    "testsrc2=s=320x192:r=25:d=3", "-map", "0:v", "-map", "1:v", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(both)], check=True)
    assert probe_video(both)["index"] == 0
    expected = decode_frames(both, 0.0, [0.15, 1.25], WINDOW, 64, backend="pyav")  # PyAV reads `video_stream`'s
    result = decode_frames(both, 0.0, [0.15, 1.25], WINDOW, 64)
    assert result.frames.shape == expected.frames.shape
    assert np.abs(result.frames.astype(int) - expected.frames.astype(int)).mean() < 3
