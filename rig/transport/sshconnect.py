"""Reaching a box over SSH: ``ssh://[user@]box[:port]``, ``~/.ssh/config``, a verified connection.

``~/.ssh/config`` gives HostName, User, Port, IdentityFile, UserKnownHostsFile and
ProxyCommand (:func:`resolve_settings`). Keys come from the agent, the identity files and
``~/.ssh/id_*``. The host key must already be in known_hosts: an unknown or changed key is
a one-line :class:`SshError` saying how to add it (no auto-accept; :func:`connect`).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from rig.errors import ConfigError

__all__ = [
    "CONNECT_TIMEOUT",
    "SshError",
    "SshSettings",
    "SshTarget",
    "connect",
    "fingerprint",
    "parse_ssh_url",
    "resolve_settings",
]

#: Seconds to wait for the TCP connection, the SSH banner and authentication.
CONNECT_TIMEOUT = 10.0


class SshError(ConfigError):
    """The SSH connection could not be made or was refused (one line, with the fix)."""


@dataclass(frozen=True)
class SshTarget:
    """What ``--host ssh://[user@]box[:port]`` names (``box`` may be a ~/.ssh/config alias)."""

    box: str
    user: str | None = None
    port: int | None = None


_URL = re.compile(r"ssh://(?:(?P<user>[^@/:]+)@)?(?P<box>\[[0-9a-fA-F:]+\]|[^:/@\[\]]+)(?::(?P<port>\d+))?/?")


def parse_ssh_url(url: str) -> SshTarget:
    """Parse ``ssh://[user@]box[:port]``; :class:`ConfigError` if it is not one."""
    m = _URL.fullmatch(url)
    if m is None:
        raise ConfigError(f"--host {url!r}: expected 'local' or ssh://[user@]box[:port]")
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--host {url!r}: port {port} is outside 1..65535")
    return SshTarget(m["box"].strip("[]"), m["user"], port)


@dataclass(frozen=True)
class SshSettings:
    """A target resolved against ~/.ssh/config and the options."""

    hostname: str
    user: str
    port: int
    identities: tuple[Path, ...] = ()
    known_hosts: tuple[Path, ...] = ()
    proxy_command: str | None = None

    @property
    def label(self) -> str:
        return f"ssh://{self.user}@{self.hostname}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts files use for this host (``[host]:port`` unless port 22)."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def resolve_settings(
    target: SshTarget,
    identity: Path | None = None,
    known_hosts: Path | None = None,
    config_file: Path | None = None,
) -> SshSettings:
    """Apply ``~/.ssh/config`` (HostName, User, Port, IdentityFile, UserKnownHostsFile,
    ProxyCommand); the URL's user and port and the options win over it."""
    config_file = config_file or Path("~/.ssh/config").expanduser()
    entry: dict[str, Any] = {}
    if config_file.exists():
        entry = dict(paramiko.SSHConfig.from_path(str(config_file)).lookup(target.box))
    hostname = str(entry.get("hostname", target.box))
    user = target.user or str(entry.get("user") or getpass.getuser())
    port = target.port or int(entry.get("port", 22))
    identities = [identity] if identity else []
    identities += [Path(p).expanduser() for p in entry.get("identityfile", []) if "%" not in p]
    if known_hosts is not None:
        known = [known_hosts]
    else:
        files = str(entry.get("userknownhostsfile", "~/.ssh/known_hosts")).split()
        known = [Path(f).expanduser() for f in files] + [Path("/etc/ssh/ssh_known_hosts")]
    proxy = entry.get("proxycommand")
    return SshSettings(hostname, user, port, tuple(identities), tuple(known), str(proxy) if proxy else None)


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of ``key``."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class _UnknownHostKey(Exception):
    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__("unknown host key")
        self.key = key


class _RejectUnknown(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _UnknownHostKey(key)


def connect(settings: SshSettings, timeout: float = CONNECT_TIMEOUT) -> paramiko.SSHClient:
    """An authenticated SSH connection with the host key verified, or a one-line :class:`SshError`."""
    label = settings.label
    sock: Any
    try:
        if settings.proxy_command:
            sock = paramiko.ProxyCommand(settings.proxy_command)
        else:
            sock = socket.create_connection((settings.hostname, settings.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except ConnectionRefusedError:
        raise SshError(
            f"{label}: connection refused (no SSH server listening on port {settings.port}?)"
        ) from None
    except TimeoutError:
        raise SshError(f"{label}: no answer within {timeout:.0f} s (host down or port filtered?)") from None
    except socket.gaierror as exc:
        raise SshError(f"{label}: cannot resolve {settings.hostname!r} ({exc.strerror})") from None
    except OSError as exc:
        raise SshError(f"{label}: cannot connect ({exc.strerror or exc})") from None
    client = paramiko.SSHClient()
    known = [f for f in settings.known_hosts if f.exists()]
    for f in known:
        try:
            client.load_system_host_keys(str(f))
        except OSError as exc:
            sock.close()
            raise SshError(f"{label}: cannot read known_hosts file {f}: {exc}") from None
    client.set_missing_host_key_policy(_RejectUnknown())
    shown = ", ".join(str(f) for f in settings.known_hosts[:1]) or "~/.ssh/known_hosts"
    try:
        client.connect(
            settings.hostname,
            settings.port,
            username=settings.user,
            sock=sock,
            key_filename=[str(p) for p in settings.identities] or None,
            allow_agent=True,
            look_for_keys=True,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
    except _UnknownHostKey as exc:
        client.close()
        port = f"-p {settings.port} " if settings.port != 22 else ""
        raise SshError(
            f"{label}: host key {exc.key.get_name()} {fingerprint(exc.key)} of {settings.known_hosts_name} "
            f"is not in {shown}; if that is the box's key, add it with "
            f"`ssh-keyscan {port}{settings.hostname} >> {shown}` (or connect once with ssh) and retry"
        ) from None
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise SshError(
            f"{label}: HOST KEY CHANGED: {settings.known_hosts_name} offered {exc.key.get_name()} "
            f"{fingerprint(exc.key)} but {shown} has {fingerprint(exc.expected_key)}; if the box was "
            f"reinstalled, remove the old key with `ssh-keygen -R '{settings.known_hosts_name}' -f {shown}` "
            "and add the new one"
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        tried = ", ".join(str(p) for p in settings.identities) or "~/.ssh/id_*"
        raise SshError(
            f"{label}: authentication as {settings.user} failed (tried the agent and {tried}); "
            "pass --ssh-identity KEY or add your public key to the box's authorized_keys"
        ) from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        client.close()
        raise SshError(
            f"{label}: SSH handshake failed: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from None
    return client
