"""Build progress with a real ``make -j2``: objects counted from kbuild-style lines, raw
output only in the log file, failures naming that file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from rig.supply.buildrun import BuildRunner, KernelBuildError, Progress

MAKEFILE = """\
OBJS := $(patsubst %.c,%.o,$(sort $(wildcard *.c)))
prog: $(OBJS)
\t@echo "  LD      $@"
\t@gcc -o $@ $^
%.o: %.c
\t@echo "  CC      $@"
\t@echo "raw make chatter for $@"
\t@gcc -c -o $@ $<
"""


def project(tmp_path: Path, n: int, *, broken: bool = False) -> Path:
    src = tmp_path / "proj"
    src.mkdir()
    (src / "Makefile").write_text(MAKEFILE)
    for i in range(n):
        (src / f"f{i}.c").write_text(f"int f{i}(void) {{ return {i}; }}\n")
    body = "int main(void) { return f0(); }\n" if not broken else "int main(void) { return no_such_thing; }\n"
    (src / "main.c").write_text("int f0(void);\n" + body)
    return src


@pytest.mark.parametrize("tty", [True, False])
def test_progress_counts_objects_and_hides_make_output(tmp_path: Path, tty: bool) -> None:
    src = project(tmp_path, 12)
    screen = io.StringIO()
    progress = Progress("kernelbuild demo", screen, tty=tty)
    runner = BuildRunner(tmp_path / "logs" / "build.log", progress=progress)
    runner.phase("configure")
    runner.phase("build", 14)
    runner.run(["make", "-j2", "-C", str(src)], what="make", capture=False)
    assert runner.objects == 14  # 13 CC + 1 LD
    runner.phase("store")
    progress.finish("done")
    runner.close()
    shown = screen.getvalue()
    assert (src / "prog").exists()
    assert "kernelbuild demo: build      14/~14 objects" in shown, shown
    assert "configure" in shown and "store" in shown
    assert "CC " not in shown and "raw make chatter" not in shown, shown
    assert ("\r" in shown) == tty
    log = (tmp_path / "logs" / "build.log").read_text()
    assert log.count("  CC      ") == 13 and "raw make chatter for f11.o" in log


def test_failure_names_the_log_and_keeps_the_compiler_error(tmp_path: Path) -> None:
    src = project(tmp_path, 3, broken=True)
    log = tmp_path / "build.log"
    runner = BuildRunner(log, progress=Progress("kernelbuild demo", io.StringIO(), tty=False))
    runner.phase("build", 5)
    with pytest.raises(KernelBuildError) as err:
        runner.run(["make", "-j2", "-C", str(src)], what="kernel build", capture=False)
    runner.close()
    assert err.value.summary.startswith("kernel build failed (exit 2)")
    assert f"(full log: {log})" in err.value.summary
    assert any("no_such_thing" in line for line in err.value.log_tail)
    assert "no_such_thing" in log.read_text()
