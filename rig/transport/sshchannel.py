"""Unix sockets of the box over one SSH connection: ``direct-streamlocal@openssh.com`` channels.

The gdbstub link, the stepping loop's hot path, is a channel the relay opens itself
(:class:`ChannelStream`: no local socket, no copying thread). QMP and the console are
exposed as local unix sockets (0600, in the local 0700 directory) by a
:class:`SocketForwarder` that opens one channel per connection, so they connect to local
paths unchanged; nothing listens on the box but QEMU's own sockets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
from pathlib import Path
from typing import Any

import paramiko
from paramiko.common import cMSG_CHANNEL_OPEN
from paramiko.message import Message

__all__ = ["ChannelStream", "SocketForwarder", "open_streamlocal"]


def open_streamlocal(transport: paramiko.Transport, path: str, timeout: float = 10.0) -> paramiko.Channel:
    """Open a ``direct-streamlocal@openssh.com`` channel to the box's unix socket ``path``.

    paramiko's :meth:`~paramiko.Transport.open_channel` only encodes TCP destinations,
    so this builds the CHANNEL_OPEN message (string path, string reserved, uint32
    reserved: OpenSSH's PROTOCOL file) and otherwise does exactly what it does.
    """
    t: Any = transport
    if not transport.is_active():
        raise paramiko.SSHException("SSH session not active")
    with t.lock:
        window = t._sanitize_window_size(None)
        packet = t._sanitize_packet_size(None)
        chanid = t._next_channel()
        m = Message()
        m.add_byte(cMSG_CHANNEL_OPEN)
        m.add_string("direct-streamlocal@openssh.com")
        m.add_int(chanid)
        m.add_int(window)
        m.add_int(packet)
        m.add_string(path)
        m.add_string("")
        m.add_int(0)
        chan = paramiko.Channel(chanid)
        t._channels.put(chanid, chan)
        t.channel_events[chanid] = event = threading.Event()
        t.channels_seen[chanid] = True
        chan._set_transport(transport)
        chan._set_window(window, packet)
    t._send_user_message(m)
    if not event.wait(timeout) or not transport.is_active():
        raise paramiko.SSHException(f"no answer opening a channel to {path}")
    opened = t._channels.get(chanid)
    if opened is None:
        raise paramiko.SSHException(
            f"the box refused a channel to {path} (no such socket, or its sshd has "
            "AllowStreamLocalForwarding/AllowTcpForwarding off)"
        )
    return opened  # type: ignore[no-any-return]


class ChannelStream:
    """A ``direct-streamlocal`` channel with the socket calls of
    :class:`~rig.transport.rsp.Stream`, for the gdbstub link: the relay and the stepping
    loop read and write the channel itself, with no local socket and no copying thread
    in between (see :meth:`rig.transport.ssh.SshHost.open_stream`).

    ``recv`` waits at most the :meth:`settimeout` seconds (then ``TimeoutError``, as a
    socket does) or else the :meth:`set_receive_timeout` seconds (then ``EAGAIN``, as a
    socket with ``SO_RCVTIMEO`` does); neither set: until data or the end of the stream.
    """

    def __init__(self, chan: paramiko.Channel) -> None:
        self.chan = chan
        self._timeout: float | None = None
        self._receive_timeout: float | None = None

    def sendall(self, data: bytes, /) -> None:
        try:
            self.chan.sendall(data)
        except (paramiko.SSHException, EOFError) as exc:
            raise ConnectionError(f"the SSH channel failed: {exc}") from None

    def recv(self, size: int, /) -> bytes:
        timeout = self._timeout if self._timeout is not None else self._receive_timeout
        self.chan.settimeout(timeout)
        try:
            return bytes(self.chan.recv(size))
        except TimeoutError:
            if self._timeout is not None:
                raise
            raise BlockingIOError(errno.EAGAIN, "no reply within the receive timeout") from None

    def settimeout(self, seconds: float | None, /) -> None:
        self._timeout = seconds

    def set_receive_timeout(self, seconds: float | None) -> None:
        self._receive_timeout = seconds or None

    def fileno(self) -> int:
        return int(self.chan.fileno())

    def shutdown(self, how: int, /) -> None:
        try:
            self.chan.shutdown(how)
        except (paramiko.SSHException, EOFError) as exc:
            raise ConnectionError(f"the SSH channel failed: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
            self.chan.close()


class SocketForwarder:
    """Expose the box's unix socket ``remote`` as the local unix socket ``local``.

    Each local connection gets its own ``direct-streamlocal`` channel and a thread that
    copies bytes both ways until either side closes. The local socket is mode 0600 in
    a 0700 directory; nothing listens on the box.
    """

    def __init__(self, transport: paramiko.Transport, remote: str, local: Path) -> None:
        self.transport = transport
        self.remote = remote
        self.local = local
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(local))
        os.chmod(local, 0o600)
        self._server.listen(4)
        self._conns: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"fwd-{local.name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            try:
                chan = open_streamlocal(self.transport, self.remote)
            except (paramiko.SSHException, OSError, EOFError):
                conn.close()
                continue
            self._conns.append(conn)
            threading.Thread(target=self._pump, args=(conn, chan), name="fwd-pump", daemon=True).start()

    @staticmethod
    def _pump(conn: socket.socket, chan: paramiko.Channel) -> None:
        sel = selectors.DefaultSelector()
        sel.register(conn, selectors.EVENT_READ, "local")
        sel.register(chan, selectors.EVENT_READ, "remote")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "local":
                        data = conn.recv(65536)
                        if not data:
                            return
                        chan.sendall(data)
                    else:
                        data = chan.recv(65536)
                        if not data:
                            return
                        conn.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            return
        finally:
            sel.close()
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
            # closing sends a message: on a dropped connection that raises EOFError
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                chan.close()

    def close(self) -> None:
        """Stop listening, cut every forwarded connection, remove the local socket."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self.local.unlink()
