"""AV-Align of the generated WAVs, each measured against its clip: the source video's window
[start, start + duration) at the video's native frame rate. The score of one clip: `eval.metrics`.

A clip whose source video is missing is left out (counted); a clip whose measurement fails (a video OpenCV
cannot follow, a dead worker) is a failure with its reason, and the other clips are still measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

import shards
from eval.clips import read_wav, wav_path
from eval.metrics import (
    FARNEBACK_PARAMS,
    FLOW_MIN_MAGNITUDE,
    ONSET_SAMPLE_RATE,
    audio_peaks,
    av_align_score,
    optical_flow_magnitudes,
    read_gray_frames,
    summarize,
    video_peaks,
)

AV_ALIGN_PROTOCOL = {
    "method": "Yariv et al. 2024 (2025 version): Farneback flow at the native fps, librosa onsets, one-to-one "
              "matching; clips with no peak on either side excluded",
    "flow_min_magnitude": FLOW_MIN_MAGNITUDE,  # a video peak needs a mean flow magnitude >= this (pixels)
    "match_window_frames": 1,  # an audio peak matches a video peak within 1/fps seconds
    "onset_sample_rate": ONSET_SAMPLE_RATE,
    "farneback": list(FARNEBACK_PARAMS),
}


def error_line(error: BaseException) -> str:
    """'<type>: <first line of the message>' (BrokenProcessPool and cv2.error say little without their type)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def av_align_window(video: str, start: float, duration: float, wav: str) -> float:
    """AV-Align of a generated WAV against frames [start, start + duration) of `video` at its native rate.

    Frame i of the file is at i / fps; the window keeps frames with start <= i / fps < start + duration and
    video peak times are shifted to the window's clock (the audio starts at `start`).
    """
    waveform, rate = read_wav(Path(wav))
    frames, fps = read_gray_frames(video)
    first, stop = math.ceil(start * fps - 1e-6), math.ceil((start + duration) * fps - 1e-6)
    try:
        magnitudes = optical_flow_magnitudes(islice(frames, first, stop))
    finally:
        frames.close()  # releases the capture when the window ends before the file does
    peaks = video_peaks(magnitudes, fps) + (first / fps - start)
    return av_align_score(audio_peaks(waveform, rate), peaks, fps)


def av_align_scores(out_dir: Path, clips: list[shards.SampleMeta], workers: int, failures: list[dict[str, str]],
                    progress: bool, measure: Callable[[str, float, float, str], float] = av_align_window) -> dict[str, Any]:
    """Per-clip AV-Align of every clip with a readable generated WAV and a source video, and its summary.

    A clip whose measurement raises (OpenCV on a stream that changes resolution, librosa, a worker process that
    died) is appended to `failures` with the reason; the other clips are still measured. WAVs already listed
    as unreadable (stage read_wav) are not tried again. `measure` is `av_align_window` (or, in tests, a
    picklable function with its signature). With nothing to measure: {"skipped": reason, "videos_missing": n}.
    """
    unreadable = {f["id"] for f in failures if f.get("stage") == "read_wav"}
    with_wav = [c for c in clips if wav_path(out_dir, c.id).exists() and c.id not in unreadable]
    with_video = [c for c in with_wav if c.source and Path(c.source).is_file()]
    missing = len(with_wav) - len(with_video)
    if not with_video:
        example = f" (e.g. {with_wav[0].source!r})" if with_wav else ""
        reason = (f"no source video found for any of the {len(with_wav)} clips with a generated WAV{example}"
                  if with_wav else "no generated WAV to measure")
        return {"skipped": reason, "videos_missing": missing}
    jobs = [(c.source, c.start, c.duration, str(wav_path(out_dir, c.id))) for c in with_video]
    scores: dict[str, float] = {}
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        futures = [pool.submit(measure, *job) if pool else job for job in jobs]
        for clip, future in tqdm(zip(with_video, futures), total=len(jobs), unit="clip", desc="AV-Align",
                                 disable=not progress):
            try:
                scores[clip.id] = future.result() if pool else measure(*future)  # type: ignore[union-attr,misc]
            except Exception as error:  # one bad clip (cv2.error, BrokenProcessPool, ...) must not end the run
                failures.append({"id": clip.id, "stage": "av_align", "reason": error_line(error)})
    finally:
        if pool is not None:
            pool.shutdown()
    return {**summarize(scores.values()), "videos_missing": missing,
            "per_clip": {k: (None if math.isnan(v) else v) for k, v in scores.items()}}
