"""Fixtures for the listening-test tests: a fake evaluation setup (videos, stage-one shards, two runs) and a
server running in a thread. No tests here."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

import shards
from eval.listen import RatingStore, Study, load_runs, make_server, pick_clips, prepare_study
from eval.listen.server import ListeningServer
from tests import media
from tests.conftest import make_sample

SPEC = shards.ShardSpec(num_frames=4, embed_dim=8, max_nouns=3, latent_channels=2, latent_time=4, latent_freq=4)
FPS = 10
START, DURATION = 0.5, 2.0  # the window of every source video that a clip covers
COMMON = ("clip_a", "clip_b", "clip_c")  # in both runs, with WAVs
RUN_NAMES = ("VTA-SAM", "baseline")  # the second run has no run_name: its folder name is used


def make_fake_eval(root: Path) -> list[Path]:
    """Videos + shards (split "test") + two evaluation runs under `root`; returns the run folders.

    The first run also lists "clip_x" (no WAV written: a clip that failed to generate); the second lists
    "clip_y" that the first lacks; so only COMMON is in every run."""
    video_dir, shard_dir = root / "videos", root / "shards"
    writer = shards.ShardWriter(shard_dir, "test", 0, max_samples=100)
    for i, clip_id in enumerate((*COMMON, "clip_x", "clip_y")):
        video = media.make_video(video_dir / f"{clip_id}.mp4", seconds=3.0, fps=FPS)
        meta, arrays, waveform = make_sample(SPEC, clip_id, seed=i, split="test")
        meta.update(source=str(video), start=START, duration=DURATION)
        writer.write(shards.encode_sample(SPEC, meta, arrays, waveform))
    writer.close()
    (shard_dir / shards.META_FILE).write_text(json.dumps({"spec": SPEC.to_dict()}))
    rng = np.random.default_rng(0)
    runs = []
    for name, folder, clips in (
        (RUN_NAMES[0], "run_one", (*COMMON, "clip_x")),
        (None, RUN_NAMES[1], (*COMMON, "clip_y")),
    ):
        run = root / "eval" / folder
        (run / "wav").mkdir(parents=True)
        results: dict[str, Any] = {"shards": str(shard_dir), "split": "test", "clips": list(clips), "wav_dir": "wav"}
        if name is not None:
            results["run_name"] = name
        (run / "results.json").write_text(json.dumps(results))
        for clip_id in clips:
            if clip_id != "clip_x":
                soundfile.write(run / "wav" / f"{clip_id}.wav", 0.1 * rng.standard_normal(16000 * 2), 16000)
        runs.append(run)
    return runs


def prepare_fake(root: Path, clips: int = 3, seed: int = 0) -> tuple[list[Path], Study]:
    run_dirs = make_fake_eval(root)
    runs = load_runs(run_dirs)
    study = prepare_study(runs, pick_clips(runs, clips, seed), root / "work", log=lambda _: None)
    return run_dirs, study


@contextmanager
def serving(db: Path, study: Study, seed: int = 0) -> Iterator[ListeningServer]:
    """A server on a free localhost port, in a thread, over the database `db` (registered with `study`)."""
    store = RatingStore(db)
    store.register_study(study.clips, study.systems, seed)
    server = make_server(store, study.media, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        store.close()


def request(
    server: ListeningServer | str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with http.client (which sends `path` as given, unnormalised): (status, headers, body)."""
    url = server if isinstance(server, str) else server.url
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent = dict(headers or {})
        if data is not None and raw is None:
            sent.setdefault("Content-Type", "application/json")
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def api(server: ListeningServer | str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, _, data = request(server, method, path, body)
    return status, json.loads(data) if data else None
