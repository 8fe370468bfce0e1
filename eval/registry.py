"""The metrics of an evaluation, as one table that the scorer (`eval.score`) and the report (`eval.report`) both
read: adding a metric is one `Metric` entry here (and the function that computes it).

An entry names its results.json key (its value at the top level, its reason under 'null_reasons' when it has
none), its table column and which way is better, what it is measured on (`embedder`: 'cnn14' or 'vggish' for
the audio metrics, which compare the generated set with the reference set; None for a metric measured per clip
on the source videos), the counts it rests on (results.json 'counts'), and the protocol knobs it records
(results.json 'protocol', listed in the report and compared between the rows of a table).

Two kinds of `compute`:
- audio metrics: `compute(reference, generated, counts) -> float`, from the {clip id: AudioEmbedding} sets;
  it writes its counts into `counts` before it may raise, so that they survive a failed computation;
- video metrics: `compute(out_dir, clips, workers, failures, progress) -> dict`, either
  {"skipped": reason, ...counts} or a summary with "per_clip" values and the counts (see `eval.av_align`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from eval.audio_embedding import AudioEmbedding
from eval.av_align import AV_ALIGN_PROTOCOL, av_align_scores
from eval.metrics import FD_EPS, KL_EPS, frechet_distance, kl_divergence

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
    """KL(reference || generated) of the Cnn14 class probabilities, paired by clip id."""
    counts["kl_pairs"] = 0
    value, counts["kl_pairs"] = kl_divergence({k: e.cnn14_probs for k, e in reference.items()},
                                              {k: e.cnn14_probs for k, e in generated.items()})
    return value


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


def describe_av_align(results: Mapping[str, Any]) -> str:
    av = results.get("av_align")
    if not av:
        return f"- AV-Align skipped: {results['null_reasons'].get('av_align', 'unknown reason')}."
    return (f"- AV-Align over {av['n']} clips (excluded, no peak on either side: {av['n_excluded']}): "
            f"mean {number(av['mean'])}, std {number(av['std'])}, "
            f"95% CI [{number(av['ci95_low'])}, {number(av['ci95_high'])}].")


METRICS: tuple[Metric, ...] = (
    Metric("fd", "FD", "lower", "cnn14", fd, protocol={"fd_eps": FD_EPS}),
    Metric("fad", "FAD", "lower", "vggish", fad, counts=("n_reference_patches", "n_generated_patches")),
    Metric("kl", "KL", "lower", "cnn14", kl, counts=("kl_pairs",), protocol={"kl_eps": KL_EPS}),
    Metric("av_align", "AV-Align", "higher", None, av_align_scores, counts=("videos_missing",),
           protocol={"av_align": AV_ALIGN_PROTOCOL}, cell=mean_ci,
           note="AV-Align: mean ± half-width of the 95% confidence interval over clips.",
           describe=describe_av_align, switch="av_align", per_clip=True),
)


def metric_protocol() -> dict[str, Any]:
    """The protocol knobs of every metric (results.json 'protocol')."""
    return {key: value for metric in METRICS for key, value in metric.protocol.items()}
