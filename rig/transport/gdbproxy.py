"""A transparent RSP relay between GDB and QEMU's gdbstub that the rig can borrow.

QEMU's gdbstub serves one client. GDB is that client for everything it is good at
(breakpoints, threads, symbols, disassembly), but each GDB round trip costs far more
than the raw protocol. The relay forwards GDB's bytes unchanged and watches them for
the two pieces of state the raw link must respect: the thread GDB believes the stub
has selected for register and memory access (its last ``Hg``, or the thread of the last
stop reply, which GDB records as current) and whether acknowledgements were switched
off (``QStartNoAckMode``). While GDB is idle (the target stopped, no command in
flight), :meth:`GdbRelay.borrow` hands the upstream socket to the caller as an
:class:`~rig.transport.rsp.RspLink`; on return it re-selects
GDB's ``Hg`` thread so GDB's belief about the stub is true again. The caller must then
tell GDB to drop its register cache (``maintenance flush register-cache``).
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from rig.errors import GuestError
from rig.transport.rsp import REPLY_TIMEOUT, ReplyTimeout, RspLink, Stream, set_receive_timeout

_HG = re.compile(rb"\$(Hg[^#]*)#")
_NOACK = re.compile(rb"\$QStartNoAckMode#")
_STOP_THREAD = re.compile(rb"\$T[0-9a-fA-F]{2}(?:[^#]*?;)?thread:([^;#]+)")


class GdbRelay:
    """Listen on ``listen_path`` for GDB, relay to the gdbstub stream ``connect`` opens
    (:meth:`rig.transport.host.Host.open_stream`; called once GDB has connected)."""

    def __init__(self, connect: Callable[[], Stream], listen_path: Path) -> None:
        self._connect = connect
        self.listen_path = listen_path
        self.last_hg: str | None = None
        #: Bound (seconds) on each reply while the link is borrowed (see RspLink).
        self.reply_timeout = REPLY_TIMEOUT
        self.acks = True
        self._noack_requested = False
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(listen_path))
        os.chmod(listen_path, 0o600)
        self._server.listen(1)
        self._upstream: Stream | None = None
        self._client: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._state = threading.Condition()
        self._borrowed = False
        self._parked = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gdb-relay", daemon=True)
        self._thread.start()

    # -- relay thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            client, _ = self._server.accept()
        except OSError:
            return
        try:
            upstream = self._connect()
        except OSError:
            client.close()
            return
        self._client, self._upstream = client, upstream
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, "client")
        sel.register(upstream, selectors.EVENT_READ, "upstream")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._closed:
                for key, _ in sel.select():
                    if key.data == "wake":
                        os.read(self._wake_r, 64)
                        self._park()
                        continue
                    src = client if key.data == "client" else upstream
                    dst = upstream if key.data == "client" else client
                    data = src.recv(65536)
                    if not data:
                        return
                    if key.data == "client":
                        self._watch_client(data)
                    else:
                        self._watch_upstream(data)
                    dst.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            client.close()
            upstream.close()

    def _watch_client(self, data: bytes) -> None:
        for m in _HG.finditer(data):
            self.last_hg = m.group(1).decode()
        if _NOACK.search(data):
            self._noack_requested = True

    def _watch_upstream(self, data: bytes) -> None:
        for m in _STOP_THREAD.finditer(data):
            self.last_hg = "Hg" + m.group(1).decode()
        if self._noack_requested and b"$OK#" in data:
            self.acks = False
            self._noack_requested = False

    def _park(self) -> None:
        with self._state:
            self._parked = True
            self._state.notify_all()
            while self._borrowed and not self._closed:
                self._state.wait()
            self._parked = False

    # -- the borrowing side --------------------------------------------------------------
    @contextlib.contextmanager
    def borrow(self) -> Iterator[RspLink]:
        """Take the upstream link while GDB is idle; give it back (and GDB's ``Hg``) after."""
        if self._upstream is None:
            raise GuestError("GDB is not connected through the relay yet")
        with self._state:
            self._borrowed = True
            os.write(self._wake_w, b"x")
            while not self._parked:
                if not self._thread.is_alive():
                    raise GuestError("the gdbstub connection is gone (did QEMU die?)")
                self._state.wait(1.0)
        upstream = self._upstream
        link = RspLink(upstream, acks=self.acks, reply_timeout=self.reply_timeout)
        set_receive_timeout(upstream, self.reply_timeout)
        in_sync = True
        try:
            yield link
        except ReplyTimeout:
            in_sync = _interrupt(link)
            raise
        finally:
            try:
                if self.last_hg is not None and in_sync:
                    link.transact([self.last_hg])
            finally:
                with contextlib.suppress(OSError):
                    set_receive_timeout(upstream, None)
                with self._state:
                    self._borrowed = False
                    self._state.notify_all()

    def close(self) -> None:
        """Stop relaying and close every socket. Idempotent."""
        self._closed = True
        with self._state:
            self._borrowed = False
            self._state.notify_all()
        with contextlib.suppress(OSError):
            self._server.close()
        for s in (self._client, self._upstream):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _interrupt(link: RspLink) -> bool:
    """After a reply that never came: stop the VM (``\\x03``) and read its stop reply, so
    the link is in step again. False if QEMU does not answer that either."""
    try:
        reply = link.interrupt()
    except (OSError, GuestError):
        return False
    return reply[:1] in ("S", "T")
