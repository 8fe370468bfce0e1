"""Stage three: evaluation. Audio embedders (PANNs Cnn14, VGGish), metric functions on arrays (FD, FAD, KL,
AV-Align) and the cache of ground-truth embeddings. Generation builds on these; see `eval.metrics` for the
definitions and their sources."""

from eval.metrics import (
    audio_peaks,
    av_align_clip,
    av_align_score,
    frechet_distance,
    frechet_from_stats,
    gaussian_stats,
    kl_divergence,
    optical_flow_magnitudes,
    read_gray_frames,
    summarize,
    video_peaks,
)

__all__ = [
    "audio_peaks",
    "av_align_clip",
    "av_align_score",
    "frechet_distance",
    "frechet_from_stats",
    "gaussian_stats",
    "kl_divergence",
    "optical_flow_magnitudes",
    "read_gray_frames",
    "summarize",
    "video_peaks",
]
