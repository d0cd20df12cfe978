"""The rig's pytest options (group ``cr3rig``) and their static checks: bad input fails
in seconds with one line, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from rig.errors import ConfigError
from rig.guest import GuestConfig, check_inputs
from rig.pytestplugin.failfast import (
    check_writable,
)
from rig.pytestplugin.settings import HOST_KEY
from rig.supply.cache import default_cache_dir
from rig.supply.kernel import is_named_kernel
from rig.transport.qemu import check_cmdline_length
from rig.transport.ssh import open_host

__all__ = ["check_options", "pytest_addoption"]


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


def check_options(config: pytest.Config) -> None:
    """Static checks of the options, so bad input fails in seconds with one line."""
    opt = config.option
    named = is_named_kernel(opt.kernel and str(opt.kernel))
    iso = opt.smp - 1 if opt.isolated_cpu is None else opt.isolated_cpu
    try:
        host = open_host(opt.host, identity=opt.ssh_identity, known_hosts=opt.ssh_known_hosts)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[HOST_KEY] = host
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
