"""The metrics of an evaluation, as one table that the scorer (`eval.score`) and the report (`eval.report`) both
read: adding a metric is one `Metric` entry here (and the function that computes it).

An entry names its results.json key (its value at the top level, its reason under 'null_reasons' when it has
none), its table column and which way is better, what it is measured on (`embedder`: 'cnn14' or 'vggish' for
the audio metrics, which compare the generated set with the reference set, or score it alone (IS); None for a
metric measured per clip
on the source videos), the counts it rests on (results.json 'counts'), and the protocol knobs it records
(results.json 'protocol', listed in the report and compared between the rows of a table).

Two kinds of `compute`:
- audio metrics: `compute(reference, generated, counts) -> float`, from the {clip id: AudioEmbedding} sets;
  it writes its counts into `counts` before it may raise, so that they survive a failed computation;
- video metrics: `compute(out_dir, clips, workers, failures, progress) -> {metric name: result}`, each result
  either {"skipped": reason, ...counts} or a summary with "per_clip" values and the counts (see `eval.av_align`).
  Entries that share one `compute` are measured in one pass (AV-Align's two rules share the optical flow).

The variants the field quotes are separate entries with their own keys: KL with softmax ('kl', the key older
results files and tables read) and with sigmoid ('kl_sigmoid'), as audioldm_eval prints both; the Inception
score on PANNs ('inception_score'), as audioldm_eval and av-benchmark report it; AV-Align by the 2025 rule
('av_align') and by the 2023 rule ('av_align_2023'), since the reference changed its definition in 2025.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np

from eval.audio_embedding import AudioEmbedding
from eval.av_align import AV_ALIGN_2023_PROTOCOL, AV_ALIGN_PROTOCOL, av_align_scores
from eval.metrics import (
    FD_EPS,
    IS_SHUFFLE_SEED,
    IS_SPLITS,
    KL_EPS,
    frechet_distance,
    inception_score,
    kl_divergence,
    kl_divergence_sigmoid,
)

Embeddings = Mapping[str, AudioEmbedding]  # clip id -> its audio embedding


def number(value: float | None) -> str:
    """A table cell: three decimals, '—' when missing."""
    return "—" if value is None else f"{value:.3f}"


@dataclass(frozen=True)
class Metric:
    name: str  # results.json key
    title: str  # table column
    better: Literal["lower", "higher"]
    embedder: Literal["cnn14", "vggish"] | None  # None: measured per clip on the source videos
    compute: Callable[..., Any]  # see the module docstring for its two signatures
    counts: tuple[str, ...] = ()  # results.json 'counts' this metric adds
    protocol: Mapping[str, Any] = field(default_factory=dict)  # results.json 'protocol' knobs it depends on
    cell: Callable[[Any], str] = number  # its table cell, from its results.json value
    note: str = ""  # a line under the table
    describe: Callable[[Mapping[str, Any]], str] | None = None  # its line in report.md, from the whole results
    switch: str = ""  # EvalConfig flag that turns it off (video metrics)
    per_clip: bool = False  # results.json holds '<name>_per_clip'

    @property
    def header(self) -> str:
        return f"{self.title} {'↓' if self.better == 'lower' else '↑'}"

    @property
    def on_audio(self) -> bool:
        return self.embedder is not None


# ----------------------------------------------------------------------------------------------------------------
# Audio metrics: the generated set against the reference set
# ----------------------------------------------------------------------------------------------------------------
def fd(reference: Embeddings, generated: Embeddings, counts: dict[str, Any]) -> float:
    """FD: Frechet distance of the Cnn14 embeddings, one per clip."""
    return frechet_distance(np.stack([e.cnn14_embedding for e in reference.values()]),
                            np.stack([e.cnn14_embedding for e in generated.values()]))


def fad(reference: Embeddings, generated: Embeddings, counts: dict[str, Any]) -> float:
    """FAD: Frechet distance of the VGGish patch embeddings, each set's patches pooled."""
    ref_patches = np.concatenate([e.vggish for e in reference.values()])
    gen_patches = np.concatenate([e.vggish for e in generated.values()])
    counts.update(n_reference_patches=len(ref_patches), n_generated_patches=len(gen_patches))
    return frechet_distance(ref_patches, gen_patches)


def kl(reference: Embeddings, generated: Embeddings, counts: dict[str, Any]) -> float:
    """KL(reference || generated) of the Cnn14 class probabilities (softmax of the logits), paired by clip id."""
    counts["kl_pairs"] = 0
    value, counts["kl_pairs"] = kl_divergence({k: e.cnn14_probs for k, e in reference.items()},
                                              {k: e.cnn14_probs for k, e in generated.items()})
    return value


def kl_sigmoid(reference: Embeddings, generated: Embeddings, counts: dict[str, Any]) -> float:
    """KL with sigmoid of the Cnn14 logits, paired by clip id as 'kl' (the same pairs: 'kl_pairs')."""
    return kl_divergence_sigmoid({k: e.cnn14_logits for k, e in reference.items()},
                                 {k: e.cnn14_logits for k, e in generated.items()})[0]


def generated_inception_score(reference: Embeddings, generated: Embeddings, counts: dict[str, Any]) -> float:
    """Inception score of the generated clips' Cnn14 logits (the reference set plays no part).

    The rows are taken in the order audioldm_eval reads the generated folder, sorted '<clip id>.wav' names,
    before its seeded shuffle, so that the splits hold the same clips as there; the std over the splits goes to
    counts['inception_score_std']. A set of fewer clips than splits (the reference then gives NaN: an empty
    split) is scored with one clip per split, and counts['inception_score_splits'] says how many were used.
    """
    ids = sorted(generated, key=lambda clip_id: f"{clip_id}.wav")
    counts["inception_score_clips"] = len(ids)
    if not ids:
        raise ValueError("no generated clip to score")
    splits = counts["inception_score_splits"] = min(IS_SPLITS, len(ids))
    logits = np.stack([generated[k].cnn14_logits for k in ids])
    mean, counts["inception_score_std"] = inception_score(logits, splits=splits)
    return mean


def describe_inception_score(results: Mapping[str, Any]) -> str:
    value, counts = results.get("inception_score"), results.get("counts", {})
    if value is None:
        return f"- IS not computed: {results['null_reasons'].get('inception_score', 'unknown reason')}."
    return (f"- IS (PANNs Cnn14, softmax of the logits, generated clips only) over "
            f"{counts.get('inception_score_clips', '?')} clips in {counts.get('inception_score_splits', IS_SPLITS)} "
            f"splits: mean {number(value)}, "
            f"std over the splits {number(counts.get('inception_score_std'))}.")


# ----------------------------------------------------------------------------------------------------------------
# AV-Align: per clip, against the source video
# ----------------------------------------------------------------------------------------------------------------
def mean_ci(value: Mapping[str, Any] | None) -> str:
    """'mean ± half-width of the 95% confidence interval' of a summary (`eval.metrics.summarize`)."""
    if not value or value.get("mean") is None:
        return "—"
    low, high = value.get("ci95_low"), value.get("ci95_high")
    half = (high - low) / 2 if low is not None and high is not None else None
    return f"{value['mean']:.3f}" + (f" ± {half:.3f}" if half is not None else "")


def describe_summary(name: str, title: str, results: Mapping[str, Any]) -> str:
    """The report.md line of a per-clip metric (`eval.metrics.summarize` with 'n' and 'n_excluded')."""
    av = results.get(name)
    if not av:
        return f"- {title} skipped: {results['null_reasons'].get(name, 'unknown reason')}."
    return (f"- {title} over {av['n']} clips (excluded, no peak on either side: {av['n_excluded']}): "
            f"mean {number(av['mean'])}, std {number(av['std'])}, "
            f"95% CI [{number(av['ci95_low'])}, {number(av['ci95_high'])}].")


METRICS: tuple[Metric, ...] = (
    Metric("fd", "FD", "lower", "cnn14", fd, protocol={"fd_eps": FD_EPS}),
    Metric("fad", "FAD", "lower", "vggish", fad, counts=("n_reference_patches", "n_generated_patches")),
    Metric("kl", "KL", "lower", "cnn14", kl, counts=("kl_pairs",), protocol={"kl_eps": KL_EPS},
           note="KL: softmax of the PANNs logits (audioldm_eval's KL_softmax, av-benchmark's KL-PANNS-softmax); "
                "KL-sigmoid: per-class sigmoid of the same logits (audioldm_eval's KL_Sigmoid)."),
    Metric("kl_sigmoid", "KL-sigmoid", "lower", "cnn14", kl_sigmoid, protocol={"kl_eps": KL_EPS}),
    Metric("inception_score", "IS", "higher", "cnn14", generated_inception_score,
           counts=("inception_score_clips", "inception_score_splits", "inception_score_std"),
           protocol={"inception_score": {"probabilities": "softmax(fc_audioset)", "set": "generated",
                                         "splits": IS_SPLITS, "shuffle_seed": IS_SHUFFLE_SEED}},
           note=f"IS: Inception score of the generated clips on PANNs ({IS_SPLITS} splits, or one per clip below "
                f"{IS_SPLITS} clips; mean over the splits).",
           describe=describe_inception_score),
    Metric("av_align", "AV-Align", "higher", None, av_align_scores, counts=("videos_missing",),
           protocol={"av_align": AV_ALIGN_PROTOCOL}, cell=mean_ci,
           note="AV-Align: mean ± half-width of the 95% confidence interval over clips; AV-Align by the 2025 rule "
                "(0.1 flow threshold, one audio peak per video peak), AV-Align 2023 by the 2023 rule (no "
                "threshold, several audio peaks may match one video peak: a clip can score above 1).",
           describe=partial(describe_summary, "av_align", "AV-Align"), switch="av_align", per_clip=True),
    Metric("av_align_2023", "AV-Align 2023", "higher", None, av_align_scores,
           protocol={"av_align_2023": AV_ALIGN_2023_PROTOCOL}, cell=mean_ci,
           describe=partial(describe_summary, "av_align_2023", "AV-Align (2023 rule)"), switch="av_align",
           per_clip=True),
)


def metric_protocol() -> dict[str, Any]:
    """The protocol knobs of every metric (results.json 'protocol')."""
    return {key: value for metric in METRICS for key, value in metric.protocol.items()}
