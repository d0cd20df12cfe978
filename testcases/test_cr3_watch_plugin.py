"""Plugin watch mode (rig.observe.pluginwatch): every CR3 switch of every vCPU, read inside
QEMU by a TCG plugin while the guest never stops.

The same workloads as ``test_cr3_watch.py`` run on every vCPU and NMIs are injected
(QMP, every ``NMI_EVERY`` site hits). The plugin records, at every CR3 write and signal
store of the entry/noinstr text (from the vmlinux) and at ``paranoid_entry``, the vCPU's
CR3, the value written and the signal, and again after the instruction; the checks are
``watching.TransitionChecker``'s (the gdbstub watch mode's), plus: the value read back
after the instruction is the value it wrote. At least ``PLUGIN_TRANSITIONS`` CR3
transitions across all vCPUs, the count per site in the session's `cr3rig: explorations`
section.

It skips as every signal testcase does (no PTI, no signal: from the session's guest); then
its own guest is booted (the session's configuration plus the plugin) with a QEMU that
has TCG plugin API 4: the session's, or, when that is older (Debian bookworm's 7.2, the
default), bookworm-backports' 10.0 (``rig.supply.qemuplugin.plugin_qemu``, fetched once by
``scripts/setup.sh``); the testcase prints which. It skips under KVM and over ``--host``,
and when no such QEMU can be had, saying why.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from rig.errors import ConfigError
from rig.guest import Guest
from rig.machine.sites import SIGNAL
from rig.observe.findings import SkipKind, fail_on
from rig.observe.pluginwatch import PluginWatch, watch
from rig.pytestplugin.caseoptions import CaseSettings, skip
from rig.pytestplugin.settings import RigSettings
from rig.supply.qemuplugin import PluginRefused, plugin_qemu
from rig.transport.local import LocalHost
from testcases.test_cr3_watch import CPU0_ONLY, EVERY_CPU

#: CR3 transitions (side changes) to check across all vCPUs (``--watch-transitions`` overrides).
PLUGIN_TRANSITIONS = 20_000
#: Inject an NMI every this many site hits.
NMI_EVERY = 200
#: Seconds the watch may take before it fails as stuck.
MAX_SECONDS = 300.0


@pytest.fixture
def plugin_guest(
    signal_guest: Guest, rig_settings: RigSettings, request: pytest.FixtureRequest
) -> Iterator[tuple[Guest, PluginWatch]]:
    """A guest of the session's configuration booted with the watch plugin (closed after).

    The session's guest (``signal_guest``) says first whether this kernel has PTI and the
    signal at all, with the same skips as every signal testcase."""
    base = rig_settings.base
    if base.vmlinux is None:
        pytest.skip("plugin watch needs the kernel's vmlinux (--vmlinux) to find its CR3 switch sites")
    if base.accel != "tcg":
        pytest.skip(f"plugin watch is a TCG plugin: not run with --accel {base.accel}")
    if not isinstance(rig_settings.host, LocalHost):
        pytest.skip("plugin watch runs QEMU with a plugin built here: not run with --host")
    try:
        qemu, note = plugin_qemu(base.qemu, base.cache_dir)
    except PluginRefused as exc:
        skip(request.node, SkipKind.PLUGIN_REFUSED, str(exc))
    except ConfigError as exc:
        pytest.skip(str(exc))
    if note:
        print(note)
    try:
        pw = PluginWatch.prepare(base.vmlinux, signal=SIGNAL, qemu=qemu, cache_dir=base.cache_dir)
    except ConfigError as exc:
        pytest.fail(f"cannot prepare plugin watch: {exc}")
    # the pool's guest stays up, idle (its workloads were killed after its last test), so
    # the testcases after this one need no new boot
    g = Guest.boot(replace(base, plugin=pw.plugin, qemu=qemu), rig_settings.host)
    try:
        yield g, pw
    finally:
        g.close()


def test_every_cr3_transition_on_every_vcpu_in_qemu(
    plugin_guest: tuple[Guest, PluginWatch], exploration_report: list[str], case_settings: CaseSettings
) -> None:
    g, pw = plugin_guest
    assert g.pti_enabled and SIGNAL in g.symbols, "the plugin guest differs from the session's guest"
    transitions = case_settings.transitions(PLUGIN_TRANSITIONS)
    for cpu in range(g.config.smp):
        for name in EVERY_CPU + (CPU0_ONLY if cpu == 0 else ()):
            g.start_workload(name, cpu)
    result = watch(
        g, pw, transitions=transitions, nmi_every=NMI_EVERY, max_seconds=MAX_SECONDS, min_per_cpu=1
    )
    exploration_report.append(result.table())
    print(result.table())
    fail_on(result.problems, result.table())
    assert result.transitions >= transitions
    assert set(result.hits_by_cpu) == set(range(g.config.smp)), (
        f"not every vCPU hit a site:\n{result.table()}"
    )
    assert result.paranoid_entries > 0, f"no NMI reached paranoid_entry:\n{result.table()}"
