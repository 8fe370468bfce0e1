"""The listening-test web app: a standard-library HTTP server (ThreadingHTTPServer) in front of a RatingStore.

Routes (nothing else is served; no part of a request path ever reaches the file system):

    GET  /, /app.js, /style.css        the page (files of this package, read once at start)
    GET  /media/<token>                one registered mp4 (HTTP Range supported: browsers seek with it)
    POST /api/listener  {"listener"}   register or resume a listener -> {"listener", "total", "completed"}
    GET  /api/next?listener=ID         the listener's next clip: {"done", "position", "total", "clip", "versions"}
    POST /api/rate  {"listener", "clip", "stimulus", "scores": {aspect: int}}   -> 201; 409 if already rated

Blinding: the page sees only random tokens (one per clip, one per (clip, system)) and the letters A, B, C, ...
of a per-listener random order; system names and clip ids stay in the database.
Bad input gets a 4xx JSON {"error": ...} and changes nothing: 400 malformed or invalid (JSON nested too deeply
included), 404 unknown listener or token, 409 duplicate, 411 no length, 413 body over MAX_BODY bytes, 415 not
JSON, 416 bad range.

Bound to a loopback address, the server answers only requests whose Host header is exactly a loopback name
(127.0.0.1, localhost, [::1] or the bound address, with or without the server's port), so that a page served
from elsewhere cannot reach it by DNS rebinding. A request whose body is not read (refused before reading it,
or a GET/HEAD that carries one) gets its answer with `Connection: close` and the connection is closed: bytes
of an unread body are never parsed as a further request. Patterns are matched whole (`fullmatch`: `$` alone
would accept a final newline).

It stays on the standard library's http.server: the page, the API and the database need nothing more, and a
server framework would add dependencies to a tool run by hand on a laptop.
"""

from __future__ import annotations

import json
import random
import re
import socket
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from eval.listen.store import DuplicateRating, RatingStore, valid_listener, valid_scores
from eval.listen.study import ASPECT_TITLES, ASPECTS

MAX_BODY = 4096  # bytes; a rating is ~200
CHUNK = 256 * 1024
DRAIN_LIMIT = 1 << 20  # an oversized body up to this size is read and dropped, so the client gets its 413 cleanly
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")
RANGE_PATTERN = re.compile(r"(?P<first>\d*)-(?P<last>\d*)")
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")  # what a Host header may name on a loopback bind
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; media-src 'self'; object-src 'none'; frame-ancestors 'none'",
}


class HttpError(Exception):
    """An answer other than success: status, a one-line message for the JSON body, extra headers."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def listener_plan(seed: int, listener: str, clips: list[str], systems: list[str]) -> list[tuple[str, list[str]]]:
    """The listener's clip order and, per clip, the order of its versions: both shuffled by a generator seeded
    with (study seed, listener id), so a returning listener (or a restarted server) sees the same order."""
    rng = random.Random(f"{seed}:{listener}")  # str seeds hash with SHA-512: stable across runs and machines
    order = rng.sample(clips, len(clips))
    return [(clip_id, rng.sample(systems, len(systems))) for clip_id in order]


def allowed_hosts(bound: str, port: int) -> set[str]:
    """The Host header values a server bound to the loopback address `bound` on `port` answers (lower case):
    each loopback name and the bound address, alone or with ':<port>'; nothing else, not even a longer name
    that starts with one of them."""
    names = {*LOCAL_NAMES, f"[{bound}]" if ":" in bound else bound}
    return names | {f"{name}:{port}" for name in names}


def version_label(index: int) -> str:
    """A, B, ..., Z, AA, AB, ... (the only name a version has on the page)."""
    label = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        label = chr(ord("A") + rest) + label
    return label


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=first-last`, `bytes=first-` or `bytes=-suffix` range (RFC 9110
    14.1.2), clipped to the file; None to send the whole file (several ranges, or another unit: a server may
    ignore Range). Raises HttpError 416 for a malformed range or one that starts past the end."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = RANGE_PATTERN.fullmatch(spec.strip())
    unsatisfiable = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
    if match is None or not (match["first"] or match["last"]):
        raise HttpError(unsatisfiable, f"malformed range {header!r}", {"Content-Range": f"bytes */{size}"})
    if match["first"]:
        first = int(match["first"])
        last = int(match["last"]) if match["last"] else size - 1
    else:  # suffix range: the last N bytes
        first, last = max(0, size - int(match["last"])), size - 1
    if last < first or first >= size:
        raise HttpError(
            unsatisfiable, f"range {header!r} outside the file ({size} bytes)", {"Content-Range": f"bytes */{size}"}
        )
    return first, min(last, size - 1)


class ListeningServer(ThreadingHTTPServer):
    """Holds the study and the store; one handler thread per connection."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], store: RatingStore, media: dict[tuple[str, str], Path]):
        study = store.study()
        if study is None:
            raise ValueError(f"{store.path}: holds no study (register_study first)")
        self.store = store
        self.clips: list[str] = study["clips"]
        self.systems: list[str] = study["systems"]
        self.seed: int = study["seed"]
        self.clip_tokens = store.clip_tokens()
        self.stimuli = store.stimulus_tokens()  # token -> (clip id, system)
        missing = [key for key in self.stimuli.values() if key not in media]
        if missing:
            raise ValueError(
                f"no media file for {len(missing)} stimuli, e.g. clip {missing[0][0]!r} of {missing[0][1]!r}"
            )
        # The only files this server ever opens: token -> path, fixed now.
        self.media: dict[str, Path] = {token: Path(media[key]) for token, key in self.stimuli.items()}
        package = resources.files("eval.listen") / "static"
        self.static = {route: ((package / name).read_bytes(), kind) for route, (name, kind) in STATIC.items()}
        super().__init__(address, ListeningHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def next_clip(self, listener: str) -> dict[str, Any]:
        """The first clip of the listener's plan with a version not yet rated (the resume point)."""
        rated = self.store.ratings_of(listener)
        plan = listener_plan(self.seed, listener, self.clips, self.systems)
        completed = sum(all((c, s) in rated for s in systems) for c, systems in plan)
        for clip_id, systems in plan:
            if all((clip_id, s) in rated for s in systems):
                continue
            tokens = {system: token for token, (c, system) in self.stimuli.items() if c == clip_id}
            versions = [
                {
                    "label": version_label(i),
                    "stimulus": tokens[s],
                    "src": f"/media/{tokens[s]}",
                    "scores": rated.get((clip_id, s)),
                }
                for i, s in enumerate(systems)
            ]
            return {
                "done": False,
                "position": completed + 1,
                "total": len(plan),
                "completed": completed,
                "clip": self.clip_tokens[clip_id],
                "versions": versions,
            }
        return {"done": True, "position": len(plan), "total": len(plan), "completed": completed}


class ListeningHandler(BaseHTTPRequestHandler):
    server: ListeningServer
    server_version = "vta-sam-listen/1"
    protocol_version = "HTTP/1.1"  # keep-alive: a video fetches many ranges

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per request would bury the experimenter's console; errors are still logged

    # ------------------------------------------------------------------------------------------ dispatching
    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        self.body_read = False  # set by _read_json: an answer before that closes the connection
        try:
            self._check_host()
            path = urlsplit(self.path).path
            body = self._read_json()
            if path == "/api/listener":
                self._send_json(HTTPStatus.OK, self._register(body))
            elif path == "/api/rate":
                self._send_json(HTTPStatus.CREATED, self._rate(body))
            else:
                raise HttpError(HTTPStatus.NOT_FOUND, "no such endpoint")
        except HttpError as error:
            if not self.body_read:  # its bytes are still in the stream: they must not be read as a request
                self.close_connection = True
            self._send_error(error)
        except Exception as error:  # a bug or a database failure: say so, keep serving the others
            self._internal_error(error)

    def _internal_error(self, error: Exception) -> None:
        self.log_error("%s %s failed: %r", self.command, self.path, error)
        self.close_connection = True
        self._send_error(HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server console); nothing was saved"))

    def _dispatch(self, head: bool) -> None:
        if self.headers.get("Transfer-Encoding") or (self.headers.get("Content-Length") or "0").strip() != "0":
            self.close_connection = True  # a body on GET/HEAD is never read: close rather than parse it as a request
        try:
            self._check_host()
            parts = urlsplit(self.path)
            if parts.path in self.server.static:
                data, kind = self.server.static[parts.path]
                self._send_bytes(HTTPStatus.OK, data, kind, head=head)
            elif parts.path.startswith("/media/"):
                self._send_media(parts.path[len("/media/") :], head)
            elif parts.path == "/api/next":
                query = parse_qs(parts.query)
                listener = self._known_listener((query.get("listener") or [""])[0])
                self._send_json(HTTPStatus.OK, self.server.next_clip(listener), head=head)
            elif parts.path == "/api/aspects":
                self._send_json(
                    HTTPStatus.OK, {"aspects": [{"key": a, "title": ASPECT_TITLES[a]} for a in ASPECTS]}, head=head
                )
            else:
                raise HttpError(HTTPStatus.NOT_FOUND, "not found")
        except HttpError as error:
            self._send_error(error, head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser dropped a media request (it seeks by opening a new one)
        except Exception as error:
            self._internal_error(error)

    # ---------------------------------------------------------------------------------------------- checks
    def _check_host(self) -> None:
        """On a loopback address, answer only requests whose one Host header is exactly a loopback name, alone or
        with the server's port (`allowed_hosts`): a web page elsewhere cannot then reach the server through DNS
        rebinding, whose Host header names the attacker's domain (e.g. 127.0.0.1.evil.example)."""
        bound = str(self.server.server_address[0])
        if bound != "::1" and not bound.startswith("127."):
            return
        hosts = self.headers.get_all("Host") or []
        host = hosts[0].strip().lower() if len(hosts) == 1 else ""
        if host not in allowed_hosts(bound, int(self.server.server_address[1])):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"unexpected Host header {', '.join(hosts)!r}")

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length, not a chunked body")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self.close_connection = True
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if length > MAX_BODY:
            if length <= DRAIN_LIMIT:
                self.rfile.read(length)
                self.body_read = True
            else:
                self.close_connection = True  # the unread body must not be parsed as the next request
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
        data = self.rfile.read(length)
        self.body_read = True
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind != "application/json":  # also keeps plain cross-site form posts out (they cannot send JSON)
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HttpError(HTTPStatus.BAD_REQUEST, "malformed JSON") from None
        except RecursionError:  # json's decoder recurses per nesting level; MAX_BODY bytes of '[' exceed the limit
            raise HttpError(HTTPStatus.BAD_REQUEST, "JSON nested too deeply") from None

    def _known_listener(self, listener: Any) -> str:
        if not valid_listener(listener):
            raise HttpError(HTTPStatus.BAD_REQUEST, "listener id: 1-64 letters, digits, '.', '_' or '-'")
        if not self.server.store.has_listener(listener):
            raise HttpError(HTTPStatus.NOT_FOUND, "unknown listener: register first")
        return listener

    # ---------------------------------------------------------------------------------------------- API
    def _register(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) != {"listener"}:
            raise HttpError(HTTPStatus.BAD_REQUEST, 'expected {"listener": "<id>"}')
        listener = body["listener"]
        if not valid_listener(listener):
            raise HttpError(HTTPStatus.BAD_REQUEST, "listener id: 1-64 letters, digits, '.', '_' or '-'")
        created = self.server.store.add_listener(listener)
        state = self.server.next_clip(listener)
        return {"listener": listener, "new": created, "total": state["total"], "completed": state["completed"]}

    def _rate(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) != {"listener", "clip", "stimulus", "scores"}:
            raise HttpError(HTTPStatus.BAD_REQUEST, 'expected {"listener", "clip", "stimulus", "scores"}')
        if not valid_scores(body["scores"]):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"scores: an integer 0..100 for each of {', '.join(ASPECTS)}")
        listener = self._known_listener(body["listener"])
        clip_token, stimulus = body["clip"], body["stimulus"]
        if not isinstance(stimulus, str) or stimulus not in self.server.stimuli:
            raise HttpError(HTTPStatus.NOT_FOUND, "unknown stimulus token")
        clip_id, system = self.server.stimuli[stimulus]
        if not isinstance(clip_token, str) or self.server.clip_tokens.get(clip_id) != clip_token:
            raise HttpError(HTTPStatus.NOT_FOUND, "unknown clip token (or not the clip of this stimulus)")
        try:
            self.server.store.add_rating(listener, clip_id, system, body["scores"])
        except DuplicateRating:
            raise HttpError(HTTPStatus.CONFLICT, "already rated: each version is rated once") from None
        state = self.server.next_clip(listener)
        return {"saved": True, "completed": state["completed"], "total": state["total"]}

    # ---------------------------------------------------------------------------------------------- sending
    def _headers(self, status: HTTPStatus, kind: str, length: int, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(length))
        for name, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send_bytes(
        self, status: HTTPStatus, data: bytes, kind: str, head: bool = False, cache: str = "no-cache"
    ) -> None:
        self._headers(status, kind, len(data), {"Cache-Control": cache})
        if not head:
            self.wfile.write(data)

    def _send_json(self, status: HTTPStatus, payload: Any, head: bool = False) -> None:
        self._send_bytes(status, json.dumps(payload).encode("utf-8"), "application/json", head=head, cache="no-store")

    def _send_error(self, error: HttpError, head: bool = False) -> None:
        data = json.dumps({"error": error.message}).encode("utf-8")
        self._headers(error.status, "application/json", len(data), {"Cache-Control": "no-store", **error.headers})
        if not head:
            self.wfile.write(data)

    def _send_media(self, token: str, head: bool) -> None:
        """One registered file, whole (200) or one byte range (206). The token is only a dictionary key."""
        path = self.server.media.get(token) if TOKEN_PATTERN.fullmatch(token) else None
        if path is None:
            raise HttpError(HTTPStatus.NOT_FOUND, "not found")
        size = path.stat().st_size
        extra = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=3600"}
        span = parse_range(self.headers["Range"], size) if self.headers.get("Range") else None
        if span is None:
            first, last, status = 0, size - 1, HTTPStatus.OK
        else:
            (first, last), status = span, HTTPStatus.PARTIAL_CONTENT
            extra["Content-Range"] = f"bytes {first}-{last}/{size}"
        self._headers(status, "video/mp4", last - first + 1, extra)
        if head:
            return
        with open(path, "rb") as handle:
            handle.seek(first)
            remaining = last - first + 1
            while remaining > 0:
                chunk = handle.read(min(CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


def make_server(
    store: RatingStore, media: dict[tuple[str, str], Path], host: str = "127.0.0.1", port: int = 0
) -> ListeningServer:
    """A server bound to (host, port) (port 0: any free port); call serve_forever() on it (or in a thread)."""
    server_class = (
        type("ListeningServer6", (ListeningServer,), {"address_family": socket.AF_INET6})
        if ":" in host
        else ListeningServer
    )
    return server_class((host, port), store, media)
