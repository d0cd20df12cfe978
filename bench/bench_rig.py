"""cr3rig benchmark: every number is a ratio against a baseline measured in the same run.

1. **step**: the Stepper's checked steps/s (step the isolated vCPU; rip and CR3 of every
   vCPU, the signal (or, without it, ``cpu_tss_rw.sp0``) through every vCPU) against the
   raw single-step loop (``vCont;s`` only, no reads) on the same borrowed link: the
   limit. The two alternate in blocks of ``--block`` steps on the same guest so that
   the load of other processes falls on both alike. The Stepper with an opaque stop
   condition (two round trips a step) is measured the same way and printed beside it. Also, for
   comparison: a bare GDB CLI ``stepi`` loop and GDB/MI per step.
2. **first-hit**: time from QEMU start to the first breakpoint hit on the isolated vCPU
   (``syscall-loop`` started, ``entry_SYSCALL_64``) against the plain boot of the same
   kernel to its readiness marker (QEMU started by QMP ``cont``, no GDB attached), with
   the rig's boot phases (``Guest.boot_phases``) as a breakdown.
3. With ``--ssh loopback`` (a private sshd on 127.0.0.1, started by the bench) or
   ``--ssh ssh://[user@]box[:port]``: checked steps/s (``Guest.step``) with QEMU over
   SSH against the same measure with QEMU local, alternating local and SSH in each
   round (only this): without a stop condition (one round trip a step); with
   ``in_user_mode`` from ``entry_SYSCALL_64`` back to user mode, as the testcases step
   (the ``ssh-step`` goal is on this one; the condition foresees most instructions, and
   the round trips a step are printed); and with an opaque condition (two round trips
   a step).
4. WatchedWord mode, on one guest booted with QEMU >= 9.2 (default: bookworm-backports' 10.0)
   and the watch plugin: CR3 transitions checked per second by plugin watching
   (rig.observe.pluginwatch: a TCG plugin reads every CR3 write and signal store inside
   QEMU, the guest never stops) against those checked by full stepping (the Stepper,
   every boundary of the isolated vCPU, counting its CR3 side changes), same guest, same
   ``syscall-loop`` on the isolated vCPU; gdbstub watching (rig.observe.watching: every
   site a breakpoint) is measured on it too.

Each goal is printed as one line ``ratio NAME VALUE goal OP TARGET`` and written, with
its baseline, measure and samples, to ``--json`` (default results/bench.json).

Usage: python bench/bench_rig.py [--kernel PATH] [--steps N] [--block B] [--rounds R]
       [--transitions T] [--plugin-transitions P] [--watch-qemu PATH] [--watch-only]
       [--json PATH] [--ssh loopback|URL]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rig.guest import Guest, GuestConfig
from rig.machine.sites import SIGNAL, find_sites
from rig.machine.stepper import Stepper
from rig.machine.stops import in_user_mode
from rig.machine.trace import WatchedWord
from rig.machine.vcpu import thread_id
from rig.observe.checks import frozen_violations
from rig.observe.pluginwatch import PluginWatch
from rig.observe.pluginwatch import watch as plugin_watch
from rig.observe.watching import watch
from rig.supply.cache import default_cache_dir
from rig.supply.initramfs import build_initramfs
from rig.supply.kernel import resolve_kernel
from rig.supply.qemu import fetch_qemu
from rig.transport.console import Console
from rig.transport.host import Host
from rig.transport.local import LocalHost
from rig.transport.qemu import QemuConfig, QemuMachine
from rig.transport.rsp import RspLink, frame


def plain_boot_seconds(cfg: GuestConfig) -> float:
    """QEMU start (frozen) -> QMP cont -> readiness marker, no GDB."""
    m = QemuMachine(LocalHost(), QemuConfig(cfg.kernel, cfg.initrd, cfg.cmdline(), smp=cfg.smp))
    try:
        t0 = time.monotonic()
        m.start()
        con = Console(m.console_socket, m.console_log)
        m.qmp("cont")
        con.wait_ready(cfg.boot_timeout)
        return time.monotonic() - t0
    finally:
        m.close()


def rig_first_hit_seconds(cfg: GuestConfig, host: Host | None = None) -> tuple[float, Guest]:
    """QEMU start -> boot with GDB -> workload -> breakpoint hit on the isolated vCPU."""
    t0 = time.monotonic()
    g = Guest.boot(cfg, host)
    g.start_workload("syscall-loop")
    g.break_on(g.symbols.address("entry_SYSCALL_64"), g.config.isolated)
    return time.monotonic() - t0, g


def gdb_cli_stepi_rate(g: Guest, steps: int) -> float:
    """A bare GDB CLI ``stepi`` loop on the same stopped guest, same vCPU, same place.

    The rig's GDB and relay let go of the gdbstub (QEMU keeps the VM stopped), then a
    plain ``gdb -batch`` connects straight to QEMU and runs ``while $i < N; stepi; end``
    with scheduler-locking. The guest is not usable by the rig afterwards.
    """
    cpu = g.config.isolated
    assert g.gdb is not None and g.relay is not None
    g.gdb.close()
    g.relay.close()
    script = g.machine.dir / "stepi-loop.gdb"
    script.write_text(
        "set pagination off\nset confirm off\n"
        f"target remote {g.machine.gdb_socket}\n"
        f"set scheduler-locking step\nthread {cpu + 1}\n"
        "python import time; t0 = time.monotonic()\n"
        f"set $i = 0\nwhile $i < {steps}\n  stepi\n  set $i = $i + 1\nend\n"
        f"python print('CLI-STEPI-RATE', {steps} / (time.monotonic() - t0))\n"
    )
    out = subprocess.run(
        ["gdb", "-nx", "-batch", "-x", str(script)], capture_output=True, text=True, timeout=600, check=False
    ).stdout
    m = re.search(r"CLI-STEPI-RATE ([0-9.]+)", out)
    if m is None:
        raise RuntimeError(f"the CLI loop printed no rate: {out[-500:]}")
    return float(m.group(1))


def mi_step_rate(g: Guest, steps: int) -> float:
    """GDB/MI per step: -exec-step-instruction, wait *stopped, read rip+cr3 of every vCPU."""
    assert g.gdb is not None
    t0 = time.monotonic()
    for _ in range(steps):
        g.gdb.command(f"-exec-step-instruction --thread {g.config.isolated + 1}")
        g.gdb.wait_stopped(30)
        for cpu in range(g.config.smp):
            g.gdb.command(f"-data-evaluate-expression --thread {cpu + 1} $cr3")
    return steps / (time.monotonic() - t0)


def checked_step_rate(g: Guest, steps: int, *, stop: str = "none") -> tuple[float, float]:
    """``Guest.step`` as a test calls it (borrow, Stepper, disassembly), steps/s; the SSH ratio.

    ``stop`` is one of :data:`STOP_KINDS`: ``none`` (``max_steps`` only: the reads of
    boundary k ride with step k+1, one round trip a step); ``in-user-mode``, as the
    testcases step: from ``entry_SYSCALL_64`` until the vCPU is back in user mode, again
    from the next ``entry_SYSCALL_64`` until ``steps`` steps ran (only the time inside
    ``Guest.step`` counts; the condition foresees most instructions, so most steps are
    one round trip); ``opaque``, a plain callable that never holds (two round trips a
    step: the reads that decide, then the step).
    """
    cpu = g.config.isolated
    w = WatchedWord("tss_sp0", g.per_cpu("cpu_tss_rw", cpu) + 4, 8)
    condition = {"none": None, "in-user-mode": in_user_mode(cpu), "opaque": _never}[stop]
    done = ahead = 0
    elapsed = 0.0
    while done < steps:
        if done:
            rebreak(g)
        t0 = time.monotonic()
        trace = g.step(cpu, words=[w], max_steps=steps - done, stop=condition)
        elapsed += time.monotonic() - t0
        g.traces.clear()
        if stop != "in-user-mode" and len(trace.snapshots) != steps + 1:
            raise RuntimeError(f"stepped {len(trace.snapshots) - 1} boundaries, not {steps}")
        done += len(trace.snapshots) - 1
        ahead += trace.steps_ahead
    # each step is read in a write of its own, and sent in a write of its own unless it rode
    # with the reads of the boundary before it (Trace.steps_ahead)
    return done / elapsed, 2 - ahead / done


def raw_step_loop(link: RspLink, cpu: int, steps: int) -> float:
    """The limit: ``vCont;s`` on vCPU ``cpu`` only, no reads; seconds for ``steps`` steps.

    Each write is the step alone (with the ``+`` for the previous stop reply in front),
    exactly the step writes of the Stepper, minus everything it reads.
    """
    data = frame(f"vCont;s:{thread_id(cpu)}")
    t0 = time.monotonic()
    for _ in range(steps):
        reply = link.exchange(data, 1, owe_last=True)[0]
        if not reply.startswith(("S", "T")):
            raise RuntimeError(f"vCont;s answered {reply!r}")
    return time.monotonic() - t0


def _never(_: object) -> bool:
    return False


def step_rates(g: Guest, steps: int, block: int) -> dict[str, float]:
    """The raw loop, the Stepper and the Stepper with an opaque stop condition, in adjacent
    blocks of ``block`` steps on one borrowed link (same guest, same path: ``syscall-loop``
    on the isolated vCPU from ``entry_SYSCALL_64``), ``steps`` steps each.

    Returns steps/s of each over all its blocks, and ``step``/``step-stop``: the median
    over the block triples of the Stepper's rate over the raw loop's in the same triple
    (adjacent blocks see the same load from other processes; the median drops the
    blocks a burst of load hit). The order inside a triple alternates.
    """
    cpu = g.config.isolated
    watch = (
        WatchedWord(SIGNAL, g.per_cpu(SIGNAL, cpu), 4)
        if SIGNAL in g.symbols
        else WatchedWord("tss_sp0", g.per_cpu("cpu_tss_rw", cpu) + 4, 8)
    )
    stepper = Stepper(g.regmap, g.config.smp, cpu, [watch])
    seconds = {"raw": 0.0, "stepper": 0.0, "stepper-stop": 0.0}
    pairs: dict[str, list[float]] = {"step": [], "step-stop": []}
    done = 0
    with g.link() as link:

        def timed(kind: str, n: int) -> float:
            if kind == "raw":
                return raw_step_loop(link, cpu, n)
            t0 = time.monotonic()
            trace = stepper.run(link, max_steps=n, stop=_never if kind == "stepper-stop" else None)
            dt = time.monotonic() - t0
            moved = frozen_violations(trace)
            if moved or len(trace.snapshots) != n + 1:
                got = len(trace.snapshots)
                raise RuntimeError(f"the Stepper's trace is wrong: {moved[:3]}, {got} boundaries")
            return dt

        order = ["raw", "stepper", "stepper-stop"]
        while done < steps:
            n = min(block, steps - done)
            dt = {kind: timed(kind, n) for kind in order}
            for kind, v in dt.items():
                seconds[kind] += v
            pairs["step"].append(dt["raw"] / dt["stepper"])
            pairs["step-stop"].append(dt["raw"] / dt["stepper-stop"])
            order.reverse()
            done += n
    out = {k: steps / v for k, v in seconds.items()}
    out.update({k: statistics.median(v) for k, v in pairs.items()})
    return out


def stepped_transition_rate(g: Guest, steps: int) -> tuple[float, int]:
    """CR3 side changes per second of the isolated vCPU under the Stepper (every boundary
    checked: rip and CR3 of every vCPU, the signal through every vCPU); (rate, count)."""
    cpu = g.config.isolated
    stepper = Stepper(g.regmap, g.config.smp, cpu, [WatchedWord(SIGNAL, g.per_cpu(SIGNAL, cpu), 4)])
    with g.link() as link:
        t0 = time.monotonic()
        trace = stepper.run(link, max_steps=steps)
        dt = time.monotonic() - t0
    flips = len(trace.cr3_flips())
    return flips / dt, flips


def watched_transition_rate(g: Guest, transitions: int) -> tuple[float, float]:
    """CR3 side changes per second checked in gdbstub watch mode (rig.observe.watching) on
    the same guest and workload; (rate, seconds)."""
    assert g.config.vmlinux is not None
    result = watch(g, find_sites(g.config.vmlinux, g.symbols), signal=SIGNAL, transitions=transitions)
    if result.problems:
        raise RuntimeError(f"watch mode found problems: {result.problems[:3]}")
    return result.rate, result.seconds


def plugin_transition_rate(g: Guest, pw: PluginWatch, transitions: int) -> tuple[float, float]:
    """CR3 side changes per second checked in plugin watch mode (rig.observe.pluginwatch) on
    the same guest and workload; (rate, seconds)."""
    result = plugin_watch(g, pw, transitions=transitions)
    if result.problems:
        raise RuntimeError(f"plugin watch found problems: {result.problems[:3]}")
    return result.rate, result.seconds


def watch_section(cfg: GuestConfig, args: argparse.Namespace) -> tuple[list[str], dict[str, list[float]]]:
    """The watch measures, on ONE guest booted with QEMU >= 9.2 and the watch plugin: per
    round, stepping (the Stepper over ``syscall-loop`` on the isolated vCPU, its CR3 side
    changes per second: the baseline), plugin watch and gdbstub watch over the same
    workload. Returns the lines to print and the samples (empty when it cannot run)."""
    med = statistics.median
    if cfg.vmlinux is None:
        return [f"watch n/a (needs a vmlinux and {SIGNAL} in the kernel)"], {}
    qemu = args.watch_qemu or str(fetch_qemu("bookworm-backports", cfg.cache_dir))
    pw = PluginWatch.prepare(cfg.vmlinux, signal=SIGNAL, qemu=qemu, cache_dir=cfg.cache_dir)
    stepped: list[float] = []
    plugin: list[float] = []
    gdbstub: list[float] = []
    g = Guest.boot(replace(cfg, qemu=qemu, plugin=pw.plugin))
    try:
        if SIGNAL not in g.symbols:
            return [f"watch n/a (needs {SIGNAL} in the kernel)"], {}
        version = g.machine.version
        g.start_workload("syscall-loop")
        for _ in range(args.rounds):
            rebreak(g)
            stepped.append(stepped_transition_rate(g, args.steps)[0])
            g.resume()
            plugin.append(plugin_transition_rate(g, pw, args.plugin_transitions)[0])
            gdbstub.append(watched_transition_rate(g, args.transitions)[0])
    finally:
        g.close()
    lines = [
        f"watch (one guest, {version}, watch plugin loaded; syscall-loop on the isolated vCPU): "
        f"stepped (Stepper) {med(stepped):.1f} CR3 transitions/s (baseline); plugin watch "
        f"{med(plugin):.0f}/s ({args.plugin_transitions} per sample); gdbstub watch {med(gdbstub):.0f}/s "
        f"({args.transitions} per sample, ratio {med(gdbstub) / med(stepped):.1f})",
    ]
    samples = {"stepped-transitions": stepped, "plugin-transitions": plugin, "gdbstub-transitions": gdbstub}
    return lines, samples


#: What each side of ``ratio transitions-watch-vs-step`` checks: they do different work,
#: so the ratio is of CR3 transitions covered per second, not of the same checks.
WATCH_RATIO_SIDES = (
    "stepping (baseline): every instruction boundary of one vCPU's path, the signal read "
    "through every vCPU at each; plugin watch: every CR3 write and signal store of every "
    "vCPU, CR3 and the signal read before and after each through the hitting vCPU only, "
    "nothing between two sites"
)


def watch_ratio(results: Results, lines: list[str], samples: dict[str, list[float]]) -> None:
    """Print the watch lines and the ``ratio transitions-watch-vs-step`` line (CR3
    transitions covered per second by plugin watch / by stepping; :data:`WATCH_RATIO_SIDES`
    says what each side checks: not the same work)."""
    print("\n".join(lines))
    print(f"what differs: {WATCH_RATIO_SIDES}")
    if not samples:
        print("ratio transitions-watch-vs-step n/a goal >= 100")
        return
    med = statistics.median
    stepped, plugin = med(samples["stepped-transitions"]), med(samples["plugin-transitions"])
    results.ratio(
        "transitions-watch-vs-step",
        plugin / stepped,
        ">=",
        100,
        digits=1,
        baseline={
            "what": "Stepper, every boundary of syscall-loop, CR3 transitions/s",
            "rate": round(stepped, 2),
        },
        measure={"what": "plugin watch, every vCPU, CR3 transitions/s", "rate": round(plugin)},
        gdbstub_watch={"rate": round(med(samples["gdbstub-transitions"]), 1)},
        differs=WATCH_RATIO_SIDES,
    )


def rebreak(g: Guest) -> None:
    g.break_on(g.symbols.address("entry_SYSCALL_64"), g.config.isolated)


#: The SSH measures: name -> (stop kind for :func:`checked_step_rate`, what it is).
SSH_VARIANTS = {
    "no-stop": ("none", "Guest.step without a stop condition (1 round trip a step)"),
    "stop": ("in-user-mode", "Guest.step with in_user_mode from entry_SYSCALL_64, as the testcases step"),
    "opaque-stop": ("opaque", "Guest.step with an opaque stop condition (2 round trips a step)"),
}


def ssh_ratio(cfg: GuestConfig, args: argparse.Namespace) -> None:
    """Checked steps/s with QEMU over SSH vs. local, for each of :data:`SSH_VARIANTS`.

    Each round boots a guest locally, then one over SSH (same kernel, same
    ``syscall-loop`` from ``entry_SYSCALL_64`` on the isolated vCPU), and on each measures
    every variant from the same breakpoint (the order of the variants alternates by
    round). The goal (SSH >= 0.5x local, ``ratio ssh-step``) is on ``stop``: it is how the
    testcases step (``in_user_mode`` on a syscall). The others are printed and kept in the
    JSON: without a condition (one round trip a step) and with an opaque one (two, the
    most the link's latency can weigh).
    """
    from rig.tools.private_sshd import PrivateSshd
    from rig.transport.ssh import SshHost

    results = Results(cfg.label)
    sshd = PrivateSshd().start() if args.ssh == "loopback" else None
    rates: dict[str, dict[str, list[float]]] = {v: {"local": [], "ssh": []} for v in SSH_VARIANTS}
    trips: dict[str, list[float]] = {v: [] for v in SSH_VARIANTS}  # round trips a step
    hits: list[float] = []
    try:
        if sshd is not None:
            host = SshHost.from_url(sshd.url, identity=sshd.client_key, known_hosts=sshd.known_hosts)
        else:
            ident = Path(args.ssh_identity) if args.ssh_identity else None
            known = Path(args.ssh_known_hosts) if args.ssh_known_hosts else None
            host = SshHost.from_url(args.ssh, identity=ident, known_hosts=known)
        try:
            for r in range(args.rounds):
                order = list(SSH_VARIANTS) if r % 2 == 0 else list(reversed(SSH_VARIANTS))
                for side, h in (("local", LocalHost()), ("ssh", host)):
                    t, g = rig_first_hit_seconds(cfg, h)
                    try:
                        if side == "ssh":
                            hits.append(t)
                        for i, variant in enumerate(order):
                            if i:
                                rebreak(g)
                            rate, per_step = checked_step_rate(g, args.steps, stop=SSH_VARIANTS[variant][0])
                            rates[variant][side].append(rate)
                            trips[variant].append(per_step)
                    finally:
                        g.close()
        finally:
            host.close()
    finally:
        if sshd is not None:
            sshd.close()
    med = statistics.median
    results.data.update(ssh=host.label, steps=args.steps, rounds=args.rounds)
    print(f"kernel: {cfg.label}; steps per sample: {args.steps}; rounds: {args.rounds}; ssh: {host.label}")
    print(f"load average at start {results.data['load_average_at_start']}, now {list(os.getloadavg())}")
    per_round_trip: dict[str, float] = {}  # ms that SSH adds per round trip, per variant
    variants: dict[str, dict[str, Any]] = {}
    for variant, (_, what) in SSH_VARIANTS.items():
        local, remote, rt = med(rates[variant]["local"]), med(rates[variant]["ssh"]), med(trips[variant])
        added = 1e3 / remote - 1e3 / local
        per_round_trip[variant] = added / rt
        variants[variant] = {
            "what": what,
            "local_steps_per_s": round(local),
            "ssh_steps_per_s": round(remote),
            "ratio": round(remote / local, 4),
            "round_trips_per_step": round(rt, 3),
            "ssh_ms_per_round_trip": round(per_round_trip[variant], 4),
        }
        print(
            f"ssh stepping, {what}: {rt:.2f} round trips a step; local {local:.0f}/s; over SSH "
            f"{remote:.0f}/s; ratio ssh/local {remote / local:.2f}; per step SSH adds {added:.3f} ms, "
            f"{per_round_trip[variant]:.3f} ms per round trip"
        )
    print(f"SSH QEMU start to first hit {med(hits):.2f} s (median)")
    stop_local, stop_ssh = med(rates["stop"]["local"]), med(rates["stop"]["ssh"])
    results.ratio(
        "ssh-step",
        stop_ssh / stop_local,
        ">=",
        0.5,
        baseline={"what": f"QEMU local: {SSH_VARIANTS['stop'][1]}", "steps_per_s": round(stop_local)},
        measure={"what": f"QEMU over SSH ({host.label}), the same", "steps_per_s": round(stop_ssh)},
        variants=variants,
        ssh_ms_per_round_trip=round(per_round_trip["stop"], 4),
        ssh_first_hit_seconds=round(med(hits), 3),
        method="median over rounds of each side's rate; local and SSH guests alternate in each round",
    )
    samples = {
        f"{side}-{variant}": rates[variant][side] for variant in SSH_VARIANTS for side in ("local", "ssh")
    }
    samples.update({f"round-trips-{v}": trips[v] for v in SSH_VARIANTS})
    samples["ssh-first-hit"] = hits
    results.data["samples"] = {name: [round(x, 3) for x in v] for name, v in samples.items()}
    print("samples:", " ".join(f"{n} {[round(x, 2) for x in v]}" for n, v in samples.items()))
    results.write(Path(args.json))


class Results:
    """The ratio lines (``ratio NAME VALUE goal OP TARGET``) and what goes to the JSON file."""

    def __init__(self, kernel: str) -> None:
        self.data: dict[str, Any] = {
            "kernel": kernel,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average_at_start": list(os.getloadavg()),
            "ratios": {},
            "measures": {},
            "samples": {},
        }

    def ratio(self, name: str, value: float, op: str, target: float, digits: int = 2, **detail: Any) -> None:
        met = value >= target if op == ">=" else value <= target
        print(f"ratio {name} {value:.{digits}f} goal {op} {target:g}")
        goal = f"{op} {target:g}"
        self.data["ratios"][name] = {"value": round(value, 4), "goal": goal, "met": met, **detail}

    def write(self, path: Path) -> None:
        self.data["load_average_at_end"] = list(os.getloadavg())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=2) + "\n")
        print(f"json: {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--block", type=int, default=200, help="steps per alternating block of the step ratio")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ssh", default=None, help="'loopback' or ssh://[user@]box[:port]: the SSH ratio only")
    ap.add_argument("--ssh-identity", default=None)
    ap.add_argument("--ssh-known-hosts", default=None)
    ap.add_argument("--transitions", type=int, default=1000, help="CR3 transitions per gdbstub-watch sample")
    ap.add_argument(
        "--plugin-transitions", type=int, default=20000, help="CR3 transitions per plugin-watch sample"
    )
    ap.add_argument("--watch-only", action="store_true", help="only the watch section")
    ap.add_argument(
        "--watch-qemu", default=None, help="QEMU >= 9.2 for the watch section (default: bookworm-backports')"
    )
    ap.add_argument("--json", default="results/bench.json", help="where the ratios go as JSON")
    args = ap.parse_args()
    cache = default_cache_dir()
    k = resolve_kernel(args.kernel, None, cache)
    cfg = GuestConfig(
        kernel=k.image, initrd=build_initramfs(cache), vmlinux=k.vmlinux, label=k.label, cache_dir=cache
    )
    # warm the kallsyms cache so boots compare like with like
    Guest.boot(cfg).close()
    if args.ssh:
        ssh_ratio(cfg, args)
        return 0
    results = Results(k.label)
    watch_lines, watch_samples = watch_section(cfg, args)
    if args.watch_only:
        print(f"kernel: {k.label}; steps per sample: {args.steps}; rounds: {args.rounds}")
        watch_ratio(results, watch_lines, watch_samples)
        results.write(Path(args.json))
        return 0
    plain: list[float] = []
    first: list[float] = []
    phases: list[dict[str, float]] = []
    raw: list[float] = []
    stepper: list[float] = []
    stepper_stop: list[float] = []
    step_ratio: list[float] = []
    step_stop_ratio: list[float] = []
    cli: list[float] = []
    mi: list[float] = []
    version = ""
    for _ in range(args.rounds):
        plain.append(plain_boot_seconds(cfg))
        t, g = rig_first_hit_seconds(cfg)
        first.append(t)
        phases.append(dict(g.boot_phases))
        try:
            version = g.machine.version
            rates = step_rates(g, args.steps, args.block)
            raw.append(rates["raw"])
            stepper.append(rates["stepper"])
            stepper_stop.append(rates["stepper-stop"])
            step_ratio.append(rates["step"])
            step_stop_ratio.append(rates["step-stop"])
            rebreak(g)
            mi.append(mi_step_rate(g, max(100, args.steps // 10)))
            rebreak(g)
            cli.append(gdb_cli_stepi_rate(g, args.steps))
        finally:
            g.close()
    med = statistics.median
    print(f"kernel: {k.label}; qemu: {version}; steps per sample: {args.steps}; rounds: {args.rounds}")
    print(f"load average at start {results.data['load_average_at_start']}, now {list(os.getloadavg())}")
    results.data.update(qemu=version, steps=args.steps, block=args.block, rounds=args.rounds)
    phase_names = list(phases[0]) if phases else []
    breakdown = {p: med(x[p] for x in phases) for p in phase_names}
    print(
        f"boot: plain to marker {med(plain):.2f} s; rig QEMU start to first hit {med(first):.2f} s;"
        " rig phases (s since QEMU start, medians): "
        + ", ".join(f"{p} {v:.2f}" for p, v in breakdown.items())
    )
    results.ratio(
        "first-hit",
        med(first) / med(plain),
        "<=",
        1.5,
        baseline={"what": "plain boot to the readiness marker (no GDB)", "seconds": round(med(plain), 3)},
        measure={"what": "QEMU start to the first hit on the isolated vCPU", "seconds": round(med(first), 3)},
        breakdown={p: round(v, 3) for p, v in breakdown.items()},
    )
    print(
        f"stepping: raw vCont;s loop {med(raw):.0f}/s (limit); Stepper {med(stepper):.0f}/s;"
        f" Stepper with an opaque stop condition {med(stepper_stop):.0f}/s,"
        f" {med(step_stop_ratio):.2f} of the limit"
        f" (ratios: medians of adjacent {args.block}-step blocks)"
    )
    results.ratio(
        "step",
        med(step_ratio),
        ">=",
        0.8,
        baseline={"what": "raw vCont;s loop, no reads, same link", "steps_per_s": round(med(raw))},
        measure={"what": "Stepper (rip+CR3, signal via each vCPU)", "steps_per_s": round(med(stepper))},
        with_stop={"steps_per_s": round(med(stepper_stop)), "ratio": round(med(step_stop_ratio), 3)},
        method=f"median over adjacent {args.block}-step blocks of raw seconds / Stepper seconds",
    )
    print(
        f"for comparison: gdb CLI stepi {med(cli):.0f}/s; GDB/MI per step {med(mi):.0f}/s;"
        f" Stepper/CLI {med(stepper) / med(cli):.2f}"
    )
    watch_ratio(results, watch_lines, watch_samples)
    samples = {
        "plain": plain,
        "first-hit": first,
        "raw": raw,
        "stepper": stepper,
        "stepper-stop": stepper_stop,
        "step-ratio": step_ratio,
        "step-stop-ratio": step_stop_ratio,
        "cli": cli,
        "mi": mi,
        **watch_samples,
    }
    results.data["samples"] = {name: [round(x, 3) for x in v] for name, v in samples.items()}
    results.data["boot_phases"] = phases
    print("samples:", " ".join(f"{n} {[round(x, 2) for x in v]}" for n, v in samples.items()))
    results.write(Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
