"""A minimal W3C WebDriver client for Debian's chromium + chromium-driver (no selenium).

Only what the report tests need: open a URL, run a script, take a screenshot. The
driver listens on 127.0.0.1 on a free port; chromium runs headless with a fresh
profile directory that names every process this client starts (so a test can check
none survives).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: The flags NOTES.md gives for chromium on these machines (no network, no sandbox).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


def missing() -> str | None:
    """Why the browser cannot run here (None: it can)."""
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if shutil.which(path) is None:
            return f"{path} not found: install Debian's {pkg} (scripts/setup.sh does)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Seconds chromium's processes get to end after the browser quits.
CHROMIUM_EXIT_SECONDS = 10.0


def profile_processes(profile: Path) -> list[int]:
    """Pids of the live processes whose command line names ``profile``."""
    found = []
    needle = str(profile).encode()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in cmd and state != "Z":
                found.append(int(pid))
    return found


class Browser:
    """One headless chromium driven over WebDriver. Use as a context manager."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 900) -> None:
        self.profile = profile
        self.port = _free_port()
        self.driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.session = ""
        deadline = time.monotonic() + 20
        while True:
            try:
                self._call("GET", "/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if self.driver.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"chromedriver did not answer on 127.0.0.1:{self.port}") from None
                time.sleep(0.05)  # polling a port for a process to come up
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            *CHROMIUM_FLAGS,
                            f"--user-data-dir={profile}",
                            f"--window-size={width},{height}",
                        ],
                    },
                }
            }
        }
        try:
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"WebDriver {method} {path}: {exc.read().decode()[:500]}") from None

    def open(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``arguments`` are ``args``) and return its value."""
        return self._call(
            "POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)}
        )

    def screenshot(self, path: Path) -> Path:
        png = base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return path

    def close(self) -> None:
        if self.session:
            with contextlib.suppress(RuntimeError, OSError):
                self._call("DELETE", f"/session/{self.session}")
            self.session = ""
        if self.driver.poll() is None:
            self.driver.terminate()
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()
        # chromium's renderers end a moment after the browser quits: wait for them (each
        # checked by pid), then kill what is left after the bound, so nothing survives
        deadline = time.monotonic() + CHROMIUM_EXIT_SECONDS
        while (left := profile_processes(self.profile)) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling /proc for processes to end
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
