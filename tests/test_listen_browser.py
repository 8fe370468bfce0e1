"""The listening-test page in a real headless browser: Debian's chromium driven by chromedriver through the
W3C WebDriver HTTP protocol (urllib only; Selenium is not in the venv). The test enters a listener id, rates
every version of two clips with the keyboard, and finds those ratings in the database.

chromium and chromium-driver are installed with apt-get when missing and the tests run as root; otherwise the
test is skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eval.listen import ASPECTS
from tests.test_listen_support import RUN_NAMES, prepare_fake, serving

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
ARROW_RIGHT = "\ue014"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--window-size=1280,1400",
]


def browser_binaries() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing them with apt-get if needed; skips when impossible."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            "chromium/chromedriver missing and not root with apt-get: apt-get install -y chromium chromium-driver"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
            env=env,
            capture_output=True,
            timeout=900,
            check=True,
        )
    except (subprocess.SubprocessError, OSError) as error:
        pytest.skip(f"could not install chromium and chromium-driver with apt-get ({error})")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("apt-get ran but chromium/chromedriver are still not on PATH")
    return chromium, driver


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebDriver:
    """The few W3C WebDriver commands this test needs (https://www.w3.org/TR/webdriver2/)."""

    def __init__(self, base: str, chromium: str, profile: Path):
        self.base = base
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]},
        }
        value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = f"/session/{value['sessionId']}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as error:
            raise AssertionError(f"WebDriver {method} {path}: {error.code} {error.read()[:500]!r}") from None

    def command(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, self.session + path, body)

    def quit(self) -> None:
        self._call("DELETE", self.session)

    def get(self, url: str) -> None:
        self.command("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self.command("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.command("POST", "/elements", {"using": "css selector", "value": css})]

    def click(self, element: str) -> None:
        self.command("POST", f"/element/{element}/click", {})

    def send_keys(self, element: str, text: str) -> None:
        self.command("POST", f"/element/{element}/value", {"text": text})

    def script(self, source: str, *args: Any) -> Any:
        return self.command("POST", "/execute/sync", {"script": source, "args": list(args)})

    def wait_for(self, source: str, *args: Any, timeout: float = 20.0) -> Any:
        """Poll a script until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.script(source, *args)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for: {source}")


@pytest.fixture
def webdriver(tmp_path: Path) -> Iterator[WebDriver]:
    chromium, driver_binary = browser_binaries()
    port = free_port()
    process = subprocess.Popen([driver_binary, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(base + "/status", timeout=2) as response:
                    if json.loads(response.read())["value"]["ready"]:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("chromedriver did not become ready within 20 s")
            time.sleep(0.1)
        driver = WebDriver(base, chromium, tmp_path / "profile")
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        process.terminate()
        process.wait(10)


def test_browser_rates_two_clips_into_the_database(tmp_path: Path, webdriver: WebDriver) -> None:
    _, study = prepare_fake(tmp_path)
    db = tmp_path / "ratings.sqlite"
    given: dict[str, dict[str, int]] = {}  # stimulus token -> the scores the browser set
    with serving(db, study) as server:
        webdriver.get(server.url)
        listener = webdriver.find("#listener")
        webdriver.send_keys(listener, "listener-01")
        webdriver.click(webdriver.find("#login button[type=submit]"))
        for clip_number in (1, 2):
            webdriver.wait_for(
                "return !document.getElementById('test').hidden && "
                "document.getElementById('position').textContent === arguments[0]",
                str(clip_number),
            )
            heading = webdriver.script("return document.getElementById('progress-title').textContent")
            assert " ".join(heading.split()) == f"Clip {clip_number} of 3"
            assert webdriver.script("return document.getElementById('next').disabled") is True
            page = webdriver.script("return document.documentElement.outerHTML")
            for secret in (*RUN_NAMES, "Ground-Truth", *study.clips):  # blinded: no system name, no clip id
                assert secret not in page
            # the browser can play the muxed file: metadata loaded through the server, with its picture size
            webdriver.wait_for(
                "const v = document.querySelector('video'); return v.readyState >= 1 && v.videoWidth > 0"
            )
            assert abs(webdriver.script("return document.querySelector('video').duration") - 2.0) < 0.1
            cards = webdriver.find_all("section.version")
            assert len(cards) == len(study.systems)
            for index, card in enumerate(cards):
                token = webdriver.script("return arguments[0].dataset.stimulus", {ELEMENT: card})
                scores = {}
                for offset, aspect in enumerate(ASPECTS):
                    slider = webdriver.command(
                        "POST", f"/element/{card}/element", {"using": "css selector", "value": f"input[name={aspect}]"}
                    )[ELEMENT]
                    presses = 1 + index * 4 + offset  # distinct per version and aspect
                    webdriver.send_keys(slider, ARROW_RIGHT * presses)  # the keyboard moves a range input
                    scores[aspect] = 50 + presses
                given[token] = scores
                save = webdriver.command(
                    "POST", f"/element/{card}/element", {"using": "css selector", "value": "button.save"}
                )
                webdriver.click(save[ELEMENT])
                webdriver.wait_for("return arguments[0].classList.contains('is-saved')", {ELEMENT: card})
            webdriver.wait_for("return !document.getElementById('next').disabled")
            webdriver.click(webdriver.find("#next"))
        webdriver.wait_for("return document.getElementById('position').textContent === '3'")
        stimuli = server.stimuli
    with sqlite3.connect(db) as connection:
        rows = connection.execute(f"SELECT listener, clip_id, system, {', '.join(ASPECTS)} FROM ratings").fetchall()
    assert len(rows) == 2 * len(study.systems)
    stored = {(clip_id, system): dict(zip(ASPECTS, values)) for listener, clip_id, system, *values in rows}
    assert {row[0] for row in rows} == {"listener-01"}
    assert len({row[1] for row in rows}) == 2
    assert stored == {stimuli[token]: scores for token, scores in given.items()}
