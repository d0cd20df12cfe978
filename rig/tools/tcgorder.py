"""What the emulator reorders between vCPUs: the store-buffering shape, counted in the guest.

The guest workload ``sb-litmus`` (``guests/initramfs/workloads/sb-litmus.c``) runs the
store-buffering (SB) shape of docs/ordering.md on two vCPUs, P0 and P1, N times::

    P0: x := i; <barrier>; r0 := y        P1: y := i; <barrier>; r1 := x

and counts the *relaxed* outcome, both loads reading the old value. x86-TSO allows it
when nothing orders a CPU's load after its own earlier store, and forbids it when both
sides have a full barrier. The variants (:data:`VARIANTS`):

* ``a``: no barrier on either side. Real x86 CPUs show the relaxed outcome.
* ``b``: MFENCE on both sides. Forbidden: a relaxed count here is an emulator that
  breaks x86-TSO.
* ``c``: on P0 a ``syscall`` instruction (getppid) in place of the fence, on P1 MFENCE.
  Under PTI the kernel entry writes CR3 before anything reads memory after the store,
  and the MOV to CR3 is serializing, so the outcome is forbidden on real CPUs: P0 is
  the isolated CPU's entry (NOTE_CR3_SWITCH, then the CR3 write), P1 the remote CPU
  with its ``smp_mb()``. Without PTI nothing on the syscall path need order the store.
* ``d``: the control for ``c``: on P0 a register-only delay loop about as long as the
  system call under TCG, with no barrier; on P1 MFENCE. Allowed, but a store does not
  stay buffered that long: when ``d`` shows no relaxed outcome either, ``c``'s zero
  cannot tell a barrier in the system call from the time it takes.

Whether a run under QEMU can show the relaxed outcome at all depends on how TCG runs
the vCPUs. With one host thread per vCPU (multi-threaded TCG, "MTTCG", QEMU's default
for an x86 guest on an x86 host), guest loads and stores are host loads and stores, so
the host CPU's own store buffer can reorder them; with one thread for every vCPU
(``-accel tcg,thread=single``) the vCPUs take turns and the relaxed outcome cannot
happen. The rig passes plain ``-accel tcg`` (QEMU's default threading);
:func:`vcpu_threading` tells which one ran from QMP ``query-cpus-fast`` (one host
thread id per vCPU, or one shared by all).

Command line (boots a guest, runs each variant, prints a Markdown table)::

    python -m rig.tools.tcgorder                          # reference-7.2, QEMU on PATH, N=200000
    python -m rig.tools.tcgorder --n 10000000 --variant a --variant b --variant c=200000 --variant d=200000
    python -m rig.tools.tcgorder --qemu "$(python -m rig.supply.qemu bookworm-backports)"
    python -m rig.tools.tcgorder --tcg-thread single      # QEMU's single-threaded TCG, for contrast
    python -m rig.tools.tcgorder --host ssh://root@box --accel kvm --n 10000000   # a real CPU

``--tcg-thread single|multi`` runs QEMU through a small wrapper script that turns the
rig's ``-accel tcg`` into ``-accel tcg,thread=…`` (local QEMU only). Exit status: 0,
1 if a variant the architecture forbids showed the relaxed outcome (``b``, or ``c``
on a kernel with PTI), 2 on bad input or a guest that failed.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rig.errors import ConfigError, GuestError, RigError
from rig.guest import Guest, GuestConfig
from rig.supply.cache import default_cache_dir
from rig.supply.initramfs import build_initramfs
from rig.supply.kernel import DEFAULT_KERNEL, resolve_kernel
from rig.transport.host import Host
from rig.transport.ssh import open_host

__all__ = [
    "DEFAULT_N",
    "SB_MARKER",
    "VARIANTS",
    "WORKLOAD",
    "OrderingRun",
    "SbLineError",
    "SbResult",
    "main",
    "measure",
    "parse_sb_line",
    "render_table",
    "run_variant",
    "thread_wrapper",
    "vcpu_threading",
]

#: The guest workload (``/bin/sb-litmus <variant> <n> <cpu-p0> <cpu-p1>``).
WORKLOAD = "sb-litmus"
#: First word of the workload's result line.
SB_MARKER = "CR3RIG-SB"
#: Each variant and the barrier on each side (P0, then P1).
VARIANTS: dict[str, str] = {
    "a": "none / none",
    "b": "MFENCE / MFENCE",
    "c": "syscall (CR3 writes under PTI) / MFENCE",
    "d": "delay loop, no barrier / MFENCE",
}
#: Iterations per variant by default (a few seconds each under MTTCG on an idle host).
DEFAULT_N = 200_000
#: P0 on the rig's isolated vCPU (the last of 2), P1 on vCPU 0.
DEFAULT_CPUS = (1, 0)

_FIELD_RE = re.compile(r"(\w+)=(\S+)")
_INT_FIELDS = ("n", "relaxed", "old0", "old1")


class SbLineError(GuestError):
    """The workload printed no well-formed result line (a GuestError: the guest's output)."""


@dataclass(frozen=True)
class SbResult:
    """One variant's run: ``relaxed`` of ``n`` iterations had both loads read the old value.

    ``old0``/``old1``: iterations where P0's / P1's load read the old value, whatever the
    other read. ``seconds``: the loop's wall time as the guest measured it. ``cpus``: the
    vCPUs of P0 and P1.
    """

    variant: str
    n: int
    relaxed: int
    old0: int
    old1: int
    seconds: float
    cpus: tuple[int, int]

    @property
    def both_new(self) -> int:
        """Iterations where both loads read the new value: the two sides overlapped."""
        return self.n - self.old0 - self.old1 + self.relaxed


def parse_sb_line(text: str) -> SbResult:
    """The result in ``text`` (the workload's output): its one line starting with
    :data:`SB_MARKER`. Raises :class:`SbLineError` if there is none, more than one, or
    its fields are missing, malformed or inconsistent."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(SB_MARKER + " ")]
    if len(lines) != 1:
        what = "no" if not lines else f"{len(lines)}"
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise SbLineError(f"{what} {SB_MARKER} line in the workload's output (it ended: {tail[-200:]!r})")
    line = lines[0]
    fields = dict(_FIELD_RE.findall(line))
    missing = [k for k in ("variant", *_INT_FIELDS, "seconds", "cpus") if k not in fields]
    if missing:
        raise SbLineError(f"{SB_MARKER} line lacks {', '.join(missing)}: {line!r}")
    try:
        counts = {k: int(fields[k]) for k in _INT_FIELDS}
        seconds = float(fields["seconds"])
        p0, p1 = (int(c) for c in fields["cpus"].split(","))
    except ValueError:
        raise SbLineError(f"{SB_MARKER} line has a malformed number: {line!r}") from None
    result = SbResult(fields["variant"], seconds=seconds, cpus=(p0, p1), **counts)
    if result.variant not in VARIANTS:
        raise SbLineError(f"{SB_MARKER} line names an unknown variant: {line!r}")
    n, relaxed = result.n, result.relaxed
    if not (n > 0 and 0 <= relaxed <= min(result.old0, result.old1) and max(result.old0, result.old1) <= n):
        raise SbLineError(f"{SB_MARKER} line's counts do not add up: {line!r}")
    if result.both_new < 0 or seconds < 0:
        raise SbLineError(f"{SB_MARKER} line's counts do not add up: {line!r}")
    return result


def run_variant(
    guest: Guest, variant: str, n: int, *, cpus: tuple[int, int] = DEFAULT_CPUS, timeout: float = 600.0
) -> SbResult:
    """Run ``sb-litmus`` ``variant`` for ``n`` iterations in ``guest``'s shell (P0 on
    ``cpus[0]``, P1 on ``cpus[1]``) and return its result. Raises :class:`GuestError` if
    the workload fails or prints no well-formed line, or names another run than asked."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    command = f"/bin/{WORKLOAD} {variant} {n} {cpus[0]} {cpus[1]}"
    out, status = guest.shell(command, timeout=timeout)
    if status != 0:
        raise GuestError(f"{command} exited with status {status}: {out.strip()[-200:]}")
    result = parse_sb_line(out)
    if (result.variant, result.n, result.cpus) != (variant, n, cpus):
        raise SbLineError(f"{command} reported another run: {result}")
    return result


def vcpu_threading(guest: Guest) -> str:
    """How QEMU runs ``guest``'s vCPUs, from QMP ``query-cpus-fast``: ``multi`` (a host
    thread per vCPU: multi-threaded TCG, or KVM), ``single`` (one thread runs every vCPU
    in turn: single-threaded TCG), or ``unknown``."""
    cpus = guest.machine.qmp("query-cpus-fast")
    threads = [c.get("thread-id") for c in cpus] if isinstance(cpus, list) else []
    if len(threads) < 2 or not all(isinstance(t, int) for t in threads):
        return "unknown"
    return "single" if len(set(threads)) == 1 else "multi"


@dataclass(frozen=True)
class OrderingRun:
    """The variants run on one guest, and what the guest ran on."""

    qemu_version: str
    accel: str
    threading: str
    kernel: str
    pti: bool
    results: tuple[SbResult, ...]

    def forbidden(self, variant: str) -> bool:
        """Whether the architecture forbids ``variant``'s relaxed outcome on this guest
        (``b`` always; ``c`` only when the kernel entry writes CR3, i.e. under PTI)."""
        return variant == "b" or (variant == "c" and self.pti)

    def violations(self) -> list[SbResult]:
        """The results with a relaxed outcome the architecture forbids."""
        return [r for r in self.results if r.relaxed and self.forbidden(r.variant)]


def _short_version(version: str) -> str:
    """``7.2.22`` out of QEMU's ``--version`` line (the line itself if it names none)."""
    m = re.search(r"version (\S+)", version)
    return m.group(1) if m else version


def measure(
    guest: Guest,
    n: int,
    variants: Sequence[str] = tuple(VARIANTS),
    *,
    iterations: Mapping[str, int] | None = None,
    cpus: tuple[int, int] = DEFAULT_CPUS,
    timeout: float = 600.0,
) -> OrderingRun:
    """Run each of ``variants`` on ``guest`` (see :func:`run_variant`) for ``n``
    iterations, or as many as ``iterations`` gives for it, and return the results with
    the QEMU version, accelerator, vCPU threading and kernel."""
    counts = iterations or {}
    results = tuple(run_variant(guest, v, counts.get(v, n), cpus=cpus, timeout=timeout) for v in variants)
    return OrderingRun(
        qemu_version=_short_version(guest.machine.version),
        accel=guest.config.accel,
        threading=vcpu_threading(guest),
        kernel=guest.config.label or str(guest.config.kernel),
        pti=guest.pti_enabled,
        results=results,
    )


def render_table(runs: Sequence[OrderingRun]) -> str:
    """A Markdown table: one row per variant of each run."""
    head = (
        "| variant | barriers (P0 / P1) | x86 | N | relaxed | old0 | old1 | seconds | QEMU | accel |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = [head]
    for run in runs:
        accel = f"{run.accel}, thread={run.threading}" if run.accel == "tcg" else run.accel
        for r in run.results:
            arch = "forbidden" if run.forbidden(r.variant) else "allowed"
            rows.append(
                f"| {r.variant} | {VARIANTS[r.variant]} | {arch} | {r.n:,} | {r.relaxed:,} | {r.old0:,} "
                f"| {r.old1:,} | {r.seconds:.2f} | {run.qemu_version} | {accel} |"
            )
    return "\n".join(rows)


def thread_wrapper(qemu: str, thread: str) -> str:
    """A shell script that runs ``qemu`` with ``-accel tcg`` turned into
    ``-accel tcg,thread=THREAD`` (every other argument as it is)."""
    if thread not in ("single", "multi"):
        raise ConfigError(f"--tcg-thread {thread!r}: choose single or multi")
    return (
        "#!/bin/sh\n"
        f"# {qemu} with -accel tcg,thread={thread} (rig.tools.tcgorder)\n"
        "prev=\n"
        "for a do\n"
        "    shift\n"
        f'    if [ "$prev" = -accel ] && [ "$a" = tcg ]; then a=tcg,thread={thread}; fi\n'
        "    prev=$a\n"
        '    set -- "$@" "$a"\n'
        "done\n"
        f'exec {shlex.quote(qemu)} "$@"\n'
    )


@contextlib.contextmanager
def _qemu_for(qemu: str, thread: str) -> Iterator[str]:
    """The QEMU to boot: ``qemu`` itself, or for ``--tcg-thread`` a wrapper around it in
    a temporary directory (removed after the block)."""
    if thread == "default":
        yield qemu
        return
    path = shutil.which(qemu)
    if path is None:
        raise ConfigError(f"--qemu {qemu}: not found; apt-get install qemu-system-x86")
    with tempfile.TemporaryDirectory(prefix="cr3rig-tcgorder-") as tmp:
        wrapper = Path(tmp) / "qemu-system-x86_64"
        wrapper.write_text(thread_wrapper(str(Path(path).resolve()), thread))
        wrapper.chmod(0o755)
        yield str(wrapper)


def _cpus(text: str) -> tuple[int, int]:
    try:
        p0, p1 = (int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two vCPUs, P0,P1 (e.g. 1,0)") from None
    if p0 == p1 or min(p0, p1) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: P0 and P1 need two different vCPUs")
    return p0, p1


def _positive(text: str) -> int:
    try:
        n = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= n <= 1_000_000_000:
        raise argparse.ArgumentTypeError(f"{n}: give 1..1000000000 iterations")
    return n


def _variant(text: str) -> tuple[str, int | None]:
    """``V`` or ``V=N`` (a variant, and its own iteration count)."""
    name, _, count = text.partition("=")
    if name not in VARIANTS:
        raise argparse.ArgumentTypeError(f"{name!r}: choose one of {', '.join(VARIANTS)}")
    return name, _positive(count) if count else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rig.tools.tcgorder", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("--n", type=_positive, default=DEFAULT_N, help=f"iterations per variant ({DEFAULT_N})")
    p.add_argument(
        "--variant", action="append", type=_variant, metavar="V[=N]",
        help="run this variant (repeatable; default all), with N iterations if given",
    )  # fmt: skip
    p.add_argument("--cpus", type=_cpus, default=DEFAULT_CPUS, help="vCPUs of P0,P1 (default 1,0)")
    p.add_argument(
        "--kernel", default=None, help=f"bzImage/vmlinux, 'reference-…' or 'debian' ({DEFAULT_KERNEL})"
    )
    p.add_argument("--vmlinux", type=Path, default=None, help="vmlinux with symbols for --kernel")
    p.add_argument("--initrd", type=Path, default=None, help="guest initramfs (default: the rig's own)")
    p.add_argument(
        "--qemu", default="qemu-system-x86_64", help="QEMU binary (e.g. rig.supply.qemu's wrapper)"
    )
    p.add_argument(
        "--tcg-thread", choices=("default", "single", "multi"), default="default",
        help="TCG threading: QEMU's default (what the rig runs), or forced through a wrapper",
    )  # fmt: skip
    p.add_argument("--accel", choices=("tcg", "kvm"), default="tcg", help="QEMU accelerator")
    p.add_argument("--host", default="local", help="where QEMU runs: 'local' or ssh://[user@]box[:port]")
    p.add_argument("--ssh-identity", type=Path, default=None, help="private key for --host ssh://…")
    p.add_argument("--ssh-known-hosts", type=Path, default=None, help="known_hosts for --host ssh://…")
    p.add_argument("--gdb", default="gdb", help="GDB binary")
    p.add_argument("--boot-timeout", type=float, default=180.0, help="seconds to wait for boot")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each variant may run")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="cache (default $CR3RIG_CACHE, ~/.cache/cr3rig)"
    )
    return p


def _boot_and_measure(args: argparse.Namespace, host: Host) -> OrderingRun:
    if args.tcg_thread != "default" and (host.label != "local" or args.accel != "tcg"):
        raise ConfigError("--tcg-thread needs a local QEMU with --accel tcg")
    if max(args.cpus) >= 2:
        raise ConfigError(f"--cpus {args.cpus[0]},{args.cpus[1]}: the guest has vCPUs 0 and 1")
    cache = args.cache_dir or default_cache_dir()
    kernel = resolve_kernel(args.kernel, args.vmlinux, cache)
    initrd = args.initrd or build_initramfs(cache)
    if args.accel == "kvm":
        from rig.transport.kvmprobe import kernel_probe
        from rig.transport.qemu import check_accel

        check_accel(host, "kvm")  # the static checks and the probe firmware, then the kernel
        why = kernel_probe(host, args.qemu, "kvm", kernel.image, initrd)
        if why is not None:
            raise ConfigError(f"--accel kvm cannot run on {host.label}: {why}; use --accel tcg")
    with _qemu_for(args.qemu, args.tcg_thread) as qemu:
        config = GuestConfig(
            kernel=kernel.image,
            initrd=initrd,
            vmlinux=kernel.vmlinux,
            label=kernel.label,
            accel=args.accel,
            qemu=qemu,
            gdb=args.gdb,
            boot_timeout=args.boot_timeout,
            cache_dir=cache,
        )
        with Guest.boot(config, host) as guest:
            chosen: list[tuple[str, int | None]] = args.variant or [(v, None) for v in VARIANTS]
            return measure(
                guest,
                args.n,
                [v for v, _ in chosen],
                iterations={v: n for v, n in chosen if n is not None},
                cpus=args.cpus,
                timeout=args.timeout,
            )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rig.tools.tcgorder``: boot a guest, run the variants, print the table."""
    args = _parser().parse_args(argv)
    try:
        host = open_host(args.host, identity=args.ssh_identity, known_hosts=args.ssh_known_hosts)
    except ConfigError as exc:
        print(f"tcgorder: {exc}", file=sys.stderr)
        return 2
    try:
        run = _boot_and_measure(args, host)
    except RigError as exc:
        print(f"tcgorder: {exc}", file=sys.stderr)
        return 2
    finally:
        host.close()
    print(
        f"kernel {run.kernel} (PTI {'on' if run.pti else 'off'}), QEMU {run.qemu_version}, "
        f"accel {run.accel}, vCPU threads: {run.threading}, "
        f"P0 on vCPU {args.cpus[0]}, P1 on vCPU {args.cpus[1]}\n"
    )
    print(render_table([run]))
    bad = run.violations()
    for r in bad:
        print(f"\nvariant {r.variant}: {r.relaxed} relaxed outcomes the architecture forbids")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
