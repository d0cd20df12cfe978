"""Linux's own x86 selftests as workloads, each run under watch mode.

The selftests (``tools/testing/selftests/x86`` of the reference kernel's source package,
built statically by :mod:`rig.supply.selftests`) drive the strangest entry paths there
are. Each runs in the guest while every CR3 write and signal store of the entry code
is a breakpoint on every vCPU (:mod:`rig.observe.selftestwatch`). A selftest fails
here on any signal violation, and when it passes on Debian's stock kernel but not on
the one under test; one that fails on both is reported, not failed.

Which selftests: the ones in the guest's initramfs. The default initramfs holds
:data:`rig.supply.selftests.DEFAULT_SELFTESTS`; ``--selftests all`` parametrizes every one
that runs here. Without ``--initrd`` the session boots an initramfs that holds what
``--selftests`` chose (:func:`rig.supply.initramfs.selftest_choice`: the full one for
``all``); with an ``--initrd`` that lacks a chosen selftest, it skips saying so.
``--selftests a_64,b_32`` picks some; ``--selftest-seconds S`` bounds each one.

The stock verdicts come from :func:`stock_verdicts`: the same binaries run once on
Debian's stock kernel of the same version as the kernel under test (reference-7.2:
sid's 7.2; reference-6.1: bookworm's 6.1; :func:`rig.supply.kernel.stock_kernel_of_version`),
else, where Debian ships none, the system's stock kernel (the verdict says the versions
differ). One boot beside the session's guest, unwatched, all chosen selftests, recorded
by the stock kernel image and the initramfs in ``<cache>/selftests/verdicts/``; later
runs read the record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from rig.errors import RigError
from rig.guest import Guest
from rig.machine.sites import SIGNAL, Site
from rig.observe.findings import fail_on
from rig.observe.selftestwatch import SelftestVerdict, installed_selftests, run_unwatched, run_watched
from rig.pytestplugin.caseoptions import CaseSettings, case_settings_of
from rig.pytestplugin.settings import RigSettings
from rig.supply.kernel import DEBIAN, Kernel, major_minor, resolve_kernel, stock_kernel_of_version
from rig.supply.selftests import DEFAULT_SELFTESTS, NOT_RUN, SelftestError, build_selftests


def _chosen(settings: CaseSettings) -> list[str]:
    """The selftests to parametrize (``--selftests``; default: the default subset)."""
    spec = settings.selftests
    if spec in ("", "default"):
        return list(DEFAULT_SELFTESTS)
    if spec == "all":
        try:
            return [n for n in build_selftests().binaries if n not in NOT_RUN]
        except SelftestError as exc:
            raise pytest.UsageError(f"--selftests all: {exc}") from None
    return [n.strip() for n in spec.split(",") if n.strip()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per chosen selftest (the option is read at collection)."""
    if "name" in metafunc.fixturenames:
        metafunc.parametrize("name", _chosen(case_settings_of(metafunc.config)))


def _stock_record(cache: Path, stock_image: Path, initrd: Path) -> Path:
    h = hashlib.sha256()
    for p in (stock_image, initrd):
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return cache / "selftests" / "verdicts" / f"{h.hexdigest()[:32]}.json"


def stock_kernel(cache: Path, release: str) -> tuple[Kernel, str]:
    """Debian's stock kernel of ``release``'s version, else the system's; and a note
    ("" or why the versions differ)."""
    same = stock_kernel_of_version(release, cache)
    if same is not None:
        return same, ""
    stock = resolve_kernel(DEBIAN, None, cache)
    return stock, f" (a different version: Debian ships no stock {major_minor(release)} kernel)"


def stock_verdicts(
    rig_settings: RigSettings, names: list[str], release: str
) -> tuple[dict[str, SelftestVerdict], str]:
    """The verdicts of ``names`` on Debian's stock kernel of ``release``'s version (the
    kernel under test), with the same initramfs.

    Read from the record of this stock kernel and initramfs; the missing ones are run
    (one stock boot, unwatched) and added to it. Returns the verdicts and a label.
    """
    base = rig_settings.base
    cache = Path(base.cache_dir)
    stock, note = stock_kernel(cache, release)
    record = _stock_record(cache, stock.image, base.initrd)
    data: dict[str, dict[str, object]] = {}
    if record.is_file():
        data = json.loads(record.read_text())
    label = str(data.get("_kernel", {}).get("release", stock.label))
    missing = [n for n in names if n not in data]
    if missing:
        config = dataclasses.replace(base, kernel=stock.image, vmlinux=None, label=stock.label)
        with Guest.boot(config) as g:
            installed, _ = installed_selftests(g)
            for n in missing:
                if n in installed:
                    data[n] = run_unwatched(g, n).verdict.to_json()
            data["_kernel"] = {"release": g.release, "build_id": g.build_id}
            label = g.release
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        tmp.replace(record)
    return {n: SelftestVerdict.from_json(n, data[n]) for n in names if n in data}, label + note


def test_x86_selftest_under_watch(
    name: str,
    signal_guest: Guest,
    watch_sites: tuple[Site, ...],
    exploration_report: list[str],
    rig_settings: RigSettings,
    case_settings: CaseSettings,
) -> None:
    g = signal_guest
    installed, why = installed_selftests(g)
    if not installed:
        pytest.skip(f"no x86 selftests in the guest: {why or 'its /selftests is empty'}")
    unbuilt = [part for part in why.split("; ") if part.startswith(f"{name} did not build")]
    if name not in installed and unbuilt:
        pytest.skip(unbuilt[0])
    if name not in installed:
        pytest.skip(
            f"{name} is not in this initramfs ({g.config.initrd.name}); drop --initrd, or pass "
            "--initrd $(python -m rig.supply.initramfs --selftests all)"
        )
    # user processes left by earlier tests make transitions that count here too: name them
    mine = " && ".join(f'$3 != "{c}"' for c in ("sh", "ps", "awk"))
    ps, _ = g.shell(f"ps -o pid,vsz,comm | awk 'NR > 1 && $1 != 1 && $2 != 0 && {mine}'")
    others = ", ".join(" ".join(ln.split()[::2]) for ln in ps.splitlines() if ln.strip())
    run = run_watched(g, watch_sites, name, signal=SIGNAL, max_seconds=case_settings.seconds_for(name))
    assert run.watch is not None
    w = run.watch
    verdict = run.verdict
    line = (
        f"x86 selftest {name} on {g.release}: {verdict.describe()}; "
        f"{w.transitions} CR3 transitions checked ({w.hits} site hits) in {run.seconds:.1f} s"
        + (f" (other user processes running: {others})" if others else "")
    )
    try:
        stock, label = stock_verdicts(rig_settings, _chosen(case_settings), g.release)
    except RigError as exc:
        pytest.fail(f"{line}\nthe stock verdicts could not be had: {exc}")
    s = stock.get(name)
    stock_line = f"stock {label}: {s.describe() if s else 'not run (not in the initramfs)'}"
    line += f"; {stock_line}"
    exploration_report.append(f"{line}\n{w.table()}")
    fail_on(w.problems, w.table())
    assert w.transitions > 0, f"{name} ran with no CR3 transition checked:\n{w.table()}"
    if not verdict.passed:
        assert s is not None and not s.passed, (
            f"{name} passes on the stock kernel but fails here: {verdict.describe()}; "
            f"{stock_line}\n" + "\n".join(verdict.notes)
        )
