"""Bare-metal runs over SSH: QEMU on a remote box, GDB, pytest and the checks here.

:class:`SshHost` implements :class:`~rig.transport.host.Host` with paramiko over one SSH
connection, which carries everything (each part in a module of its own:
:mod:`~rig.transport.sshconnect`, :mod:`~rig.transport.sshsupervisor`,
:mod:`~rig.transport.sshchannel`; this module is the host, and re-exports their names):

* **Connection.** ``ssh://[user@]box[:port]``; ``~/.ssh/config`` gives HostName, User,
  Port, IdentityFile and UserKnownHostsFile. Keys come from the agent, the identity
  files and ``~/.ssh/id_*``. The host key must already be in known_hosts: an unknown or
  changed key is a one-line :class:`SshError` saying how to add it (no auto-accept).
* **Processes.** Each process runs under a small ``sh`` supervisor on an exec channel
  (:data:`SUPERVISOR`): QEMU gets a process group of its own; the supervisor blocks
  reading the channel's stdin and, when it closes (the rig closes it, or the SSH
  session ends for any reason: the connection drops, the rig is killed), kills that
  group and removes the remote private directory. QEMU's output streams back over the
  channel's stderr into the local log file.
* **Sockets.** The gdbstub, QMP and the console stay unix sockets in the remote private
  directory (``mktemp -d``: 0700), reached over ``direct-streamlocal@openssh.com``
  channels, as ``ssh -L local.sock:remote.sock`` does. The gdbstub link, the stepping
  loop's hot path, is a channel the relay opens itself (:meth:`SshHost.open_stream`,
  :class:`ChannelStream`): no local socket, no copying thread. QMP and the console are
  exposed as local unix sockets (0600, in the local 0700 directory) by a
  :class:`SocketForwarder` that opens one channel per connection, so they connect to
  local paths unchanged. Chosen over a remote ``socat``/``nc -U``: no program or extra
  process is needed on the box, nothing listens there but QEMU's own sockets, and the
  bytes take one hop (sshd -> socket) instead of two.
* **Files.** :meth:`SshHost.stage` uploads a file over SFTP once into a cache on the box
  named by its SHA-256 (checked with ``sha256sum`` there); a second run uploads nothing.
  An sshd without SFTP (no ``Subsystem sftp`` in its sshd_config, as on hardened hosts)
  is served over exec channels instead: uploads stream into ``cat`` (then the same
  ``sha256sum`` check and a rename), reads are ``tail -c``, existence is ``test -e``.
  What fails on that path says so and names the fix (:data:`NO_SFTP_FIX`).
"""

from __future__ import annotations

import contextlib
import hashlib
import shlex
import tempfile
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from rig.errors import ConfigError, GuestError
from rig.transport.host import Host, HostProcess, remove_tree
from rig.transport.kvmprobe import kvm_problem
from rig.transport.local import LocalHost
from rig.transport.sshchannel import ChannelStream, SocketForwarder, open_streamlocal
from rig.transport.sshconnect import (
    CONNECT_TIMEOUT,
    SshError,
    SshSettings,
    SshTarget,
    connect,
    parse_ssh_url,
    resolve_settings,
)
from rig.transport.sshsupervisor import SUPERVISOR, SshProcess

__all__ = [
    "CONNECT_TIMEOUT",
    "NO_SFTP_FIX",
    "REMOTE_CACHE",
    "SUPERVISOR",
    "ChannelStream",
    "SocketForwarder",
    "SshError",
    "SshHost",
    "SshProcess",
    "SshSettings",
    "SshTarget",
    "UploadStats",
    "connect",
    "open_host",
    "open_streamlocal",
    "parse_ssh_url",
    "resolve_settings",
]

#: Where uploads are cached on the box, relative to the remote home directory.
REMOTE_CACHE = ".cache/cr3rig-uploads"
#: Seconds an upload over an exec channel may stall (no byte accepted) before it fails.
UPLOAD_STALL_SECONDS = 60.0
#: The fix named when a file operation over an exec channel (no SFTP on the box) fails.
NO_SFTP_FIX = (
    "the box's sshd offers no SFTP: add `Subsystem sftp internal-sftp` to its sshd_config "
    "and reload sshd, or make cat, tail, test, wc, mv and sha256sum available to the login shell"
)


def _said(status: int, err: str) -> str:
    """What a failed command on the box said: its first stderr line, else its status."""
    first = next((ln for ln in err.splitlines() if ln.strip()), "")
    return first[:100] if first else f"status {status}"


@dataclass
class UploadStats:
    """What :meth:`SshHost.stage` did: files uploaded and found in the box's cache."""

    uploaded: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0


class SshHost(Host):
    """A box reached over SSH (see the module docstring)."""

    def __init__(
        self,
        settings: SshSettings,
        *,
        remote_cache: str | None = None,
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.label = settings.label
        self.client = connect(settings, timeout)
        transport = self.client.get_transport()
        assert transport is not None
        self.transport: paramiko.Transport = transport
        self.transport.set_keepalive(15)
        self._lock = threading.Lock()
        self._dirs: dict[Path, str] = {}
        self._forwarders: dict[Path, SocketForwarder] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._closed = False
        #: the SFTP session; None if the box's sshd offers no SFTP (exec channels then)
        self.sftp: Any = self._open_sftp()
        try:
            home = self.sftp.normalize(".") if self.sftp is not None else self._home()
        except (paramiko.SSHException, OSError, EOFError, GuestError) as exc:
            self.close()
            raise SshError(f"{self.label}: cannot find the remote home directory: {exc}") from None
        self.remote_cache = remote_cache or f"{home}/{REMOTE_CACHE}"
        self.uploads = UploadStats()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        identity: Path | None = None,
        known_hosts: Path | None = None,
        config_file: Path | None = None,
        remote_cache: str | None = None,
    ) -> SshHost:
        """Connect to ``ssh://[user@]box[:port]`` (one-line :class:`SshError` if it fails)."""
        if identity is not None and not identity.exists():
            raise ConfigError(f"--ssh-identity {identity}: no such file")
        if known_hosts is not None and not known_hosts.exists():
            raise ConfigError(f"--ssh-known-hosts {known_hosts}: no such file")
        settings = resolve_settings(parse_ssh_url(url), identity, known_hosts, config_file)
        return cls(settings, remote_cache=remote_cache)

    # -- SFTP, or exec channels where the box has none ---------------------------------
    def _open_sftp(self) -> Any:
        """An SFTP session, or None if the box's sshd refuses the ``sftp`` subsystem (it
        closes the channel). Raises :class:`SshError` if the connection itself is lost."""
        try:
            return self.client.open_sftp()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if self.transport.is_active():
                return None
            self.client.close()
            raise SshError(f"{self.label}: the connection was lost opening SFTP ({exc})") from None

    def _home(self) -> str:
        """The remote home directory (where an exec channel starts); :class:`GuestError`
        naming :data:`NO_SFTP_FIX` if the box does not say."""
        status, out = self.run(["pwd"])
        home = out.strip()
        if status != 0 or not home.startswith("/") or "\n" in home:
            raise GuestError(f"`pwd` on {self.label} answered {status}: {home[:100]!r}; {NO_SFTP_FIX}")
        return home

    def _exec(
        self, argv: Sequence[str], *, stdin: Path | None = None, timeout: float = 30.0
    ) -> tuple[int, bytes, str]:
        """Run ``argv`` on the box, ``stdin`` (a local file) streamed to it; (exit status,
        stdout bytes, stderr text). Each send or read may wait ``timeout`` seconds.
        Raises :class:`GuestError` (naming a lost connection) on SSH failures. The
        commands run this way print little on stderr: it is read after stdout."""
        command = " ".join(shlex.quote(a) for a in argv)
        try:
            chan = self.transport.open_session(timeout=timeout)
            try:
                chan.settimeout(timeout)
                chan.exec_command(command)
                if stdin is not None:
                    with open(stdin, "rb") as f, contextlib.suppress(OSError, paramiko.SSHException):
                        # a command that ends early closes the channel: its status and
                        # stderr (read below) say why, or the lost connection does
                        for chunk in iter(lambda: f.read(1 << 18), b""):
                            chan.sendall(chunk)
                with contextlib.suppress(OSError, paramiko.SSHException):
                    chan.shutdown_write()
                out = bytearray()
                while data := chan.recv(1 << 16):
                    out += data
                err = bytearray()
                while data := chan.recv_stderr(1 << 16):
                    err += data
                if not chan.status_event.wait(timeout):
                    if not self.transport.is_active():
                        raise EOFError("the connection ended")
                    raise GuestError(
                        f"`{command[:60]}` on {self.label} did not finish within {timeout:.0f} s"
                    )
                status = chan.recv_exit_status()
            finally:
                chan.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(f"running `{command[:60]}`", exc) from None
        return status, bytes(out), err.decode(errors="replace").strip()

    def _remote_size(self, remote: str) -> int | None:
        """The size of the box's regular file ``remote``, None if there is none."""
        if self.sftp is not None:
            try:
                return int(self.sftp.stat(remote).st_size)
            except FileNotFoundError:
                return None
        status, out, err = self._exec(["sh", "-c", '[ -f "$1" ] || exit 3; wc -c <"$1"', "sh", remote])
        if status == 3:
            return None
        if status != 0 or not out.strip().isdigit():
            raise GuestError(f"cannot size {remote} on {self.label} ({_said(status, err)}); {NO_SFTP_FIX}")
        return int(out)

    def _put(self, local_file: Path, remote: str) -> None:
        """Copy ``local_file`` to the box as ``remote`` (mode 0600 there)."""
        if self.sftp is not None:
            self.sftp.put(str(local_file), remote)
            return
        status, _, err = self._exec(
            ["sh", "-c", 'umask 077; cat >"$1" && exit; s=$?; rm -f -- "$1"; exit "$s"', "sh", remote],
            stdin=local_file,
            timeout=UPLOAD_STALL_SECONDS,
        )
        if status != 0:
            why = _said(status, err)
            raise GuestError(
                f"upload of {local_file.name} to {self.label} by `cat` failed ({why}); {NO_SFTP_FIX}"
            )

    def _rename(self, old: str, new: str) -> None:
        """Rename the box's file ``old`` to ``new``, replacing ``new`` (POSIX rename)."""
        if self.sftp is not None:
            self.sftp.posix_rename(old, new)
            return
        status, _, err = self._exec(["mv", "-f", "--", old, new])
        if status != 0:
            raise GuestError(
                f"cannot rename {old} to {new} on {self.label} ({_said(status, err)}); {NO_SFTP_FIX}"
            )

    # -- connection state ------------------------------------------------------------
    def lost_reason(self) -> str:
        """Why the connection is gone, in a few words."""
        exc = self.transport.get_exception() if self.transport else None
        if self._closed:
            return "closed by the rig"
        return str(exc).splitlines()[0] if exc and str(exc) else "the connection dropped"

    def _lost(self, what: str, exc: BaseException) -> GuestError:
        if not self.transport.is_active():
            return GuestError(
                f"the SSH connection to {self.label} was lost ({self.lost_reason()}) while {what}"
            )
        return GuestError(f"{what} on {self.label} failed: {exc}")

    # -- Host interface ---------------------------------------------------------------
    def run(self, argv: Sequence[str], timeout: float = 30.0) -> tuple[int, str]:
        command = " ".join(shlex.quote(a) for a in argv)
        try:
            chan = self.transport.open_session(timeout=timeout)
            chan.set_combine_stderr(True)
            chan.settimeout(timeout)
            chan.exec_command(command)
            out = bytearray()
            while True:
                data = chan.recv(65536)
                if not data:
                    break
                out += data
            if not chan.status_event.wait(timeout):
                chan.close()
                raise GuestError(f"`{command[:60]}` on {self.label} did not finish within {timeout:.0f} s")
            status = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(f"running `{command[:60]}`", exc) from None
        return status, out.decode(errors="replace")

    def which(self, program: str) -> str | None:
        status, out = self.run(["sh", "-c", 'command -v "$1"', "sh", program])
        path = out.strip().splitlines()[-1] if out.strip() else ""
        return path if status == 0 and path.startswith("/") else None

    def private_dir(self, prefix: str) -> Path:
        status, out = self.run(["sh", "-c", 'mktemp -d "${TMPDIR:-/tmp}/$1XXXXXXXX"', "sh", prefix])
        remote = out.strip()
        if status != 0 or not remote.startswith("/"):
            raise GuestError(f"cannot make a private directory on {self.label}: {out.strip()[:200]}")
        local = Path(tempfile.mkdtemp(prefix=prefix))
        self._dirs[local] = remote
        return local

    def host_path(self, local: Path) -> str:
        if local in self._dirs:
            return self._dirs[local]
        if local.parent in self._dirs:
            return f"{self._dirs[local.parent]}/{local.name}"
        raise GuestError(f"{local} is not in a private directory made for {self.label}")

    def spawn(self, argv: Sequence[str], *, log: Path) -> HostProcess:
        remote_dir = self.host_path(log.parent)
        command = " ".join(
            shlex.quote(a) for a in ["sh", "-c", SUPERVISOR, "cr3rig-supervisor", remote_dir, *argv]
        )
        try:
            chan = self.transport.open_session(timeout=CONNECT_TIMEOUT)
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(f"starting {argv[0]}", exc) from None
        return SshProcess(self, chan, log)

    def open_stream(self, local_socket: Path) -> ChannelStream:
        """A channel straight to the box's socket: one hop fewer than :meth:`expose`'s local
        socket and its copying thread (about 70 us less per round trip on loopback)."""
        try:
            return ChannelStream(open_streamlocal(self.transport, self.host_path(local_socket)))
        except (paramiko.SSHException, EOFError) as exc:
            raise ConnectionError(f"{self.label}: {exc}") from None

    def expose(self, local_socket: Path) -> None:
        if local_socket not in self._forwarders:
            self._forwarders[local_socket] = SocketForwarder(
                self.transport, self.host_path(local_socket), local_socket
            )

    def exists(self, local: Path) -> bool:
        """Whether the box has ``host_path(local)``; :class:`GuestError` if the connection
        is lost (or, without SFTP, ``test`` fails: naming :data:`NO_SFTP_FIX`)."""
        path = self.host_path(local)
        if self.sftp is None:
            status, _, err = self._exec(["test", "-e", path])
            if status not in (0, 1):
                raise GuestError(
                    f"`test -e {path}` on {self.label} failed ({_said(status, err)}); {NO_SFTP_FIX}"
                )
            return status == 0
        try:
            self.sftp.stat(path)
        except FileNotFoundError:
            return False
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(f"checking {local.name}", exc) from None
        return True

    def read_tail(self, local: Path, size: int) -> bytes:
        """The last ``size`` bytes of the box's ``host_path(local)``; OSError if it cannot
        be read (no such file, the connection lost, or without SFTP ``tail`` failing)."""
        try:
            if self.sftp is None:
                path = self.host_path(local)
                status, out, err = self._exec(["tail", "-c", str(size), "--", path])
                if status != 0:
                    raise OSError(f"`tail` of {path} on {self.label} failed ({_said(status, err)})")
                return out
            with self.sftp.open(self.host_path(local), "rb") as f:
                end = f.stat().st_size or 0
                f.seek(max(0, end - size))
                return bytes(f.read(size))
        except (paramiko.SSHException, EOFError, GuestError) as exc:
            raise OSError(str(exc)) from None

    def stage(self, local_file: Path) -> str:
        """Upload ``local_file`` once into the box's cache (by SHA-256, checked there);
        its path on the box. Raises :class:`GuestError` if the upload is corrupt, the
        connection is lost, or (without SFTP) a command on the box fails, naming
        :data:`NO_SFTP_FIX`."""
        st = local_file.stat()
        key = (str(local_file.resolve()), st.st_size, st.st_mtime_ns)
        digest = self._hashes.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(local_file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest = self._hashes[key] = h.hexdigest()
        remote = f"{self.remote_cache}/{digest}"
        try:
            with self._lock:
                if self._remote_size(remote) == st.st_size:
                    self.uploads.cached.append(local_file.name)
                    return remote
                status, out = self.run(["mkdir", "-p", "-m", "0700", self.remote_cache])
                if status != 0:
                    raise GuestError(f"cannot make {self.remote_cache} on {self.label}: {out.strip()}")
                part = f"{remote}.part-{uuid.uuid4().hex[:8]}"
                self._put(local_file, part)
                status, out = self.run(["sha256sum", part])
                if status != 0 or out.split()[:1] != [digest]:
                    self.run(["rm", "-f", part])
                    raise GuestError(
                        f"upload of {local_file.name} to {self.label} is corrupt: {out.strip()[:100]}"
                    )
                self._rename(part, remote)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(f"uploading {local_file.name}", exc) from None
        self.uploads.uploaded.append(local_file.name)
        self.uploads.bytes_uploaded += st.st_size
        return remote

    def remove_private_dir(self, local: Path) -> None:
        for sock in [s for s in self._forwarders if s.parent == local]:
            self._forwarders.pop(sock).close()
        remote = self._dirs.pop(local, None)
        if remote is not None and self.transport.is_active():
            with contextlib.suppress(GuestError):
                self.run(["rm", "-rf", "--", remote])
        remove_tree(local)

    def kvm_usable(self, qemu: str = "qemu-system-x86_64") -> str | None:
        return kvm_problem(self, qemu)

    def summary(self) -> str | None:
        u = self.uploads
        return (
            f"{self.label}: uploaded {len(u.uploaded)} files ({u.bytes_uploaded / 1e6:.1f} MB), "
            f"{len(u.cached)} found in the box's cache {self.remote_cache}"
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fwd in self._forwarders.values():
            fwd.close()
        self._forwarders.clear()
        if self.sftp is not None:
            with contextlib.suppress(Exception):
                self.sftp.close()
        self.client.close()
        for local in list(self._dirs):
            remove_tree(local)
        self._dirs.clear()


def open_host(spec: str, *, identity: Path | None = None, known_hosts: Path | None = None) -> Host:
    """The host ``--host`` names: ``local`` or ``ssh://[user@]box[:port]``."""
    if spec in ("", "local"):
        if identity is not None or known_hosts is not None:
            raise ConfigError("--ssh-identity/--ssh-known-hosts need --host ssh://[user@]box[:port]")
        return LocalHost()
    return SshHost.from_url(spec, identity=identity, known_hosts=known_hosts)
