"""The litmus runner (rig.tools.litmus): herd7's output parsed, verdicts judged, and the
whole litmus/ folder run through herd7.

tests/data/herd7/ holds real herd7 7.58 output (Debian sid's herdtools7 7.58-2, run as
rig.tools.litmus runs it):

* ``x86tso-7.58.out``: ``herd7 -model x86tso.cat *.litmus`` in litmus/ (stdout), one
  block per test;
* ``xadd-7.58.stderr``: its stderr for a test using ``LOCK XADD``, which herd7's X86
  syntax lacks: a warning, no result block, and exit status 0.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from rig.supply.cache import default_cache_dir
from rig.tools import litmus
from rig.tools.litmus import Herd7, HerdResult, LitmusError

DATA = Path(__file__).resolve().parent / "data" / "herd7"
OUT = DATA / "x86tso-7.58.out"
XADD_STDERR = DATA / "xadd-7.58.stderr"

SB_FENCED_READER = """X86 {name}
(* Question: a test of the runner: SB with the entry fenced, the reader not. *)
(* expect: {expect} *)
{{ signal=0; pte=0; }}
 P0              | P1               ;
 MOV [signal],$1 | MOV [pte],$1     ;
 MFENCE          | MOV EAX,[signal] ;
 MOV EAX,[pte]   |                  ;
exists (0:EAX=0 /\\ 1:EAX=0)
"""


def write_test(folder: Path, name: str = "a-v8+reader-po", expect: str = "allowed") -> Path:
    path = folder / f"{name}.litmus"
    path.write_text(SB_FENCED_READER.format(name=name, expect=expect))
    return path


def fake_herd7(folder: Path, stdout: Path | None, stderr: Path | None = None, status: int = 0) -> Herd7:
    """A stand-in herd7 that answers ``-version`` and prints captured output for any test."""
    script = folder / "herd7"
    lines = ["#!/bin/sh", 'if [ "$1" = -version ]; then echo "7.58, Rev: exported"; exit 0; fi']
    if stdout is not None:
        lines.append(f"cat '{stdout}'")
    if stderr is not None:
        lines.append(f"cat '{stderr}' >&2")
    lines.append(f"exit {status}")
    script.write_text("\n".join(lines) + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return Herd7((str(script),), "a stand-in")


# --------------------------------------------------------------------------
# Parsing real herd7 output


def by_name() -> dict[str, HerdResult]:
    return {r.name: r for r in litmus.parse_herd_output(OUT.read_text())}


def test_parse_every_block_of_a_real_run() -> None:
    results = litmus.parse_herd_output(OUT.read_text())
    assert len(results) == OUT.read_text().count("\nObservation ") == 10
    assert [r.name for r in results] == sorted(r.name for r in results)  # herd7 keeps the order given


def test_parse_an_allowed_outcome() -> None:
    r = by_name()["a-v8+reader-po"]
    assert r.states == ("0:EAX=0; 1:EAX=0;", "0:EAX=0; 1:EAX=1;", "0:EAX=1; 1:EAX=0;", "0:EAX=1; 1:EAX=1;")
    assert r.ok and (r.positive, r.negative) == (1, 3)
    assert r.condition == r"exists (0:EAX=0 /\ 1:EAX=0)"
    assert r.observation == "Sometimes" and r.verdict == "allowed"


def test_parse_a_forbidden_outcome() -> None:
    """herd7's ``Test NAME Allowed`` line names the clause's kind only: this one is forbidden."""
    assert "Test b-v8+reader-mfence Allowed" in OUT.read_text()
    r = by_name()["b-v8+reader-mfence"]
    assert "0:EAX=0; 1:EAX=0;" not in r.states and len(r.states) == 3
    assert not r.ok and (r.positive, r.negative) == (0, 3)
    assert r.observation == "Never" and r.verdict == "forbidden"


def test_parse_the_lock_variants() -> None:
    r = by_name()
    assert r["c1-lockxadd+reader-po"].verdict == "allowed"
    assert r["c2-lockxadd+reader-mfence"].verdict == "forbidden"
    assert r["c3-lockxadd-nocr3+reader-mfence"].verdict == "forbidden"


def test_parse_rejects_a_cut_block() -> None:
    text = OUT.read_text()
    cut = text[: text.index("Observation b-v8+reader-mfence")]
    with pytest.raises(LitmusError, match="b-v8\\+reader-mfence ends before its Observation"):
        litmus.parse_herd_output(cut)


def test_parse_rejects_a_miscounted_state_list() -> None:
    block = OUT.read_text().split("\n\n")[0].replace("States 4", "States 5")
    with pytest.raises(LitmusError, match=r"States|Observation"):
        litmus.parse_herd_output(block)


def test_parse_nothing_from_herd7s_complaint() -> None:
    assert litmus.parse_herd_output(XADD_STDERR.read_text()) == []


def test_only_exists_conditions_are_judged() -> None:
    r = by_name()["a-v8+reader-po"]
    forall = HerdResult(r.name, r.states, r.ok, r.positive, r.negative, "forall (0:EAX=1)", r.observation)
    with pytest.raises(LitmusError, match="only `exists`"):
        forall.verdict  # noqa: B018


# --------------------------------------------------------------------------
# Litmus files


def test_read_test(tmp_path: Path) -> None:
    t = litmus.read_test(write_test(tmp_path, "x-name", "forbidden"))
    assert (t.name, t.expect) == ("x-name", "forbidden")
    assert t.question == "a test of the runner: SB with the entry fenced, the reader not."


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (lambda s: s.replace("(* expect: allowed *)\n", ""), "expect"),
        (lambda s: s.replace("expect: allowed", "expect: maybe"), "expect"),
        (lambda s: s + "(* expect: forbidden *)\n", "expect"),
        (lambda s: s.replace("Question:", "Q:"), "Question"),
        (lambda s: s.replace("exists", "~exists"), "exists"),
        (lambda s: s.replace("X86 ", "ARM "), "X86 NAME"),
    ],
)
def test_read_test_demands_its_parts(tmp_path: Path, edit: Callable[[str], str], complaint: str) -> None:
    path = write_test(tmp_path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(LitmusError, match=complaint):
        litmus.read_test(path)


def test_every_test_in_the_folder_is_readable() -> None:
    tests = litmus.find_tests([litmus.LITMUS_DIR])
    assert len(tests) >= 10
    assert all(t.path.stem == t.name for t in tests), "a file is named after its test"
    assert {t.expect for t in tests} == {"allowed", "forbidden"}


# --------------------------------------------------------------------------
# Judging, through a stand-in herd7 that prints the captured output


def test_an_expected_verdict_is_ok(tmp_path: Path) -> None:
    test = litmus.read_test(write_test(tmp_path, expect="allowed"))
    row = litmus.run_test(fake_herd7(tmp_path, OUT), test)
    assert row.matches and row.verdict == "allowed" and not row.error


def test_a_wrong_expectation_is_a_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_test(tmp_path, expect="forbidden")  # herd7 says allowed
    row = litmus.run_test(fake_herd7(tmp_path, OUT), litmus.read_test(path))
    assert not row.matches and row.verdict == "allowed" and row.result is not None
    line = "| a-v8+reader-po | forbidden | allowed | Sometimes 1 / 3 | 4 | MISMATCH |"
    assert line in litmus.render_table([row])
    assert litmus.main([str(path), "--herd7", str(tmp_path / "herd7")]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "1 test(s), 0 as expected, 1 not" in out
    assert "herd7 says allowed, the test expects forbidden" in out


def test_no_result_from_herd7_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """herd7 exits 0 on a test it cannot parse: the row carries its warning."""
    path = write_test(tmp_path, name="xadd")
    row = litmus.run_test(fake_herd7(tmp_path, None, XADD_STDERR), litmus.read_test(path))
    assert not row.matches and row.verdict == "error" and row.result is None
    assert "herd7 gave no result: Warning:" in row.error and "unexpected 'XADD'" in row.error
    assert litmus.main([str(path), "--herd7", str(tmp_path / "herd7")]) == 1
    assert "| xadd | allowed | error |" in capsys.readouterr().out


def test_a_failing_herd7_is_an_error(tmp_path: Path) -> None:
    failing = fake_herd7(tmp_path, None, XADD_STDERR, status=3)
    row = litmus.run_test(failing, litmus.read_test(write_test(tmp_path)))
    assert row.verdict == "error" and row.error.startswith("herd7 exited 3: Warning:")


def test_no_herd7_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert litmus.main(["--herd7", str(tmp_path / "none"), str(write_test(tmp_path))]) == 2
    assert "ERROR:" in capsys.readouterr().err


def test_find_herd7_says_why_none_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LitmusError, match=r"no herd7 on PATH; none unpacked in .* --no-install"):
        litmus.find_herd7(tmp_path / "cache", install=False)


def test_debian_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# URIs: http://old.example/debian\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm\n\nURIs: http://mirror.example/debian-security\n"
    )
    assert litmus.debian_mirror(tmp_path) == "http://mirror.example/debian"
    monkeypatch.setenv("MIRROR", "http://other.example/debian/")
    assert litmus.debian_mirror(tmp_path) == "http://other.example/debian"
    monkeypatch.delenv("MIRROR")
    assert litmus.debian_mirror(tmp_path / "none") == "http://deb.debian.org/debian"


# --------------------------------------------------------------------------
# The real herd7


@pytest.fixture(scope="module")
def herd7() -> Herd7:
    """herd7 from PATH, else Debian sid's unpacked into the cache (downloaded on first use)."""
    try:
        return litmus.find_herd7(default_cache_dir())
    except LitmusError as e:
        pytest.skip(f"no herd7 can run here: {e}")


def test_litmus_folder_through_herd7(herd7: Herd7, capsys: pytest.CaptureFixture[str]) -> None:
    tests = litmus.find_tests([litmus.LITMUS_DIR])
    rows = [litmus.run_test(herd7, t) for t in tests]
    table = litmus.render_table(rows)
    assert all(r.matches for r in rows), table
    assert {r.verdict for r in rows} == {"allowed", "forbidden"}
    assert litmus.main([]) == 0
    assert f"{len(tests)} test(s), {len(tests)} as expected, 0 not" in capsys.readouterr().out


def test_real_herd7_reports_a_wrong_expectation(herd7: Herd7, tmp_path: Path) -> None:
    right = litmus.run_test(herd7, litmus.read_test(write_test(tmp_path, expect="allowed")))
    wrong = litmus.run_test(herd7, litmus.read_test(write_test(tmp_path, expect="forbidden")))
    assert right.matches, right
    assert not wrong.matches and wrong.verdict == "allowed" and wrong.error == ""


def test_real_herd7_has_no_xadd(herd7: Herd7, tmp_path: Path) -> None:
    """Why the LOCK XADD tests use LOCK ADD: herd7's X86 syntax has no XADD."""
    path = write_test(tmp_path, name="xadd")
    path.write_text(path.read_text().replace("MOV [signal],$1", "LOCK XADD [signal],EBX"))
    row = litmus.run_test(herd7, litmus.read_test(path))
    assert row.verdict == "error" and "XADD" in row.error
