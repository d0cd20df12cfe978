"""Tests of the pure parts of rig.tools.mutants (no kernel is built, no guest is booted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rig.observe.findings import FailureKind
from rig.tools import mutants
from rig.tools.mutants import (
    MUTANTS_DIR,
    MutantResult,
    Outcome,
    TestResults,
    UnknownMutantError,
    Verdict,
    caught_by_lines,
    discover_mutants,
    judge,
    parse_junit,
    render_markdown,
    render_table,
    run_failed,
    select_mutants,
    short_name,
)

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="2" failures="2" skipped="1" tests="7">
  <testcase classname="testcases.test_pti_entry" name="test_syscall_entry_flips_cr3_at_mov_to_cr3"
            time="3.1" />
  <testcase classname="testcases.test_cr3_signal" name="test_signal_tracks_cr3_over_a_syscall[iret-loop]">
    <properties><property name="cr3rig.failure" value="finding" /></properties>
    <failure message="AssertionError: step 412: CR3 became the user CR3 with the signal still 1">
trace...</failure>
  </testcase>
  <testcase classname="testcases.test_cr3_signal" name="test_signal_tracks_cr3_over_a_syscall[syscall-loop]">
    <properties><property name="cr3rig.failure" value="finding" /></properties>
    <failure message="AssertionError: first">x</failure>
  </testcase>
  <testcase classname="testcases.test_cr3_signal" name="test_signal_tracks_cr3_over_a_syscall[syscall-loop]">
    <error message="failed on teardown with &quot;GdbError: boom&quot;">y</error>
  </testcase>
  <testcase classname="testcases.test_pti_tables" name="test_user_tables_map_cpu_entry_area">
    <properties><property name="cr3rig.failure" value="kernel-crash" /></properties>
    <error message="failed on setup with &quot;rig.errors.GuestError: bzImage did not boot: {CRASHED}&quot;">
tail</error>
  </testcase>
  <testcase classname="testcases.test_pti_tables.TestGroup" name="test_in_class">
    <skipped type="pytest.skip" message="PTI is off">skip</skipped>
  </testcase>
  <testcase classname="testcases.test_pti_tables" name="test_gdb_hiccup">
    <properties><property name="cr3rig.failure" value="rig-error" /></properties>
    <error message="failed on setup with &quot;rig.errors.GdbError: ^error timeout&quot;">z</error>
  </testcase>
</testsuite></testsuites>
""".replace("{CRASHED}", "the guest kernel crashed during boot")

SIGNAL_IRET = "testcases/test_cr3_signal.py::test_signal_tracks_cr3_over_a_syscall[iret-loop]"
SIGNAL_SYSCALL = "testcases/test_cr3_signal.py::test_signal_tracks_cr3_over_a_syscall[syscall-loop]"
CEA = "testcases/test_pti_tables.py::test_user_tables_map_cpu_entry_area"
GDB = "testcases/test_pti_tables.py::test_gdb_hiccup"
ENTRY = "testcases/test_pti_entry.py::test_syscall_entry_flips_cr3_at_mov_to_cr3"


def results(**outcomes: Outcome) -> TestResults:
    """TestResults from keyword names (``t1=Outcome.FAILED``) -> ids ``t/x.py::t1``; a
    failure is a finding, an error a rig error."""
    ids = {f"t/x.py::{k}": v for k, v in outcomes.items()}
    kinds = {t: FailureKind.FINDING if o is Outcome.FAILED else FailureKind.RIG_ERROR for t, o in ids.items()}
    return TestResults(ids, {}, {t: k for t, k in kinds.items() if ids[t] in (Outcome.FAILED, Outcome.ERROR)})


# -- JUnit parsing ----------------------------------------------------------


def test_parse_junit_outcomes_and_ids() -> None:
    res = parse_junit(JUNIT)
    assert res.passed == [ENTRY]
    assert res.failed == [SIGNAL_IRET, SIGNAL_SYSCALL]
    assert res.errored == [GDB, CEA]
    assert res.skipped == ["testcases/test_pti_tables.py::TestGroup::test_in_class"]
    assert "still 1" in res.messages[SIGNAL_IRET]
    assert res.summary() == "1 passed, 2 failed, 2 error, 1 skipped"


def test_parse_junit_duplicate_id_keeps_worst_outcome_and_all_messages() -> None:
    res = parse_junit(JUNIT)
    assert res.outcomes[SIGNAL_SYSCALL] is Outcome.FAILED
    assert "first" in res.messages[SIGNAL_SYSCALL]
    assert "teardown" in res.messages[SIGNAL_SYSCALL]


def test_parse_junit_keeps_the_message_not_the_traceback() -> None:
    res = parse_junit(
        '<testsuite><testcase classname="t.x" name="a"><error message="GdbError: ^error">'
        "console tail: Kernel panic in an old log line</error></testcase>"
        '<testcase classname="t.x" name="b"><failure>AssertionError: first line\nmore</failure>'
        "</testcase></testsuite>"
    )
    assert res.messages == {"t/x.py::a": "GdbError: ^error", "t/x.py::b": "AssertionError: first line"}
    assert judge("m", res).other_errors == ["t/x.py::a", "t/x.py::b"]  # unclassified: rig errors


def test_parse_junit_reads_files_and_collection_errors(tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="" name="testcases.test_new">'
        '<error message="collection failure">SyntaxError</error></testcase></testsuite></testsuites>'
    )
    res = parse_junit(xml)
    assert res.errored == ["testcases.test_new"]


@pytest.mark.parametrize("bad", ["", "<testsuite><testcase>", "not xml"])
def test_parse_junit_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="JUnit"):
        parse_junit(bad)


def test_parse_junit_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JUnit"):
        parse_junit(tmp_path / "missing.xml")


# -- verdicts ---------------------------------------------------------------


def test_a_finding_or_a_kernel_crash_catches_the_mutant_a_rig_error_does_not() -> None:
    res = judge("m", parse_junit(JUNIT))
    assert res.verdict is Verdict.CAUGHT
    assert res.caught_by == [SIGNAL_IRET, SIGNAL_SYSCALL, CEA]
    assert res.other_errors == [GDB]


def test_a_failure_the_plugin_did_not_classify_is_a_rig_error() -> None:
    res = parse_junit(
        '<testsuite><testcase classname="t.x" name="a"><failure message="boom">x</failure></testcase>'
        "</testsuite>"
    )
    assert res.kind("t/x.py::a") is FailureKind.RIG_ERROR
    assert judge("m", res).verdict is Verdict.ERRORED


def test_only_rig_errors_is_errored_never_caught() -> None:
    hiccup = TestResults(
        {"a": Outcome.ERROR, "b": Outcome.FAILED, "c": Outcome.PASSED},
        {"a": "GdbError: ^error", "b": "ReplyTimeout: QEMU sent no reply"},
        {"a": FailureKind.RIG_ERROR, "b": FailureKind.RIG_ERROR},
    )
    res = judge("m", hiccup)
    assert res.verdict is Verdict.ERRORED
    assert res.caught_by == [] and res.other_errors == ["a", "b"]


def test_the_named_testcases_must_catch_it() -> None:
    ref = results(a=Outcome.PASSED, b=Outcome.PASSED, c=Outcome.PASSED)
    both = results(a=Outcome.FAILED, b=Outcome.FAILED, c=Outcome.PASSED)
    assert judge("m", both, ref, ["t/x.py::a", "t/x.py::b"]).verdict is Verdict.CAUGHT
    elsewhere = judge("m", results(a=Outcome.PASSED, b=Outcome.PASSED, c=Outcome.FAILED), ref, ["t/x.py::a"])
    assert elsewhere.verdict is Verdict.MISNAMED and "not caught by a" in elsewhere.detail
    errored = judge("m", results(a=Outcome.ERROR, c=Outcome.FAILED), ref, ["t/x.py::a"])
    assert errored.verdict is Verdict.ERRORED
    assert judge("m", results(a=Outcome.PASSED), ref, ["t/x.py::a"]).verdict is Verdict.SURVIVED
    # a name without parameters stands for all of them
    params = TestResults({"t/x.py::p[1]": Outcome.FAILED}, {}, {"t/x.py::p[1]": FailureKind.FINDING})
    assert judge("m", params, None, ["t/x.py::p"]).verdict is Verdict.CAUGHT


def test_every_mutant_names_the_testcases_that_must_catch_it() -> None:
    for name, patch in discover_mutants().items():
        named = caught_by_lines(patch)
        assert named, f"{name}: no Caught-by line"
        assert all(n.startswith("testcases/") and "::" in n for n in named), (name, named)


def test_all_passed_or_skipped_survives() -> None:
    res = judge("m", results(a=Outcome.PASSED, b=Outcome.SKIPPED))
    assert res.verdict is Verdict.SURVIVED
    assert res.caught_by == []


def test_testcases_bad_on_the_reference_do_not_count() -> None:
    reference = results(a=Outcome.FAILED, b=Outcome.PASSED)
    assert judge("m", results(a=Outcome.FAILED, b=Outcome.PASSED), reference).verdict is Verdict.SURVIVED
    caught = judge("m", results(a=Outcome.FAILED, b=Outcome.FAILED), reference)
    assert caught.verdict is Verdict.CAUGHT
    assert caught.caught_by == ["t/x.py::b"]


def test_run_failed_rules() -> None:
    clean = MutantResult("reference", Verdict.SURVIVED, results=results(a=Outcome.PASSED, s=Outcome.SKIPPED))
    dirty = MutantResult("reference", Verdict.SURVIVED, results=results(a=Outcome.ERROR))
    caught = MutantResult("m1", Verdict.CAUGHT, ["t/x.py::a"])
    assert not run_failed(clean, [caught])
    assert run_failed(dirty, [caught])
    assert run_failed(MutantResult("reference", Verdict.NO_RESULT, detail="timeout"), [caught])
    for verdict in (Verdict.SURVIVED, Verdict.BUILD_FAILED, Verdict.NO_RESULT):
        assert run_failed(clean, [caught, MutantResult("m2", verdict)])


# -- rendering --------------------------------------------------------------


def _sample() -> tuple[MutantResult, list[MutantResult]]:
    ref = MutantResult(
        "reference", Verdict.SURVIVED, results=results(a=Outcome.PASSED, b=Outcome.PASSED, c=Outcome.SKIPPED)
    )
    crash = TestResults(
        {"t/y.py::boot": Outcome.ERROR},
        {"t/y.py::boot": "kernel crashed during boot"},
        {"t/y.py::boot": FailureKind.KERNEL_CRASH},
    )
    return ref, [
        judge("alpha", results(a=Outcome.FAILED, b=Outcome.PASSED), ref.results),
        judge("beta", results(a=Outcome.PASSED, b=Outcome.PASSED), ref.results),
        MutantResult("gamma", Verdict.BUILD_FAILED, detail="patch x does not apply | really"),
        judge("delta", crash, ref.results),
    ]


def test_render_table() -> None:
    ref, muts = _sample()
    lines = render_table(ref, muts).splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["mutant", "verdict", "testcases that failed"]
    assert set(lines[1]) <= {"-", "+"}
    reference = [c.strip() for c in lines[2].split("|")]
    assert reference == ["reference", "OK", "2 passed, 0 failed, 0 error, 1 skipped"]
    assert [c.strip() for c in lines[3].split("|")] == ["alpha", "CAUGHT", "a"]
    assert [c.strip() for c in lines[4].split("|")] == ["beta", "SURVIVED", "-"]
    assert lines[5].startswith("gamma") and "BUILD-FAILED" in lines[5]
    assert [c.strip() for c in lines[6].split("|")] == ["delta", "CAUGHT", "boot (crash)"]
    # the columns line up
    assert len({line.index("|") for line in lines if "|" in line}) == 1


def test_render_table_reference_failures() -> None:
    ref = MutantResult("reference", Verdict.SURVIVED, results=results(a=Outcome.FAILED, b=Outcome.ERROR))
    line = render_table(ref, []).splitlines()[2]
    assert "FAILED" in line
    assert "a, b (error)" in line


def test_render_markdown() -> None:
    ref, muts = _sample()
    md = render_markdown(ref, muts).splitlines()
    assert md[0] == "| mutant | verdict | testcases that failed |"
    assert md[1] == "| --- | --- | --- |"
    assert md[2].startswith("| reference | OK |")
    assert md[3] == "| alpha | CAUGHT | a |"
    assert "does not apply \\| really" in md[5]
    assert all(line.replace("\\|", "").count(" | ") == 2 for line in md)


def test_short_name() -> None:
    assert short_name(SIGNAL_IRET) == "test_signal_tracks_cr3_over_a_syscall[iret-loop]"
    assert short_name("testcases.test_new") == "testcases.test_new"


# -- selection and the command line ----------------------------------------


def test_discover_and_select(tmp_path: Path) -> None:
    for name in ("b", "a", "c"):
        (tmp_path / f"{name}.patch").write_text("x")
    (tmp_path / "README").write_text("x")
    found = discover_mutants(tmp_path)
    assert list(found) == ["a", "b", "c"]
    assert list(select_mutants(found, None)) == ["a", "b", "c"]
    assert list(select_mutants(found, ["c", "a"])) == ["a", "c"]
    with pytest.raises(UnknownMutantError) as info:
        select_mutants(found, ["a", "zz"])
    message = str(info.value)
    assert "\n" not in message
    assert "zz" in message and "a, b, c" in message


def test_unknown_only_name_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be built for bad input")

    monkeypatch.setattr(mutants, "run", no_run)
    assert mutants.main(["--only", "no-such-mutant"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("ERROR: unknown mutant(s) no-such-mutant")
    for name in discover_mutants():
        assert name in err


EXPECTED_MUTANTS = {
    "branch-inverted",
    "entry-store-after-cr3",
    "iret-exit-no-clear",
    "nmi-no-store",
    "page-user",
    "shared-page",
    "sysret-exit-no-clear",
    "wrong-cpu",
}


def test_the_mutant_patches_are_described() -> None:
    found = discover_mutants(MUTANTS_DIR)
    assert set(found) >= EXPECTED_MUTANTS
    for name, patch in found.items():
        text = patch.read_text()
        head = text.split("diff --git", 1)[0]
        assert f"Subject: [MUTANT {name}]" in head, name
        assert "caught by" in head.lower(), name
        assert "diff --git" in text, name


def test_unknown_flavor_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert mutants.main(["--flavor", "reference-9.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "reference-9.9" in err and "reference-7.2" in err
