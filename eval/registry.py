"""The metrics of an evaluation, as one table that the scorer (`eval.score`) and the report (`eval.report`) both
read: adding a metric is one `Metric` entry here (and the function that computes it).

An entry names its results.json key (its value at the top level, its reason under 'null_reasons' when it has
none), its table column and which way is better, what it is measured on (`embedder`: the model whose per-clip
outputs it compares, see below; None for a metric measured per clip on the source videos by its own pass), the
counts it rests on (results.json 'counts'), the protocol knobs it records (results.json 'protocol', listed in the
report and compared between the rows of a table) and the metric groups it belongs to (`--metrics`).

Two kinds of `compute`:
- embedding metrics: `compute(reference, generated, counts) -> float`, from the {clip id: per-clip outputs}
  sets of their embedder: 'cnn14' and 'vggish' give `AudioEmbedding`s of the reference and generated audio;
  'passt' gives {'logits', 'embedding'} of both; 'imagebind' gives {'video'} (the source video's embedding) as
  the reference and {'audio'} (the generated audio's) as the generated side; 'synchformer' gives {'desync'} per
  generated clip (the offset Synchformer predicts between the source video and the generated audio; see
  `eval.benchmark_embed`). It writes its counts into `counts` before it may raise, so that they survive a
  failed computation;
- video metrics: `compute(out_dir, clips, workers, failures, progress) -> {metric name: result}`, each result
  either {"skipped": reason, ...counts} or a summary with "per_clip" values and the counts (see `eval.av_align`).
  Entries that share one `compute` are measured in one pass (AV-Align's two rules share the optical flow).

The variants the field quotes are separate entries with their own keys: KL with softmax ('kl', audioldm_eval's,
with its eps), with sigmoid ('kl_sigmoid') and in log space without eps ('kl_panns', av-benchmark's); the
Inception score on PANNs ('inception_score') and on PaSST ('is_passt'); AV-Align by the 2025 rule ('av_align')
and by the 2023 rule ('av_align_2023'), since the reference changed its definition in 2025.

Groups (`select_metrics`): 'paper' is the paper's FD, FAD, KL and AV-Align with the variants the field prints
next to them; 'av-benchmark' is the nine columns of hkchengrex/av-benchmark as MMAudio (2025) and later systems
report them: FD on PaSST, PANNs and VGGish, KL on PANNs and PaSST, IS on PANNs and PaSST, the ImageBind score and
DeSync. `TABLES` gives each group's columns, in the order its papers print them.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np

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
    kl_log_softmax,
)

Embeddings = Mapping[str, Any]  # clip id -> its embedder's outputs (an AudioEmbedding, or named arrays)
Embedder = Literal["cnn14", "vggish", "passt", "imagebind", "synchformer"]
EMBEDDERS: tuple[str, ...] = typing.get_args(Embedder)
GROUPS = ("paper", "av-benchmark")
NOT_SELECTED = "not selected"  # the null reason of a metric --metrics left out


def number(value: float | None) -> str:
    """A table cell: three decimals, '—' when missing."""
    return "—" if value is None else f"{value:.3f}"


@dataclass(frozen=True)
class Metric:
    name: str  # results.json key
    title: str  # table column
    better: Literal["lower", "higher"]
    embedder: Embedder | None  # None: measured per clip on the source videos by its own pass
    compute: Callable[..., Any]  # see the module docstring for its two signatures
    counts: tuple[str, ...] = ()  # results.json 'counts' this metric adds
    protocol: Mapping[str, Any] = field(default_factory=dict)  # results.json 'protocol' knobs it depends on
    cell: Callable[[Any], str] = number  # its table cell, from its results.json value
    note: str = ""  # a line under the table
    describe: Callable[[Mapping[str, Any]], str] | None = None  # its line in report.md, from the whole results
    switch: str = ""  # EvalConfig flag that turns it off (video metrics)
    per_clip: bool = False  # results.json holds '<name>_per_clip'
    groups: tuple[str, ...] = ("paper",)  # the --metrics groups it belongs to
    min_clips: int = 2  # fewest clips per set it can be computed on (a Frechet distance needs 2)
    generated_only: bool = False  # computed on the generated set alone (the Inception score): min_clips is its
    paired_on: str = ""  # set: min_paired counts the clips in both sets, which hold this (e.g. a source video)
    titles: Mapping[str, str] = field(default_factory=dict)  # its column title in another group's table

    def header_in(self, table: str) -> str:
        return f"{self.titles.get(table, self.title)} {'↓' if self.better == 'lower' else '↑'}"

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


def generated_inception_score(reference: Embeddings, generated: Embeddings, counts: dict[str, Any],
                              logits_of: Callable[[Any], np.ndarray] = lambda e: e.cnn14_logits,
                              prefix: str = "inception_score") -> float:
    """Inception score of the generated clips' logits (the reference set plays no part); `logits_of` picks them
    from a clip's outputs (Cnn14's by default), `prefix` names its counts.

    The rows are taken in the order audioldm_eval and av-benchmark read the generated folder, sorted
    '<clip id>.wav' names, before their seeded shuffle, so that the splits hold the same clips as there; the std
    over the splits goes to counts['<prefix>_std']. A set of fewer clips than splits is refused (ValueError; the
    reference gives NaN there, an empty split): the registry's min_clips keeps such a set from coming here.
    """
    ids = sorted(generated, key=lambda clip_id: f"{clip_id}.wav")
    counts[f"{prefix}_clips"] = len(ids)
    counts[f"{prefix}_splits"] = IS_SPLITS
    logits = np.stack([logits_of(generated[k]) for k in ids]) if ids else np.zeros((0, 1))
    mean, counts[f"{prefix}_std"] = inception_score(logits, splits=IS_SPLITS)
    return mean


def describe_inception_score(results: Mapping[str, Any], name: str = "inception_score",
                             model: str = "PANNs Cnn14") -> str:
    value, counts = results.get(name), results.get("counts", {})
    title = "IS" if name == "inception_score" else "IS-PaSST"
    if value is None:
        return f"- {title} not computed: {results['null_reasons'].get(name, 'unknown reason')}."
    return (f"- {title} ({model}, softmax of the logits, generated clips only) over "
            f"{counts.get(f'{name}_clips', '?')} clips in {counts.get(f'{name}_splits', IS_SPLITS)} splits: mean "
            f"{number(value)}, std over the splits {number(counts.get(f'{name}_std'))}.")


# ----------------------------------------------------------------------------------------------------------------
# av-benchmark's metrics (hkchengrex/av-benchmark, av_bench/evaluate.py)
# ----------------------------------------------------------------------------------------------------------------
def kl_panns(reference: Embeddings, generated: Embeddings, counts: dict[str, Any]) -> float:
    """KL(reference || generated) of softmax(Cnn14 logits) in log space without eps (av-benchmark's
    KL-PANNS-softmax), paired by clip id."""
    counts["kl_panns_pairs"] = 0
    value, counts["kl_panns_pairs"] = kl_log_softmax({k: e.cnn14_logits for k, e in reference.items()},
                                                     {k: e.cnn14_logits for k, e in generated.items()})
    return value


def fd_passt(reference: Embeddings, generated: Embeddings, counts: dict[str, Any]) -> float:
    """FD-PaSST: Frechet distance of the PaSST embeddings (768-d, the tokens before the head), one per clip, on
    the clips with both a reference and a generated embedding (av-benchmark pairs the PaSST sets by name, unlike
    its FD-PANNs and FD-VGG)."""
    ids = sorted(set(reference) & set(generated))
    counts["fd_passt_pairs"] = len(ids)
    return frechet_distance(np.stack([reference[k]["embedding"] for k in ids]),
                            np.stack([generated[k]["embedding"] for k in ids]))


def kl_passt(reference: Embeddings, generated: Embeddings, counts: dict[str, Any]) -> float:
    """KL-PaSST: KL(reference || generated) of softmax(PaSST logits) in log space without eps (av-benchmark's
    KL-PASST-softmax), paired by clip id."""
    counts["kl_passt_pairs"] = 0
    value, counts["kl_passt_pairs"] = kl_log_softmax({k: e["logits"] for k, e in reference.items()},
                                                     {k: e["logits"] for k, e in generated.items()})
    return value


def is_passt(reference: Embeddings, generated: Embeddings, counts: dict[str, Any]) -> float:
    """IS-PaSST: the Inception score of the generated clips' PaSST logits (splits and shuffle as IS-PANNs)."""
    return generated_inception_score(reference, generated, counts, lambda e: e["logits"], "is_passt")


def imagebind_score(reference: Embeddings, generated: Embeddings, counts: dict[str, Any]) -> float:
    """IB-score: mean over paired clips of the cosine similarity of the source video's ImageBind embedding and the
    generated audio's (av-benchmark's IB-Score; papers print it x100)."""
    from eval.imagebind import ib_score  # torch and the ImageBind code only when this metric is computed

    ids = sorted(set(reference) & set(generated))
    counts["ib_pairs"] = len(ids)
    if not ids:
        raise ValueError("no clip has both a source-video and a generated-audio ImageBind embedding")
    return float(np.mean(ib_score(np.stack([reference[k]["video"] for k in ids]),
                                  np.stack([generated[k]["audio"] for k in ids]))))


def desync(reference: Embeddings, generated: Embeddings, counts: dict[str, Any]) -> float:
    """DeSync: mean over clips of the |offset| (seconds) Synchformer predicts between the source video and the
    generated audio, each clip measured on its first and on its last 4.8 s (av-benchmark's DeSync averages both)."""
    values = [np.asarray(e["desync"], dtype=np.float64) for e in generated.values()]
    counts["desync_clips"] = len(values)
    if not values:
        raise ValueError("no clip has a DeSync measurement")
    return float(np.mean(np.concatenate(values)))


def ib_cell(value: float | None) -> str:
    """The IB-score as papers print it: x100."""
    return "—" if value is None else f"{100 * value:.2f}"


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


AV = "av-benchmark"
METRICS: tuple[Metric, ...] = (
    Metric("fd", "FD", "lower", "cnn14", fd, protocol={"fd_eps": FD_EPS}, groups=("paper", AV),
           titles={AV: "FD-PANNs"}),
    Metric("fad", "FAD", "lower", "vggish", fad, counts=("n_reference_patches", "n_generated_patches"),
           groups=("paper", AV), titles={AV: "FD-VGG"}),
    Metric("kl", "KL", "lower", "cnn14", kl, counts=("kl_pairs",), protocol={"kl_eps": KL_EPS},
           note="KL: softmax of the PANNs logits, with audioldm_eval's eps (its KL_softmax); KL-sigmoid: per-class "
                "sigmoid of the same logits (audioldm_eval's KL_Sigmoid)."),
    Metric("kl_sigmoid", "KL-sigmoid", "lower", "cnn14", kl_sigmoid, protocol={"kl_eps": KL_EPS}),
    Metric("inception_score", "IS", "higher", "cnn14", generated_inception_score,
           counts=("inception_score_clips", "inception_score_splits", "inception_score_std"),
           protocol={"inception_score": {"probabilities": "softmax(fc_audioset)", "set": "generated",
                                         "splits": IS_SPLITS, "shuffle_seed": IS_SHUFFLE_SEED}},
           note=f"IS: Inception score of the generated clips on PANNs ({IS_SPLITS} splits, mean over the splits; none "
                f"below {IS_SPLITS} clips, where a split of one clip would score 1 whatever the audio).",
           describe=describe_inception_score, groups=("paper", AV), titles={AV: "IS-PANNs"}, min_clips=IS_SPLITS,
           generated_only=True),
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
    Metric("kl_panns", "KL-PANNs", "lower", "cnn14", kl_panns, counts=("kl_panns_pairs",), groups=(AV,),
           note="KL-PANNs, KL-PaSST: KL(reference || generated) of the softmax of the logits, in log space "
                "without eps, as av-benchmark computes them."),
    Metric("fd_passt", "FD-PaSST", "lower", "passt", fd_passt, counts=("fd_passt_pairs",), protocol={"fd_eps": FD_EPS},
           groups=(AV,),
           note="FD-PaSST, KL-PaSST, IS-PaSST: PaSST (passt-s-f128-p16-s10-ap.476-swa) at 32 kHz, each clip cut to "
                "--duration and zero-padded to 10 s, as av-benchmark feeds it."),
    Metric("kl_passt", "KL-PaSST", "lower", "passt", kl_passt, counts=("kl_passt_pairs",), groups=(AV,)),
    Metric("is_passt", "IS-PaSST", "higher", "passt", is_passt,
           counts=("is_passt_clips", "is_passt_splits", "is_passt_std"),
           protocol={"is_passt": {"probabilities": "softmax(PaSST logits)", "set": "generated",
                                  "splits": IS_SPLITS, "shuffle_seed": IS_SHUFFLE_SEED}}, groups=(AV,),
           describe=partial(describe_inception_score, name="is_passt", model="PaSST"), min_clips=IS_SPLITS,
           generated_only=True),
    Metric("ib_score", "IB-score", "higher", "imagebind", imagebind_score, counts=("ib_pairs",), cell=ib_cell,
           min_clips=1, groups=(AV,), paired_on="a source-video embedding and a generated WAV",
           protocol={"ib_score": {"video": "source window at 0.5 fps (ffmpeg fps filter), resized to 224 (bicubic), "
                                           "3 spatial crops of 224, consecutive 2-frame clips, embeddings averaged",
                                  "audio": "generated WAV at 16 kHz, three 2 s clips spread over its length, "
                                           "128-bin kaldi fbank padded to 204 frames, (x + 4.268) / 9.138",
                                  "score": "cosine(video, audio), mean over clips (av-benchmark's IB-Score)"}},
           note="IB-score: cosine similarity of ImageBind-huge's embeddings of the source video and the generated "
                "audio, mean over clips, printed x100 (results.json keeps the cosine)."),
    Metric("desync", "DeSync", "lower", "synchformer", desync, counts=("desync_clips",), min_clips=1, groups=(AV,),
           paired_on="source-video features and a generated WAV",
           protocol={"desync": {"video": "source window at 25 fps (ffmpeg fps filter), resized to 224 and centre-"
                                         "cropped, segments of 16 frames every 8",
                                "audio": "generated WAV at 16 kHz cut to the duration, segments of 10240 samples "
                                         "every 5120, 128-bin log mel (win 400, hop 160) cut/padded to 66 frames",
                                "offsets": "21 classes from -2 to +2 s", "segments_compared": 14,
                                "averaging": "|argmax offset| of the first 14 and of the last 14 segments, mean "
                                             "over both and over clips (av-benchmark's DeSync)"}},
           note="DeSync: seconds of audio-visual offset Synchformer predicts, mean over the first and last 4.8 s of "
                "every clip."),
)
BY_NAME: dict[str, Metric] = {metric.name: metric for metric in METRICS}
# each group's table: its columns in the order its papers print them
TABLES: dict[str, tuple[str, ...]] = {
    "paper": ("fd", "fad", "kl", "kl_sigmoid", "inception_score", "av_align", "av_align_2023"),
    AV: ("fd_passt", "fd", "fad", "kl_panns", "kl_passt", "inception_score", "is_passt", "ib_score", "desync"),
}


def select_metrics(spec: str) -> tuple[Metric, ...]:
    """The metrics `--metrics` names, in registry order: a comma-separated list of group names ('paper',
    'av-benchmark'), 'all' and results.json keys. ValueError (one line) for an unknown name or an empty list."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ValueError("--metrics names no metric")
    chosen: set[str] = set()
    for name in names:
        if name == "all":
            chosen.update(BY_NAME)
        elif name in GROUPS:
            chosen.update(m.name for m in METRICS if name in m.groups)
        elif name in BY_NAME:
            chosen.add(name)
        else:
            raise ValueError(f"--metrics: unknown metric or group {name!r} (groups: all, {', '.join(GROUPS)}; "
                             f"metrics: {', '.join(BY_NAME)})")
    return tuple(m for m in METRICS if m.name in chosen)


def tables_for(metrics: tuple[Metric, ...]) -> list[str]:
    """The tables worth printing for a selection: each table whose columns are all selected; when none is, the
    one showing most of the selection."""
    names = {m.name for m in metrics}
    whole = [table for table, columns in TABLES.items() if set(columns) <= names]
    return whole or [max(TABLES, key=lambda table: len(names & set(TABLES[table])))]


def metric_protocol(metrics: tuple[Metric, ...] = METRICS) -> dict[str, Any]:
    """The protocol knobs of `metrics` (results.json 'protocol': those of the selected ones)."""
    return {key: value for metric in metrics for key, value in metric.protocol.items()}
