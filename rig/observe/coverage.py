"""Which testcase executed which CR3 switch site.

A :class:`SiteCoverage` holds a kernel's switch sites (:mod:`rig.machine.sites`) and,
for each, the testcases that executed it: a stepped trace executed a site if one of
its boundaries sat at the site's address (the instruction then ran: the next boundary
exists), an exploration if it stopped and stepped there. Sites TCG cannot reach carry
their reason and never count as missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rig.guest import Guest
from rig.machine.sites import Site, find_sites, unreachable_reason
from rig.machine.trace import Trace


@dataclass
class SiteCoverage:
    """The switch sites of one kernel and who executed them."""

    kernel: str
    sites: Sequence[Site]
    has_signal: bool
    pti: bool = True
    executed_by: dict[int, list[str]] = field(default_factory=dict)

    def record(self, test: str, addresses: Iterable[int]) -> None:
        """Mark every site among ``addresses`` as executed by ``test``."""
        known = {s.address for s in self.sites}
        for a in set(addresses) & known:
            who = self.executed_by.setdefault(a, [])
            if test not in who:
                who.append(test)

    def record_trace(self, test: str, trace: Trace) -> None:
        """Sites at which ``trace``'s vCPU executed an instruction (a later boundary exists)."""
        self.record(test, (s.pc for s in trace.snapshots[:-1]))

    def reason(self, site: Site) -> str | None:
        """Why TCG cannot reach ``site`` (None: it can); nothing is reached without PTI."""
        if not self.pti:
            return "PTI is off on every guest of this session"
        return unreachable_reason(site, has_signal=self.has_signal)

    def missing(self) -> list[Site]:
        """Reachable sites that no testcase executed."""
        return [s for s in self.sites if self.reason(s) is None and s.address not in self.executed_by]

    def table(self) -> str:
        """One line per site: address, kind, symbol+offset, instruction, who executed it."""
        lines = [
            f"CR3 switch sites of {self.kernel}: {len(self.sites)}, "
            f"{len(self.missing())} reachable but not executed"
        ]
        for s in self.sites:
            lines.append(
                f"  {s.address:#x} {s.kind:<12} {s.where:<44} {s.insn:<34.34} {self._status(s, limit=3)}"
            )
        return "\n".join(lines)

    def markdown(self) -> str:
        """The table as Markdown: site, kind, instruction, the testcases that executed it."""
        out = [
            f"CR3 switch sites of {self.kernel}: {len(self.sites)}, "
            f"{len(self.missing())} reachable but not executed",
            "",
            "| site | kind | instruction | executed by |",
            "| --- | --- | --- | --- |",
        ]
        for s in self.sites:
            out.append(f"| `{s.where}` | {s.kind} | `{s.insn}` | {self._status(s, code=True)} |")
        return "\n".join(out) + "\n"

    def _status(self, site: Site, *, limit: int | None = None, code: bool = False) -> str:
        """Who executed ``site`` (at most ``limit`` names), or why nobody did."""
        who = self.executed_by.get(site.address)
        if who:
            names = [f"`{_short(t)}`" if code else _short(t) for t in who[:limit]]
            more = ", ..." if limit is not None and len(who) > limit else ""
            head = f"executed by {len(who)}: " if limit is not None else ""
            return head + ", ".join(names) + more
        reason = self.reason(site)
        if reason is not None:
            return f"not reachable under TCG: {reason}"
        return "**NOT EXECUTED**" if code else "NOT EXECUTED"

    def rows(self) -> list[dict[str, str]]:
        """The table as dicts (for reports)."""
        out = []
        for s in self.sites:
            who = self.executed_by.get(s.address, [])
            out.append(
                {
                    "address": f"{s.address:#x}",
                    "kind": s.kind,
                    "where": s.where,
                    "instruction": s.insn,
                    "executed_by": ", ".join(_short(t) for t in who)
                    or ("not reachable" if self.reason(s) else "not covered"),
                    "unreachable": self.reason(s) or "",
                }
            )
        return out


def _short(nodeid: str) -> str:
    return nodeid.rsplit("::", 1)[-1]


def coverage_of(guest: Guest, signal: str) -> SiteCoverage | None:
    """The (empty) coverage of ``guest``'s kernel, or None without a vmlinux to read sites from."""
    if guest.config.vmlinux is None:
        return None
    sites = find_sites(guest.config.vmlinux, guest.symbols, signal)
    return SiteCoverage(
        f"{guest.config.label or guest.config.kernel} {guest.release}",
        sites,
        signal in guest.symbols,
        pti=guest.pti_enabled,
    )
