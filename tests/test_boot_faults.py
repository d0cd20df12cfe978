"""A boot that faults before its readiness marker is booted once more; a configuration
that faults on every boot fails after exactly two boots. Real boots of the stock kernel
in a child pytest session, through a QEMU wrapper that records each boot and makes some
fault: the default configuration's first boot runs a program that QEMU 7.2's TCG faults
(test_syscall_vdso_32's LRETQ, README "x86 selftests") with ``oops=panic``, and the first
boot of another configuration SIGKILLs QEMU while the kernel decompresses."""

from __future__ import annotations

import gzip
import io
import json
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

from rig.report.bootfault import RETRY_BOOTED
from rig.supply.cache import default_cache_dir
from rig.supply.initramfs import _dir, _file, _write_newc, build_initramfs
from rig.supply.selftests import build_selftests
from tests.cases.boot_fault_cases import KILLED, PANIC
from tests.conftest import REPO, junit_outcomes, run_pytest

BOOT_TIMEOUT = 60
#: the program QEMU 7.2's TCG faults: the LRETQ of its 64-bit thunk reads the user stack
#: as a supervisor access, a #PF the kernel oopses on (in user mode: the RIP is a user one)
TCG_FAULT = "test_syscall_vdso_32"

#: QEMU, but each boot (a run with -kernel) appends its -append to BOOTS; the first boot
#: with KILLED is SIGKILLed (with the wrapper) a second after QEMU opened its QMP socket;
#: the first boot of the default configuration gets FAULT_INITRD and oops=panic.
WRAPPER = r"""#!/bin/bash
case " $* " in *" -kernel "*) ;; *) exec qemu-system-x86_64 "$@";; esac
args=("$@") append="" qmp=""
for i in "${!args[@]}"; do
    case "${args[$i]}" in
        -append) append=${args[$((i + 1))]};;
        -qmp) qmp=${args[$((i + 1))]#unix:} && qmp=${qmp%%,*};;
    esac
done
echo "$append" >> "BOOTS"
case "$append" in
*KILLED*)
    if [ "$(grep -c -e KILLED "BOOTS")" = 1 ]; then
        qemu-system-x86_64 "$@" &
        for _ in $(seq 200); do [ -S "$qmp" ] && break; sleep 0.05; done
        sleep 1
        kill -9 $! $$
    fi;;
*rdinit=*) ;;
*)
    if [ "$(grep -v -c -e KILLED -e rdinit= "BOOTS")" = 1 ]; then
        for i in "${!args[@]}"; do
            [ "${args[$i]}" = -initrd ] && args[$((i + 1))]="FAULT_INITRD"
            [ "${args[$i]}" = -append ] && args[$((i + 1))]+=" oops=panic"
        done
    fi;;
esac
exec qemu-system-x86_64 "${args[@]}"
"""

#: /init of the faulting initramfs: the TCG-faulting program, then the rig's own init.
FAULT_INIT = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
/fault/PROGRAM > /dev/console 2>&1
/bin/busybox umount /dev
/bin/busybox umount /proc
exec /init.rig
"""


def faulting_initrd(path: Path) -> Path:
    """The rig's initramfs with an archive appended (the kernel unpacks both, the later
    one's files win) whose /init runs :data:`TCG_FAULT` before the rig's init."""
    base = build_initramfs(default_cache_dir())
    program = build_selftests().binaries[TCG_FAULT].read_bytes()
    buf = io.BytesIO()
    _write_newc(
        buf,
        [
            _dir("fault"),
            _file(f"fault/{TCG_FAULT}", program),
            _file("init", FAULT_INIT.replace(b"PROGRAM", TCG_FAULT.encode())),
            _file("init.rig", (REPO / "guests" / "initramfs" / "init").read_bytes()),
        ],
    )
    path.write_bytes(base.read_bytes() + gzip.compress(buf.getvalue()))
    return path


def _properties(xml: Path) -> dict[str, dict[str, str]]:
    return {
        tc.get("name", ""): {p.get("name", ""): p.get("value", "") for p in tc.iter("property")}
        for tc in ET.parse(xml).getroot().iter("testcase")
    }


def test_boot_fault_is_booted_again_and_a_repeated_one_fails(tag: str, tmp_path: Path) -> None:
    boots = tmp_path / "boots.txt"
    qemu = tmp_path / "qemu-faults-once"
    script = WRAPPER.replace("BOOTS", str(boots)).replace("KILLED", KILLED)
    qemu.write_text(script.replace("FAULT_INITRD", str(faulting_initrd(tmp_path / "fault.cpio.gz"))))
    qemu.chmod(qemu.stat().st_mode | stat.S_IXUSR)
    xml = tmp_path / "faults.xml"
    results_dir = tmp_path / "results"
    res = run_pytest(
        [
            "--kernel", "debian", "--qemu", str(qemu), "--boot-timeout", str(BOOT_TIMEOUT),
            f"--junitxml={xml}", "--trace-dir", str(results_dir),
        ],
        tag,
        target="tests/cases/boot_fault_cases.py",
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out[max(0, out.find("Traceback") - 2000) :][:6000]
    runs = boots.read_text().splitlines()
    # each configuration booted exactly twice: the faulted boot and the next one
    assert len([r for r in runs if PANIC in r]) == 2, runs
    assert len([r for r in runs if KILLED in r]) == 2, runs
    assert len([r for r in runs if PANIC not in r and KILLED not in r]) == 2, runs

    results = junit_outcomes(xml)
    assert results["test_default_boots"][0] == "passed", results
    assert results["test_killed_qemu_boots_again"][0] == "passed", results
    outcome, message, _ = results["test_panic_1"]
    assert outcome == "error" and "both boots faulted" in message and "Kernel panic" in message, message
    outcome, message, seconds = results["test_panic_2"]
    assert outcome == "error" and "not booted again" in message and seconds < 2, (message, seconds)

    props = _properties(xml)
    (tcg,) = json.loads(props["test_default_boots"]["cr3rig.boot_faults"])
    assert tcg["boot"] == 1 and tcg["kind"] == "kernel crash", (
        tcg,
        f"QEMU 7.2's TCG did not fault {TCG_FAULT}",
    )
    assert tcg["what"] == "Kernel panic - not syncing: Fatal exception", tcg["console_tail"]
    assert tcg["rip"].startswith("0033:0x"), tcg  # the user-mode RIP of the faulting LRETQ
    assert "BUG: unable to handle page fault" in tcg["console_tail"], tcg["console_tail"]
    assert tcg["then"] == RETRY_BOOTED, tcg
    (killed,) = json.loads(props["test_killed_qemu_boots_again"]["cr3rig.boot_faults"])
    assert killed["boot"] == 1 and killed["kind"] == "QEMU exit" and "signal 9" in killed["what"], killed
    assert killed["rip"] == "" and killed["then"] == RETRY_BOOTED, killed  # no register dump
    first, second = json.loads(props["test_panic_1"]["cr3rig.boot_faults"])
    assert (first["boot"], second["boot"]) == (1, 2)
    for f in (first, second):
        assert f["kind"] == "kernel crash" and "Kernel panic - not syncing" in f["what"], f
        assert "Kernel panic - not syncing" in f["console_tail"], f
        assert PANIC in f["cmdline"], f
    assert first["then"] == "the second boot faulted too" and "both boots faulted" in second["then"]
    assert "cr3rig.boot_faults" not in props["test_panic_2"]  # not booted: no fault of its own

    page = (results_dir / "index.html").read_text()
    assert page.count('class="boot-fault flaky"') == 2, page
    assert page.count('class="boot-fault repeated"') == 2, page
    assert "BUG: unable to handle page fault" in page and tcg["rip"] in page
    lines = [ln for ln in out.splitlines() if "boot fault (boot" in ln]
    assert [ln.split(" boot fault")[0] for ln in lines] == ["cr3rig: flaky"] * 2 + ["cr3rig: repeated"] * 2, (
        lines
    )


def test_what_is_a_fault() -> None:
    """A crash or a QEMU that ended by itself is a fault; a hang (QEMU still running at the
    boot timeout) and bad input are not: they are not booted again."""
    from rig.errors import ConfigError, GuestError
    from rig.guest import BootEnd
    from rig.pytestplugin.failfast import boot_fault

    def error(
        end: BootEnd, cls: type[GuestError] | type[ConfigError] = GuestError
    ) -> GuestError | ConfigError:
        exc = cls("k did not boot: something")
        exc.boot_end = end
        return exc

    oops = "\n".join(
        [
            "[    2.4] BUG: kernel NULL pointer dereference, address: 0000000000000008",
            "[    2.4] RIP: 0010:__jump_label_patch+0x8e/0x1a0",
            "[    2.4] Call Trace:",
            "[    2.4]  ? exc_page_fault+0x71/0x150",
            "[    2.4] RIP: 0033:0x4011d6",
            "[    2.4] Kernel panic - not syncing: Fatal exception",
        ]
    )
    crash = boot_fault(error(BootEnd("QEMU exited with status 0", False, oops)), "c", 1)
    assert crash is not None and crash.kind == "kernel crash"
    assert crash.what == "Kernel panic - not syncing: Fatal exception"
    assert crash.rip == "0010:__jump_label_patch+0x8e/0x1a0"  # the first dump's, not the user frame's
    triple = boot_fault(error(BootEnd("QEMU exited with status 0 after a triple fault", True, "")), "c", 2)
    assert triple is not None and (triple.kind, triple.rip, triple.boot) == ("triple fault", "", 2)
    killed = boot_fault(error(BootEnd("QEMU exited with signal 9 (SIGKILL)", False, "Linux version")), "c", 1)
    assert killed is not None and killed.kind == "QEMU exit"
    assert boot_fault(error(BootEnd(None, False, "Linux version")), "c", 1) is None  # a hang
    after_init = BootEnd(None, False, "", "SYSTEM_RUNNING", "vCPU 0 halted at default_idle+0x9", False)
    assert boot_fault(error(after_init), "c", 1) is None  # user space never became ready
    before = BootEnd(
        None, False, "", "SYSTEM_SCHEDULING", "vCPU 0 at check_timer+0x3c; vCPU 1 halted at x", True
    )
    hang = boot_fault(GuestError("k did not boot: no boot within 180 s; console tail:"), "c", 1)
    assert hang is None  # no boot_end: not from a boot
    exc = GuestError("k did not boot: no boot within 180 s; console tail:\n")
    exc.boot_end = before
    hang = boot_fault(exc, "c", 1)
    assert hang is not None and hang.kind == "timeout before init", hang
    assert hang.what == "the kernel still at SYSTEM_SCHEDULING", hang.what
    assert hang.rip == "vCPU 0 at check_timer+0x3c; vCPU 1 halted at x"
    assert "(vCPU 0 at check_timer+0x3c; vCPU 1 halted at x)" in hang.line()
    assert boot_fault(error(BootEnd(None, False, oops), ConfigError), "c", 1) is None  # bad input
    assert boot_fault(GuestError("not from a boot"), "c", 1) is None


def test_boot_faults_travel_from_a_worker_and_render() -> None:
    """The session report keeps each fault with its testcase through an xdist worker's wire
    data, marks it flaky or repeated, and lists a fault no testcase received."""
    from rig.report.bootfault import BootFault
    from rig.report.session import NO_TESTCASE, SessionReport, boot_fault_summary, render_index

    flaky = BootFault("c", 1, "triple fault", "QEMU exited", "", "tail <b>", RETRY_BOOTED)
    worker = SessionReport()
    worker.record("t::a").boot_faults.append(flaky.to_json())
    controller = SessionReport()
    controller.absorb(worker.to_wire(), "gw0")
    assert BootFault.from_json(controller.records["t::a"].boot_faults[0]) == flaky
    controller.pending_boot_faults.append(
        BootFault("d", 2, "kernel crash", "panic", "0010:f+0x1/0x2", "").to_json()
    )
    page = render_index(controller, Path("/tmp"))
    assert page.count('class="boot-fault flaky"') == 1 and page.count('class="boot-fault repeated"') == 1
    assert "tail &lt;b&gt;" in page and "0010:f+0x1/0x2" in page and NO_TESTCASE in page
    lines = boot_fault_summary(controller)
    assert lines[0].startswith("flaky boot fault (boot 1, for t::a): triple fault") and "repeated" in lines[1]


def test_a_boot_that_hangs_before_init_is_a_fault_and_one_after_it_is_not() -> None:
    """The reference kernel told to wait 600 s before it mounts a root (no initramfs init,
    ``rootdelay``) hangs before init (a fault: booted once more); told to run a shell as
    init, it hangs after (user space never printed the marker: not booted again). Real
    boots, 15 s timeouts."""
    from rig.errors import GuestError
    from rig.guest import Guest
    from rig.pytestplugin.failfast import boot_fault
    from tests.conftest import reference_config

    ends = {}
    for name, append in (
        ("rootdelay", "rdinit=/nonexistent rootdelay=600"),
        ("shell", "rdinit=/bin/sh"),
    ):
        config = reference_config(append=append, boot_timeout=15)
        try:
            Guest.boot(config).close()
        except GuestError as exc:
            assert exc.boot_end is not None, exc
            ends[name] = (exc, exc.boot_end)
        else:
            raise AssertionError(f"{append}: the guest booted")
    exc, end = ends["rootdelay"]
    assert end.hung_before_init and end.hang_state == "SYSTEM_SCHEDULING", end
    assert end.hang_where.startswith("vCPU 0 "), end.hang_where
    fault = boot_fault(exc, "c", 1)
    assert fault is not None and fault.kind == "timeout before init", fault
    assert fault.what == "the kernel still at SYSTEM_SCHEDULING", fault.what
    exc, end = ends["shell"]
    assert not end.hung_before_init and end.hang_state == "SYSTEM_RUNNING", end
    assert end.hang_where.startswith("vCPU 0 "), end.hang_where
    assert boot_fault(exc, "c", 1) is None
