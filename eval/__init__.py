"""Stage three: evaluation, one straight pipeline (`eval.evaluate`): select the clips (`eval.clips`) -> generate
their WAVs (`eval.generate`) -> embed the reference and generated audio (`eval.embed`, on `eval.audio_embedding`,
`eval.cache`, `eval.panns`, `eval.vggish`) -> score every metric of the registry (`eval.score`, `eval.registry`,
`eval.av_align`) -> write results.json, report.md and figure.png (`eval.report`, `eval.figures`). The metric
functions on arrays exported here (`eval.metrics`) state their definitions and sources."""

from eval.metrics import (
    audio_peaks,
    av_align_clip,
    av_align_score,
    av_align_score_2023,
    frechet_distance,
    frechet_from_stats,
    gaussian_stats,
    inception_score,
    kl_divergence,
    kl_divergence_sigmoid,
    optical_flow_magnitudes,
    read_gray_frames,
    summarize,
    video_peaks,
)

__all__ = [
    "audio_peaks",
    "av_align_clip",
    "av_align_score",
    "av_align_score_2023",
    "frechet_distance",
    "frechet_from_stats",
    "gaussian_stats",
    "inception_score",
    "kl_divergence",
    "kl_divergence_sigmoid",
    "optical_flow_magnitudes",
    "read_gray_frames",
    "summarize",
    "video_peaks",
]
