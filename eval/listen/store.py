"""The SQLite database of a listening test: the study (clips, systems, opaque tokens), listeners and ratings.

Every rating is committed on its own before the server answers, in WAL mode with synchronous=FULL, so a
listener who closes the tab or a server killed mid-test loses nothing already acknowledged. A listener rates a
(clip, system) pair at most once: UNIQUE (listener, clip_id, system), whatever the client does. Scores are
integers 0..100, checked here and again by the table's CHECK constraints.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from eval.listen.study import ASPECTS

LISTENER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # the whole id: see valid_listener
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clips (
    clip_id TEXT PRIMARY KEY, token TEXT NOT NULL UNIQUE, position INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS stimuli (
    token TEXT PRIMARY KEY, clip_id TEXT NOT NULL REFERENCES clips (clip_id), system TEXT NOT NULL,
    UNIQUE (clip_id, system));
CREATE TABLE IF NOT EXISTS listeners (listener TEXT PRIMARY KEY, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY,
    listener TEXT NOT NULL REFERENCES listeners (listener),
    clip_id TEXT NOT NULL,
    system TEXT NOT NULL,
    {", ".join(f"{a} INTEGER NOT NULL CHECK ({a} BETWEEN 0 AND 100)" for a in ASPECTS)},
    created TEXT NOT NULL,
    UNIQUE (listener, clip_id, system),
    FOREIGN KEY (clip_id, system) REFERENCES stimuli (clip_id, system));
"""


class DuplicateRating(Exception):
    """The listener has already rated this (clip, system)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def valid_listener(listener: Any) -> bool:
    """True for a string that LISTENER_PATTERN matches whole: `fullmatch`, since `re.match` with `$` would let
    'ann\\n' through as a second listener beside 'ann'."""
    return isinstance(listener, str) and LISTENER_PATTERN.fullmatch(listener) is not None


def valid_scores(scores: Any) -> bool:
    """True for a dict with exactly the four aspects, each an int (not a bool, not a float) in 0..100."""
    return (
        isinstance(scores, dict)
        and set(scores) == set(ASPECTS)
        and all(type(scores[a]) is int and 0 <= scores[a] <= 100 for a in ASPECTS)
    )


class RatingStore:
    """One SQLite connection shared by the server's threads behind a lock (ratings are few; writes are tiny)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit survives a power cut, not only a killed process
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock, self._db:
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------------------------------------- the study
    def study(self) -> dict[str, Any] | None:
        """{"clips": [...], "systems": [...], "seed": int} as first registered, or None for a new database."""
        with self._lock:
            rows = dict(self._db.execute("SELECT key, value FROM study").fetchall())
        if not rows:
            return None
        return {key: json.loads(value) for key, value in rows.items()}

    def register_study(self, clips: list[str], systems: list[str], seed: int) -> dict[str, Any]:
        """Store the study with a fresh random token per clip and per (clip, system); return what is stored.

        A database that already holds a study keeps it (tokens included, so open pages and resumed listeners
        keep working across restarts); the caller compares it with what it was asked for.
        """
        with self._lock, self._db:
            if self._db.execute("SELECT COUNT(*) FROM study").fetchone()[0] == 0:
                values = {"clips": clips, "systems": systems, "seed": seed, "created": _now()}
                self._db.executemany("INSERT INTO study VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()])
                for position, clip_id in enumerate(clips):
                    self._db.execute(
                        "INSERT INTO clips VALUES (?, ?, ?)", (clip_id, secrets.token_urlsafe(12), position)
                    )
                    for system in systems:
                        self._db.execute(
                            "INSERT INTO stimuli VALUES (?, ?, ?)", (secrets.token_urlsafe(12), clip_id, system)
                        )
        stored = self.study()
        assert stored is not None
        return stored

    def clip_tokens(self) -> dict[str, str]:
        """{clip id: token}."""
        with self._lock:
            return dict(self._db.execute("SELECT clip_id, token FROM clips").fetchall())

    def stimulus_tokens(self) -> dict[str, tuple[str, str]]:
        """{token: (clip id, system)}."""
        with self._lock:
            rows = self._db.execute("SELECT token, clip_id, system FROM stimuli").fetchall()
        return {token: (clip_id, system) for token, clip_id, system in rows}

    # ------------------------------------------------------------------------------------- listeners, ratings
    def add_listener(self, listener: str) -> bool:
        """Register a listener id (see LISTENER_PATTERN); False when it was already there (a returning listener)."""
        if not valid_listener(listener):
            raise ValueError(f"listener id {listener!r}: use 1-64 letters, digits, '.', '_' or '-'")
        with self._lock, self._db:
            cursor = self._db.execute("INSERT OR IGNORE INTO listeners VALUES (?, ?)", (listener, _now()))
            return cursor.rowcount == 1

    def has_listener(self, listener: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM listeners WHERE listener = ?", (listener,)).fetchone() is not None

    def ratings_of(self, listener: str) -> dict[tuple[str, str], dict[str, int]]:
        """{(clip id, system): {aspect: score}} of one listener."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT clip_id, system, {', '.join(ASPECTS)} FROM ratings WHERE listener = ?", (listener,)
            )
            return {(row[0], row[1]): dict(zip(ASPECTS, row[2:])) for row in rows.fetchall()}

    def add_rating(self, listener: str, clip_id: str, system: str, scores: dict[str, int]) -> None:
        """Insert and commit one rating. Raises DuplicateRating if the listener already rated (clip, system),
        ValueError for scores that are not four integers in 0..100, LookupError for an unknown listener/stimulus."""
        if not valid_scores(scores):
            raise ValueError(f"scores must be integers 0..100 for exactly {', '.join(ASPECTS)}; got {scores!r}")
        values = (listener, clip_id, system, *(scores[a] for a in ASPECTS), _now())
        with self._lock:
            try:
                with self._db:  # commits on success, rolls back on error
                    self._db.execute(
                        f"INSERT INTO ratings (listener, clip_id, system, {', '.join(ASPECTS)}, created) "
                        f"VALUES ({', '.join('?' * len(values))})",
                        values,
                    )
            except sqlite3.IntegrityError as error:
                if "UNIQUE" in str(error):
                    raise DuplicateRating(f"{listener} has already rated this version of this clip") from None
                raise LookupError(f"unknown listener or stimulus ({error})") from None

    def all_ratings(self) -> list[dict[str, Any]]:
        """Every rating as {"listener", "clip_id", "system", <aspect>: score, "created"}, in insertion order."""
        with self._lock:
            cursor = self._db.execute(
                f"SELECT listener, clip_id, system, {', '.join(ASPECTS)}, created FROM ratings ORDER BY id"
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]
