"""Table II from a listening-test database: mean and 95% confidence interval per system and aspect.

For the n ratings of a (system, aspect) cell (one per listener and clip):

    mean = sum(x) / n,   s = sqrt(sum((x - mean)^2) / (n - 1)),   CI95 = mean +- t_{0.975, n-1} * s / sqrt(n)

with t the Student t quantile (scipy.stats.t.ppf), as for MUSHRA results (ITU-R BS.1534-3, section 9.1). The
ratings are treated as independent, as papers reporting such tables do; listener and clip effects make the true
interval somewhat wider.

Screening: a listener whose ratings of the hidden ground truth average (over clips and the four aspects) below a
threshold is flagged, in the spirit of BS.1534-3's post-screening (which drops assessors who rate the hidden
reference below 90 for more than 15% of items; here the reference is real, often noisy, VGGSound audio, so the
threshold is lower and chosen by the experimenter). The report gives the table with every listener and, when
someone is flagged, again without them.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

from scipy import stats

from eval.listen.study import ASPECT_TITLES, ASPECTS, GROUND_TRUTH

DEFAULT_THRESHOLD = 50.0
CONFIDENCE = 0.95


def mean_ci(values: list[float] | list[int], confidence: float = CONFIDENCE) -> dict[str, float | int | None]:
    """{"n", "mean", "sd", "ci"}: sample mean, standard deviation (ddof 1) and the half-width of the Student t
    confidence interval (see the module docstring); sd and ci are None below two values."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    t = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    return {"n": n, "mean": mean, "sd": sd, "ci": t * sd / math.sqrt(n)}


def load(db: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(study, ratings) of a database, opened read-only (the server may still be writing to it)."""
    path = Path(db)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such database")
    try:
        connection = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        try:
            study = {k: json.loads(v) for k, v in connection.execute("SELECT key, value FROM study")}
            cursor = connection.execute(
                f"SELECT listener, clip_id, system, {', '.join(ASPECTS)} FROM ratings ORDER BY id"
            )
            names = [d[0] for d in cursor.description]
            ratings = [dict(zip(names, row)) for row in cursor.fetchall()]
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        raise ValueError(f"{path}: not a listening-test database ({error})") from None
    return study, ratings


def screen(ratings: list[dict[str, Any]], threshold: float) -> dict[str, float]:
    """{listener: mean ground-truth score} for the listeners whose mean ground-truth score is below `threshold`."""
    scores: dict[str, list[int]] = defaultdict(list)
    for rating in ratings:
        if rating["system"] == GROUND_TRUTH:
            scores[rating["listener"]].extend(rating[a] for a in ASPECTS)
    means = {listener: sum(values) / len(values) for listener, values in scores.items()}
    return {listener: mean for listener, mean in sorted(means.items()) if mean < threshold}


def table(ratings: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    """{"systems": {system: {aspect: mean_ci}}, "listeners", "ratings", "clips"} over the given ratings."""
    cells: dict[tuple[str, str], list[int]] = defaultdict(list)
    for rating in ratings:
        for aspect in ASPECTS:
            cells[(rating["system"], aspect)].append(rating[aspect])
    return {
        "systems": {s: {a: mean_ci(cells[(s, a)]) for a in ASPECTS} for s in systems},
        "listeners": len({r["listener"] for r in ratings}),
        "ratings": len(ratings),
        "clips": len({r["clip_id"] for r in ratings}),
    }


def build_report(db: str | os.PathLike[str], threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Everything the Markdown and JSON reports hold (see the module docstring)."""
    study, ratings = load(db)
    systems = list(study.get("systems") or [])
    for system in sorted({r["system"] for r in ratings} - set(systems)):
        systems.append(system)  # only for a database written by hand
    if GROUND_TRUTH in systems:
        systems.remove(GROUND_TRUTH)
        systems.insert(0, GROUND_TRUTH)
    per_listener: dict[str, int] = defaultdict(int)
    for rating in ratings:
        per_listener[rating["listener"]] += 1
    full = len(study.get("clips") or []) * len(study.get("systems") or [])
    flagged = screen(ratings, threshold)
    kept = [r for r in ratings if r["listener"] not in flagged]
    return {
        "database": str(Path(db)),
        "aspects": {a: ASPECT_TITLES[a] for a in ASPECTS},
        "confidence": CONFIDENCE,
        "study": {"clips": len(study.get("clips") or []), "systems": systems, "seed": study.get("seed")},
        "listeners": {
            name: {"ratings": count, "complete": bool(full) and count >= full}
            for name, count in sorted(per_listener.items())
        },
        "screening": {
            "threshold": threshold,
            "rule": "mean ground-truth score over clips and aspects < threshold",
            "flagged": flagged,
        },
        "all": table(ratings, systems),
        "screened": table(kept, systems) if flagged else None,
    }


def _cell(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return "-"
    return f"{cell['mean']:.2f}" if cell["ci"] is None else f"{cell['mean']:.2f} ± {cell['ci']:.2f}"


def _markdown_table(result: dict[str, Any]) -> list[str]:
    lines = ["| Method | " + " | ".join(ASPECT_TITLES[a] for a in ASPECTS) + " |", "|---" * (len(ASPECTS) + 1) + "|"]
    for system, cells in result["systems"].items():
        lines.append(f"| {system} | " + " | ".join(_cell(cells[a]) for a in ASPECTS) + " |")
    counts = sorted({cell["n"] for cells in result["systems"].values() for cell in cells.values()})
    per_cell = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    lines += [
        "",
        f"{result['listeners']} listener(s), {result['clips']} clip(s), {result['ratings']} rating(s) "
        f"({per_cell} per cell).",
    ]
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: Table II (all listeners), screening, and the table without flagged listeners."""
    screening = report["screening"]
    lines = [
        "# Subjective evaluation (Table II)",
        "",
        f"Scores 0-100; mean ± half-width of the {report['confidence']:.0%} confidence interval (Student t).",
        "",
        "## All listeners",
        "",
        *_markdown_table(report["all"]),
        "",
        "## Screening",
        "",
    ]
    incomplete = [name for name, info in report["listeners"].items() if not info["complete"]]
    if incomplete:
        lines += [f"Incomplete (counted with the ratings they gave): {', '.join(incomplete)}.", ""]
    if screening["flagged"]:
        flagged = ", ".join(f"{name} ({mean:.1f})" for name, mean in screening["flagged"].items())
        lines += [
            f"Flagged: mean ground-truth score below {screening['threshold']:g}: {flagged}.",
            "",
            "## Without flagged listeners",
            "",
            *_markdown_table(report["screened"]),
        ]
    else:
        lines.append(
            f"No listener rates the ground truth below {screening['threshold']:g} on average; nobody is flagged."
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write `listening_test.md` and `listening_test.json` into `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown, data = out / "listening_test.md", out / "listening_test.json"
    markdown.write_text(to_markdown(report), encoding="utf-8")
    data.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return markdown, data
