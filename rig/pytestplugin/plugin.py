"""The cr3rig pytest plugin: options (one ``cr3rig`` group), fixtures, failure reports.

Fixtures:

* ``rig_settings`` (session): the parsed options, the resolved kernel and initramfs.
* ``guest_pool`` (session): boots a guest once per distinct kernel command line and
  keeps at most one alive (a second command line closes the first).
* ``guest`` (function): the default guest, its traces cleared for the test.
* ``pti_guest`` (function): the default guest, skipping the test if PTI is off.

On failure the report gets sections with the step trace (also written as JSON lines and
as a timeline page, rig.report.timeline), the console tail, every vCPU's registers and
the exact kernel and QEMU. Every testcase carries the provenance as JUnit properties; a
session that used the rig ends by writing ``<trace-dir>/index.html`` (rig.report.session).

Under pytest-xdist (``-n N``) each worker has its own session fixtures (its own guest);
the controller writes the report and the coverage table of the whole run
(rig.pytestplugin.distributed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import pytest

from rig.diagnosis import diagnose
from rig.errors import ConfigError, RigError
from rig.guest import Effort, Guest, GuestConfig, check_inputs
from rig.observe.coverage import SiteCoverage, coverage_of
from rig.observe.findings import FindingsFailure, failure_kind
from rig.pytestplugin import distributed
from rig.pytestplugin.failfast import (
    BootFailed,
    BootFailures,
    boot_fault,
    both_faulted,
    breaks_guest,
    check_writable,
    kernel_crashed,
    one_line_head,
    one_line_report,
    split_boot_error,
    wants_one_line,
)
from rig.report import hooks as report_hooks
from rig.report.bootfault import RETRY_BOOTED, BootFault
from rig.report.session import add_coverage_table, session_report
from rig.supply.cache import default_cache_dir
from rig.supply.kernel import DEFAULT_KERNEL, is_named_kernel, is_reference_kernel
from rig.transport.host import Host, sigterm_as_ctrl_c
from rig.transport.qemu import check_cmdline_length
from rig.transport.ssh import open_host

#: The CR3 software signal of the patch series (CONFIG_TRACK_CR3).
SIGNAL = "kernel_cr3_loaded"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("cr3rig", "cr3rig: boot a kernel under QEMU and single-step its entry code")
    g.addoption(
        "--kernel",
        default=None,
        help="bzImage/vmlinux path, 'reference-7.2' (default), 'reference-6.1' or 'debian' (stock)",
    )
    g.addoption(
        "--vmlinux",
        default=None,
        type=Path,
        help="vmlinux with symbols for --kernel (default: found beside it in a build tree)",
    )
    g.addoption(
        "--initrd",
        default=None,
        type=Path,
        help="guest initramfs (default: the rig's own, built from guests/initramfs)",
    )
    g.addoption("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    g.addoption("--gdb", default="gdb", help="GDB binary")
    g.addoption("--smp", default=2, type=int, help="number of vCPUs (default 2)")
    g.addoption(
        "--isolated-cpu",
        default=None,
        type=int,
        help="the vCPU that runs the workloads and is stepped (default: the last)",
    )
    g.addoption("--append", default="", help="extra kernel command-line parameters")
    g.addoption("--accel", default="tcg", choices=("tcg", "kvm"), help="QEMU accelerator")
    g.addoption("--boot-timeout", default=180.0, type=float, help="seconds to wait for boot")
    g.addoption(
        "--cr3rig-cache",
        default=None,
        type=Path,
        help="cache directory (default $CR3RIG_CACHE or ~/.cache/cr3rig)",
    )
    g.addoption(
        "--site-coverage",
        default="auto",
        choices=("auto", "require", "report", "off"),
        help="CR3 switch-site coverage table at the end; 'require' fails the session if a site "
        "TCG can reach was executed by no testcase ('auto': require on a full run of testcases/ "
        "against a kernel with the CR3 signal, else report)",
    )
    g.addoption(
        "--explore",
        default="sample",
        choices=("sample", "all"),
        help="which boundaries of each exploration window get an event: 'all' (every boundary "
        "from the entry to past the CR3 write, from the exit to user mode) or 'sample' (default: "
        "boundary 0, the store-to-write race window and every 4th other boundary, the same each run)",
    )
    g.addoption(
        "--host", default="local", help="where QEMU runs: 'local' (default) or ssh://[user@]box[:port]"
    )
    g.addoption("--ssh-identity", default=None, type=Path, help="private key for --host ssh://...")
    g.addoption("--ssh-known-hosts", default=None, type=Path, help="known_hosts file for --host ssh://...")
    g.addoption(
        "--trace-dir",
        default=None,
        type=Path,
        help="where step traces are written (default <rootdir>/results)",
    )


def _check_options(config: pytest.Config) -> None:
    """Static checks of the options, so bad input fails in seconds with one line."""
    opt = config.option
    named = is_named_kernel(opt.kernel and str(opt.kernel))
    iso = opt.smp - 1 if opt.isolated_cpu is None else opt.isolated_cpu
    try:
        host = open_host(opt.host, identity=opt.ssh_identity, known_hosts=opt.ssh_known_hosts)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_HOST_KEY] = host
    config.add_cleanup(host.close)
    try:
        check_inputs(
            host, None if named else Path(opt.kernel), opt.vmlinux, opt.initrd, opt.smp, iso, opt.accel
        )
        if not opt.boot_timeout > 0:
            raise ConfigError(
                f"--boot-timeout {opt.boot_timeout:g}: must be more than 0 seconds (default 180)"
            )
        check_cmdline_length(
            GuestConfig(Path(), Path(), smp=opt.smp, isolated_cpu=iso, append=opt.append).cmdline()
        )
        check_writable(opt.trace_dir or config.rootpath / "results", "trace directory", "--trace-dir")
        check_writable(
            opt.cr3rig_cache or default_cache_dir(), "cache directory", "--cr3rig-cache or $CR3RIG_CACHE"
        )
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config: pytest.Config) -> str:
    """Where QEMU runs, which accelerator, and why (the KVM check runs on that host)."""
    host = config.stash.get(_HOST_KEY, None)
    if host is None:
        return "cr3rig: QEMU on local"
    if config.option.accel == "kvm":
        return f"cr3rig: QEMU on {host.label}, accel kvm (-cpu host; KVM checked there)"
    try:
        why = host.kvm_usable(config.option.qemu)
    except RigError as exc:
        why = str(exc)
    note = f"KVM not usable there: {why}" if why else "KVM is usable there: pass --accel kvm"
    return f"cr3rig: QEMU on {host.label}, accel tcg ({note})"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cmdline(extra, isolate=True): boot the guest with extra kernel parameters; "
        "isolate=False leaves out the rig's nohz_full/isolcpus",
    )
    _check_options(config)
    opt = config.option
    spec = str(opt.kernel or "")
    named = is_named_kernel(spec)  # built or fetched on first use
    plan = _options_config(
        opt,
        kernel=Path() if named else Path(spec).expanduser(),
        initrd=Path(),
        vmlinux=opt.vmlinux,
        label=(spec or DEFAULT_KERNEL) if named else spec,
    )
    report_hooks.start_session(config, config.stash[_HOST_KEY], plan, resolved=not named)
    distributed.use_run_temp_dir(config)
    if distributed.role(config) == "single":
        # not under xdist: its controller ends the workers with signals of its own, and a
        # KeyboardInterrupt raised there in the middle left their guests running
        sigterm_as_ctrl_c()
    if distributed.role(config) == "controller":
        config.pluginmanager.register(distributed.ControllerHooks(config), "cr3rig-xdist-controller")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group tests by kernel command line (stable), so each is booted once."""

    def key(item: pytest.Item) -> tuple[str, bool]:
        m = item.get_closest_marker("cmdline")
        if m is None:
            return ("", True)
        return (m.args[0] if m.args else "", bool(m.kwargs.get("isolate", True)))

    items.sort(key=lambda it: (key(it) != ("", True), key(it)))


@dataclass(frozen=True)
class RigSettings:
    """The options, resolved: what every guest of this session boots."""

    base: GuestConfig
    trace_dir: Path
    host: Host
    site_coverage: str = "auto"
    #: the kernel is one of the rig's reference builds (the default): a missing signal,
    #: PTI or site list there is an error, never a skip (see :func:`missing_on_reference`)
    reference: bool = False
    #: which boundaries the exploration windows take an event at (``--explore``)
    explore: str = "sample"


#: Ends the run with one line and a status (and the boot failure behind it, if any).
EndRun = Callable[[str, int, "BootFailed | None"], NoReturn]


def _exit(line: str, returncode: int, failed: BootFailed | None = None) -> NoReturn:
    pytest.exit(line, returncode=returncode)


def _run_ender(request: pytest.FixtureRequest) -> EndRun:
    """:func:`pytest.exit`, or in an xdist worker (where it would crash xdist's
    controller) :func:`distributed.end_run` and an error for this test."""
    if distributed.role(request.config) != "worker":
        return _exit
    session = request.session

    def end_worker(line: str, returncode: int, failed: BootFailed | None = None) -> NoReturn:
        tail = failed.console_tail if failed is not None else ""
        distributed.end_run(session, line, returncode, tail, tell=not (failed and failed.remembered))
        raise failed if failed is not None else distributed.RunEnded(line)

    return end_worker


def _options_config(opt: Any, **files: Any) -> GuestConfig:
    """The guest the options describe; ``files`` give the kernel, initrd, vmlinux, label
    (and cache) as far as they are known."""
    return GuestConfig(
        smp=opt.smp,
        isolated_cpu=opt.isolated_cpu,
        append=opt.append,
        accel=opt.accel,
        qemu=opt.qemu,
        gdb=opt.gdb,
        boot_timeout=opt.boot_timeout,
        **files,
    )


@pytest.fixture(scope="session")
def rig_settings(pytestconfig: pytest.Config, request: pytest.FixtureRequest) -> RigSettings:
    from rig.supply.initramfs import build_initramfs
    from rig.supply.kernel import resolve_kernel

    opt = pytestconfig.option
    cache = opt.cr3rig_cache or default_cache_dir()
    # A cold cache builds the kernel here: let its progress line reach the terminal.
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    uncaptured = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
    try:
        with uncaptured:
            kernel = resolve_kernel(opt.kernel, opt.vmlinux, cache)
            initrd = opt.initrd or build_initramfs(cache)
    except RigError as exc:
        _run_ender(request)(f"cr3rig: {exc}", 4, None)
    host = pytestconfig.stash[_HOST_KEY]
    if opt.accel == "kvm":
        from rig.transport.kvmprobe import kernel_probe

        why = kernel_probe(host, opt.qemu, "kvm", kernel.image, initrd)
        if why is not None:
            _run_ender(request)(
                f"cr3rig: --accel kvm cannot run on {host.label}: {why}; use --accel tcg", 4, None
            )
    base = _options_config(
        opt, kernel=kernel.image, initrd=initrd, vmlinux=kernel.vmlinux, label=kernel.label, cache_dir=cache
    )
    settings = RigSettings(
        base,
        opt.trace_dir or pytestconfig.rootpath / "results",
        host,
        opt.site_coverage,
        is_reference_kernel(opt.kernel and str(opt.kernel)),
        opt.explore,
    )
    session_report(pytestconfig).directory = settings.trace_dir
    report_hooks.settings_resolved(pytestconfig, base)
    return settings


class GuestPool:
    """Boots guests on demand, one per distinct command line, at most one alive.

    A boot that faults before its readiness marker (the kernel crashed, or QEMU ended by
    itself: :func:`~rig.pytestplugin.failfast.boot_fault`) is made once more: an
    emulator's one-off fault is not a test result. Each fault goes to ``on_boot_fault``
    (and :attr:`boot_faults`) with its console tail, its RIP and what the second boot
    did. A configuration that fails to boot (a second fault, a hang, a rig error) is not
    booted again: later tests needing it get the same one-line error at once. If the
    default configuration (no ``cmdline`` marker) cannot boot, the session ends, as it
    does for bad input.
    """

    def __init__(
        self,
        settings: RigSettings,
        on_fatal: Any = None,
        failures: BootFailures | None = None,
        end_run: EndRun = _exit,
        on_boot_fault: Callable[[BootFault], None] | None = None,
    ) -> None:
        self.settings = settings
        self.current: Guest | None = None
        self.failures = failures if failures is not None else BootFailures()
        self.on_fatal = on_fatal
        self.end_run = end_run
        self.on_boot_fault = on_boot_fault
        #: every boot fault of the session, in order
        self.boot_faults: list[BootFault] = []
        self._coverage: SiteCoverage | None = None

    def get(self, extra_append: str = "", *, isolate: bool = True) -> Guest:
        """The guest booted with ``extra_append`` (and, unless ``isolate`` is False, the
        rig's nohz_full/isolcpus parameters for the isolated CPU)."""
        base = self.settings.base
        config = replace(base, append=f"{base.append} {extra_append}".strip(), isolate=isolate)
        cur = self.current
        if cur is not None and (cur.config != config or not cur.usable()):
            cur.close()
            self.current = None
        if self.current is None:
            default = extra_append == "" and isolate
            try:
                self.failures.check(config)
            except BootFailed as remembered:  # the default one only if another worker failed it
                if default:
                    self.end_run(
                        f"cr3rig: {remembered.reason} (the default configuration cannot boot)", 3, remembered
                    )
                raise
            try:
                self.current = self._boot(config)
            except ConfigError as exc:
                self.end_run(f"cr3rig: {exc}", 4, None)
            except RigError as exc:
                failed = self.failures.remember(config, exc)
                if default:
                    if self.on_fatal is not None:
                        self.on_fatal(failed)
                    self.end_run(
                        f"cr3rig: {failed.reason} (the default configuration cannot boot)", 3, failed
                    )
                raise failed from None
        return self.current

    def _boot(self, config: GuestConfig) -> Guest:
        """Boot ``config``, once more if the first boot faulted; a second fault raises the
        second boot's error, saying that both boots faulted."""
        first: BootFault | None = None
        for boot in (1, 2):
            try:
                guest = Guest.boot(config, self.settings.host)
            except RigError as exc:
                fault = boot_fault(exc, config.cmdline(), boot)
                if first is None:
                    if fault is None:
                        raise
                    first = fault
                    continue
                if fault is None:
                    head = split_boot_error(exc)[0]
                    self._fault(replace(first, then=f"the second boot failed otherwise: {head}"))
                    raise
                self._fault(replace(first, then="the second boot faulted too"))
                self._fault(replace(fault, then="both boots faulted: the configuration fails"))
                raise both_faulted(exc, fault) from exc
            if first is not None:
                self._fault(replace(first, then=RETRY_BOOTED))
            return guest
        raise AssertionError("unreachable: the second boot returns or raises")

    def _fault(self, fault: BootFault) -> None:
        self.boot_faults.append(fault)
        if self.on_boot_fault is not None:
            self.on_boot_fault(fault)

    def coverage(self, guest: Guest) -> SiteCoverage | None:
        """The session's switch-site coverage of ``guest``'s kernel (None: no vmlinux)."""
        if self._coverage is None and guest.config.vmlinux is not None:
            self._coverage = coverage_of(guest, SIGNAL)
        if self._coverage is not None and guest.pti_enabled:
            self._coverage.pti = True  # sites are reachable once one guest runs with PTI
        return self._coverage

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


@pytest.fixture(scope="session")
def guest_pool(
    rig_settings: RigSettings, pytestconfig: pytest.Config, request: pytest.FixtureRequest
) -> Iterator[GuestPool]:
    def show_console(failed: BootFailed) -> None:
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        capman = pytestconfig.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capman is not None and failed.console_tail:
            with capman.global_and_fixture_disabled():
                reporter.write_sep("-", "cr3rig: console tail of the failed boot")
                reporter.write_line(failed.console_tail)

    def on_boot_fault(fault: BootFault) -> None:
        report_hooks.boot_fault(pytestconfig, fault)

    if distributed.role(pytestconfig) == "worker":
        failures = BootFailures(
            distributed.shared_failures_dir(pytestconfig), distributed.worker_id(pytestconfig)
        )
        pool = GuestPool(rig_settings, None, failures, _run_ender(request), on_boot_fault)
    else:
        pool = GuestPool(rig_settings, show_console, on_boot_fault=on_boot_fault)
    pytestconfig.stash[_POOL_KEY] = pool
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def site_coverage(guest_pool: GuestPool, guest: Guest) -> SiteCoverage | None:
    """The session's CR3 switch-site coverage (None if the kernel has no vmlinux)."""
    return guest_pool.coverage(guest)


@pytest.fixture
def exploration_report(pytestconfig: pytest.Config) -> list[str]:
    """Where testcases put their exploration tables (printed at the end of the session)."""
    return pytestconfig.stash.setdefault(_EXPLORATIONS_KEY, [])


_POOL_KEY = pytest.StashKey[GuestPool]()
_DESELECTED_KEY = pytest.StashKey[bool]()
_EXPLORATIONS_KEY = pytest.StashKey[list[str]]()


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        items[0].config.stash[_DESELECTED_KEY] = True


def _coverage_required(config: pytest.Config, coverage: SiteCoverage) -> bool:
    mode = config.option.site_coverage
    if mode != "auto":
        return bool(mode == "require")
    testcases = (config.rootpath / "testcases").resolve()
    full = [Path(a.split("::")[0]).resolve() for a in config.args] in (
        [testcases],
        [config.rootpath.resolve()],
    )
    return coverage.has_signal and full and not _deselected(config)


def _deselected(config: pytest.Config) -> bool:
    """Whether this run (under xdist: any worker) deselected a test."""
    agg = distributed.aggregate(config)
    return agg.deselected if agg is not None else config.stash.get(_DESELECTED_KEY, False)


def _run_coverage(config: pytest.Config) -> SiteCoverage | None:
    """The switch-site coverage of the run (under xdist: of all workers together)."""
    agg = distributed.aggregate(config)
    if agg is not None:
        return agg.coverage
    pool = config.stash.get(_POOL_KEY, None)
    return pool._coverage if pool is not None else None


def _host_summaries(config: pytest.Config) -> list[str]:
    agg = distributed.aggregate(config)
    if agg is not None:
        return agg.host_summaries
    host = config.stash.get(_HOST_KEY, None)
    line = host.summary() if host is not None else None
    return [line] if line else []


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for line in _host_summaries(config):
        terminalreporter.write_line(f"cr3rig: {line}")
    agg = distributed.aggregate(config)
    tables = agg.explorations if agg is not None else config.stash.get(_EXPLORATIONS_KEY, [])
    if tables:
        terminalreporter.section("cr3rig: explorations (an NMI at each boundary of each window)")
        for table in tables:
            terminalreporter.write_line(table)
    coverage = _run_coverage(config)
    if coverage is None or config.option.site_coverage == "off":
        return
    terminalreporter.section("cr3rig: CR3 switch-site coverage")
    terminalreporter.write_line(coverage.table())
    missing = coverage.missing()
    if missing and _coverage_required(config, coverage):
        terminalreporter.write_line(
            f"FAILED: {len(missing)} reachable CR3 switch site(s) executed by no testcase: "
            + ", ".join(s.where for s in missing)
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    role = distributed.role(config)
    pool = config.stash.get(_POOL_KEY, None)
    if role == "worker":  # the controller writes the run's files from what workers send
        explorations: list[str] = config.stash.get(_EXPLORATIONS_KEY, [])
        distributed.worker_payload(
            config,
            pool._coverage if pool is not None else None,
            explorations,
            config.stash.get(_DESELECTED_KEY, False),
            next(iter(_host_summaries(config)), None),
        )
        return
    agg = distributed.aggregate(config)
    if agg is not None:
        exitstatus = _finish_controller(session, agg)
    coverage = _run_coverage(config)
    directory = pool.settings.trace_dir if pool is not None else session_report(config).directory
    if coverage is not None and directory is not None and config.option.site_coverage != "off":
        with contextlib.suppress(OSError):
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "site-coverage.md").write_text(coverage.markdown())
        add_coverage_table(config, "CR3 switch sites (who executed each)", coverage.rows())
    if (
        coverage is not None
        and exitstatus == 0
        and coverage.missing()
        and _coverage_required(session.config, coverage)
    ):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    report_hooks.finish_session(session, exitstatus)


def _finish_controller(session: pytest.Session, agg: distributed.Aggregate) -> int:
    """Under xdist: a default configuration that did not boot on a worker ends the run
    with status 3 and its console tail, as without xdist; a worker that went down
    without reporting is named. Returns the exit status."""
    tr = session.config.pluginmanager.getplugin("terminalreporter")
    if tr is not None:
        for worker in agg.lost:
            tr.write_line(f"cr3rig: worker {worker} ended without reporting (its traces are not listed)")
        tail = distributed.fatal_console_tail(agg)
        if tail:  # xdist's "Interrupted: cr3rig: ... cannot boot" line follows
            tr.write_sep("-", "cr3rig: console tail of the failed boot")
            tr.write_line(tail)
    if agg.fatal:
        session.exitstatus = int(agg.fatal[0][1]["returncode"])
    return int(session.exitstatus)


@pytest.fixture
def guest(guest_pool: GuestPool, request: pytest.FixtureRequest) -> Iterator[Guest]:
    """The guest for this test (the ``cmdline`` marker adds kernel parameters)."""
    marker = request.node.get_closest_marker("cmdline")
    g = guest_pool.get(
        marker.args[0] if marker and marker.args else "",
        isolate=bool(marker.kwargs.get("isolate", True)) if marker else True,
    )
    g.traces.clear()
    g.effort = Effort()
    try:
        g.resume()  # a previous test may have left it stopped at a breakpoint
    except RigError:
        g.close()  # not reused by the next test
        raise
    request.node.stash[_GUEST_KEY] = g
    yield g
    coverage = guest_pool.coverage(g)
    if coverage is not None:
        for trace in g.traces:
            coverage.record_trace(request.node.nodeid, trace)
    if request.node.stash.get(_BROKEN_KEY, False):
        g.close()  # a rig error mid-test: the next test gets a fresh guest
    elif g.machine.alive and not g.closed:
        try:
            g.kill_workloads()
        except RigError:
            g.close()  # a guest in an unknown state is not reused


#: Kernel parameters with which the user turns PTI off (a skip of the PTI testcases is theirs).
PTI_OFF_PARAMETERS = ("nopti", "pti=off", "pti=auto", "mitigations=off")


def pti_off_asked(cmdline: str) -> bool:
    """True if the kernel command line turns PTI off (:data:`PTI_OFF_PARAMETERS`)."""
    return any(word in PTI_OFF_PARAMETERS for word in cmdline.split())


def missing_on_reference(settings: RigSettings, reason: str) -> None:
    """Skip a testcase that cannot run on this kernel (``reason`` says what it lacks and how
    that was seen), or, on a reference kernel (the default, which the rig builds with the
    signal and PTI), fail it: there the lack is a broken build that a skip would hide.

    Raises:
        pytest.skip.Exception: on a kernel the user chose with ``--kernel``.
        pytest.fail.Exception: on a reference kernel.
    """
    if settings.reference:
        pytest.fail(
            f"the reference kernel {settings.base.label} is broken: {reason}; rebuild it "
            "(cr3rig kernel) or check its config fragment",
            pytrace=False,
        )
    pytest.skip(reason)


@pytest.fixture
def pti_guest(guest: Guest, rig_settings: RigSettings) -> Guest:
    """The guest, or a skip saying exactly why PTI testcases cannot run on it (an error
    on a reference kernel whose command line did not turn PTI off)."""
    if not guest.pti_enabled:
        why = (
            f"kernel {guest.release} runs without PTI ("
            + (
                "its entry code is not mapped in the user half of the PGD pair"
                if guest.config.vmlinux
                else "dmesg has no 'page tables isolation: enabled'"
            )
            + f"; cmdline: {guest.config.cmdline()})"
        )
        if pti_off_asked(guest.config.cmdline()):
            pytest.skip(why)
        missing_on_reference(rig_settings, why)
    return guest


_GUEST_KEY = pytest.StashKey[Guest]()
_BROKEN_KEY = pytest.StashKey[bool]()
_HOST_KEY = pytest.StashKey[Host]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    g = item.stash.get(_GUEST_KEY, None)
    if call.when == "teardown":
        report_hooks.add_junit_properties(item, g)
    outcome: Any = yield
    report = outcome.get_result()
    if report.when == "call" and g is not None:
        # the testcases' retries (breakpoint hits taken, steps of each stepped trace), for the soak
        item.user_properties.append(("cr3rig.breaks", g.effort.breaks))
        item.user_properties.append(("cr3rig.steps", ",".join(map(str, g.effort.steps))))
        item.user_properties.append(("cr3rig.discarded", " | ".join(g.effort.discarded)))
        if g.effort.discarded:
            report.sections.append(
                ("cr3rig discarded tries (each judged first)", "\n".join(g.effort.discarded))
            )
    if report.failed:
        exc = call.excinfo.value if call.excinfo is not None else None
        kind = failure_kind(exc, crashed=kernel_crashed(exc, g))
        item.user_properties.append(("cr3rig.failure", kind.value))
        if isinstance(exc, FindingsFailure):
            rules = sorted({f.rule.value for f in exc.findings})
            item.user_properties.append(("cr3rig.rules", ",".join(rules)))
        if breaks_guest(exc):
            item.stash[_BROKEN_KEY] = True
        if wants_one_line(exc, item.config.option.tbstyle):
            assert exc is not None
            where, lineno, _ = item.location
            head = one_line_head(exc)
            report.longrepr = one_line_report(
                head, diagnose(g, head) if g is not None else "", where, (lineno or 0) + 1
            )
        if isinstance(exc, BootFailed) and exc.console_tail:
            report.sections.append(("cr3rig console tail of the failed boot", exc.console_tail))
    files = report_hooks.record_phase(item, call, report, g)
    if report.when != "call" or not report.failed or g is None:
        return
    for n, trace in enumerate(g.traces):
        where = f"{files[n].jsonl}, timeline {files[n].html}" if n < len(files) else "not written"
        report.sections.append(
            (
                f"cr3rig step trace {n} ({len(trace.snapshots)} steps, vCPU {trace.cpu}; {where})",
                trace.render(80),
            )
        )
    report.sections.append(("cr3rig console tail", g.machine.console_tail(40)))
    report.sections.append(("cr3rig registers", g.registers_report()))
    report.sections.append(("cr3rig kernel and QEMU", g.describe()))
