"""AV-Align on constructed inputs with known peaks: peak rules, one-to-one matching (2025 rule) and many-to-one
matching without a flow threshold (2023 rule), and whole clips (a square that jumps at chosen frames of a
synthetic video, clicks at chosen times) with the IoU counted by hand."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from eval.metrics import (
    audio_peaks,
    av_align_clip,
    av_align_rules,
    av_align_score,
    av_align_score_2023,
    optical_flow_magnitudes,
    read_gray_frames,
    video_peaks,
)

SIZE = 96
AUDIO_RATE = 16000


def write_jumping_square(path: Path, fps: float, frames: int, jumps: set[int], nudges: set[int] = frozenset()) -> Path:
    """A 16x16 white square on black that moves 8 px right at each frame in `jumps`; a 3x3 dot moves 1 px at
    each frame in `nudges` (motion far below the 0.1 px mean-flow threshold). MJPG in AVI via cv2.VideoWriter."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (SIZE, SIZE))
    assert writer.isOpened()
    x, dot = 10, 10
    for i in range(frames):
        x += 8 if i in jumps else 0
        dot += 1 if i in nudges else 0
        image = np.zeros((SIZE, SIZE, 3), np.uint8)
        image[40:56, x : x + 16] = 255
        image[80:83, dot : dot + 3] = 255
        writer.write(image)
    writer.release()
    return path


def clicks(times: list[float], seconds: float) -> np.ndarray:
    """Silence with a 20 ms decaying noise burst starting at each time (16 kHz)."""
    rng = np.random.default_rng(0)
    y = np.zeros(round(seconds * AUDIO_RATE), np.float32)
    n = round(0.02 * AUDIO_RATE)
    for t in times:
        start = round(t * AUDIO_RATE)
        y[start : start + n] += 0.8 * rng.standard_normal(n) * np.exp(-np.arange(n) / (0.004 * AUDIO_RATE))
    return y


# ---- pure parts --------------------------------------------------------------------------------------------
def test_score_counts_each_video_peak_once():
    # window 1/25 = 40 ms. 0.50 -> 0.50; 0.52 is near 0.50 too but that peak is taken; 2.00 -> 2.03; 3.00: none
    audio, video = [0.5, 0.52, 2.0, 3.0], [0.5, 2.03, 5.0]
    assert av_align_score(audio, video, fps=25) == pytest.approx(2 / (4 + 3 - 2))


def test_score_window_is_strict_and_order_free():
    # fps 4: window 0.25 s exactly (binary fractions, no rounding)
    assert av_align_score([1.25], [1.0], fps=4) == 0.0
    assert av_align_score([1.2499], [1.0], fps=4) == 1.0
    # greedy in time order still finds the maximum matching: 0.9 -> 0.7 leaves 1.1 for 1.2
    assert av_align_score([1.2, 0.9], [1.1, 0.7], fps=4) == 1.0


def test_score_empty_sides():
    assert av_align_score([], [1.0, 2.0], fps=25) == 0.0
    assert av_align_score([1.0], [], fps=25) == 0.0
    assert math.isnan(av_align_score([], [], fps=25))
    assert av_align_score([], [], fps=25, both_empty=1.0) == 1.0


def test_2023_rule_lets_several_audio_peaks_match_one_video_peak():
    # the peaks of test_score_counts_each_video_peak_once: 0.50 and 0.52 both match the video peak at 0.50 now
    audio, video = [0.5, 0.52, 2.0, 3.0], [0.5, 2.03, 5.0]
    assert av_align_score_2023(audio, video, fps=25) == pytest.approx(3 / (4 + 3 - 3))
    # three clicks within one frame of a single video peak: 3 / (3 + 1 - 3) = 3 (2023) against 1 / 3 (2025)
    crowd = [0.99, 1.0, 1.01]
    assert av_align_score_2023(crowd, [1.0], fps=25) == pytest.approx(3.0)
    assert av_align_score(crowd, [1.0], fps=25) == pytest.approx(1 / 3)
    # the same window rule (strict) and the same empty cases
    assert av_align_score_2023([1.25], [1.0], fps=4) == 0.0 and av_align_score_2023([1.2499], [1.0], fps=4) == 1.0
    assert av_align_score_2023([], [1.0], fps=25) == 0.0 and av_align_score_2023([1.0], [], fps=25) == 0.0
    assert math.isnan(av_align_score_2023([], [], fps=25))


def test_rules_share_one_flow_and_differ_in_the_threshold():
    m = [0.9, 0.05, 0.2, 0.1, 0.05, 0.3, 0.3, 0.1, 0.09, 0.08, 0.095, 0.05, 0.5, 0.6]
    # video peaks: 2025 keeps 0.2 s only (0.095 at 1.0 s is below 0.1); 2023 keeps both
    scores = av_align_rules(np.array([1.0]), np.array(m), fps=10)
    assert scores == {"2025": 0.0, "2023": pytest.approx(1 / (1 + 2 - 1))}
    # an offset moves the video peaks onto the audio clock: 0.2 + 0.8 = 1.0
    assert av_align_rules(np.array([1.0]), np.array(m), fps=10, offset=0.8)["2025"] == 1.0


def test_video_peaks_are_strict_local_maxima_above_threshold():
    m = [0.9, 0.05, 0.2, 0.1, 0.05, 0.3, 0.3, 0.1, 0.09, 0.08, 0.095, 0.05, 0.5, 0.6]
    # index 2: peak (0.2 >= 0.1); 5-6: a plateau is not strict; 10: below 0.1; 0 and 13: ends never count
    np.testing.assert_allclose(video_peaks(m, fps=10), [0.2])
    np.testing.assert_allclose(video_peaks(m, fps=10, threshold=0.0), [0.2, 1.0])


def test_optical_flow_duplicates_first_value_and_sees_motion():
    frames = [np.zeros((SIZE, SIZE), np.uint8) for _ in range(5)]
    for i, frame in enumerate(frames):
        x = 10 if i < 1 else 18 if i < 3 else 26  # moves between frames 0->1 and 2->3
        frame[40:56, x : x + 16] = 255
    m = optical_flow_magnitudes(frames)
    assert m.shape == (5,)
    assert m[0] == m[1] > 0.1
    assert m[3] > 0.1 and m[2] == 0.0 and m[4] == 0.0
    assert optical_flow_magnitudes(frames[:1]).tolist() == [0.0]


def test_audio_peaks_find_clicks():
    times = [0.4, 1.2, 2.6]
    peaks = audio_peaks(clicks(times, 3.0), AUDIO_RATE)
    assert len(peaks) == 3
    assert np.all(np.abs(peaks - times) < 0.03)  # onsets land one or two 23 ms hops after the click
    # stereo input is averaged to mono, as librosa.load does
    stereo = np.stack([clicks(times, 3.0), clicks(times, 3.0)])
    np.testing.assert_allclose(audio_peaks(stereo, AUDIO_RATE), peaks)


# ---- whole clips ----------------------------------------------------------------------------------------------
def test_clip_at_25_fps(tmp_path):
    video = write_jumping_square(tmp_path / "v.avi", fps=25, frames=75, jumps={10, 30, 50}, nudges={20})
    frames, fps = read_gray_frames(video)
    magnitudes = optical_flow_magnitudes(frames)
    assert fps == 25 and magnitudes.shape == (75,)
    np.testing.assert_allclose(video_peaks(magnitudes, fps), [0.4, 1.2, 2.0])  # the 1 px nudge is below 0.1
    # clicks at 0.4 and 1.2 meet a jump; 2.6 does not; the jump at 2.0 has no click: 2 / (3 + 3 - 2)
    audio = clicks([0.4, 1.2, 2.6], 3.0)
    assert av_align_clip(video, audio, AUDIO_RATE) == pytest.approx(0.5)
    # 2023 rule: no threshold, so the nudge at frame 20 (0.8 s) is a fourth video peak: 2 / (3 + 4 - 2)
    np.testing.assert_allclose(video_peaks(magnitudes, fps, threshold=0.0), [0.4, 0.8, 1.2, 2.0])
    assert av_align_clip(video, audio, AUDIO_RATE, rule="2023") == pytest.approx(0.4)


def test_clip_two_clicks_near_one_jump_count_once(tmp_path):
    # 10 fps: the window is 100 ms, wide enough for two onsets that librosa resolves (110 ms apart)
    video = write_jumping_square(tmp_path / "v.avi", fps=10, frames=40, jumps={10, 30})
    audio = clicks([0.93, 1.04, 2.0], 4.0)
    peaks = audio_peaks(audio, AUDIO_RATE)
    assert len(peaks) == 3 and np.all(np.abs(peaks[:2] - 1.0) < 0.1)  # both within one frame of the jump at 1.0
    # one match (the 1.0 jump is used once), 3 audio + 2 video peaks: 1 / (3 + 2 - 1)
    assert av_align_clip(video, audio, AUDIO_RATE) == pytest.approx(0.25)
    # the 2023 rule counts both clicks at the jump: 2 / (3 + 2 - 2)
    assert av_align_clip(video, audio, AUDIO_RATE, rule="2023") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="rule"):
        av_align_clip(video, audio, AUDIO_RATE, rule="2024")


def test_unreadable_video_raises(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        read_gray_frames(bad)


def test_window_of_a_clip_leaves_out_audio_past_its_end_and_refuses_a_short_video(tmp_path):
    """A WAV longer than its clip scored its peaks past the window as unmatched (a 60 s WAV for a 7.6 s clip: a
    tenth of the score); a video shorter than its clip scored 0 as if measured."""
    import soundfile

    from eval.av_align import av_align_window

    video = write_jumping_square(tmp_path / "v.avi", fps=25, frames=75, jumps={10, 30, 50})
    audio = clicks([0.4, 1.2, 2.0], 3.0)
    soundfile.write(tmp_path / "fits.wav", audio, AUDIO_RATE)
    soundfile.write(tmp_path / "long.wav", np.concatenate([audio, clicks([0.5 * k for k in range(1, 40)], 20.0)]),
                    AUDIO_RATE)
    fits = av_align_window(str(video), 0.0, 3.0, str(tmp_path / "fits.wav"))
    assert fits["av_align"] == pytest.approx(1.0)
    assert av_align_window(str(video), 0.0, 3.0, str(tmp_path / "long.wav")) == fits
    short = write_jumping_square(tmp_path / "short.avi", fps=25, frames=25, jumps={10})
    for start in (0.0, 2.0):  # one second of a three-second window; a window past the end
        with pytest.raises(ValueError, match=r"short\.avi: (25|0) frames in the window .* where 75 were expected at 25 fps"):
            av_align_window(str(short), start, 3.0, str(tmp_path / "fits.wav"))


def test_a_wav_too_short_for_the_onset_detection_is_a_failure_naming_it(tmp_path):
    """Five samples are shorter than librosa's 2048-sample onset frame: librosa warned on the terminal (naming no
    file), found no onset and the clip scored 0. Now the clip fails, in one line naming the WAV, and nothing warns."""
    import warnings

    import soundfile

    import shards
    from eval.av_align import av_align_scores, av_align_window

    video = write_jumping_square(tmp_path / "v.avi", fps=25, frames=75, jumps={10, 30, 50})
    wav = tmp_path / "out" / "wav" / "c0.wav"
    wav.parent.mkdir(parents=True)
    soundfile.write(wav, np.full(5, 0.1, np.float32), AUDIO_RATE)
    reason = (f"{wav}: 0.312 ms of audio, shorter than the 92.9 ms frame AV-Align's onset detection needs "
              "(7 of 2048 samples at 22050 Hz)")
    clip = shards.SampleMeta(id="c0", caption="", label="", split="test", duration=3.0, valid_frames=75, nouns=(),
                             source=str(video))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as raised:
            av_align_window(str(video), 0.0, 3.0, str(wav))
        assert str(raised.value) == reason
        failures: list[dict[str, str]] = []
        results = av_align_scores(tmp_path / "out", [clip], 1, failures, False)
    assert failures == [{"id": "c0", "stage": "av_align", "reason": f"ValueError: {reason}"}]
    assert results["av_align"]["n"] == 0 and results["av_align"]["per_clip"] == {}
    # a WAV of one frame is measured, without a warning
    soundfile.write(wav, clicks([0.05], 2048 / 22050), AUDIO_RATE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(av_align_window(str(video), 0.0, 3.0, str(wav))) == {"av_align", "av_align_2023"}
