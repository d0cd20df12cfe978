"""The container matrix's cells and the container engine commands that build and run them.

A *cell* is ``SUITE:KERNEL`` (:class:`Cell`): the image ``cr3rig:SUITE`` (the Dockerfile
with ``--build-arg SUITE=SUITE``) and a ``--kernel`` value. :func:`build_argv` builds the
suite's image, :func:`run_argv` runs one cell (:func:`cell_script` inside it). The runner is
:mod:`rig.tools.matrix`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rig.supply.kernel import is_named_kernel

__all__ = [
    "IMAGE",
    "KERNEL_ENV",
    "PREPARE_FAILED",
    "REPO_ROOT",
    "Cell",
    "Engine",
    "MatrixError",
    "build_argv",
    "cell_script",
    "container_name",
    "find_engine",
    "image_name",
    "kernel_mounts",
    "last_line",
    "parse_cell",
    "podman_engine",
    "run_argv",
    "site_ca_certs",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Image name; the tag is the suite.
IMAGE = "cr3rig"
#: Exit status of the cell script when the kernel (or initramfs) could not be prepared.
PREPARE_FAILED = 90
#: Exported to the container: the kernel to test.
KERNEL_ENV = "CR3RIG_MATRIX_KERNEL"


class MatrixError(RuntimeError):
    """Bad input to the runner (a malformed cell, no container engine); one line."""


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` (``(no output)`` if none)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


# --------------------------------------------------------------------------
# Cells


@dataclass(frozen=True)
class Cell:
    """One column of the table: a Debian suite (hence a QEMU version) and a kernel."""

    suite: str
    kernel: str

    @property
    def name(self) -> str:
        return f"{self.suite}:{self.kernel}"

    @property
    def slug(self) -> str:
        """A file-name-safe form of :attr:`name`."""
        return "".join(c if c.isalnum() or c in "-._" else "_" for c in self.name.replace(":", "__"))


def parse_cell(text: str) -> Cell:
    """``SUITE:KERNEL`` -> :class:`Cell`; a path kernel must exist on the host."""
    suite, sep, kernel = text.partition(":")
    if not sep or not suite or not kernel or not suite.replace("-", "").isalnum():
        raise MatrixError(f"cell {text!r}: expected SUITE:KERNEL, e.g. trixie:reference-7.2 or sid:debian")
    named = is_named_kernel(kernel)
    if not named:
        path = Path(kernel).expanduser()
        if not path.is_file():
            raise MatrixError(
                f"cell {text!r}: {kernel} is no file; give reference-7.2, reference-6.1, debian or a path"
            )
        kernel = str(path.resolve())
    return Cell(suite, kernel)


def kernel_mounts(kernel: str) -> list[Path]:
    """Host directories a path kernel needs in the container (mounted read-only at the same path).

    The image's directory, or the build tree when the image is ``<tree>/arch/x86/boot/bzImage``
    with a ``<tree>/vmlinux`` (the rig finds the vmlinux there).
    """
    if kernel == "debian" or kernel.startswith("reference-"):
        return []
    path = Path(kernel)
    tree = path.parents[3] if len(path.parents) > 3 else path.parent
    return [tree if (tree / "vmlinux").is_file() else path.parent]


# --------------------------------------------------------------------------
# The container engine


@dataclass(frozen=True)
class Engine:
    """A container engine CLI: the argv prefix every command starts with, and its environment."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


def podman_engine(out: Path, *, runc: bool, containers_conf: str | None) -> Engine:
    """podman with cgroupfs (hosts without a systemd user session), runc if present, and a
    containers.conf without default ulimits (runc here refuses them: "error setting rlimit
    type 7") unless ``CONTAINERS_CONF`` already names one."""
    argv = ["podman", "--cgroup-manager=cgroupfs"]
    if runc:
        argv += ["--runtime", "runc"]
    if containers_conf is None:
        conf = out / "containers.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        containers_conf = str(conf)
    return Engine("podman", tuple(argv), {"CONTAINERS_CONF": containers_conf})


def find_engine(out: Path, preferred: str | None = None) -> Engine:
    """The first of podman, docker (or only ``preferred``) that is installed and answers ``info``."""
    tried = []
    for name in [preferred] if preferred else ["podman", "docker"]:
        if shutil.which(name) is None:
            tried.append(f"{name}: not installed")
            continue
        if name == "podman":
            eng = podman_engine(
                out, runc=shutil.which("runc") is not None, containers_conf=os.environ.get("CONTAINERS_CONF")
            )
        else:
            eng = Engine(name, (name,))
        res = subprocess.run(
            [*eng.argv, "info"], capture_output=True, text=True, env={**os.environ, **eng.env}, check=False
        )
        if res.returncode == 0:
            return eng
        tried.append(f"{name}: `{name} info` failed: {last_line(res.stderr or res.stdout)}")
    raise MatrixError("no usable container engine (" + "; ".join(tried) + "); install podman and runc")


def image_name(suite: str) -> str:
    return f"{IMAGE}:{suite}"


#: A host's own CA certificates (update-ca-certificates reads them); passed to the image.
SITE_CA_DIR = Path("/usr/local/share/ca-certificates")


def site_ca_certs(ca_dir: Path = SITE_CA_DIR) -> str:
    """The PEM text of the host's own CA certificates (``*.crt`` under ``ca_dir``), or ''.

    Behind a TLS-intercepting proxy pip in the image needs them to reach PyPI.
    """
    if not ca_dir.is_dir():
        return ""
    return "\n".join(p.read_text().strip() for p in sorted(ca_dir.rglob("*.crt")) if p.is_file())


def build_argv(engine: Engine, suite: str, repo: Path, ca_pem: str = "") -> list[str]:
    """The command that builds (or, from the layer cache, reuses) the suite's image."""
    argv = [*engine.argv, "build", "--network", "host", "--build-arg", f"SUITE={suite}"]
    if ca_pem:
        argv += ["--build-arg", f"EXTRA_CA_CERTS={ca_pem}"]
    return [*argv, "-t", image_name(suite), "-f", str(repo / "Dockerfile"), str(repo)]


def cell_script(pytest_args: Sequence[str] = ()) -> str:
    """The shell script a cell runs in its container (the kernel comes in ``$CR3RIG_MATRIX_KERNEL``).

    Exit :data:`PREPARE_FAILED` if the kernel or initramfs cannot be prepared, else pytest's status.
    """
    extra = " ".join(_sh_quote(a) for a in pytest_args)
    return (
        "qemu-system-x86_64 --version | head -n 1 > /out/qemu-version\n"
        f'.venv/bin/python -m rig.supply.kernel "${KERNEL_ENV}" > /out/prepare.log 2>&1 '
        f"|| exit {PREPARE_FAILED}\n"
        f'exec .venv/bin/pytest testcases/ --kernel "${KERNEL_ENV}" --junitxml=/out/junit.xml '
        f"-p no:cacheprovider --trace-dir /out/traces {extra} > /out/pytest.log 2>&1\n"
    )


def run_argv(
    engine: Engine, cell: Cell, cache: Path, cell_out: Path, *, prepare_only: bool = False,
    pytest_args: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """The command that runs one cell: the host's cache at the same path, ``cell_out`` at /out."""
    argv = [
        *engine.argv, "run", "--rm", "--name", container_name(cell), "--network", "host",
        "-v", f"{cache}:{cache}", "-e", f"CR3RIG_CACHE={cache}",
        "-v", f"{cell_out}:/out", "-e", f"{KERNEL_ENV}={cell.kernel}",
    ]  # fmt: skip
    for d in kernel_mounts(cell.kernel):
        argv += ["-v", f"{d}:{d}:ro"]
    if engine.name == "docker" and os.getuid() != 0:
        # files written into the shared cache keep the caller's ownership
        argv += ["--user", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp"]
    script = cell_script(pytest_args)
    if prepare_only:
        script = script.split("\nexec ", 1)[0] + "\n"
    return [*argv, image_name(cell.suite), "sh", "-c", script]


def container_name(cell: Cell) -> str:
    """The cell's container name: unique per runner process, so a stop can remove it."""
    return f"cr3rig-{cell.slug.replace('__', '-')}-{os.getpid()}"


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
