"""A private OpenSSH server on 127.0.0.1 for the rig's SSH tests and bench.

Debian's ``sshd`` (package openssh-server) runs as ``sshd -D -f CONFIG -E LOG`` with
everything in one temporary directory: a generated host key, a generated client key and
its authorized_keys, a known_hosts line for the client, the PID file and the log. It
listens on 127.0.0.1 and a free port only; the system's SSH configuration is not read
or touched. Every session it starts carries ``CR3RIG_SSHD_TAG=<tag>`` in its
environment (sshd's ``SetEnv``), so a test can find what runs on the "remote" side.

Run by hand: ``python -m rig.tools.private_sshd [--no-sftp]`` prints the ``--host``
options and serves until Ctrl-C (``--no-sftp``: a server without SFTP).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rig.errors import ConfigError
from rig.transport.host import processes_with_env, sigterm_as_ctrl_c

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, comment: str) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return (
        path.with_suffix(".pub").read_text().strip()
        if path.suffix
        else Path(f"{path}.pub").read_text().strip()
    )


class PrivateSshd:
    """One private sshd. :meth:`start` it, then :meth:`close` (or use ``with``)."""

    def __init__(self, extra_config: str = "", *, sftp: bool = True) -> None:
        """``extra_config``: more sshd_config lines; ``sftp=False``: no ``Subsystem sftp``
        (a server where SFTP is disabled, as on hardened hosts). Raises
        :class:`ConfigError` if sshd is not installed."""
        if not os.path.exists(SSHD):
            raise ConfigError(f"{SSHD} not found: install it with `apt-get install openssh-server`")
        self.dir = Path(tempfile.mkdtemp(prefix="cr3rig-sshd-"))
        self.tag = uuid.uuid4().hex
        self.port = 0
        self.host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        self.extra_config = extra_config
        self.sftp = sftp
        self.proc: subprocess.Popen[bytes] | None = None
        host_pub = _keygen(self.host_key, "cr3rig-test-host")
        client_pub = _keygen(self.client_key, "cr3rig-test-client")
        (self.dir / "authorized_keys").write_text(client_pub + "\n")
        self.host_public_key = host_pub

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}"

    def options(self) -> list[str]:
        """The pytest options that reach this server."""
        return [
            "--host",
            self.url,
            "--ssh-identity",
            str(self.client_key),
            "--ssh-known-hosts",
            str(self.known_hosts),
        ]

    def start(self, timeout: float = 10.0) -> PrivateSshd:
        """Start sshd on a free port; return once it accepts TCP connections."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        for _ in range(5):
            self.port = _free_port()
            self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_public_key}\n")
            self.config.write_text(
                f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {self.host_key}\n"
                f"AuthorizedKeysFile {self.dir}/authorized_keys\nPidFile {self.dir}/sshd.pid\n"
                "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "AllowStreamLocalForwarding yes\nX11Forwarding no\n"
                + ("Subsystem sftp internal-sftp\n" if self.sftp else "")
                + f"SetEnv CR3RIG_SSHD_TAG={self.tag}\nLogLevel VERBOSE\n"
                + self.extra_config
            )
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-f", str(self.config), "-E", str(self.log)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                    return self
                time.sleep(0.02)  # waiting for sshd to listen (test set-up, not rig code)
            self._stop()
        raise ConfigError(f"private sshd did not start: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def session_processes(self) -> list[str]:
        """Command lines of live processes started by this server's sessions (tagged)."""
        return [f"{pid} {cmd[:160]}" for pid, cmd in processes_with_env("CR3RIG_SSHD_TAG", self.tag)]

    def connection_pids(self) -> list[int]:
        """PIDs of sshd's per-connection processes (children of the listener)."""
        if self.proc is None:
            return []
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def close(self) -> None:
        """Stop sshd and its per-connection processes (they outlive the listener), remove
        the directory."""
        connections = self.connection_pids()
        self._stop()
        for pid in connections:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateSshd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--no-sftp"]):
        print("usage: python -m rig.tools.private_sshd [--no-sftp]", file=sys.stderr)
        return 2
    sigterm_as_ctrl_c()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`&`)
    with PrivateSshd(sftp=not args).start() as sshd:
        print(" ".join(sshd.options()), flush=True)
        try:
            assert sshd.proc is not None
            sshd.proc.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
