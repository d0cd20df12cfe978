#!/usr/bin/env bash
# cr3rig set-up for a fresh Debian machine; the README, the Dockerfile and .ci/run all
# call this one script. Idempotent: a second run only checks.
#   system packages (QEMU, GDB, busybox-static, a C toolchain), the venv in .venv with
#   cr3rig installed editable, then the default kernel and the guest initramfs in the
#   cache ($CR3RIG_CACHE or ~/.cache/cr3rig).
#   scripts/setup.sh [packages] [venv] [cache]   runs only the steps named (default: all);
#   the container image runs `packages` and `venv`: its kernels come from a shared cache.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=" ${*:-packages venv cache} "
for s in $steps; do
    case $s in packages|venv|cache) ;; *) echo "setup: unknown step '$s' (valid: packages venv cache)" >&2; exit 2;; esac
done
want() { [[ $steps == *" $1 "* ]]; }

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive

if want packages; then
pkgs="qemu-system-x86 gdb busybox-static gcc libc6-dev binutils cpio python3 python3-venv ca-certificates"
# gcc -m32 with a 32-bit libc: the 32-bit x86 selftests of the kernel tree (rig/supply/selftests.py)
pkgs="$pkgs gcc-multilib"
# the rig's own tests open the HTML reports in headless chromium (tests/test_report_browser.py)
pkgs="$pkgs chromium chromium-driver"
# the SSH tests start a private sshd on 127.0.0.1 (tests/test_ssh.py); note that Debian's
# postinst also starts the system sshd where services can start (not in containers with
# a policy-rc.d that exits 101)
pkgs="$pkgs openssh-server openssh-client"
# (package shellcheck) actionlint checks the workflow's run: scripts with it (tests/test_workflow.py)
pkgs="$pkgs shellcheck"
# on a host (not inside the matrix's own images, whose Dockerfile sets CR3RIG_IN_IMAGE;
# podman builds also have /run/.containerenv): what the container matrix needs. A host
# may itself carry a /.dockerenv (a CI machine made from a container image) and still run
# podman, so that file says nothing.
if [ -z "${CR3RIG_IN_IMAGE:-}" ] && [ ! -e /run/.containerenv ]; then
    pkgs="$pkgs podman runc debootstrap"
fi
# what building the watch-mode TCG plugin needs (rig/supply/qemuplugin.py; its header comes from
# QEMU's source package, fetched by the rig; xz-utils unpacks it)
pkgs="$pkgs gcc pkg-config libglib2.0-dev xz-utils"
# what building the reference kernel needs
pkgs="$pkgs $(grep -v '^#' guests/linux/build-deps.txt | tr '\n' ' ')"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ] || ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
    $SUDO apt-get update -q
fi
if [ -n "$missing" ]; then
    echo "setup: installing$missing"
    # shellcheck disable=SC2086 # one word per package
    $SUDO apt-get install -y -q --no-install-recommends $missing
fi
fi

if want venv; then
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# xdist: `pytest -n 2` (the README's parallel run; tests/test_xdist.py runs it)
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev,xdist]'
fi

want cache || exit 0
# the default kernel (the 7.2 reference build, ~7 min cold on 2 cores), Debian's stock
# kernel (the rig's own tests boot it), and the initramfs, all cached
.venv/bin/python -m rig.supply.kernel
.venv/bin/python -m rig.supply.kernel debian
# plugin watch (testcases/test_cr3_watch_plugin.py): a QEMU with TCG plugin API 4 (the
# system's, or bookworm-backports' 10.0 beside bookworm's 7.2), qemu-plugin.h, the plugin
.venv/bin/python -m rig.supply.qemuplugin
