"""Scoring: every metric of `eval.registry.METRICS` on the embedded sets and the source videos.

Bad input is reported, never papered over: when fewer than `min_paired` of the clips have a readable generated
WAV, the embedding metrics (FD, FAD, KL, IS, their PaSST versions, IB-score, DeSync) are null with the reason; an
embedding metric whose computation fails is null with the error, and one whose embedder could not be loaded
(missing weights) is null with that line; a video metric turned off or with nothing to measure is null with the
reason; a metric `--metrics` did not select is null with the reason 'not selected'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

import shards
from eval.config import EvalConfig
from eval.registry import METRICS, NOT_SELECTED, Embeddings, Metric


@dataclass
class Scores:
    values: dict[str, Any] = field(default_factory=dict)  # metric name -> its results.json value (None: see reasons)
    reasons: dict[str, str] = field(default_factory=dict)  # metric name -> why it is None
    counts: dict[str, Any] = field(default_factory=dict)  # the counts the metrics rest on (Metric.counts)
    per_clip: dict[str, dict[str, float | None]] = field(default_factory=dict)  # video metric -> clip id -> value


def _guarded(metric: Metric, compute: Callable[[], Any], errors: dict[str, str] | None) -> Any:
    """compute(); with `errors`, a failure is recorded there (one line) and the value is None."""
    if errors is None:
        return compute()
    try:
        return compute()
    except Exception as error:  # any numerical failure of one metric: recorded, not fatal
        errors[metric.name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return None


PANNS_VGGISH = ("cnn14", "vggish")  # the embedders of one `AudioEmbedding`


def audio_metrics(reference: Embeddings, generated: Embeddings, errors: dict[str, str] | None = None,
                  metrics: tuple[Metric, ...] | None = None) -> dict[str, Any]:
    """Embedding metrics on one pair of sets, with the counts they rest on; by default the PANNs/VGGish ones on
    `AudioEmbedding` sets (FD on Cnn14 embeddings, FAD on VGGish patch embeddings pooled per set, KL with softmax,
    with sigmoid and in log space on Cnn14 class posteriors paired by clip id: KL(reference || generated), the
    Inception score of the generated Cnn14 posteriors).

    With `errors`, a metric whose computation raises (e.g. sqrtm with a large imaginary part) is None and
    errors[metric] says why, so the others survive; without it the exception propagates.
    """
    metrics = tuple(m for m in METRICS if m.embedder in PANNS_VGGISH) if metrics is None else metrics
    out: dict[str, Any] = {"n_reference": len(reference), "n_generated": len(generated)}
    counts: dict[str, Any] = {}
    for metric in metrics:
        out[metric.name] = _guarded(metric, partial(metric.compute, reference, generated, counts), errors)
    return {**out, **counts}


def pairing_refusal(reference: Mapping[str, Any], generated: Mapping[str, Any], expected: int,
                    min_paired: float, min_clips: int = 2, paired_on: str = "", generated_only: bool = False
                    ) -> str | None:
    """Why the embedding metrics cannot be trusted on these sets (None: they can). With `paired_on`, the clips
    counted are those in both sets (each has `paired_on`), else those with a generated embedding. `generated_only`:
    the metric uses the generated set alone, which alone needs `min_clips`."""
    count = len(set(reference) & set(generated)) if paired_on else len(generated)
    fraction = count / expected if expected else 0.0
    if fraction < min_paired:
        return (f"only {count} of {expected} clips ({fraction:.0%}) have {paired_on or 'a generated WAV that could be embedded'}, "
                f"below min_paired {min_paired:.0%}")
    if generated_only and len(generated) < min_clips:
        return f"needs at least {min_clips} generated clips ({len(generated)})"
    if not generated_only and (len(generated) < min_clips or len(reference) < min_clips):
        return f"needs at least {min_clips} clips per set ({len(reference)} reference, {len(generated)} generated)"
    return None


def audio_scores(reference: Embeddings, generated: Embeddings, expected: int, min_paired: float,
                 metrics: tuple[Metric, ...] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The embedding metrics (PANNs/VGGish by default) and their counts; a metric that cannot be trusted or fails
    to compute is None with its reason."""
    metrics = tuple(m for m in METRICS if m.embedder in PANNS_VGGISH) if metrics is None else metrics
    values: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for rule in dict.fromkeys((m.min_clips, m.paired_on, m.generated_only) for m in metrics):
        group = tuple(m for m in metrics if (m.min_clips, m.paired_on, m.generated_only) == rule)
        reason = pairing_refusal(reference, generated, expected, min_paired, *rule)
        if reason is not None:
            values.update(dict.fromkeys([m.name for m in group]))
            reasons.update(dict.fromkeys([m.name for m in group], reason))
            continue
        errors: dict[str, str] = {}
        values.update(audio_metrics(reference, generated, errors, group))
        reasons.update({k: f"computation failed ({v})" for k, v in errors.items()})
        for metric in group:  # NaN or an infinity is no score (and no JSON): null, saying so
            value = values.get(metric.name)
            if isinstance(value, float | np.floating) and not math.isfinite(value):
                values[metric.name] = None
                reasons.setdefault(metric.name, f"computation gave {float(value)} (a statistic overflowed or was undefined)")
    return values, reasons


def video_score(metric: Metric, config: EvalConfig, clips: list[shards.SampleMeta], failures: list[dict[str, str]],
                progress: bool, measured: dict[Callable[..., Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """A video metric's result: {"skipped": reason} when its switch is off, else its entry in what its `compute`
    returns. `measured` keeps each compute's results, so that entries sharing a compute run it once."""
    if metric.switch and not getattr(config, metric.switch):
        return {"skipped": f"turned off (--no-{metric.switch.replace('_', '-')})"}
    measured = {} if measured is None else measured
    if metric.compute not in measured:
        measured[metric.compute] = metric.compute(config.output_dir, clips, config.workers, failures, progress)
    return measured[metric.compute][metric.name]


Sets = Mapping[str, tuple[Embeddings, Embeddings]]  # embedder -> (reference set, generated set)


def score(config: EvalConfig, clips: list[shards.SampleMeta], sets: Sets, failures: list[dict[str, str]],
          progress: bool = True, selected: tuple[Metric, ...] = METRICS,
          unavailable: Mapping[str, str] | None = None) -> Scores:
    """Every metric of the registry: the `selected` ones computed (an embedding metric on its embedder's sets,
    None with the reason when `unavailable` names its embedder, e.g. missing weights), the others None with the
    reason 'not selected'. Clips whose video metric fails are appended to `failures`."""
    unavailable = unavailable or {}
    scores = Scores()
    chosen = {m.name for m in selected}
    by_embedder: dict[str, list[Metric]] = {}
    for metric in METRICS:
        if metric.on_audio and metric.name in chosen:
            by_embedder.setdefault(str(metric.embedder), []).append(metric)
    audio: dict[str, Any] = {}
    for embedder, metrics in by_embedder.items():
        if embedder in unavailable or embedder not in sets:
            reason = unavailable.get(embedder, f"no {embedder} embeddings were computed")
            audio.update(dict.fromkeys([m.name for m in metrics]))
            scores.reasons.update(dict.fromkeys([m.name for m in metrics], reason))
            continue
        values, reasons = audio_scores(*sets[embedder], len(clips), config.min_paired, tuple(metrics))
        audio.update(values)
        scores.reasons.update(reasons)
    measured: dict[Callable[..., Any], dict[str, Any]] = {}
    for metric in METRICS:
        if metric.name not in chosen:
            scores.values[metric.name] = None
            scores.reasons[metric.name] = f"{NOT_SELECTED} (--metrics {config.metrics})"
            continue
        if metric.on_audio:
            scores.values[metric.name] = audio[metric.name]
            scores.counts.update({k: audio[k] for k in metric.counts if k in audio})
            continue
        result = video_score(metric, config, clips, failures, progress, measured)
        if "skipped" in result:
            scores.reasons[metric.name] = result["skipped"]
        scores.values[metric.name] = None if "skipped" in result else {k: v for k, v in result.items() if k != "per_clip"}
        scores.counts.update({k: result[k] for k in metric.counts if k in result})  # none when turned off
        scores.per_clip[metric.name] = result.get("per_clip", {})
    return scores
