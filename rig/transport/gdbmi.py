"""A GDB/MI session: one GDB process, a reader thread, token-matched synchronous replies.

Modelled on avatar2's GDB protocol: every command carries a numeric token, the reader
thread parses each MI line with pygdbmi's parser and hands the result record to the
caller waiting on that token. Asynchronous ``*stopped`` records go to a queue of their
own. Nothing here sleeps for a fixed time: a wait returns the moment the record it waits
for arrives; the timeout is only an upper bound for a hung GDB or target.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pygdbmi.gdbmiparser import parse_response

from rig.errors import ConfigError, GdbError

#: Lines of GDB output kept for error messages and failure reports.
TRANSCRIPT_LINES = 400


@dataclass
class MiResult:
    """One ``^done``/``^running``/``^connected`` result record and the console text before it."""

    message: str
    payload: dict[str, Any]
    console: str = ""


@dataclass
class _Pending:
    event: threading.Event = field(default_factory=threading.Event)
    record: dict[str, Any] | None = None
    console: list[str] = field(default_factory=list)


def mi_quote(text: str) -> str:
    """Quote ``text`` as an MI c-string argument."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class GdbMi:
    """A running ``gdb --interpreter=mi3``.

    Commands are serialised: :meth:`command` sends one and blocks until its token's
    result record arrives. The process runs in its own session so a Ctrl-C at the
    terminal reaches pytest, not GDB; :meth:`close` (also on ``with`` exit) ends it.
    """

    def __init__(self, gdb: str = "gdb", *, cwd: Path | None = None) -> None:
        path = shutil.which(gdb)
        if path is None:
            raise ConfigError(f"gdb not found ({gdb!r}): install it with `apt-get install gdb`")
        self.transcript: deque[str] = deque(maxlen=TRANSCRIPT_LINES)
        self._stopped: queue.Queue[dict[str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._token = 0
        self._pending: dict[int, _Pending] = {}
        self._current: _Pending | None = None
        self._dead = threading.Event()
        self._answered = 0
        self.path = path
        self.proc = subprocess.Popen(
            [path, "--interpreter=mi3", "-nx", "-q"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name="gdbmi-reader", daemon=True)
        self._reader.start()

    # -- reader thread -------------------------------------------------------------
    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed by close() after its join timed out
            self._read_lines(self.proc.stdout)
        self._dead.set()
        for pend in list(self._pending.values()):
            pend.event.set()
        self._stopped.put({"type": "eof"})

    def _read_lines(self, stdout: Iterable[str]) -> None:
        for line in stdout:
            line = line.rstrip("\n")
            if not line or line == "(gdb) ":
                continue
            self.transcript.append(line)
            try:
                rec = parse_response(line)
            except Exception:  # pragma: no cover - pygdbmi raises on garbage
                continue
            kind = rec.get("type")
            if kind == "result":
                tok = rec.get("token")
                pend = self._pending.get(tok) if tok is not None else None
                if pend is not None:
                    pend.record = rec
                    pend.event.set()
            elif kind == "notify" and rec.get("message") == "stopped":
                self._stopped.put(rec)
            elif kind == "notify" and rec.get("message") == "thread-group-exited":
                self._stopped.put({"type": "target-lost"})
            elif kind in ("console", "target", "log"):
                cur = self._current
                if cur is not None and isinstance(rec.get("payload"), str):
                    cur.console.append(rec["payload"])

    # -- commands ------------------------------------------------------------------
    def command(self, cmd: str, timeout: float = 30.0) -> MiResult:
        """Send one MI command, wait for its result record; raise :class:`GdbError` on ``^error``."""
        with self._lock:
            if self._dead.is_set():
                raise GdbError(self.death(f"while running {cmd!r}"))
            self._token += 1
            tok = self._token
            pend = _Pending()
            self._pending[tok] = pend
            self._current = pend
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(f"{tok}{cmd}\n")
                self.proc.stdin.flush()
                if not pend.event.wait(timeout):
                    raise GdbError(f"gdb gave no answer to {cmd!r} within {timeout:.0f} s")
            except BrokenPipeError:
                raise GdbError(self.death(f"while running {cmd!r}")) from None
            finally:
                self._current = None
                del self._pending[tok]
        rec = pend.record
        if rec is None:
            raise GdbError(self.death(f"while running {cmd!r}"))
        self._answered += 1
        payload = rec.get("payload") or {}
        if rec.get("message") == "error":
            msg = payload.get("msg", "") if isinstance(payload, dict) else str(payload)
            raise GdbError(f"gdb: {cmd.split()[0]}: {msg}")
        return MiResult(rec.get("message", ""), payload, "".join(pend.console))

    def cli(self, text: str, timeout: float = 30.0) -> str:
        """Run a GDB CLI command through MI and return what it printed."""
        return self.command(f"-interpreter-exec console {mi_quote(text)}", timeout).console

    def python(self, code: str, timeout: float = 30.0) -> str:
        """Run a line of Python inside GDB; return what it printed."""
        return self.cli(f"python {code}", timeout)

    def wait_stopped(self, timeout: float) -> dict[str, Any]:
        """Block until the next ``*stopped`` record; return its payload."""
        try:
            rec = self._stopped.get(timeout=timeout)
        except queue.Empty:
            raise GdbError(f"the target did not stop within {timeout:.0f} s") from None
        if rec.get("type") == "target-lost":
            raise GdbError("the remote target went away (QEMU exited or closed the gdbstub)")
        if rec.get("type") == "eof":
            raise GdbError(self.death("while waiting for a stop"))
        payload = rec.get("payload")
        return payload if isinstance(payload, dict) else {}

    def drain_stopped(self) -> None:
        """Forget stop records nobody waited for."""
        while True:
            try:
                self._stopped.get_nowait()
            except queue.Empty:
                return

    def death(self, doing: str) -> str:
        """One line on GDB's exit: its status, ``doing`` (e.g. "while running 'x'"), its
        last output."""
        from rig.transport.host import describe_status

        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        if self.proc.returncode is not None:
            self._reader.join(timeout=2)  # its last words may still be in the pipe
        rc = self.proc.returncode
        status = "an unknown status" if rc is None else describe_status(rc)
        said = f"its last output: {self.tail(3)}" if self.transcript else "it printed nothing"
        hint = "; check --gdb (it must be GNU gdb with MI3)" if self._answered == 0 else ""
        return f"gdb ({self.path}) exited with {status} {doing}; {said}{hint}"

    def tail(self, n: int = 20) -> str:
        """The last ``n`` lines GDB printed, joined by `` | ``."""
        return " | ".join(list(self.transcript)[-n:])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """End GDB: ask politely, then kill its whole process group. Idempotent."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        # the reader sees GDB's end (EOF) first: a stream closed under its read raised
        # "I/O operation on closed file" in the reader thread (a guest closed mid-boot)
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=2)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> GdbMi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
