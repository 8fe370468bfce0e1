"""Metric functions on arrays: Frechet distance (FD, FAD), KL divergence of class posteriors, AV-Align.

Each function states its formula and the public implementation it follows: pytorch-fid's Frechet distance (as
used by audioldm_eval and av-benchmark for FD and FAD), av-benchmark's KL (audioldm_eval's "softmax over
logits" KL), and TempoTokens' av_align.py for AV-Align. Embeddings come from `eval.panns` (FD, KL) and
`eval.vggish` (FAD); nothing here touches a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Generator, Iterable, Mapping
from pathlib import Path

import cv2
import librosa
import numpy as np
from scipy import linalg, stats

log = logging.getLogger(__name__)

FD_EPS = 1e-6  # pytorch-fid's diagonal offset when sqrtm(S1 S2) is not finite
KL_EPS = 1e-6  # added to p_gen inside the log: p_ref log(p_ref / (p_gen + 1e-6)), as av-benchmark's kl.py
ONSET_SAMPLE_RATE = 22050  # librosa.load's default rate: the AV-Align reference loads audio with it
FLOW_MIN_MAGNITUDE = 0.1  # AV-Align (2025): a video peak needs a mean flow magnitude >= 0.1 pixel
# cv2.calcOpticalFlowFarneback(prev, next, flow, pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags)
FARNEBACK_PARAMS = (0.5, 3, 15, 3, 5, 1.2, 0)


# --------------------------------------------------------------------------------------------------------------
# Frechet distance (FD on PANNs Cnn14 embeddings, FAD on VGGish embeddings)
# --------------------------------------------------------------------------------------------------------------
def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of the rows of `x` (N, D), in float64 (np.cov, ddof=1)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (N, D) array with N >= 2 embeddings for a covariance, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = FD_EPS) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2):

        d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))

    Dowson & Landau (1982); computed as in pytorch-fid's `calculate_frechet_distance` (used by FAD and the
    PANNs FD of AudioLDM / av-benchmark): scipy's sqrtm; when the product is singular (sqrtm not finite) `eps` is
    added to both diagonals and sqrtm retried; a complex result from rounding is accepted only when the
    imaginary part of its diagonal is tiny (atol 1e-3), otherwise this raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.warning("Frechet distance: sqrtm(S1 S2) is not finite (singular product); adding %g to the diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: sqrtm(S1 S2) has an imaginary part of {np.abs(covmean.imag).max():g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance(x: np.ndarray, y: np.ndarray, eps: float = FD_EPS) -> float:
    """Frechet distance between Gaussians fitted to the rows of `x` (N, D) and `y` (M, D); see
    `frechet_from_stats`. FD: one Cnn14 embedding per clip; FAD: all VGGish patch embeddings of a set pooled."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need two (N, D) arrays with the same D, got {x.shape} and {y.shape}")
    return frechet_from_stats(*gaussian_stats(x), *gaussian_stats(y), eps=eps)


# --------------------------------------------------------------------------------------------------------------
# KL divergence of class posteriors, paired by clip id
# --------------------------------------------------------------------------------------------------------------
def kl_divergence(
    p_ref: Mapping[str, np.ndarray], p_gen: Mapping[str, np.ndarray], eps: float = KL_EPS
) -> tuple[float, int]:
    """Mean over paired clips of KL(p_ref || p_gen) = sum_c p_ref[c] log(p_ref[c] / (p_gen[c] + eps)).

    `p_ref` and `p_gen` map a clip id to its class probabilities (C,) (Cnn14: softmax over the 527 AudioSet
    logits). Only ids present in both are paired; returns (mean KL, number of pairs). Terms with p_ref = 0
    contribute 0 (the limit of p log p), as torch's kl_div does. Definition: av-benchmark's kl.py (audioldm_eval's
    KL on softmax probabilities, eps on the generated side), whose loop returned only the last pair's value; here
    every pair is averaged.
    """
    ids = sorted(set(p_ref) & set(p_gen))
    if not ids:
        raise ValueError(f"no clip id is in both sets ({len(p_ref)} reference, {len(p_gen)} generated): "
                         "nothing to pair")
    values = []
    for clip_id in ids:
        p = np.asarray(p_ref[clip_id], dtype=np.float64)
        q = np.asarray(p_gen[clip_id], dtype=np.float64)
        if p.shape != q.shape or p.ndim != 1:
            raise ValueError(f"clip {clip_id!r}: class probabilities must be two (C,) vectors, "
                             f"got {p.shape} and {q.shape}")
        safe_p = np.where(p > 0, p, 1.0)  # log(1) = 0 keeps 0 * log(0) out of the sum
        values.append(float(np.sum(np.where(p > 0, p * np.log(safe_p / (q + eps)), 0.0))))
    return float(np.mean(values)), len(ids)


# --------------------------------------------------------------------------------------------------------------
# AV-Align (Yariv et al., AAAI 2024; TempoTokens av_align.py, 2025 version)
# --------------------------------------------------------------------------------------------------------------
def read_gray_frames(video_path: str | Path) -> tuple[Generator[np.ndarray, None, None], float]:
    """All frames of a video as (H, W) uint8 grayscale, read with OpenCV at the native frame rate, and that rate.

    The frames come as a generator (a 10 s 720p clip is ~280 MB of grayscale); OpenCV applies rotation metadata.
    """
    capture = cv2.VideoCapture(str(video_path))
    if not capture.isOpened():
        raise ValueError(f"{video_path}: OpenCV cannot open the video")
    fps = float(capture.get(cv2.CAP_PROP_FPS))
    if not math.isfinite(fps) or fps <= 0:
        capture.release()
        raise ValueError(f"{video_path}: no frame rate in the container (CAP_PROP_FPS = {fps})")

    def frames() -> Generator[np.ndarray, None, None]:
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        finally:
            capture.release()

    return frames(), fps


def optical_flow_magnitudes(frames_gray: Iterable[np.ndarray]) -> np.ndarray:
    """Per-frame motion (T,): the mean Farneback flow magnitude between frame t-1 and frame t.

    Farneback parameters pyr_scale 0.5, levels 3, winsize 15, iterations 3, poly_n 5, poly_sigma 1.2, flags 0, as in
    the AV-Align reference; the first value (frames 0 -> 1) is duplicated so that the length equals the number of
    frames and index i is frame i. A single frame has no motion: (1,) zeros.
    """
    magnitudes: list[float] = []
    previous = None
    for frame in frames_gray:
        frame = np.asarray(frame)
        if frame.ndim != 2:
            raise ValueError(f"optical flow needs (H, W) grayscale frames, got shape {frame.shape}")
        if previous is not None:
            # (the stubs do not admit flow=None, which asks OpenCV to allocate the output)
            flow = cv2.calcOpticalFlowFarneback(previous, frame, None, *FARNEBACK_PARAMS)  # type: ignore[call-overload]
            magnitudes.append(float(cv2.magnitude(flow[..., 0], flow[..., 1]).mean()))
        previous = frame
    if previous is None:
        raise ValueError("optical flow needs at least one frame, got none")
    if not magnitudes:
        return np.zeros(1)
    return np.asarray([magnitudes[0], *magnitudes])


def video_peaks(magnitudes: np.ndarray, fps: float, threshold: float = FLOW_MIN_MAGNITUDE) -> np.ndarray:
    """Times (s) of video peaks: strict local maxima m[i-1] < m[i] > m[i+1] with m[i] >= threshold, at i / fps.

    The first and last frames are never peaks (they have one neighbour), as in the reference.
    """
    m = np.asarray(magnitudes, dtype=np.float64)
    if m.size < 3:
        return np.zeros(0)
    inner = m[1:-1]
    is_peak = (m[:-2] < inner) & (inner > m[2:]) & (inner >= threshold)
    return (np.flatnonzero(is_peak) + 1) / fps


def audio_peaks(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """Times (s) of audio onsets: librosa.onset.onset_detect on librosa.onset.onset_strength, all defaults.

    The reference reads the file with librosa.load's defaults (mono = mean of the channels, resampled to
    22050 Hz with soxr_hq); this does the same to an in-memory waveform, (L,) or (channels, L).
    """
    y = np.asarray(waveform, dtype=np.float32)
    if y.ndim == 2:
        y = librosa.to_mono(y)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"audio peaks need a non-empty (L,) or (channels, L) waveform, got shape {np.shape(waveform)}")
    if sample_rate != ONSET_SAMPLE_RATE:
        y = librosa.resample(y, orig_sr=sample_rate, target_sr=ONSET_SAMPLE_RATE, res_type="soxr_hq")
    envelope = librosa.onset.onset_strength(y=y, sr=ONSET_SAMPLE_RATE)
    onsets = librosa.onset.onset_detect(onset_envelope=envelope, sr=ONSET_SAMPLE_RATE)
    return librosa.frames_to_time(onsets, sr=ONSET_SAMPLE_RATE)


def av_align_score(
    audio_peak_times: np.ndarray, video_peak_times: np.ndarray, fps: float, both_empty: float = math.nan
) -> float:
    """AV-Align of one clip: IoU of audio and video peaks, matches / (|A| + |V| - matches).

    An audio peak a matches an unused video peak v when v - 1/fps < a < v + 1/fps (strict, as in the
    reference); each video peak is used at most once, so two audio peaks near one video peak count once.
    Audio peaks are taken in time order and each takes the earliest unused video peak in its window; with equal
    windows this greedy order finds a maximum one-to-one matching.

    When exactly one side has no peaks the formula gives 0.0 (nothing matches). When both are empty the formula
    is 0/0 (the reference raises ZeroDivisionError, so no published number includes such clips): the clip gets
    `both_empty`, NaN by default, which `summarize` leaves out of the mean and counts separately. (1.0 would
    reward a generator for silence on a still picture; 0.0 would punish a correct silent output.)
    """
    a = np.sort(np.asarray(audio_peak_times, dtype=np.float64))
    v = np.sort(np.asarray(video_peak_times, dtype=np.float64))
    if a.size + v.size == 0:
        return float(both_empty)
    window = 1.0 / fps
    used = np.zeros(v.size, dtype=bool)
    matches = 0
    for t in a:
        candidates = np.flatnonzero(~used & (v - window < t) & (t < v + window))
        if candidates.size:
            used[candidates[0]] = True
            matches += 1
    return matches / (a.size + v.size - matches)


def av_align_clip(
    video_path: str | Path,
    waveform: np.ndarray,
    sample_rate: int,
    both_empty: float = math.nan,
    threshold: float = FLOW_MIN_MAGNITUDE,
) -> float:
    """AV-Align of one clip: the video's frames (all of them, native fps, OpenCV, grayscale) against `waveform`
    (usually the generated audio of that clip). See `av_align_score` for the score and the empty cases."""
    frames, fps = read_gray_frames(video_path)
    magnitudes = optical_flow_magnitudes(frames)
    return av_align_score(audio_peaks(waveform, sample_rate), video_peaks(magnitudes, fps, threshold), fps, both_empty)


def summarize(scores: Iterable[float]) -> dict[str, float]:
    """Mean and spread of per-clip scores: n, n_excluded (NaN scores, left out), mean, std (ddof=1), sem and a
    95% confidence interval of the mean (Student t with n-1 degrees of freedom). Undefined entries are NaN."""
    values = np.asarray(list(scores), dtype=np.float64)
    finite = values[~np.isnan(values)]
    n = int(finite.size)
    nan = math.nan
    mean = float(finite.mean()) if n else nan
    std = float(finite.std(ddof=1)) if n > 1 else nan
    sem = std / math.sqrt(n) if n > 1 else nan
    half = float(stats.t.ppf(0.975, n - 1)) * sem if n > 1 else nan
    return {"n": n, "n_excluded": int(values.size - n), "mean": mean, "std": std, "sem": sem,
            "ci95_low": mean - half, "ci95_high": mean + half}
