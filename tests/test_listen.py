"""The listening test: clip choice, muxed media, the server's endpoints (blinding, validation, Range, path
traversal), resume and durability. The server runs on port 0 in a thread; requests go through http.client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from eval.listen import GROUND_TRUTH, RatingStore, Study, listener_plan, load_runs, main, pick_clips, prepare_study
from eval.listen.server import parse_range
from eval.listen.study import ASPECTS, common_clips, load_run
from tests import media
from tests.test_listen_support import COMMON, DURATION, FPS, RUN_NAMES, START, api, prepare_fake, request, serving

REPO = Path(__file__).resolve().parents[1]
SCORES = {"audio_quality": 70, "semantic_alignment": 61, "temporal_alignment": 52, "overall_quality": 43}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Study]:
    root = tmp_path_factory.mktemp("listen")
    run_dirs, study = prepare_fake(root)
    return root, run_dirs, study


def ratings_in(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(
            f"SELECT listener, clip_id, system, {', '.join(ASPECTS)} FROM ratings ORDER BY id"
        ).fetchall()


def first_clip(server, listener: str = "ann") -> dict:
    assert api(server, "POST", "/api/listener", {"listener": listener})[0] == 200
    status, state = api(server, "GET", f"/api/next?listener={listener}")
    assert status == 200
    return state


def rate(server, listener: str, clip: str, stimulus: str, scores: dict | None = None) -> tuple[int, dict]:
    return api(
        server,
        "POST",
        "/api/rate",
        {"listener": listener, "clip": clip, "stimulus": stimulus, "scores": scores or SCORES},
    )


# ----------------------------------------------------------------------------------------------- runs and clips
def test_runs_clip_choice_is_seeded_and_common_to_all(fake) -> None:
    _, run_dirs, _ = fake
    runs = load_runs(run_dirs)
    assert [r.name for r in runs] == list(RUN_NAMES)  # second: no run_name, so the folder name
    assert common_clips(runs) == sorted(COMMON)  # clip_x has no WAV, clip_y is in one run only
    assert pick_clips(runs, 2, seed=3) == pick_clips(runs, 2, seed=3)
    assert {tuple(pick_clips(runs, 3, seed=s)) for s in range(20)} != {tuple(pick_clips(runs, 3, seed=0))}
    assert set(pick_clips(runs, 3, seed=1)) == set(COMMON)
    with pytest.raises(ValueError, match="only 3 clips"):
        pick_clips(runs, 4, seed=0)


def test_bad_run_folders_fail_with_the_file_and_reason(tmp_path: Path, fake) -> None:
    _, run_dirs, _ = fake
    with pytest.raises(FileNotFoundError, match="results.json: missing"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text('{"run_name": "x", "split": "test"}')
    with pytest.raises(ValueError, match="lacks shards, clips"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="share the name"):
        load_runs([run_dirs[0], run_dirs[0]])


def test_media_hold_the_window_with_h264_and_aac_made_once(fake) -> None:
    root, run_dirs, study = fake
    assert set(study.media) == {(c, s) for c in study.clips for s in study.systems}
    assert len(set(study.media.values())) == len(study.media)
    for path in study.media.values():
        with av.open(str(path)) as container:
            video, audio = container.streams.video[0], container.streams.audio[0]
            assert (video.codec_context.name, audio.codec_context.name) == ("h264", "aac")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        # the source's frame i (at i / FPS s) carries index i: the file starts at START and lasts DURATION
        assert media.frame_index(frames[0]) == round(START * FPS)
        assert len(frames) == round(DURATION * FPS)
        assert path.read_bytes()[4:8] == b"ftyp" and path.read_bytes().find(b"moov") < path.read_bytes().find(b"mdat")
    for clip_id in study.clips:  # the picture is cut once per clip: every version carries the same video packets
        pictures = set()
        for system in study.systems:
            with av.open(str(study.media[(clip_id, system)])) as container:
                pictures.add(b"".join(bytes(packet) for packet in container.demux(video=0)))
        assert len(pictures) == 1
    before = {p: p.stat().st_mtime_ns for p in study.media.values()}
    again = prepare_study(load_runs(run_dirs), study.clips, root / "work", log=lambda _: None)
    assert again.media == study.media and {p: p.stat().st_mtime_ns for p in again.media.values()} == before


def test_listener_plan_is_a_stable_permutation_per_listener() -> None:
    clips, systems = [f"c{i}" for i in range(8)], ["G", "A", "B", "C"]
    plan = listener_plan(0, "ann", clips, systems)
    assert plan == listener_plan(0, "ann", clips, systems)
    assert sorted(c for c, _ in plan) == clips and all(sorted(s) == sorted(systems) for _, s in plan)
    assert plan != listener_plan(0, "bob", clips, systems) and plan != listener_plan(1, "ann", clips, systems)


# ----------------------------------------------------------------------------------------------- the server
def test_page_and_next_clip_are_blinded(tmp_path: Path, fake) -> None:
    _, _, study = fake
    with serving(tmp_path / "db.sqlite", study) as server:
        status, headers, page = request(server, "GET", "/")
        assert status == 200 and headers["content-type"].startswith("text/html") and b"Listener ID" in page
        assert request(server, "GET", "/app.js")[0] == 200 and request(server, "GET", "/style.css")[0] == 200
        state = first_clip(server)
        assert (state["position"], state["total"], state["done"]) == (1, 3, False)
        assert [v["label"] for v in state["versions"]] == ["A", "B", "C"]
        text = json.dumps(state)
        for secret in (*RUN_NAMES, GROUND_TRUTH, *study.clips, "wav", "mp4", str(tmp_path)):
            assert secret not in text
        tokens = {v["stimulus"] for v in state["versions"]}
        assert len(tokens) == 3 and state["clip"] not in tokens
        assert {server.stimuli[t][1] for t in tokens} == set(study.systems)
        assert len({server.stimuli[t][0] for t in tokens}) == 1


def test_rating_is_stored_then_the_next_clip_follows_and_resumes_after_restart(tmp_path: Path, fake) -> None:
    _, _, study = fake
    db = tmp_path / "db.sqlite"
    with serving(db, study) as server:
        state = first_clip(server)
        first = state["versions"]
        for version in first:
            assert rate(server, "ann", state["clip"], version["stimulus"])[0] == 201
        status, second = api(server, "GET", "/api/next?listener=ann")
        assert (second["position"], second["completed"]) == (2, 1) and second["clip"] != state["clip"]
        assert (
            rate(server, "ann", second["clip"], second["versions"][1]["stimulus"], {**SCORES, "overall_quality": 9})[0]
            == 201
        )
        expected_clip = server.stimuli[first[0]["stimulus"]][0]
    assert len(ratings_in(db)) == 4 and {r[1] for r in ratings_in(db)[:3]} == {expected_clip}
    with serving(db, study) as server:  # a new server process on the same database: same tokens, same place
        status, resumed = api(server, "GET", "/api/next?listener=ann")
        assert status == 200 and resumed["clip"] == second["clip"] and resumed["position"] == 2
        assert [v["stimulus"] for v in resumed["versions"]] == [v["stimulus"] for v in second["versions"]]
        assert [v["scores"] for v in resumed["versions"]] == [None, {**SCORES, "overall_quality": 9}, None]
        assert api(server, "POST", "/api/listener", {"listener": "ann"})[1] == {
            "listener": "ann",
            "new": False,
            "total": 3,
            "completed": 1,
        }
        # another listener starts from zero, in an order of their own
        assert first_clip(server, "bob")["position"] == 1


def test_finishing_every_clip_reports_done(tmp_path: Path, fake) -> None:
    _, _, study = fake
    with serving(tmp_path / "db.sqlite", study) as server:
        state = first_clip(server)
        while not state["done"]:
            for version in state["versions"]:
                assert rate(server, "ann", state["clip"], version["stimulus"])[0] == 201
            state = api(server, "GET", "/api/next?listener=ann")[1]
        assert (state["completed"], state["total"]) == (3, 3)
    assert len(ratings_in(tmp_path / "db.sqlite")) == 9


def test_a_listener_cannot_rate_the_same_version_twice(tmp_path: Path, fake) -> None:
    _, _, study = fake
    db = tmp_path / "db.sqlite"
    with serving(db, study) as server:
        state = first_clip(server)
        stimulus = state["versions"][0]["stimulus"]
        assert rate(server, "ann", state["clip"], stimulus)[0] == 201
        status, answer = rate(server, "ann", state["clip"], stimulus, {a: 0 for a in ASPECTS})
        assert status == 409 and "already rated" in answer["error"]
        assert [r[3:] for r in ratings_in(db)] == [tuple(SCORES.values())]  # the first rating stands
        first_clip(server, "bob")
        assert rate(server, "bob", state["clip"], stimulus)[0] == 201  # another listener may
    store = RatingStore(db)
    try:
        clip_id, system = ratings_in(db)[0][1:3]
        with pytest.raises(Exception, match="already rated"):
            store.add_rating("ann", clip_id, system, SCORES)  # the database itself refuses (UNIQUE)
    finally:
        store.close()


BAD_SCORES = [
    {**SCORES, "audio_quality": 101},
    {**SCORES, "audio_quality": -1},
    {**SCORES, "audio_quality": 50.5},
    {**SCORES, "audio_quality": 50.0},
    {**SCORES, "audio_quality": "50"},
    {**SCORES, "audio_quality": True},
    {**SCORES, "audio_quality": None},
    {k: v for k, v in SCORES.items() if k != "overall_quality"},
    {**SCORES, "loudness": 50},
    [70, 61, 52, 43],
    "70",
]


@pytest.mark.parametrize("scores", BAD_SCORES, ids=range(len(BAD_SCORES)))
def test_invalid_scores_get_400_and_change_nothing(tmp_path: Path, fake, scores) -> None:
    _, _, study = fake
    db = tmp_path / "db.sqlite"
    with serving(db, study) as server:
        state = first_clip(server)
        status, answer = rate(server, "ann", state["clip"], state["versions"][0]["stimulus"], scores)
        assert status == 400 and "error" in answer
    assert ratings_in(db) == []


def test_bad_requests_get_4xx_and_change_nothing(tmp_path: Path, fake) -> None:
    _, _, study = fake
    db = tmp_path / "db.sqlite"
    with serving(db, study) as server:
        state = first_clip(server)
        clip, stimulus = state["clip"], state["versions"][0]["stimulus"]
        other_clip = next(t for c, t in server.clip_tokens.items() if t != clip)
        body = {"listener": "ann", "clip": clip, "stimulus": stimulus, "scores": SCORES}
        json_type = {"Content-Type": "application/json"}
        cases = {
            "unknown stimulus": (404, {**body, "stimulus": "AAAAAAAAAAAAAAAA"}),
            "unknown clip": (404, {**body, "clip": "AAAAAAAAAAAAAAAA"}),
            "clip of another stimulus": (404, {**body, "clip": other_clip}),
            "unknown listener": (404, {**body, "listener": "zoe"}),
            "bad listener id": (400, {**body, "listener": "../ann"}),
            "missing field": (400, {k: v for k, v in body.items() if k != "clip"}),
            "extra field": (400, {**body, "system": "VTA-SAM"}),
            "not an object": (400, [body]),
            "stimulus not a string": (404, {**body, "stimulus": 5}),
        }
        for name, (expected, payload) in cases.items():
            assert api(server, "POST", "/api/rate", payload)[0] == expected, name
        raw_cases = {
            "malformed JSON": (400, b'{"listener": "ann",', json_type),
            "not UTF-8": (400, b'{"listener": "\xff"}', json_type),
            "oversized": (413, json.dumps({**body, "pad": "x" * 10_000}).encode(), json_type),
            "form post": (415, json.dumps(body).encode(), {"Content-Type": "application/x-www-form-urlencoded"}),
        }
        for name, (expected, raw, headers) in raw_cases.items():
            assert request(server, "POST", "/api/rate", raw=raw, headers=headers)[0] == expected, name
        # a huge announced body is refused from its headers, without waiting for (or reading) the body
        host, port = str(server.server_address[0]), int(server.server_address[1])
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(
                f"POST /api/rate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {1 << 30}\r\n\r\n{{".encode()
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
        assert request(server, "POST", "/api/rate", raw=b"", headers={"Transfer-Encoding": "chunked"})[0] == 411
        assert api(server, "POST", "/api/listener", {"listener": "a b"})[0] == 400
        assert api(server, "POST", "/api/listener", {"listener": "x" * 65})[0] == 400
        assert api(server, "POST", "/api/listener", {"name": "ann"})[0] == 400
        assert api(server, "GET", "/api/next?listener=zoe")[0] == 404
        assert api(server, "GET", "/api/next")[0] == 400
        assert api(server, "POST", "/api/nothing", {})[0] == 404
        assert request(server, "GET", "/", headers={"Host": "evil.example:80"})[0] == 400  # DNS rebinding
        assert rate(server, "ann", clip, stimulus)[0] == 201  # the connection handling survived all that
    assert len(ratings_in(db)) == 1
    with sqlite3.connect(db) as connection:
        assert [r[0] for r in connection.execute("SELECT listener FROM listeners")] == ["ann"]


def test_media_only_registered_files_with_ranges(tmp_path: Path, fake) -> None:
    _, _, study = fake
    with serving(tmp_path / "db.sqlite", study) as server:
        state = first_clip(server)
        src = state["versions"][0]["src"]
        data = server.media[src.rsplit("/", 1)[1]].read_bytes()
        size = len(data)
        status, headers, body = request(server, "GET", src)
        assert (status, body, headers["content-type"], headers["accept-ranges"]) == (200, data, "video/mp4", "bytes")
        for header, first, last in (
            ("bytes=0-99", 0, 99),
            ("bytes=100-", 100, size - 1),
            ("bytes=-10", size - 10, size - 1),
            (f"bytes=5-{size + 50}", 5, size - 1),
        ):
            status, headers, body = request(server, "GET", src, headers={"Range": header})
            assert status == 206 and body == data[first : last + 1], header
            assert headers["content-range"] == f"bytes {first}-{last}/{size}"
        for header in (f"bytes={size}-", "bytes=9-2", "bytes=abc", "bytes=-0"):
            status, headers, _ = request(server, "GET", src, headers={"Range": header})
            assert status == 416 and headers["content-range"] == f"bytes */{size}", header
        assert request(server, "GET", src, headers={"Range": "bytes=0-1,5-9"})[2] == data  # several ranges: whole file
        status, headers, body = request(server, "HEAD", src)
        assert (status, body, int(headers["content-length"])) == (200, b"", size)
        passwd = Path("/etc/passwd").read_bytes()[:20]
        for path in (
            "/media/../../etc/passwd",
            "/media/..%2F..%2Fetc%2Fpasswd",
            "/media/%2e%2e/%2e%2e/etc/passwd",
            "/../../etc/passwd",
            f"{src}/../../../etc/passwd",
            "/media/",
            "/media/AAAAAAAAAAAA",
            "/static/../cli.py",
            "/app.js/../../cli.py",
            "//etc/passwd",
            "/media//etc/passwd",
        ):
            status, _, body = request(server, "GET", path)
            assert status == 404 and passwd not in body, path


def test_parse_range_by_hand() -> None:
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=-30", 10) == (0, 9)
    assert parse_range("items=0-3", 10) is None


def test_a_killed_server_loses_no_acknowledged_rating(tmp_path: Path, fake) -> None:
    root, run_dirs, study = fake
    db = tmp_path / "db.sqlite"
    command = [
        sys.executable,
        "-m",
        "eval.listen",
        *map(str, run_dirs),
        "--clips",
        "3",
        "--port",
        "0",
        "--work",
        str(root / "work"),
        "--db",
        str(db),
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        line = process.stdout.readline()  # prints its URL once it serves
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, f"no URL in {line!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"
        url = match.group(0)
        state = first_clip(url)
        for version in state["versions"][:2]:
            assert rate(url, "ann", state["clip"], version["stimulus"])[0] == 201
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdout.close()
        process.stderr.close()
    assert len(ratings_in(db)) == 2
    with serving(db, study) as server:  # same database, new server: the listener continues on that clip
        resumed = api(server, "GET", "/api/next?listener=ann")[1]
        assert resumed["clip"] == state["clip"] and [v["scores"] is not None for v in resumed["versions"]] == [
            True,
            True,
            False,
        ]


def test_a_database_keeps_its_study(tmp_path: Path, fake, capsys: pytest.CaptureFixture[str]) -> None:
    root, run_dirs, study = fake
    db = tmp_path / "db.sqlite"
    store = RatingStore(db)
    stored = store.register_study(["clip_b"], study.systems, 5)
    assert store.register_study(study.clips, study.systems, 0) == stored  # the first registration stands
    store.close()
    assert main([str(run_dirs[0]), "--work", str(root / "work"), "--db", str(db), "--prepare-only"]) == 1
    assert "holds a test of Ground-Truth, VTA-SAM, baseline, not of Ground-Truth, VTA-SAM" in capsys.readouterr().err
    args = [*map(str, run_dirs), "--work", str(root / "work"), "--db", str(db), "--prepare-only"]
    assert main(args) == 0  # the same systems: the stored single clip and seed 5 are kept
    assert "resuming" in capsys.readouterr().err
    check = RatingStore(db)
    kept = check.study()
    check.close()
    assert kept is not None and (kept["clips"], kept["seed"]) == (["clip_b"], 5)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--report", str(tmp_path / "none.sqlite")]) == 1
    assert "none.sqlite: no such database" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 1
    assert "results.json: missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])


def test_loudness_is_levelled_across_tracks() -> None:
    from eval.listen.study import PEAK_DBFS, TARGET_RMS_DBFS, normalise_loudness

    rng = np.random.default_rng(0)
    quiet, loud = 0.01 * rng.standard_normal(16000), 0.3 * rng.standard_normal(16000)
    for wave in (quiet, loud):
        out = normalise_loudness(wave)
        rms_db = 20 * np.log10(np.sqrt(np.mean(out.astype(np.float64) ** 2)))
        assert abs(rms_db - TARGET_RMS_DBFS) < 0.01  # noise: the peak limit does not bind
    click = np.zeros(16000)
    click[100] = 0.5  # one sample: the peak limit wins over the RMS target
    assert abs(np.abs(normalise_loudness(click)).max() - 10 ** (PEAK_DBFS / 20)) < 1e-6
    assert not normalise_loudness(np.zeros(100)).any()


def test_a_failing_database_gets_500_and_the_server_keeps_serving(tmp_path: Path, fake) -> None:
    _, _, study = fake
    with serving(tmp_path / "db.sqlite", study) as server:
        server.store.close()  # every query now raises sqlite3.ProgrammingError
        status, answer = api(server, "POST", "/api/listener", {"listener": "ann"})
        assert status == 500 and "nothing was saved" in answer["error"]
        assert request(server, "GET", "/")[0] == 200


# ------------------------------------------------------------------------------------- hostile requests
def exchange(server, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes on one connection and read what comes back until the server closes it (or `timeout`
    passes without a byte: a server that keeps the connection open)."""
    host, port = str(server.server_address[0]), int(server.server_address[1])
    received = b""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def statuses(answer: bytes) -> list[int]:
    """The status of every response in `answer` (a response may follow the previous body on the same line)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def post_bytes(host: str, path: str, body: bytes, method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def listeners_in(db: Path) -> list[str]:
    with sqlite3.connect(db) as connection:
        return [r[0] for r in connection.execute("SELECT listener FROM listeners ORDER BY listener")]


def test_the_host_header_must_be_a_loopback_name_exactly(tmp_path: Path, fake) -> None:
    """DNS rebinding: a name that merely starts with a loopback name is the attacker's domain."""
    _, _, study = fake
    with serving(tmp_path / "db.sqlite", study) as server:
        port = int(server.server_address[1])
        refused = ["127.0.0.1.evil.com", f"127.0.0.1.evil.com:{port}", f"localhost.evil.com:{port}", "127.1.2.3",
                   f"evil.com:{port}", "127.0.0.1:1", "::1", ""]
        for host in refused:
            answer = exchange(server, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert statuses(answer) == [400], host
        answer = exchange(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.com\r\nConnection: close\r\n\r\n")
        assert statuses(answer) == [400]  # two Host headers
        for host in ["127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", f"[::1]:{port}"]:
            answer = exchange(server, f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert statuses(answer) == [200], host


def test_a_request_inside_an_unread_body_is_never_served(tmp_path: Path, fake) -> None:
    """A POST refused for its Host header (before its body is read), and a GET carrying a body, each smuggle a
    complete second request in that body: the server answers the first one alone and closes the connection."""
    _, _, study = fake
    db = tmp_path / "db.sqlite"
    with serving(db, study) as server:
        good = f"127.0.0.1:{int(server.server_address[1])}"
        inner = post_bytes(good, "/api/listener", json.dumps({"listener": "mallory"}).encode())
        answer = exchange(server, post_bytes("evil.example", "/api/listener", inner))
        assert statuses(answer) == [400] and b"Connection: close" in answer
        answer = exchange(server, post_bytes(good, "/", inner, method="GET"))
        assert statuses(answer) == [200] and b"Connection: close" in answer
        # a body read in full keeps the connection: two pipelined requests get two answers
        two = post_bytes(good, "/api/listener", b'{"listener": "ann"}') + post_bytes(good, "/api/nothing", b"{}")
        assert statuses(exchange(server, two, timeout=1.0)) == [200, 404]
    assert listeners_in(db) == ["ann"]


def test_a_listener_id_with_a_final_newline_is_refused(tmp_path: Path, fake) -> None:
    _, _, study = fake
    db = tmp_path / "db.sqlite"
    with serving(db, study) as server:
        assert api(server, "POST", "/api/listener", {"listener": "ann"})[0] == 200
        assert api(server, "POST", "/api/listener", {"listener": "ann\n"})[0] == 400
        assert api(server, "GET", "/api/next?listener=ann%0A")[0] == 400
        with pytest.raises(ValueError, match="listener id"):
            server.store.add_listener("bob\n")
    assert listeners_in(db) == ["ann"]


def test_deeply_nested_json_is_a_400(tmp_path: Path, fake) -> None:
    _, _, study = fake
    with serving(tmp_path / "db.sqlite", study) as server:
        for raw in (b"[" * 4000, b'{"listener": ' + b"[" * 2000 + b"]" * 2000 + b"}"):
            status, _, data = request(server, "POST", "/api/listener", raw=raw,
                                      headers={"Content-Type": "application/json"})
            assert status == 400 and b"nested too deeply" in data
        assert api(server, "POST", "/api/listener", {"listener": "ann"})[0] == 200


def test_a_file_that_is_no_database_and_a_port_out_of_range_are_one_line(tmp_path: Path, fake,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--db naming another kind of file was sqlite3's traceback; --port 70000 failed in bind() after every video
    was muxed."""
    root, run_dirs, _ = fake
    notes = tmp_path / "notes.sqlite"
    notes.write_text("not a database, but long enough for SQLite to read its header: " * 4)
    args = [*map(str, run_dirs), "--work", str(root / "work"), "--prepare-only"]
    assert main([*args, "--db", str(notes)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {notes}: not a ratings database (") and "\n" not in err, err
    with pytest.raises(SystemExit):
        main([*args, "--port", "70000"])
    assert "argument --port: 70000 is not a port (0-65535; 0: any free port)" in capsys.readouterr().err
