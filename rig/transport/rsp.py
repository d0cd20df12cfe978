"""The GDB remote serial protocol (RSP): packet framing and a pipelined client link.

Only what the stepping loop needs: frame a packet (``$data#cs``), parse replies
(including run-length encoding), and send several packets in one write and read their
replies in order. Pipelining is safe against QEMU's gdbstub while the target is stopped
(it handles packets strictly in order); the stepping loop never sends anything but the
step itself while a vCPU runs, because a byte arriving while the VM runs stops it.
"""

from __future__ import annotations

import errno
import re
import socket
import struct
from collections.abc import Sequence
from typing import Protocol

from rig.errors import GuestError


def checksum(data: bytes) -> int:
    """The RSP checksum: the sum of the payload bytes modulo 256."""
    return sum(data) & 0xFF


def frame(payload: str) -> bytes:
    """``payload`` framed as ``$payload#xx``, escaping ``$ # } *``."""
    raw = payload.encode("latin-1")
    out = bytearray()
    for b in raw:
        if b in (0x23, 0x24, 0x7D, 0x2A):
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return b"$" + bytes(out) + b"#" + f"{checksum(bytes(out)):02x}".encode()


def unescape(data: bytes) -> bytes:
    """Undo RSP escaping (``}x`` -> ``x^0x20``) and run-length encoding (``c*n``)."""
    if b"}" not in data and b"*" not in data:
        return data  # the usual reply (hex digits, OK, Exx, a stop reply): nothing to undo
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        b = data[i]
        if b == 0x7D and i + 1 < n:
            out.append(data[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A and out and i + 1 < n:
            out += bytes((out[-1],)) * (data[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


#: A whole packet: ``$``, the payload (no unescaped ``#``), ``#`` and two checksum digits.
_PACKET = re.compile(rb"\$([^#]*)#[0-9a-fA-F]{2}")

#: Default bound (seconds) on waiting for any one reply: a step that never returns
#: (a hung or stopped QEMU) ends in an error, not a wait forever.
REPLY_TIMEOUT = 20.0


class ReplyTimeout(GuestError):
    """QEMU sent no reply within the link's reply timeout."""


class Stream(Protocol):
    """What the relay and :class:`RspLink` need of a connection to the gdbstub: a
    connected unix socket, or a stream that behaves like one (an SSH channel, see
    :class:`rig.transport.ssh.ChannelStream`). ``recv`` returns ``b""`` at the end of the
    stream; a stream that is not a socket also has ``set_receive_timeout`` (see
    :func:`set_receive_timeout`)."""

    def sendall(self, data: bytes, /) -> None: ...

    def recv(self, size: int, /) -> bytes: ...

    def settimeout(self, seconds: float | None, /) -> None: ...

    def fileno(self) -> int: ...

    def shutdown(self, how: int, /) -> None: ...

    def close(self) -> None: ...


def set_receive_timeout(sock: Stream, seconds: float | None) -> None:
    """Bound each blocking ``recv`` on ``sock`` in the kernel (``SO_RCVTIMEO``), or with the
    stream's own ``set_receive_timeout``: a late reply then fails with ``EAGAIN``.

    The socket stays in blocking mode, so a read whose data is already there (every
    read of the stepping loop) costs nothing extra; only a late reply hits the bound.
    ``None`` or 0 removes the bound.
    """
    if not isinstance(sock, socket.socket):
        sock.set_receive_timeout(seconds)  # type: ignore[attr-defined]
        return
    sec = seconds or 0.0
    whole = int(sec)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, int((sec - whole) * 1e6)))


class RspLink:
    """A client end of an RSP connection over a connected :class:`Stream`.

    ``acks`` says whether the connection still uses ``+``/``-`` acknowledgements (it
    does not after a successful ``QStartNoAckMode``, which GDB negotiates with QEMU).
    ``reply_timeout`` (seconds) bounds the wait for each reply (see
    :func:`set_receive_timeout`; the owner of the socket sets it): a late reply raises
    :class:`ReplyTimeout`.
    """

    def __init__(self, sock: Stream, *, acks: bool, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = sock
        self.acks = acks
        self.reply_timeout = reply_timeout
        self._buf = bytearray()
        self._owed_ack = False

    def transact(self, packets: Sequence[str]) -> list[str]:
        """Send ``packets`` in one write; return their replies, in order, as text."""
        self._send(b"".join(frame(p) for p in packets))
        return [self._read_packet() for _ in packets]

    def pipeline(self, packets: Sequence[str]) -> bytes:
        """``packets`` framed for one :meth:`exchange`, each followed by the ``+`` that
        acknowledges its reply when the link uses acknowledgements.

        These acknowledgements are sent ahead of the replies. That is sound with QEMU's
        gdbstub (system mode): it handles its input byte by byte, in order, and answers
        a packet that does not resume the VM before it reads the next byte, so each
        ``+`` arrives right after the reply it acknowledges (``gdb_read_byte``: a ``+``
        while a reply is outstanding clears it). It saves one write per reply, and a
        wake-up of QEMU's main loop for each. A resume packet (``vCont;s``/``c``) may
        only come last: any byte that reaches the gdbstub while a vCPU runs stops the VM.
        """
        ack = b"+" if self.acks else b""
        return b"".join(frame(p) + ack for p in packets)

    def exchange(self, data: bytes, count: int, *, owe_last: bool = False) -> list[str]:
        """Send ``data`` from :meth:`pipeline` (one write) and read ``count`` replies.

        The replies were acknowledged in ``data``; if ``owe_last`` (``data`` ends with a
        resume packet, whose stop reply must not be acknowledged in the same write),
        the last reply's ``+`` is sent at the front of the link's next write instead.
        """
        self.send(data, owe_last=owe_last)
        return self.receive(count)

    def send(self, data: bytes, *, owe_last: bool = False) -> None:
        """The first half of :meth:`exchange`: send ``data``; :meth:`receive` reads the
        replies. Work done in between overlaps with QEMU's (the stepping loop parses the
        previous boundary while the next step runs)."""
        if owe_last and self.acks and data.endswith(b"+"):
            raise ValueError("a resume packet must end the write: pipeline it without its '+'")
        self._send(data)
        self._owed_ack = owe_last and self.acks

    def receive(self, count: int) -> list[str]:
        """The second half of :meth:`exchange`: the next ``count`` replies."""
        return self._read_packets(count)

    def _read_packets(self, count: int) -> list[str]:
        """The next ``count`` packets, none acknowledged (see :meth:`exchange`).

        A packet ends at ``#`` and two checksum digits, and ``#`` never occurs unescaped
        inside one, so the buffer holds ``count`` packets once it holds ``count`` such
        ends; they are then split in one pass (the stepping loop's hot path).
        """
        buf = self._buf
        while True:
            if buf.count(b"#") >= count:
                out: list[str] = []
                end = 0
                for m in _PACKET.finditer(buf):
                    out.append(m.group(1).decode("latin-1"))
                    end = m.end()
                    if len(out) == count:
                        break
                if len(out) == count:
                    if buf.find(b"}", 0, end) >= 0 or buf.find(b"*", 0, end) >= 0:
                        out = [unescape(p.encode("latin-1")).decode("latin-1") for p in out]
                    del buf[:end]
                    return out
            self._receive()

    def _send(self, data: bytes) -> None:
        if self._owed_ack:
            data = b"+" + data
            self._owed_ack = False
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise GuestError(f"the gdbstub connection failed: {exc.strerror} (did QEMU exit?)") from None

    def interrupt(self) -> str:
        """Send the break byte (``\\x03``, stop the VM) and return the stop reply."""
        self._send(b"\x03")
        return self._read_packet()

    def resume(self, packet: str, timeout: float) -> str:
        """Send a resume packet (``vCont;c:…``) and return the stop reply.

        ``timeout`` (seconds) bounds a target that never stops: then the link sends an
        interrupt (``\\x03``), waits for that stop reply and raises :class:`GuestError`
        saying so. The wait itself is one blocking read; the deadline only matters
        when no stop arrives.
        """
        self._send(frame(packet))
        self.sock.settimeout(timeout)
        try:
            return self._read_packet()
        except TimeoutError:
            self.sock.settimeout(5.0)
            self.sock.sendall(b"\x03")
            try:
                reply = self._read_packet()
            except TimeoutError:
                raise GuestError(
                    f"the target ignored an interrupt after `{packet}` ran {timeout:.0f} s"
                ) from None
            raise GuestError(
                f"no stop within {timeout:.0f} s after `{packet}` (interrupted: {reply})"
            ) from None
        finally:
            self.sock.settimeout(None)

    def _read_packet(self, *, ack: bool = True) -> str:
        buf = self._buf
        while True:
            start = buf.find(b"$")
            if start >= 0:
                end = buf.find(b"#", start)
                if end >= 0 and len(buf) >= end + 3:
                    body = bytes(buf[start + 1 : end])
                    del buf[: end + 3]
                    if self.acks and ack:
                        self.sock.sendall(b"+")
                    return unescape(body).decode("latin-1")
            elif buf and not self.acks:
                # stray '+' or notification bytes before a packet: drop them
                del buf[:]
            self._receive()

    def _receive(self) -> None:
        """Append what the socket has (blocking until something arrives) to the buffer."""
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:  # a Python-level timeout (see resume): the caller handles it
            raise
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise ReplyTimeout(
                    f"QEMU sent no reply within {self.reply_timeout:g} s (a step that never "
                    "returns: QEMU is hung or stopped, or the vCPU never completes the instruction)"
                ) from None
            raise GuestError(f"the gdbstub connection failed: {exc}") from None
        if not chunk:
            raise GuestError("QEMU closed the gdbstub connection (did QEMU die?)")
        self._buf += chunk


def hex_le(value: str) -> int:
    """Decode a little-endian hex register or memory reply (``p``/``m`` packets)."""
    return int.from_bytes(bytes.fromhex(value), "little")


def is_error(reply: str) -> bool:
    """True for ``Exx`` error replies (e.g. memory not mapped through this vCPU's CR3)."""
    return len(reply) == 3 and reply[0] == "E"
