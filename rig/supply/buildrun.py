"""Running the commands of a kernel build: every line of output to a log file, one
progress line (phase, objects built out of an estimate, elapsed time) to the terminal.

Raw ``make`` output never reaches the terminal; a failure names the log file and
carries the last lines of the failed command's output.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from rig.errors import ConfigError, RigError

#: Lines of a failed command's output kept for the error message.
TAIL_LINES = 40
#: Phases of a build, in order.
PHASES = ("download", "unpack", "patch", "configure", "build", "store")
#: kbuild's quiet output: one line per target made, ``  CC      kernel/fork.o``.
KBUILD_LINE = re.compile(r"^  (CC|AS|HOSTCC|HOSTCXX|HOSTLD|LD|AR|CPP|OBJCOPY|LDS)\s+(\S+)")
#: Seconds between progress lines when the terminal is not a TTY (a CI log).
PLAIN_INTERVAL = 30.0

LogFn = Callable[[str], None]


class KernelBuildError(RigError):
    """Fetching, patching, configuring or building a kernel failed.

    ``str(e)`` starts with a one-line summary (also in :attr:`summary`); for a
    failed command it goes on with the last lines of its output
    (:attr:`log_tail`).
    """

    def __init__(self, summary: str, log_tail: Sequence[str] = ()) -> None:
        self.summary = summary
        self.log_tail = list(log_tail)
        text = summary
        if self.log_tail:
            text += "\n--- last lines of output ---\n" + "\n".join(self.log_tail)
        super().__init__(text)


class UnknownFlavorError(KernelBuildError, ConfigError):
    """The flavor is not known; the one-line message lists the valid ones."""


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


class Progress:
    """The progress line: ``<what>: <phase> <objects>/~<estimate> objects <elapsed>``.

    On a TTY one line is rewritten in place (at most 4 times a second); otherwise a line
    is printed at each phase change and every :data:`PLAIN_INTERVAL` seconds.
    """

    def __init__(self, what: str, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.start = time.monotonic()
        self.phase = ""
        self.objects = 0
        self.estimate: int | None = None
        self._last_draw = 0.0
        self._width = 0

    def line(self) -> str:
        """The current progress text (no newline)."""
        parts = [f"{self.what}: {self.phase:<9}"]
        if self.phase == "build" or self.objects:
            est = f"/~{self.estimate}" if self.estimate else ""
            parts.append(f"{self.objects}{est} objects")
        parts.append(_clock(time.monotonic() - self.start))
        return "  ".join(parts)

    def set_phase(self, phase: str, estimate: int | None = None) -> None:
        if self.phase:  # the previous phase's final state, on a line of its own
            self._draw(force=True, end="\n")
        self.phase = phase
        self.objects = 0
        self.estimate = estimate
        self._draw(force=True)

    def object_built(self) -> None:
        self.objects += 1
        self._draw()

    def tick(self) -> None:
        self._draw()

    def _draw(self, *, force: bool = False, end: str = "") -> None:
        now = time.monotonic()
        if not self.phase:
            return
        interval = 0.25 if self.tty else PLAIN_INTERVAL
        if not force and now - self._last_draw < interval:
            return
        self._last_draw = now
        text = self.line()
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad + end)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, message: str) -> None:
        """End the progress line with ``message`` on a line of its own."""
        if self.tty and self.phase:
            self._draw(force=True, end="\n")
        self.stream.write(message + "\n")
        self.stream.flush()


class BuildRunner:
    """Runs commands for one build: output to ``log_file`` (and ``echo``), progress shown.

    ``echo`` receives every line (messages and command output), for callers that keep
    their own log (the mutant runner); ``progress`` is the terminal line (None: silent).
    """

    def __init__(
        self, log_file: Path, *, progress: Progress | None = None, echo: LogFn | None = None
    ) -> None:
        self.log_file = log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_file.open("w", encoding="utf-8")
        self.progress = progress
        self.echo = echo
        self.objects = 0

    def close(self, *, keep: bool = True) -> None:
        """Close the log; ``keep=False`` deletes it (nothing was built)."""
        self._log.close()
        if not keep:
            self.log_file.unlink(missing_ok=True)

    def _write(self, line: str) -> None:
        self._log.write(line + "\n")
        if self.echo is not None:
            self.echo(line)

    def say(self, message: str) -> None:
        """A line of the build's own narration (log only)."""
        self._write(message)
        self._log.flush()

    def phase(self, phase: str, estimate: int | None = None) -> None:
        """Enter ``phase`` (one of :data:`PHASES`)."""
        self.say(f"kernelbuild: phase {phase}")
        self.objects = 0
        if self.progress is not None:
            self.progress.set_phase(phase, estimate)

    def fail(self, summary: str, tail: Sequence[str] = ()) -> KernelBuildError:
        """The error to raise: ``summary`` naming the full log, plus ``tail``."""
        self.say(f"kernelbuild: FAILED: {summary}")
        return KernelBuildError(f"{summary} (full log: {self.log_file})", tail)

    def run(
        self,
        cmd: Sequence[str | os.PathLike[str]],
        *,
        what: str,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        capture: bool = True,
    ) -> str:
        """Run ``cmd``; its output goes to the log (returned too if ``capture``).

        kbuild's per-target lines count as objects built. Raises
        :class:`KernelBuildError` naming the log file if the command fails.
        """
        full_env = dict(os.environ)
        full_env["LC_ALL"] = "C"
        if env:
            full_env.update(env)
        argv = [os.fspath(c) for c in cmd]
        self.say(f"$ {' '.join(argv)}")
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        out: list[str] = []
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except FileNotFoundError as e:
            raise self.fail(f"{what}: {argv[0]} not found; install guests/linux/build-deps.txt") from e
        assert proc.stdout is not None
        with proc:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                tail.append(line)
                self._write(line)
                if capture:
                    out.append(line)
                if KBUILD_LINE.match(line):
                    self.objects += 1
                    if self.progress is not None:
                        self.progress.object_built()
                elif self.progress is not None:
                    self.progress.tick()
        self._log.flush()
        if proc.returncode != 0:
            raise self.fail(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}", list(tail))
        return "\n".join(out)


def log_path(logs: Path, name: str, keep: int = 10) -> Path:
    """A fresh log file name ``<logs>/<name>-<time>-<pid>.log``; older ones beyond ``keep`` go."""
    logs.mkdir(parents=True, exist_ok=True)
    dated = []
    for p in logs.glob(f"{name}-*.log"):
        with contextlib.suppress(FileNotFoundError):  # another session (or xdist worker) pruned it
            dated.append((p.stat().st_mtime, p))
    old = [p for _, p in sorted(dated)]
    for p in old[: max(0, len(old) - keep + 1)]:
        p.unlink(missing_ok=True)
    return logs / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
