"""The Table II report on a hand-made database: means and Student-t 95% intervals checked against values worked
out by hand (t quantiles from a printed table), screening of listeners who rate the ground truth low, and the
Markdown / JSON outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eval.listen import GROUND_TRUTH, RatingStore, build_report, main, mean_ci, to_markdown
from eval.listen.study import ASPECTS

# Student t, two-sided 95% (0.975 quantile), from a printed table, by degrees of freedom.
T_975 = {1: 12.706, 2: 4.303, 4: 2.776, 5: 2.571, 6: 2.447}
# listener -> (system, clip) -> base score; aspect k gets base + k, so each aspect's mean is shifted by k and
# its spread is the same. "cat" rates the ground truth low and the model high: a listener to flag.
BASE = {
    "ann": {(GROUND_TRUTH, "c1"): 80, (GROUND_TRUTH, "c2"): 90, ("Model", "c1"): 60, ("Model", "c2"): 50},
    "bob": {(GROUND_TRUTH, "c1"): 70, (GROUND_TRUTH, "c2"): 84, ("Model", "c1"): 40, ("Model", "c2"): 45},
    "cat": {(GROUND_TRUTH, "c1"): 20, (GROUND_TRUTH, "c2"): 30, ("Model", "c1"): 90, ("Model", "c2"): 95},
}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ratings.sqlite"
    store = RatingStore(path)
    store.register_study(["c1", "c2"], [GROUND_TRUTH, "Model"], seed=0)
    for listener, ratings in BASE.items():
        store.add_listener(listener)
        for (system, clip), base in ratings.items():
            store.add_rating(listener, clip, system, {a: base + k for k, a in enumerate(ASPECTS)})
    store.add_listener("dan")  # registered, one rating only: incomplete
    store.add_rating("dan", "c1", "Model", {a: 100 for a in ASPECTS})
    store.close()
    return path


def test_mean_ci_by_hand() -> None:
    # 60, 70, 80: mean 70, s = 10, half-width t(0.975, 2) * 10 / sqrt(3) = 4.303 * 5.7735 = 24.84
    cell = mean_ci([60, 70, 80])
    assert (cell["n"], cell["mean"], cell["sd"]) == (3, 70.0, 10.0)
    assert cell["ci"] == pytest.approx(24.84, abs=0.01) == T_975[2] * 10 / math.sqrt(3)
    # 1, 3: mean 2, s = sqrt(2), half-width 12.706 * sqrt(2) / sqrt(2) = 12.706
    assert mean_ci([1, 3])["ci"] == pytest.approx(T_975[1], abs=1e-3)
    assert mean_ci([42]) == {"n": 1, "mean": 42.0, "sd": None, "ci": None}
    assert mean_ci([])["mean"] is None


def test_report_table_screening_and_files(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = build_report(db, threshold=50)
    assert list(report["all"]["systems"]) == [GROUND_TRUTH, "Model"]
    # Model, audio quality: 60 50 40 45 90 95 100 -> mean 480 / 7 = 68.571; deviations -8.571 -18.571 -28.571
    # -23.571 21.429 26.429 31.429, squares 73.47 344.90 816.33 555.61 459.18 698.47 987.76, sum 3935.71,
    # s^2 = 3935.71 / 6 = 655.95, s = 25.612, CI = t(0.975, 6) s / sqrt(7) = 2.447 * 25.612 / 2.6458 = 23.687
    model = report["all"]["systems"]["Model"]
    assert model["audio_quality"]["n"] == 7
    assert model["audio_quality"]["mean"] == pytest.approx(68.571, abs=1e-3)
    assert model["audio_quality"]["sd"] == pytest.approx(25.612, abs=1e-3)
    assert model["audio_quality"]["ci"] == pytest.approx(23.687, abs=0.01)
    # aspect k adds k to every score but dan's 100s: mean rises by 6k/7, the spread changes accordingly
    assert model["overall_quality"]["mean"] == pytest.approx((380 + 18 + 100) / 7, abs=1e-9)
    # Ground truth, temporal alignment (+2): 82 92 72 86 22 32 -> mean 386 / 6 = 64.333; squared deviations 312.11
    # 765.44 58.78 469.44 1792.11 1045.44, sum 4443.33, s^2 = 888.67, s = 29.81, CI = 2.571 * 29.81 / sqrt(6) = 31.29
    truth = report["all"]["systems"][GROUND_TRUTH]["temporal_alignment"]
    assert truth["mean"] == pytest.approx(386 / 6, abs=1e-9)
    assert truth["ci"] == pytest.approx(T_975[5] * math.sqrt(4443.333 / 5) / math.sqrt(6), abs=0.01)
    assert truth["ci"] == pytest.approx(31.29, abs=0.01)
    assert (report["all"]["listeners"], report["all"]["ratings"], report["all"]["clips"]) == (4, 13, 2)

    # cat's ground-truth mean: (20 + 30) / 2 + (0 + 1 + 2 + 3) / 4 = 26.5 < 50; ann 86.5 and bob 78.5 are kept
    assert report["screening"]["flagged"] == {"cat": 26.5}
    screened = report["screened"]["systems"]["Model"]["audio_quality"]
    # without cat: 60 50 40 45 100 -> mean 59; squares of deviations 1 + 81 + 361 + 196 + 1681 = 2320; s^2 = 580
    assert (screened["n"], screened["mean"]) == (5, 59.0)
    assert screened["ci"] == pytest.approx(T_975[4] * math.sqrt(580) / math.sqrt(5), abs=0.01)
    assert report["listeners"]["dan"] == {"ratings": 1, "complete": False}
    assert report["listeners"]["ann"] == {"ratings": 4, "complete": True}
    assert build_report(db, threshold=20)["screened"] is None  # nobody below 20

    markdown = to_markdown(report)
    assert "| Method | Audio quality | Semantic alignment | Temporal alignment | Overall quality |" in markdown
    assert "| Model | 68.57 ± 23.69 |" in markdown
    assert "cat (26.5)" in markdown and "## Without flagged listeners" in markdown and "Incomplete" in markdown

    out = tmp_path / "report"
    assert main(["--report", str(db), "--out", str(out), "--screen-threshold", "50"]) == 0
    printed = capsys.readouterr().out
    assert "| Ground-Truth |" in printed and str(out / "listening_test.md") in printed
    assert (out / "listening_test.md").read_text(encoding="utf-8") == markdown
    written = json.loads((out / "listening_test.json").read_text(encoding="utf-8"))
    assert written["all"]["systems"]["Model"]["audio_quality"]["mean"] == pytest.approx(68.571, abs=1e-3)
    assert written["screening"]["flagged"] == {"cat": 26.5}
