"""The container matrix runner (rig.tools.matrix): cells, engine commands, JUnit, the table.

The JUnit files come from real pytest runs; the engine test runs the real podman when it
is installed. Running whole cells (minutes each) is the matrix's own job, not CI's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rig.observe.findings import SkipKind
from rig.report.junit import SKIP_KIND, read_junit
from rig.tools import matrix
from rig.tools.matrix import Cell, CellResult, Engine, MatrixError, Outcome
from rig.transport.host import processes_with_env

SAMPLE_TESTS = """
import pytest

def test_passes():
    assert True

def test_fails():
    assert 1 == 2, "one is not two"

@pytest.mark.skip(reason="kernel has no CONFIG_TRACK_CR3")
def test_skipped():
    pass

@pytest.fixture
def broken():
    raise RuntimeError("guest did not boot: kernel panic")

def test_errors(broken):
    pass

@pytest.mark.parametrize("w", ["a", "b"])
def test_param(w):
    pass
"""


def _real_junit(tmp_path: Path, source: str = SAMPLE_TESTS) -> Path:
    """Run pytest on ``source`` (as testcases/test_sample.py) and return its JUnit XML."""
    d = tmp_path / "testcases"
    d.mkdir(parents=True, exist_ok=True)
    (d / "test_sample.py").write_text(source)
    junit = tmp_path / "junit.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:cr3rig",
         f"--junitxml={junit}", str(d)],
        cwd=tmp_path, capture_output=True, check=False,
    )  # fmt: skip
    assert junit.exists()
    return junit


def test_parse_cell() -> None:
    assert matrix.parse_cell("trixie:reference-7.2") == Cell("trixie", "reference-7.2")
    assert matrix.parse_cell("sid:debian").slug == "sid__debian"
    for bad in ("trixie", ":debian", "sid:", "sid/x:debian"):
        with pytest.raises(MatrixError, match="expected SUITE:KERNEL"):
            matrix.parse_cell(bad)
    with pytest.raises(MatrixError, match="is no file"):
        matrix.parse_cell("sid:/nonexistent/bzImage")


def test_path_kernel_mounts_its_build_tree(tmp_path: Path) -> None:
    image = tmp_path / "tree" / "arch" / "x86" / "boot" / "bzImage"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"MZ")
    assert matrix.kernel_mounts(str(image)) == [image.parent]
    (tmp_path / "tree" / "vmlinux").write_bytes(b"\x7fELF")
    cell = matrix.parse_cell(f"bookworm:{image}")
    assert matrix.kernel_mounts(cell.kernel) == [tmp_path / "tree"]
    argv = matrix.run_argv(Engine("docker", ("docker",)), cell, tmp_path / "c", tmp_path / "o")
    assert f"{tmp_path / 'tree'}:{tmp_path / 'tree'}:ro" in argv


def test_podman_engine_drops_default_ulimits(tmp_path: Path) -> None:
    eng = matrix.podman_engine(tmp_path, runc=True, containers_conf=None)
    assert eng.argv == ("podman", "--cgroup-manager=cgroupfs", "--runtime", "runc")
    conf = Path(eng.env["CONTAINERS_CONF"]).read_text()
    assert "[containers]" in conf and "default_ulimits = []" in conf
    # a containers.conf the user already has is kept, and crun hosts get no --runtime
    eng = matrix.podman_engine(tmp_path / "x", runc=False, containers_conf="/etc/mine.conf")
    assert eng.env == {"CONTAINERS_CONF": "/etc/mine.conf"} and "--runtime" not in eng.argv
    assert not (tmp_path / "x").exists()


def test_run_argv_shares_the_cache_at_the_same_path(tmp_path: Path) -> None:
    eng = Engine("podman", ("podman", "--cgroup-manager=cgroupfs"))
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = matrix.run_argv(eng, Cell("sid", "debian"), cache, out, pytest_args=["-k", "it's"])
    assert argv[:4] == ["podman", "--cgroup-manager=cgroupfs", "run", "--rm"]
    assert f"{cache}:{cache}" in argv and f"CR3RIG_CACHE={cache}" in argv
    assert f"{out}:/out" in argv and "CR3RIG_MATRIX_KERNEL=debian" in argv
    assert argv[-4:-2] == ["cr3rig:sid", "sh"]
    script = argv[-1]
    assert "pytest testcases/" in script and "--junitxml=/out/junit.xml" in script
    assert "'it'\\''s'" in script
    prep = matrix.run_argv(eng, Cell("sid", "debian"), cache, out, prepare_only=True)[-1]
    assert "rig.supply.kernel" in prep and "pytest" not in prep
    b = matrix.build_argv(eng, "trixie", Path("/repo"))
    assert b[2:] == ["build", "--network", "host", "--build-arg", "SUITE=trixie", "-t", "cr3rig:trixie",
                     "-f", "/repo/Dockerfile", "/repo"]  # fmt: skip


def test_cell_script_is_valid_shell() -> None:
    script = matrix.cell_script(["-k", "x y"])
    res = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_outcomes_from_a_real_pytest_run(tmp_path: Path) -> None:
    got = matrix.outcomes_of(read_junit(_real_junit(tmp_path)))
    assert {t: o.status for t, o in got.items()} == {
        "test_sample.py::test_passes": "pass",
        "test_sample.py::test_fails": "FAIL",
        "test_sample.py::test_skipped": "skip",
        "test_sample.py::test_errors": "error",
        "test_sample.py::test_param[a]": "pass",
        "test_sample.py::test_param[b]": "pass",
    }
    assert got["test_sample.py::test_skipped"].message == "kernel has no CONFIG_TRACK_CR3"
    assert "one is not two" in got["test_sample.py::test_fails"].message
    with pytest.raises(ValueError, match="unreadable JUnit"):
        read_junit("<testsuite><testcase")


def test_judge_cell(tmp_path: Path) -> None:
    cell = Cell("sid", "reference-6.1")
    (tmp_path / "qemu-version").write_text("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1)\n")
    (tmp_path / "prepare.log").write_text("Traceback...\nKernelBuildError: make failed\n")
    r = matrix.judge_cell(cell, tmp_path, matrix.PREPARE_FAILED, 3.0)
    assert (r.status, r.reason, r.qemu) == ("kernel failed", "KernelBuildError: make failed",
                                            "11.1.3 (Debian 1:11.1.3+ds-1)")  # fmt: skip
    r = matrix.judge_cell(cell, tmp_path, 4, 3.0)
    assert r.status == "no result" and r.reason.startswith("exit 4")
    shutil.copy(_real_junit(tmp_path / "a"), tmp_path / "junit.xml")
    r = matrix.judge_cell(cell, tmp_path, 1, 3.0)
    assert r.status == "failed" and not r.ok
    assert r.counts() == {"pass": 3, "FAIL": 1, "error": 1, "skip": 1}
    boot = "import pytest\n@pytest.fixture\ndef g():\n    raise RuntimeError('guest did not boot: panic')\n"
    boot += "def test_a(g): pass\ndef test_b(g): pass\n"
    shutil.copy(_real_junit(tmp_path / "b", boot), tmp_path / "junit.xml")
    r = matrix.judge_cell(cell, tmp_path, 1, 3.0)
    assert r.status == "boot failed" and "guest did not boot: panic" in r.reason


def _run_cell_pytest(cell_out: Path, source: str) -> int:
    """Run a real pytest on ``source`` the way a cell does: JUnit and log into ``cell_out``; its status."""
    d = cell_out / "testcases"
    d.mkdir(parents=True)
    (d / "test_cell.py").write_text(source)
    with open(cell_out / "pytest.log", "w") as log:
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:cr3rig",
             f"--junitxml={cell_out / 'junit.xml'}", str(d)],
            cwd=cell_out, stdout=log, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    return res.returncode


BOOT_EXIT_TESTS = """
import pytest

def test_first():
    pass

def test_second():
    pytest.exit("cr3rig: the guest did not boot: kernel panic (the default configuration cannot boot)",
                returncode=3)

def test_third():
    pass
"""


def test_a_pytest_exit_at_boot_is_not_ok(tmp_path: Path) -> None:
    """Real pytest: the rig's pytest.exit(returncode=3) leaves a JUnit file with nothing failed."""
    rc = _run_cell_pytest(tmp_path, BOOT_EXIT_TESTS)
    assert rc == 3 and (tmp_path / "junit.xml").exists()
    outcomes = matrix.outcomes_of(read_junit(tmp_path / "junit.xml"))
    # the JUnit file alone looks green: what ran passed, the stopped test is no failure
    assert {o.status for o in outcomes.values()} == {"pass"}
    assert "test_cell.py::test_first" in outcomes and "?" not in outcomes
    r = matrix.judge_cell(Cell("trixie", "reference-7.2"), tmp_path, rc, 5.0)
    assert not r.ok and r.status == "boot failed"
    assert r.reason == (
        "pytest exit 3: cr3rig: the guest did not boot: kernel panic (the default configuration cannot boot)"
    )
    md = matrix.render_markdown([r])
    assert "| result | **1 pass** |" in md
    assert "trixie:reference-7.2: boot failed: pytest exit 3: cr3rig: the guest did not boot" in md
    assert matrix.main(["--merge", _write_json(tmp_path, [r]), "--out", str(tmp_path / "o")]) == 1


def test_a_config_error_at_boot_is_no_result(tmp_path: Path) -> None:
    """Real pytest: bad input found at boot ends the run with status 4; the cell says why."""
    source = "import pytest\n\ndef test_a():\n"
    source += "    pytest.exit('cr3rig: --kernel /x: no such file', returncode=4)\n"
    rc = _run_cell_pytest(tmp_path, source)
    assert rc == 4 and (tmp_path / "junit.xml").exists()
    r = matrix.judge_cell(Cell("sid", "debian"), tmp_path, rc, 1.0)
    assert (r.status, r.reason) == ("no result", "pytest exit 4: cr3rig: --kernel /x: no such file")


def test_stop_reason() -> None:
    log = "=== 1 passed in 0.2s ===\n!!!!! _pytest.outcomes.Exit: cr3rig: x did not boot: panic !!!!!\n"
    assert matrix.stop_reason(log) == "cr3rig: x did not boot: panic"
    assert matrix.stop_reason("cr3rig: worker gw1 ended without reporting\n=== 2 passed ===\n") == (
        "cr3rig: worker gw1 ended without reporting"
    )
    assert matrix.stop_reason("Traceback\nImportError: no module x\n") == "ImportError: no module x"
    assert matrix.stop_reason("") == "(no output)"


def _write_json(tmp_path: Path, results: list[CellResult]) -> str:
    f = tmp_path / "m.json"
    f.write_text(matrix.to_json(results))
    return str(f)


#: Skip texts as the testcases word them (kernel release and symbol source vary); the
#: matrix reads their kinds, never the texts.
PCID_SKIP = (
    "NOT COVERED: PCID is off in this guest (CR4.PCIDE=0, accel=tcg; TCG has no PCID), so the PCID "
    "CR3 sites are not tested by this run; run with --accel kvm on a VT-x/AMD-V host"
)
SIGNAL_SKIP = (
    "kernel_cr3_loaded (CONFIG_TRACK_CR3, the CR3-signal patch) missing: kernel 6.12.118+deb13-amd64, "
    "symbols from kallsyms"
)
OTHER_SKIP = "kernel 7.2.0 runs without PTI (dmesg has no 'page tables isolation: enabled')"


def _skip_tests(*skips: tuple[SkipKind | None, str]) -> str:
    """Tests that skip for each (kind, reason), recording the kind as the testcases do."""
    src = "import pytest\n\ndef test_runs():\n    pass\n"
    for i, (kind, why) in enumerate(skips):
        src += f"\ndef test_skips_{i}(request):\n"
        if kind is not None:
            src += f"    request.node.user_properties.append(({SKIP_KIND!r}, {kind.value!r}))\n"
        src += f"    pytest.skip({why!r})\n"
    return src


def test_skip_expected_per_kernel_kind() -> None:
    for kernel in ("reference-7.2", "reference-6.1"):
        assert matrix.skip_expected(kernel, SkipKind.PCID_OFF)
        assert not matrix.skip_expected(kernel, SkipKind.NO_SIGNAL)
        assert not matrix.skip_expected(kernel, None)
    assert matrix.skip_expected("debian", SkipKind.PCID_OFF) and matrix.skip_expected(
        "debian", SkipKind.NO_SIGNAL
    )
    assert not matrix.skip_expected("debian", None)
    assert matrix.skip_expected("/some/bzImage", None)
    for kernel in ("reference-7.2", "debian"):
        assert matrix.skip_expected(kernel, SkipKind.PLUGIN_REFUSED)


def test_the_testcases_record_the_kinds_the_matrix_reads() -> None:
    """The skips a kernel kind may give are recorded as such by the testcases that give
    them (a text the matrix matched once went stale when a testcase reworded it)."""
    testcases = Path(matrix.REPO_ROOT) / "testcases"
    assert "note_skip(request.node, SkipKind.NO_SIGNAL)" in (testcases / "conftest.py").read_text()
    assert "SkipKind.PCID_OFF" in (testcases / "test_pcid.py").read_text()
    assert "SkipKind.PLUGIN_REFUSED" in (testcases / "test_cr3_watch_plugin.py").read_text()


def test_an_unexpected_skip_fails_the_cell(tmp_path: Path) -> None:
    """Real pytest runs: which skips each kernel kind may give, and how the table shows the rest."""
    pcid, signal_skip, other = (
        (SkipKind.PCID_OFF, PCID_SKIP),
        (SkipKind.NO_SIGNAL, SIGNAL_SKIP),
        (None, OTHER_SKIP),
    )
    rc = _run_cell_pytest(tmp_path / "a", _skip_tests(pcid, signal_skip))
    assert rc == 0
    debian = matrix.judge_cell(Cell("trixie", "debian"), tmp_path / "a", rc, 1.0)
    assert debian.ok and not debian.unexpected_skips()
    ref = matrix.judge_cell(Cell("trixie", "reference-7.2"), tmp_path / "a", rc, 1.0)
    assert not ref.ok and ref.status == "failed"
    assert list(ref.unexpected_skips()) == ["test_cell.py::test_skips_1"]
    assert ref.reason == f"unexpected skip of test_cell.py::test_skips_1: {SIGNAL_SKIP}"
    path = matrix.judge_cell(Cell("trixie", str(tmp_path / "bzImage")), tmp_path / "a", rc, 1.0)
    assert path.ok

    rc = _run_cell_pytest(tmp_path / "b", _skip_tests(other, signal_skip))
    stock = matrix.judge_cell(Cell("sid", "debian"), tmp_path / "b", rc, 1.0)
    assert stock.status == "failed" and list(stock.unexpected_skips()) == ["test_cell.py::test_skips_0"]

    md = matrix.render_markdown([debian, ref, stock])  # without --reasons: unexpected skips still noted
    assert "| `test_cell.py::test_skips_0` | skip | skip | skip! [1] |" in md
    assert "| `test_cell.py::test_skips_1` | skip | skip! [2] | skip |" in md
    assert f"[1] {OTHER_SKIP}" in md and f"[2] {SIGNAL_SKIP}" in md
    assert "| result | 1 pass, 2 skip | **1 pass, 2 skip (1 unexpected)** |" in md
    assert f"trixie:reference-7.2: failed: unexpected skip of test_cell.py::test_skips_1: {SIGNAL_SKIP}" in md
    data = json.loads(matrix.to_json([ref]))[0]
    assert data["status"] == "failed"
    assert data["outcomes"]["test_cell.py::test_skips_1"]["unexpected"] is True
    assert data["outcomes"]["test_cell.py::test_skips_0"]["unexpected"] is False
    assert matrix.from_json(matrix.to_json([debian, ref, stock])) == [debian, ref, stock]
    assert matrix.main(["--merge", _write_json(tmp_path, [debian]), "--out", str(tmp_path / "o")]) == 0
    assert matrix.main(["--merge", _write_json(tmp_path, [debian, ref]), "--out", str(tmp_path / "o")]) == 1


def test_image_reason_names_the_tool_error() -> None:
    log = "Get:1 ...\nE: Release file for http://x/dists/sid/InRelease is expired\nError: building at STEP\n"
    assert matrix._image_reason("sid", log).startswith("E: Release file")
    log = 'Error: creating build container: short-name "debian:sid" did not resolve: not found\n'
    assert matrix._image_reason("sid", log).endswith("make it with scripts/debian-base-image.sh sid")


def test_table_markdown_and_json() -> None:
    outcomes = {"t.py::a": Outcome("pass"), "t.py::b": Outcome("skip", "no CONFIG_TRACK_CR3")}
    ok = CellResult("bookworm:debian", "ok", qemu="7.2.22", seconds=75, outcomes=outcomes)
    bad = CellResult("sid:reference-6.1", "kernel failed", "make: *** [vmlinux] Error 2", seconds=4)
    md = matrix.render_markdown([ok, bad])
    lines = md.splitlines()
    assert lines[0] == "| testcase | bookworm:debian | sid:reference-6.1 |"
    assert "| QEMU | 7.2.22 | ? |" in lines and "| result | 1 pass, 1 skip | kernel failed |" in lines
    assert "| time | 1 min 15 s | 4 s |" in lines
    assert "| `t.py::b` | skip |  |" in lines
    assert "sid:reference-6.1: kernel failed: make: *** [vmlinux] Error 2" in md
    md = matrix.render_markdown([ok, bad], reasons=True)
    assert "| `t.py::b` | skip [1] |  |" in md and "[1] no CONFIG_TRACK_CR3" in md
    back = matrix.from_json(matrix.to_json([ok, bad]))
    assert back == [ok, bad]
    assert json.loads(matrix.to_json([ok]))[0]["outcomes"]["t.py::b"]["message"] == "no CONFIG_TRACK_CR3"


def test_a_failure_always_carries_its_message() -> None:
    long = "GuestError: interrupt-entry: 200 hits in a row\n" + "x" * 2000
    outcomes = {"t.py::a": Outcome("FAIL", long), "t.py::b": Outcome("skip", "no PCID")}
    md = matrix.render_markdown([CellResult("trixie:reference-7.2", "failed", outcomes=outcomes)])
    assert "| `t.py::a` | FAIL [1] |" in md and "| `t.py::b` | skip |" in md
    note = next(line for line in md.splitlines() if line.startswith("[1] "))
    assert note.startswith("[1] GuestError: interrupt-entry: 200 hits in a row x")
    assert len(note) <= matrix.NOTE_CHARS + 4 and note.endswith("…")


def test_merge_exits_nonzero_on_a_broken_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = CellResult("bookworm:debian", "ok", qemu="7.2.22", outcomes={"t.py::a": Outcome("pass")})
    bad = CellResult("sid:debian", "image failed", "no base image debian:sid")
    (tmp_path / "1.json").write_text(matrix.to_json([ok]))
    (tmp_path / "2.json").write_text(matrix.to_json([bad]))
    assert matrix.main(["--merge", str(tmp_path / "1.json"), "--out", str(tmp_path / "o")]) == 0
    assert matrix.main(["--merge", str(tmp_path / "1.json"), str(tmp_path / "2.json"),
                        "--out", str(tmp_path / "o")]) == 1  # fmt: skip
    assert "sid:debian: image failed: no base image debian:sid" in capsys.readouterr().out
    assert "sid:debian" in (tmp_path / "o" / "matrix.md").read_text()


def test_bad_cell_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert matrix.main(["--cell", "bookworm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ERROR: cell 'bookworm': expected SUITE:KERNEL") and "\n" not in err


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed (apt-get install podman)")
def test_a_suite_without_base_image_is_reported_not_raised(tmp_path: Path) -> None:
    """Real podman: a suite with no base image fails its image build; the runner reports it and goes on."""
    eng = matrix.find_engine(tmp_path, "podman")
    res = matrix.run_matrix(
        [Cell("no-such-suite", "debian"), Cell("no-such-suite", "reference-7.2")],
        tmp_path, eng, cache=tmp_path / "cache", log=lambda s: None,
    )  # fmt: skip
    assert [r.status for r in res] == ["image failed", "image failed"]
    fix = "make it with scripts/debian-base-image.sh no-such-suite"
    assert res[0].reason == f"no base image debian:no-such-suite: {fix}"


def test_sigterm_removes_the_running_cells_container(tmp_path: Path) -> None:
    """A SIGTERM'd runner runs the cell's cleanup (``podman rm -f NAME`` in a real run;
    here a command that leaves a mark) and stops the cell's process group: before, the
    runner died and the container with its QEMU ran on (seen here on 2026-11-29)."""
    mark = tmp_path / "cleaned"
    tag = uuid.uuid4().hex
    script = (
        "from pathlib import Path\n"
        "from rig.tools import matrix\n"
        "from rig.transport.host import sigterm_as_ctrl_c\n"
        "sigterm_as_ctrl_c()\n"
        f"matrix._run_logged(['sleep', '60'], {{}}, Path({str(tmp_path / 'cell.log')!r}), 120,"
        f" cleanup=['touch', {str(mark)!r}])\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=matrix.REPO_ROOT,
        env=dict(os.environ, CR3RIG_TEST_TAG=tag),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _sleeping(tag):
            time.sleep(0.05)  # test-harness polling for the cell's process to exist
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=40)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert mark.exists(), "the cell's cleanup did not run"
    assert child.returncode != 0
    assert not _sleeping(tag)


def _sleeping(tag: str) -> bool:
    """Whether the cell's ``sleep 60`` (which carries ``tag`` in its environment) is alive."""
    return any(cmd.startswith("sleep") for _, cmd in processes_with_env("CR3RIG_TEST_TAG", tag))
