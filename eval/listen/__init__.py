"""The blinded listening test behind the paper's Table II.

`python -m eval.listen RUN_DIR...` muxes the test videos with each run's audio and with the ground truth (once,
ahead of time), then serves a local web page where listeners rate every version of every clip, blind and in a
random order, from 0 to 100 on audio quality, semantic alignment, temporal alignment and overall quality.
`python -m eval.listen --report DB` turns the ratings into the table (mean and 95% CI per system and aspect).

Modules: `study` (runs, clips, muxing), `store` (the SQLite database), `server` (the web app), `report`.
"""

from eval.listen.cli import main
from eval.listen.report import build_report, mean_ci, to_markdown, write_report
from eval.listen.server import ListeningServer, listener_plan, make_server
from eval.listen.store import DuplicateRating, RatingStore
from eval.listen.study import ASPECTS, GROUND_TRUTH, Run, Study, load_runs, pick_clips, prepare_study

__all__ = [
    "ASPECTS",
    "GROUND_TRUTH",
    "DuplicateRating",
    "ListeningServer",
    "RatingStore",
    "Run",
    "Study",
    "build_report",
    "listener_plan",
    "load_runs",
    "main",
    "make_server",
    "mean_ci",
    "pick_clips",
    "prepare_study",
    "to_markdown",
    "write_report",
]
