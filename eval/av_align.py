"""AV-Align of the generated WAVs, each measured against its clip: the source video's window
[start, start + duration) at the video's native frame rate, under both rules of the reference (the 2025 one,
results.json 'av_align', and the 2023 one a paper of 2024 most likely used, 'av_align_2023'), from one optical
flow per clip. The score of one clip: `eval.metrics`.

A clip whose source video is missing is left out (counted); a clip whose measurement fails (a video OpenCV
cannot follow, a WAV too short for the onset detection, a dead worker) is a failure with its reason, and the other
clips are still measured.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import shards
from common.signals import pool_worker
from eval.clips import read_wav, wav_path
from eval.metrics import (
    FARNEBACK_PARAMS,
    FLOW_MIN_MAGNITUDE,
    FLOW_MIN_MAGNITUDE_2023,
    ONSET_SAMPLE_RATE,
    audio_peaks,
    av_align_rules,
    optical_flow_magnitudes,
    read_gray_frames,
    summarize,
)

MIN_WINDOW_FRAMES = 0.9  # fewest of a window's frames its video must hold (else the clip fails)
# both rules: the audio is cut at the clip's window, a video short of its window is a failure (results.json
# rows measured before these rules lack the keys, so a table flags them as measured otherwise)
WINDOW_RULES = {"audio": "cut at the clip's window", "min_window_frames": MIN_WINDOW_FRAMES}
AV_ALIGN_PROTOCOL = {
    "method": "Yariv et al. 2024 (2025 version): Farneback flow at the native fps, librosa onsets, one-to-one "
              "matching; clips with no peak on either side excluded",
    "flow_min_magnitude": FLOW_MIN_MAGNITUDE,  # a video peak needs a mean flow magnitude >= this (pixels)
    "match_window_frames": 1,  # an audio peak matches a video peak within 1/fps seconds
    "onset_sample_rate": ONSET_SAMPLE_RATE,
    "farneback": list(FARNEBACK_PARAMS),
    **WINDOW_RULES,
}
AV_ALIGN_2023_PROTOCOL = {
    "method": "Yariv et al. 2024 (2023 version, TempoTokens av_align.py at 34d9502): Farneback flow at the native "
              "fps, librosa onsets, no flow threshold, an audio peak matches when any video peak is within the "
              "window (several audio peaks may match one video peak, so a score can exceed 1); clips with no peak "
              "on either side excluded",
    "flow_min_magnitude": FLOW_MIN_MAGNITUDE_2023,
    "match_window_frames": 1,
    "onset_sample_rate": ONSET_SAMPLE_RATE,
    "farneback": list(FARNEBACK_PARAMS),
    **WINDOW_RULES,
}
RULE_METRICS = {"2025": "av_align", "2023": "av_align_2023"}  # AV-Align rule -> its results.json key


def error_line(error: BaseException) -> str:
    """'<type>: <first line of the message>' (BrokenProcessPool and cv2.error say little without their type)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def av_align_window(video: str, start: float, duration: float, wav: str) -> dict[str, float]:
    """AV-Align of a generated WAV against frames [start, start + duration) of `video` at its native rate, under
    both rules: {results.json key: score} (`RULE_METRICS`).

    Frame i of the file is at i / fps; the window keeps frames with start <= i / fps < start + duration and
    video peak times are shifted to the window's clock (the audio starts at `start`). Audio past the window's
    end (a WAV longer than its clip) is left out: no frame could match its peaks. ValueError naming the video
    when it holds fewer than 90% of the window's frames (a file shorter than the clip the shards recorded: its
    missing frames would score as motion that never matches), and naming the WAV when its audio in the window is
    shorter than the onset detection's frame (`audio_peaks`: librosa would find no onset, scoring 0 as if measured).
    """
    waveform, rate = read_wav(Path(wav))
    try:  # before the optical flow, the costly part
        peaks = audio_peaks(waveform[:math.ceil(duration * rate)], rate)
    except ValueError as error:
        raise ValueError(f"{wav}: {error}") from None
    frames, fps = read_gray_frames(video)
    first, stop = math.ceil(start * fps - 1e-6), math.ceil((start + duration) * fps - 1e-6)
    seen = 0

    def counted() -> Iterator[np.ndarray]:  # the window's frames, streamed (not held: ~280 MB for 10 s of 720p)
        nonlocal seen
        for frame in islice(frames, first, stop):
            seen += 1
            yield frame

    magnitudes = None
    try:
        magnitudes = optical_flow_magnitudes(counted())
    except ValueError:
        if seen:  # not the empty window said below
            raise
    finally:
        frames.close()  # releases the capture when the window ends before the file does
    if magnitudes is None or seen < MIN_WINDOW_FRAMES * (stop - first):
        raise ValueError(f"{video}: {seen} frames in the window [{start:g}, {start + duration:g}) s where "
                         f"{stop - first} were expected at {fps:g} fps: the video is shorter than its clip")
    scores = av_align_rules(peaks, magnitudes, fps, offset=first / fps - start)
    return {RULE_METRICS[rule]: score for rule, score in scores.items()}


def av_align_scores(out_dir: Path, clips: list[shards.SampleMeta], workers: int, failures: list[dict[str, str]],
                    progress: bool, measure: Callable[[str, float, float, str], dict[str, float]] = av_align_window,
                    ) -> dict[str, dict[str, Any]]:
    """Per-clip AV-Align (both rules) of every clip with a readable generated WAV and a source video, and the
    summaries: {results.json key ('av_align', 'av_align_2023'): its result}.

    A clip whose measurement raises (OpenCV on a stream that changes resolution, librosa, a worker process that
    died) is appended to `failures` once with the reason; the other clips are still measured. WAVs already listed
    as unreadable (stage read_wav) are not tried again. `measure` is `av_align_window` (or, in tests, a
    picklable function with its signature). A result is {"skipped": reason, "videos_missing": n} when there is
    nothing to measure, else the `summarize` of its per-clip scores with "videos_missing" and "per_clip".
    """
    unreadable = {f["id"] for f in failures if f.get("stage") == "read_wav"}
    with_wav = [c for c in clips if wav_path(out_dir, c.id).exists() and c.id not in unreadable]
    with_video = [c for c in with_wav if c.source and Path(c.source).is_file()]
    missing = len(with_wav) - len(with_video)
    if not with_video:
        example = f" (e.g. {with_wav[0].source!r})" if with_wav else ""
        reason = (f"no source video found for any of the {len(with_wav)} clips with a generated WAV{example}"
                  if with_wav else "no generated WAV to measure")
        return {name: {"skipped": reason, "videos_missing": missing} for name in RULE_METRICS.values()}
    jobs = [(c.source, c.start, c.duration, str(wav_path(out_dir, c.id))) for c in with_video]
    scores: dict[str, dict[str, float]] = {name: {} for name in RULE_METRICS.values()}
    # the workers leave a scheduler's SIGTERM to this process (`common.signals`), which stops without waiting for
    # the clips still queued, and die with it (SIGKILLed, it left them holding the folder's lock)
    pool = ProcessPoolExecutor(workers, initializer=pool_worker, initargs=(os.getpid(),)) if workers > 1 else None
    finished = False
    try:
        futures = [pool.submit(measure, *job) if pool else job for job in jobs]
        for clip, future in tqdm(zip(with_video, futures), total=len(jobs), unit="clip", desc="AV-Align",
                                 disable=not progress):
            try:
                clip_scores = future.result() if pool else measure(*future)  # type: ignore[union-attr,misc]
                row = {name: clip_scores[name] for name in scores}  # all rules or none
                for name, value in row.items():
                    scores[name][clip.id] = value
            except Exception as error:  # one bad clip (cv2.error, BrokenProcessPool, ...) must not end the run
                failures.append({"id": clip.id, "stage": "av_align", "reason": error_line(error)})
        finished = True
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=not finished)  # Ctrl-C, a stop signal: the queued clips are dropped
    return {name: {**summarize(values.values()), "videos_missing": missing,
                   "per_clip": {k: (None if math.isnan(v) else v) for k, v in values.items()}}
            for name, values in scores.items()}
