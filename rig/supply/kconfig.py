"""Kernel configuration: ``make tinyconfig`` plus a fragment, checked option by option."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from rig.supply.buildrun import BuildRunner

_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_fragment(text: str) -> dict[str, str | None]:
    """Parse a Kconfig fragment or ``.config``.

    Returns ``{symbol: value}``, with ``None`` for ``# CONFIG_X is not set``.
    Other comments and blank lines are ignored.
    """
    options: dict[str, str | None] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = _SET_RE.match(line)
        if m:
            options[m.group(1)] = m.group(2)
            continue
        m = _UNSET_RE.match(line)
        if m:
            options[m.group(1)] = None
            continue
        if line.startswith("#"):
            continue
        raise ValueError(f"line {lineno}: not a Kconfig assignment: {raw!r}")
    return options


def check_config(fragment: str, config: str) -> list[str]:
    """Compare a fragment with a resulting ``.config``.

    Returns one message per option of the fragment that did not take (empty
    if all did): ``CONFIG_X=y`` must be in the config with exactly that value,
    ``# CONFIG_X is not set`` must be unset (or absent) there.
    """
    wanted = parse_fragment(fragment)
    actual = parse_fragment(config)
    problems: list[str] = []
    for sym, value in wanted.items():
        got = actual.get(sym)
        if value is None:
            if got is not None and got != "n":
                problems.append(f"{sym} should be unset, is {sym}={got}")
        elif got != value:
            shown = "unset" if got is None else f"{sym}={got}"
            problems.append(f"{sym}={value} requested, is {shown}")
    return problems


def configure(
    name: str, fragment_path: Path, src: Path, tree: Path, fragment: str, jobs: int, runner: BuildRunner
) -> None:
    """Generate the configuration in ``tree/kconfig``; copy it to ``tree/build`` if changed."""
    kconfig = tree / "kconfig"
    build = tree / "build"
    kconfig.mkdir(parents=True, exist_ok=True)
    build.mkdir(parents=True, exist_ok=True)
    frag_file = kconfig / "fragment.config"
    frag_file.write_text(fragment)
    make = ["make", "-C", str(src), f"O={kconfig}", f"-j{jobs}"]
    runner.say(f"kernelbuild: configuring {name} (tinyconfig + {fragment_path.name})")
    runner.run([*make, "tinyconfig"], what="make tinyconfig")
    runner.run(
        [
            str(src / "scripts" / "kconfig" / "merge_config.sh"),
            "-m",
            "-O",
            str(kconfig),
            str(kconfig / ".config"),
            str(frag_file),
        ],
        what="merge_config.sh",
        cwd=src,
    )
    runner.run([*make, "olddefconfig"], what="make olddefconfig")
    new_config = (kconfig / ".config").read_text()
    problems = check_config(fragment, new_config)
    if problems:
        for p in problems:
            runner.say(f"kernelbuild: config: {p}")
        raise runner.fail(
            f"{len(problems)} option(s) of {fragment_path} did not take after "
            f"olddefconfig (missing dependencies?): " + "; ".join(problems)
        )
    old = build / ".config"
    if not old.exists() or old.read_text() != new_config:
        shutil.copyfile(kconfig / ".config", old)
