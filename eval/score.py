"""Scoring: every metric of `eval.registry.METRICS` on the embedded sets and the source videos.

Bad input is reported, never papered over: when fewer than `min_paired` of the clips have a readable generated
WAV, the audio metrics (FD, FAD, KL, KL-sigmoid, IS) are null with the reason; an audio metric whose computation
fails is null with the error; a video metric turned off or with nothing to measure is null with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import shards
from eval.config import EvalConfig
from eval.registry import METRICS, Embeddings, Metric


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


def audio_metrics(reference: Embeddings, generated: Embeddings, errors: dict[str, str] | None = None) -> dict[str, Any]:
    """The audio metrics (FD on Cnn14 embeddings, FAD on VGGish patch embeddings pooled per set, KL with softmax
    and with sigmoid on Cnn14 class posteriors paired by clip id: KL(reference || generated), the Inception score
    of the generated Cnn14 posteriors), with the counts they rest on.

    With `errors`, a metric whose computation raises (e.g. sqrtm with a large imaginary part) is None and
    errors[metric] says why, so the others survive; without it the exception propagates.
    """
    out: dict[str, Any] = {"n_reference": len(reference), "n_generated": len(generated)}
    counts: dict[str, Any] = {}
    for metric in METRICS:
        if metric.on_audio:
            out[metric.name] = _guarded(metric, partial(metric.compute, reference, generated, counts), errors)
    return {**out, **counts}


def pairing_refusal(reference: Mapping[str, Any], generated: Mapping[str, Any], expected: int,
                    min_paired: float) -> str | None:
    """Why the audio metrics cannot be trusted on these sets (None: they can)."""
    fraction = len(generated) / expected if expected else 0.0
    if fraction < min_paired:
        return (f"only {len(generated)} of {expected} clips ({fraction:.0%}) have a readable generated WAV, "
                f"below min_paired {min_paired:.0%}")
    if len(generated) < 2 or len(reference) < 2:
        return f"a Frechet distance needs at least 2 clips per set ({len(reference)} reference, {len(generated)} generated)"
    return None


def audio_scores(reference: Embeddings, generated: Embeddings, expected: int,
                 min_paired: float) -> tuple[dict[str, Any], dict[str, str]]:
    """The audio metrics and their counts; a metric that cannot be trusted or fails to compute is None with its
    reason."""
    reason = pairing_refusal(reference, generated, expected, min_paired)
    if reason is not None:
        names = [m.name for m in METRICS if m.on_audio]
        return dict.fromkeys(names), dict.fromkeys(names, reason)
    errors: dict[str, str] = {}
    metrics = audio_metrics(reference, generated, errors)
    return metrics, {k: f"computation failed ({v})" for k, v in errors.items()}


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


def score(config: EvalConfig, clips: list[shards.SampleMeta], reference: Embeddings, generated: Embeddings,
          failures: list[dict[str, str]], progress: bool = True) -> Scores:
    """Every metric of the registry; clips whose video metric fails are appended to `failures`."""
    audio, reasons = audio_scores(reference, generated, len(clips), config.min_paired)
    scores = Scores(reasons=reasons)
    measured: dict[Callable[..., Any], dict[str, Any]] = {}
    for metric in METRICS:
        if metric.on_audio:
            scores.values[metric.name] = audio[metric.name]
            scores.counts.update({k: audio[k] for k in metric.counts if k in audio})
            continue
        result = video_score(metric, config, clips, failures, progress, measured)
        if "skipped" in result:
            scores.reasons[metric.name] = result["skipped"]
        scores.values[metric.name] = None if "skipped" in result else {k: v for k, v in result.items() if k != "per_clip"}
        scores.counts.update({k: result.get(k, 0) for k in metric.counts})
        scores.per_clip[metric.name] = result.get("per_clip", {})
    return scores
