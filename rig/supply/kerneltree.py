"""The kernel work tree: pristine sources recorded in git, a patch series applied by checkout.

``<tree>/src`` is a git repository whose ``pristine`` commit is the package's tarball.
The series is applied by building the patched tree in a scratch index and checking it
out: git rewrites only the files whose content changed, so the mtimes of the others
survive and ``make`` rebuilds incrementally.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rig.supply.buildrun import BuildRunner, KernelBuildError
from rig.supply.cache import locked as locked  # re-exported: it lived here before cache.py

#: Identity of the commits made in the work trees (never pushed anywhere).
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "cr3rig",
    "GIT_AUTHOR_EMAIL": "cr3rig@localhost",
    "GIT_COMMITTER_NAME": "cr3rig",
    "GIT_COMMITTER_EMAIL": "cr3rig@localhost",
    "GIT_AUTHOR_DATE": "1970-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "1970-01-01T00:00:00Z",
}


def _git(runner: BuildRunner, repo: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    full_env = dict(_GIT_ENV)
    if env:
        full_env.update(env)
    return runner.run(["git", "-C", str(repo), *args], what=f"git {args[0]}", env=full_env)


@dataclass
class TreeState:
    path: Path
    pristine: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> TreeState:
        data: dict[str, dict[str, str]] = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
        return cls(path, dict(data.get("pristine", {})))

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pristine": self.pristine}, indent=1) + "\n")
        os.replace(tmp, self.path)


def _unpack_tarball(deb: Path, package: str, dest: Path, runner: BuildRunner) -> None:
    """Extract ``usr/src/<package>.tar.xz`` of ``deb`` into ``dest`` (top dir stripped)."""
    with tempfile.TemporaryDirectory(prefix="deb-", dir=dest.parent) as tmp:
        runner.run(["dpkg", "-x", str(deb), tmp], what="dpkg -x")
        tarballs = sorted(Path(tmp, "usr", "src").glob(f"{package}.tar.*"))
        if not tarballs:
            raise KernelBuildError(f"{deb.name} holds no usr/src/{package}.tar.*")
        dest.mkdir(parents=True, exist_ok=True)
        runner.run(
            ["tar", "-xf", str(tarballs[0]), "-C", str(dest), "--strip-components=1"],
            what="tar -x",
        )


def pristine_commit(src: Path, state: TreeState, deb: Path, version: str, runner: BuildRunner) -> str:
    """Return the commit holding the pristine sources of ``version``, creating it if needed."""
    if version in state.pristine:
        return state.pristine[version]
    package = deb.name.split("_", 1)[0]
    ref = "refs/cr3rig/pristine/" + re.sub(r"[^A-Za-z0-9.+-]", "_", version)
    if not (src / ".git").is_dir():
        runner.say(f"kernelbuild: unpacking {deb.name} into {src}")
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        _unpack_tarball(deb, package, src, runner)
        _git(runner, src, "init", "-q")
        _git(runner, src, "config", "core.autocrlf", "false")
        _git(runner, src, "config", "gc.auto", "0")
        runner.say("kernelbuild: recording the pristine tree in git (about 30 s)")
        _git(runner, src, "add", "-A", "-f", ".")
        tree = _git(runner, src, "write-tree").strip()
        commit = _git(runner, src, "commit-tree", tree, "-m", f"pristine {version}").strip()
        _git(runner, src, "update-ref", ref, commit)
        _git(runner, src, "checkout", "-q", "-f", "--detach", commit)
    else:
        # A new version of the package: record it without touching the work
        # tree, so that the next checkout rewrites only the files that differ.
        runner.say(f"kernelbuild: recording {deb.name} in {src}")
        with tempfile.TemporaryDirectory(prefix="unpack-", dir=src.parent) as tmp:
            unpacked = Path(tmp, "tree")
            _unpack_tarball(deb, package, unpacked, runner)
            index = Path(tmp, "index")
            env = {"GIT_INDEX_FILE": str(index), "GIT_WORK_TREE": str(unpacked)}
            _git(runner, src, "add", "-A", "-f", ".", env=env)
            tree = _git(runner, src, "write-tree", env=env).strip()
        commit = _git(runner, src, "commit-tree", tree, "-m", f"pristine {version}").strip()
        _git(runner, src, "update-ref", ref, commit)
    state.pristine[version] = commit
    state.save()
    return commit


def apply_series(src: Path, pristine: str, patches: Sequence[Path], runner: BuildRunner) -> None:
    """Make the work tree ``src`` = ``pristine`` + ``patches``, rewriting only changed files."""
    with tempfile.TemporaryDirectory(prefix="apply-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp, "index"))}
        _git(runner, src, "read-tree", pristine, env=env)
        for patch in patches:
            try:
                _git(runner, src, "apply", "--cached", "--whitespace=nowarn", str(patch), env=env)
            except KernelBuildError as e:
                raise runner.fail(
                    f"patch {patch} does not apply to the pristine sources", e.log_tail
                ) from None
        tree = _git(runner, src, "write-tree", env=env).strip()
    commit = _git(runner, src, "commit-tree", tree, "-p", pristine, "-m", "cr3rig series").strip()
    _git(runner, src, "update-ref", "refs/cr3rig/applied", commit)
    # Only paths that differ between HEAD and `commit` (or that were modified
    # in the work tree) are written; the others keep their mtimes.
    _git(runner, src, "checkout", "-q", "-f", "--detach", commit)
    _git(runner, src, "clean", "-q", "-f", "-d", "-x")
