"""The SSH host against a real OpenSSH server (Debian's sshd on 127.0.0.1, private config).

Every server, key and known_hosts file lives in a temporary directory
(:class:`~rig.tools.private_sshd.PrivateSshd`); the system's SSH configuration is not
read or touched. The server tags every session it starts, so "nothing left on the
remote" is checked on exactly the processes of this server's sessions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig.errors import RigError
from rig.guest import Guest, GuestConfig
from rig.tools.private_sshd import PrivateSshd
from rig.transport.kvmprobe import ARCH_CAPABILITIES_CAUSE, kernel_probe, probe_boot, probe_firmware
from rig.transport.qemu import QemuConfig, QemuMachine
from rig.transport.rsp import ReplyTimeout, RspLink, set_receive_timeout
from rig.transport.ssh import ChannelStream, SshError, SshHost, parse_ssh_url
from tests.conftest import junit_outcomes, processes_tagged, run_pytest


@pytest.fixture(scope="module")
def sshd() -> Iterator[PrivateSshd]:
    server = PrivateSshd().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def sshd_without_sftp() -> Iterator[PrivateSshd]:
    """A server with no ``Subsystem sftp`` in its config, as hardened hosts have."""
    server = PrivateSshd(sftp=False).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def host_without_sftp(sshd_without_sftp: PrivateSshd, tmp_path: Path) -> Iterator[SshHost]:
    """An SshHost on :func:`sshd_without_sftp` with an upload cache of its own (so every
    file is uploaded, none found cached by another test)."""
    sshd = sshd_without_sftp
    h = SshHost.from_url(sshd.url, identity=sshd.client_key, known_hosts=sshd.known_hosts)
    h.remote_cache = str(tmp_path / "uploads")
    try:
        yield h
    finally:
        h.close()
    assert wait_until(lambda: not sshd.session_processes(), 10), sshd.session_processes()


@pytest.fixture(scope="module")
def remote_cache() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="cr3rig-test-uploads-")
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", d], check=False)


@pytest.fixture
def host(sshd: PrivateSshd, remote_cache: str) -> Iterator[SshHost]:
    h = SshHost.from_url(sshd.url, identity=sshd.client_key, known_hosts=sshd.known_hosts)
    h.remote_cache = remote_cache
    try:
        yield h
    finally:
        h.close()
    assert wait_until(lambda: not sshd.session_processes(), 10), sshd.session_processes()


@pytest.fixture(autouse=True)
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the keys a test names (an agent of the user's could otherwise answer)."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def wait_until(cond: object, seconds: float) -> bool:
    """Poll ``cond`` (a callable) until true or ``seconds`` pass (test harness only)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(cond())  # type: ignore[operator]


def drop_connection(h: SshHost) -> None:
    """Cut the TCP connection under paramiko, as a network failure or a dying client would."""
    sock = h.transport.sock
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)


#: Summary words that are not outcomes of a selected test.
QUIET_OUTCOMES = frozenset({"deselected", "warning", "warnings"})

_SUMMARY = re.compile(r"^=*\s*((?:\d+ [a-z]+(?:, )?)+) in [0-9.]+s\b")


def summary_counts(stdout: str) -> dict[str, int]:
    """Outcome -> count from pytest's last summary line (``2 passed, 25 deselected in 31.5s``);
    empty if there is none (pytest died before it)."""
    for line in reversed(stdout.splitlines()):
        m = _SUMMARY.match(line.strip())
        if m:
            return {word: int(n) for n, word in (part.split(" ") for part in m[1].split(", "))}
    return {}


# -- parsing and configuration ------------------------------------------------------------
def test_parse_pytest_summary() -> None:
    assert summary_counts("x\n2 passed, 25 deselected in 31.52s\n") == {"passed": 2, "deselected": 25}
    line = "==== 1 failed, 1 passed, 1 error, 3 warnings in 62.10s (0:01:02) ===="
    assert summary_counts(f"{line}\nexplorations\n") == {"failed": 1, "passed": 1, "error": 1, "warnings": 3}
    assert summary_counts("2 passed here, not a summary\n") == {}


def test_parse_ssh_url() -> None:
    t = parse_ssh_url("ssh://kdev@box.lan:2222")
    assert (t.user, t.box, t.port) == ("kdev", "box.lan", 2222)
    assert parse_ssh_url("ssh://box").port is None
    with pytest.raises(RigError, match="expected 'local' or ssh://"):
        parse_ssh_url("box:22")


def test_ssh_config_is_honoured(sshd: PrivateSshd, tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.write_text(
        f"Host testbox\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
        f"  IdentityFile {sshd.client_key}\n  UserKnownHostsFile {sshd.known_hosts}\n"
    )
    h = SshHost.from_url("ssh://testbox", config_file=cfg)
    try:
        assert h.label == f"ssh://root@127.0.0.1:{sshd.port}"
        assert h.run(["id", "-un"]) == (0, "root\n")
    finally:
        h.close()


def test_agent_key_is_used(sshd: PrivateSshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)], stdout=subprocess.DEVNULL)
    try:
        assert wait_until(agent_sock.exists, 5)
        env = dict(os.environ, SSH_AUTH_SOCK=str(agent_sock))
        subprocess.run(["ssh-add", "-q", str(sshd.client_key)], env=env, check=True, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(agent_sock))
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* to fall back on
        h = SshHost.from_url(sshd.url, known_hosts=sshd.known_hosts, config_file=tmp_path / "none")
        try:
            assert h.run(["true"])[0] == 0
        finally:
            h.close()
    finally:
        agent.kill()
        agent.wait(5)


# -- the four connection faults: one line, in seconds, nothing left ------------------------------
def one_line_error(sshd: PrivateSshd | None, **kwargs: object) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(SshError) as err:
        SshHost.from_url(**kwargs)  # type: ignore[arg-type]
    took = time.monotonic() - t0
    msg = str(err.value)
    assert "\n" not in msg
    if sshd is not None:
        assert wait_until(lambda: not sshd.session_processes(), 5)
        assert not sshd.connection_pids() or wait_until(lambda: not sshd.connection_pids(), 5)
    return msg, took


def test_unknown_host_key_is_refused(sshd: PrivateSshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    msg, took = one_line_error(sshd, url=sshd.url, identity=sshd.client_key, known_hosts=empty)
    assert f"[127.0.0.1]:{sshd.port} is not in {empty}" in msg
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}" in msg
    assert took < 10


def test_changed_host_key_is_refused(sshd: PrivateSshd, tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {Path(f'{other}.pub').read_text()}")
    msg, took = one_line_error(sshd, url=sshd.url, identity=sshd.client_key, known_hosts=wrong)
    assert "HOST KEY CHANGED" in msg and f"ssh-keygen -R '[127.0.0.1]:{sshd.port}'" in msg
    assert took < 10


def test_refused_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        msg, took = one_line_error(None, url=f"ssh://root@127.0.0.1:{port}")
    assert f"ssh://root@127.0.0.1:{port}: connection refused" in msg
    assert took < 10


def test_auth_failure(sshd: PrivateSshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    msg, took = one_line_error(sshd, url=sshd.url, identity=stranger, known_hosts=sshd.known_hosts)
    assert f"authentication as root failed (tried the agent and {stranger})" in msg
    assert took < 10


# -- remote processes, directories and uploads ------------------------------------------------------
def test_private_dir_is_0700_and_removed(host: SshHost) -> None:
    local = host.private_dir("cr3rig-")
    remote = host.host_path(local)
    assert host.run(["stat", "-c", "%a %U", remote]) == (0, "700 root\n")
    assert (local.stat().st_mode & 0o777) == 0o700
    host.remove_private_dir(local)
    assert host.run(["test", "-e", remote])[0] != 0 and not local.exists()


def test_upload_by_hash_happens_once(host: SshHost, tmp_path: Path) -> None:
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(3 << 20))
    first = host.stage(f)
    again = host.stage(f)
    assert first == again and host.uploads.uploaded == ["blob"] and host.uploads.cached == ["blob"]
    assert host.uploads.bytes_uploaded == 3 << 20
    digest = subprocess.run(["sha256sum", str(f)], capture_output=True, text=True, check=True).stdout.split()[
        0
    ]
    assert first.endswith(digest) and host.run(["sha256sum", first])[1].split()[0] == digest


def test_upload_without_sftp_goes_over_exec_channels(
    host_without_sftp: SshHost, sshd_without_sftp: PrivateSshd, tmp_path: Path
) -> None:
    """The server refuses the sftp subsystem: stage() streams the file through ``cat``, the
    box's sha256sum checks it, and the bytes on the box are the file's; exists() and
    read_tail() answer as over SFTP."""
    h = host_without_sftp
    assert h.sftp is None
    assert "subsystem request for sftp by user root failed" in sshd_without_sftp.log.read_text()
    f = tmp_path / "blob"
    data = os.urandom((3 << 20) + 12345)  # not a whole number of the sender's chunks
    f.write_bytes(data)
    remote = h.stage(f)
    digest = hashlib.sha256(data).hexdigest()
    assert remote == f"{h.remote_cache}/{digest}"
    assert h.run(["sha256sum", remote])[1].split()[0] == digest
    assert h.run(["stat", "-c", "%a %s", remote]) == (0, f"600 {len(data)}\n")
    assert Path(remote).read_bytes() == data  # the "box" is this machine
    assert h.stage(f) == remote and h.uploads.uploaded == ["blob"] and h.uploads.cached == ["blob"]
    assert h.uploads.bytes_uploaded == len(data)
    assert sorted(os.listdir(h.remote_cache)) == [digest], "a .part file was left on the box"

    d = h.private_dir("cr3rig-")
    try:
        log = d / "out.log"
        assert not h.exists(log)
        with pytest.raises(OSError, match="tail"):
            h.read_tail(log, 16)
        Path(h.host_path(log)).write_bytes(data[:100_000])
        assert h.exists(log)
        assert h.read_tail(log, 1000) == data[99_000:100_000]
        assert h.read_tail(log, 1 << 20) == data[:100_000]
    finally:
        h.remove_private_dir(d)


def test_a_failed_upload_without_sftp_names_the_fix(host_without_sftp: SshHost, tmp_path: Path) -> None:
    """Where the exec-channel path itself fails (here: no file can be made in the cache
    directory), the error is one line naming the sshd_config line that enables SFTP."""
    h = host_without_sftp
    h.remote_cache = "/proc/self"  # exists; nothing can be created in it
    f = tmp_path / "blob"
    f.write_bytes(b"x" * 1000)
    with pytest.raises(RigError) as err:
        h.stage(f)
    msg = str(err.value)
    assert "\n" not in msg and "by `cat` failed" in msg, msg
    assert "Subsystem sftp internal-sftp" in msg and "sshd_config" in msg, msg


def test_gdbstub_stream_is_a_channel_with_the_links_timeouts(host: SshHost) -> None:
    """``SshHost.open_stream`` (the relay's gdbstub link) is a streamlocal channel to the
    box's socket with the socket behaviour RspLink relies on: a reply that never comes is
    a ReplyTimeout at the link's bound, a Python-level timeout is TimeoutError, the
    bytes arrive as sent, and the other end closing is the end of the stream."""
    local = host.private_dir("cr3rig-")
    try:
        path = local / "stub.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(host.host_path(path))  # the "box" is this machine: bind its remote path
        server.listen(1)
        stream = host.open_stream(path)
        assert isinstance(stream, ChannelStream)
        conn, _ = server.accept()
        link = RspLink(stream, acks=False, reply_timeout=0.5)
        set_receive_timeout(stream, 0.5)
        t0 = time.monotonic()
        with pytest.raises(ReplyTimeout, match=r"no reply within 0\.5 s"):
            link.transact(["?"])
        assert 0.4 < time.monotonic() - t0 < 3
        assert conn.recv(64) == b"$?#3f"
        stream.settimeout(0.2)
        with pytest.raises(TimeoutError):
            stream.recv(16)
        stream.settimeout(None)
        conn.sendall(b"$OK#9a")
        assert link.transact(["g"]) == ["OK"]
        conn.close()
        server.close()
        with pytest.raises(RigError, match="closed the gdbstub connection"):
            link.transact(["?"])
        stream.close()
    finally:
        host.remove_private_dir(local)


def qemu_argv() -> list[str]:
    return ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-m", "16"]


def test_supervisor_gives_qemu_its_own_group_and_kills_it_on_close(host: SshHost, sshd: PrivateSshd) -> None:
    d = host.private_dir("cr3rig-")
    proc = host.spawn(qemu_argv(), log=d / "qemu.log")

    def ids() -> list[str]:
        return host.run(["ps", "-o", "pgid=,sid=,comm=", "-p", str(proc.pid)])[1].split()

    wait_until(lambda: "qemu-system-x86" in ids(), 5)  # setsid execs QEMU just after "pid N"
    got = ids()
    assert got == [str(proc.pid), str(proc.pid), "qemu-system-x86"], got
    assert proc.poll() is None
    proc.kill()
    assert proc.poll() == 137 and "status 137" in proc.exit_text()
    assert host.run(["test", "-e", host.host_path(d)])[0] != 0, "the supervisor left the private dir"
    assert wait_until(lambda: not sshd.session_processes(), 5), sshd.session_processes()
    host.remove_private_dir(d)


@pytest.mark.parametrize("side", ["client", "server"])
def test_dropped_connection_kills_qemu_on_the_box(sshd: PrivateSshd, remote_cache: str, side: str) -> None:
    """The session ends without the rig's help: the TCP connection is cut (client side) or
    sshd's process for the connection dies (server side). QEMU must not survive."""
    h = SshHost.from_url(sshd.url, identity=sshd.client_key, known_hosts=sshd.known_hosts)
    try:
        d = h.private_dir("cr3rig-")
        remote = h.host_path(d)
        proc = h.spawn(qemu_argv(), log=d / "qemu.log")
        assert wait_until(lambda: any("qemu-system" in p for p in sshd.session_processes()), 5)
        if side == "client":
            drop_connection(h)
        else:
            for pid in sshd.connection_pids():
                os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not sshd.session_processes(), 10), sshd.session_processes()
        assert not os.path.exists(remote), "the supervisor left the private dir"
        assert wait_until(lambda: proc.poll() is not None, 10)
        assert f"the SSH connection to {sshd.url} was lost" in proc.exit_text()
    finally:
        h.close()


def test_qemu_machine_over_ssh(host: SshHost, base_config: GuestConfig) -> None:
    """QEMU on the box, QMP through the forwarded socket; the kernel and initramfs uploaded."""
    m = QemuMachine(host, QemuConfig(base_config.kernel, base_config.initrd, base_config.cmdline()))
    try:
        m.start()
        assert m.status() == "prelaunch" or m.status() == "paused"
        assert (m.qmp_socket.stat().st_mode & 0o777) == 0o600
        assert str(m.qmp_socket).startswith(str(m.dir)) and not m.dir.samefile(host.host_path(m.dir))
    finally:
        m.close()
    assert not m.dir.exists()


def test_kvm_uses_cpu_host() -> None:
    from rig.transport.local import LocalHost

    m = QemuMachine(LocalHost(), QemuConfig(Path("k"), Path("i"), "", accel="kvm"))
    try:
        argv = m.argv("qemu")
        assert argv[argv.index("-cpu") + 1] == "host"
        assert argv[argv.index("-accel") + 1] == "kvm"
    finally:
        m.close()


# -- KVM readiness (KVM itself cannot be proved here) ----------------------------------------------
def test_probe_boot_runs_and_is_bounded(host: SshHost) -> None:
    assert probe_boot(host, "qemu-system-x86_64", "tcg", probe_firmware()) is None
    t0 = time.monotonic()
    why = probe_boot(host, "qemu-system-x86_64", "tcg", probe_firmware(halts=False), seconds=2)
    assert why is not None and "did not finish within 2 s" in why
    assert time.monotonic() - t0 < 10


def test_dropped_connection_ends_the_kvm_probe(sshd: PrivateSshd, remote_cache: str) -> None:
    """The probe's QEMU runs under the supervisor: cutting the connection mid-probe kills
    it on the box at once (not at the probe's 60 s bound), and the probe raises one error
    naming the lost connection."""
    h = SshHost.from_url(sshd.url, identity=sshd.client_key, known_hosts=sshd.known_hosts)
    h.remote_cache = remote_cache
    outcome: list[BaseException | str | None] = []

    def probe() -> None:
        try:
            outcome.append(
                probe_boot(h, "qemu-system-x86_64", "tcg", probe_firmware(halts=False), seconds=60)
            )
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=probe)
    try:
        worker.start()
        assert wait_until(lambda: any("qemu-system" in p for p in sshd.session_processes()), 10)
        t0 = time.monotonic()
        drop_connection(h)
        assert wait_until(lambda: not sshd.session_processes(), 10), sshd.session_processes()
        worker.join(15)
        assert not worker.is_alive() and time.monotonic() - t0 < 20
    finally:
        h.close()
        worker.join(15)
    assert len(outcome) == 1 and isinstance(outcome[0], RigError), outcome
    line = str(outcome[0])
    assert "\n" not in line and f"the SSH connection to {sshd.url} was lost" in line, line


def test_kernel_probe_over_ssh(host: SshHost, base_config: GuestConfig) -> None:
    assert kernel_probe(host, "qemu-system-x86_64", "tcg", base_config.kernel, base_config.initrd) is None


def test_kernel_probe_refuses_a_nested_kvm_whichever_way_it_fails(base_config: GuestConfig) -> None:
    """This machine is the case the probe exists for: /dev/kvm without vmx/svm, whose KVM
    cannot run a kernel. Machines of this kind fail in different ways (and one machine
    differently over time): QEMU aborts at start setting IA32_ARCH_CAPABILITIES (MSR
    0x10a) with -cpu host, and the probe starts again with host,-arch-capabilities; the
    guest hangs (in the decompressor, or stopped by a KVM internal error); or QEMU exits
    with an error. Each must be a refusal in one line naming its cause, within the bound.
    On a real KVM host this test skips."""
    from rig.transport.local import LocalHost

    flags = Path("/proc/cpuinfo").read_text()
    if " vmx" in flags or " svm" in flags or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs the nested /dev/kvm of this kind of machine (no vmx/svm flag, /dev/kvm usable)")
    kernel = base_config.kernel
    t0 = time.monotonic()
    why = kernel_probe(LocalHost(), "qemu-system-x86_64", "kvm", kernel, base_config.initrd, 15)
    took = time.monotonic() - t0
    assert why is not None, "a KVM that cannot run a kernel passed the kernel probe"
    fallback = (
        rf" with -cpu host,-arch-capabilities \(-cpu host failed: {re.escape(ARCH_CAPABILITIES_CAUSE)}\)"
    )
    m = re.fullmatch(
        rf"a KVM boot of {re.escape(kernel.name)}(?P<fallback>{fallback})? "
        r"(?:did not reach user space within 15 s \(a nested KVM that hangs\?\); last console line: .*"
        r"|failed with status -?\d+: (?P<said>.+))",
        why,
    )
    assert m is not None and "\n" not in why, why
    said = m["said"]
    assert said is None or (said.strip() and said != "no output"), why
    if said is not None and "MSR 0x10a" in said:
        assert said == ARCH_CAPABILITIES_CAUSE, why  # the abort by name, not QEMU's assertion line
    assert took < 40, f"{took:.1f} s: {why}"


# -- a guest and the testcases over SSH ------------------------------------------------------------
@pytest.mark.boots
def test_connection_dropped_mid_test(
    sshd: PrivateSshd, base_config: GuestConfig, tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CR3RIG_TEST_TAG", tag)  # GDB here carries the tag
    h = SshHost.from_url(sshd.url, identity=sshd.client_key, known_hosts=sshd.known_hosts)
    try:
        g = Guest.boot(dataclasses.replace(base_config), h)
        try:
            g.start_workload("syscall-loop")
            drop_connection(h)
            t0 = time.monotonic()
            with pytest.raises(RigError) as err:
                g.break_on(g.symbols.address("entry_SYSCALL_64"), g.config.isolated)
            assert time.monotonic() - t0 < 35
            assert f"the SSH connection to {sshd.url} was lost" in str(err.value).splitlines()[0]
        finally:
            g.close()
    finally:
        h.close()
    assert wait_until(lambda: not sshd.session_processes(), 10), sshd.session_processes()
    assert not processes_tagged(tag)


@pytest.mark.boots
def test_guest_boots_over_ssh_without_sftp(
    host_without_sftp: SshHost, sshd_without_sftp: PrivateSshd, base_config: GuestConfig
) -> None:
    """A whole boot on a box without SFTP: the kernel and initramfs go up through ``cat``,
    QEMU's sockets are found by ``test -e``, and the guest is the kernel that was sent."""
    h = host_without_sftp
    g = Guest.boot(dataclasses.replace(base_config), h)
    try:
        assert g.release and g.pti_enabled
        assert sorted(h.uploads.uploaded) == sorted([base_config.kernel.name, base_config.initrd.name])
        assert f"cr3rig: kernel {g.release}" in g.machine.console_tail(400)  # read by `tail -c`
    finally:
        g.close()
    assert h.sftp is None


@pytest.mark.boots
def test_testcases_pass_over_ssh(sshd: PrivateSshd, tag: str, tmp_path: Path) -> None:
    """The cheap CI form of ``pytest testcases/ --host ssh://...``: two PTI testcases on
    the stock kernel through the plugin, with nothing left on either side. The run must
    exit 0 with exactly those two passed and no other outcome (no error, failure or skip
    beside them)."""
    two_testcases_pass(sshd, tag, tmp_path)


@pytest.mark.boots
def test_testcases_pass_over_ssh_without_sftp(
    sshd_without_sftp: PrivateSshd, tag: str, tmp_path: Path
) -> None:
    """The same run on a box whose sshd has no SFTP (it once ended in an INTERNALERROR)."""
    two_testcases_pass(sshd_without_sftp, tag, tmp_path)
    assert "subsystem request for sftp by user root failed" in sshd_without_sftp.log.read_text()


def two_testcases_pass(sshd: PrivateSshd, tag: str, tmp_path: Path) -> None:
    """Run two PTI testcases through the plugin on ``sshd``; exactly they pass, nothing is left."""
    names = ["test_syscall_entry_flips_cr3_at_mov_to_cr3", "test_user_tables_map_cpu_entry_area"]
    xml = tmp_path / "junit.xml"
    r = run_pytest(
        ["--kernel", "debian", "-k", " or ".join(names), f"--junitxml={xml}", *sshd.options()], tag
    )
    shown = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, shown
    counts = summary_counts(r.stdout)
    assert {k: v for k, v in counts.items() if k not in QUIET_OUTCOMES} == {"passed": 2}, shown
    assert {n: o[0] for n, o in junit_outcomes(xml).items()} == dict.fromkeys(names, "passed"), shown
    assert wait_until(lambda: not sshd.session_processes(), 10), sshd.session_processes()


def test_accel_kvm_is_checked_on_the_box(sshd: PrivateSshd, tag: str) -> None:
    """This machine's CPU has no vmx/svm flag, so --accel kvm over SSH stops in seconds."""
    if " vmx" in Path("/proc/cpuinfo").read_text() or " svm" in Path("/proc/cpuinfo").read_text():
        pytest.skip("this machine has VT-x/AMD-V: the refusal cannot be shown here")
    t0 = time.monotonic()
    r = run_pytest([*sshd.options(), "--accel", "kvm"], tag)
    assert time.monotonic() - t0 < 30 and r.returncode == 4
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(lines) == 1, r.stderr
    assert f"--accel kvm cannot run on {sshd.url}: the CPU has no vmx/svm flag" in lines[0]


def test_bad_host_is_a_usage_error(sshd: PrivateSshd, tmp_path: Path, tag: str) -> None:
    empty = tmp_path / "kh"
    empty.write_text("")
    t0 = time.monotonic()
    r = run_pytest(
        ["--host", sshd.url, "--ssh-identity", str(sshd.client_key), "--ssh-known-hosts", str(empty)], tag
    )
    assert time.monotonic() - t0 < 30
    assert r.returncode == 4
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(lines) == 1 and "is not in" in lines[0], r.stderr
