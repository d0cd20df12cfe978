#!/usr/bin/env bash
# Make the base image `debian:SUITE` the Dockerfile starts from, without any image
# registry: debootstrap a minimal Debian from Debian's package registry and import it.
#   scripts/debian-base-image.sh SUITE [ENGINE]     e.g. scripts/debian-base-image.sh trixie
# ENGINE is podman (default if present) or docker. Needs root (debootstrap) and the
# packages debootstrap and debian-archive-keyring. Idempotent: an existing image is kept
# (FORCE=1 makes it again). Like the registry's images, a stable suite also gets its
# -updates and -security sources (where a stable suite's newest kernel is), and the
# host's acceptance of expired Release files if it has one (a snapshot mirror).
# MIRROR overrides the mirror (default: the first deb.debian.org-style URI in /etc/apt).
set -euo pipefail
suite=${1:?usage: $0 SUITE [podman|docker]}
engine=${2:-$(command -v podman >/dev/null && echo podman || echo docker)}
# podman on hosts without systemd cgroups (see README "Container matrix")
eargs=()
[ "$engine" = podman ] && eargs=(--cgroup-manager=cgroupfs)
image="debian:$suite"
if [ "${FORCE:-0}" != 1 ] && "$engine" "${eargs[@]}" image inspect "$image" >/dev/null 2>&1; then
    echo "$image: already present"
    exit 0
fi
mirror=${MIRROR:-$(grep -rhoE 'https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | head -1 | tr -d ' ' || true)}
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d "${TMPDIR:-/tmp}/debian-base-$suite.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "$image: debootstrap --variant=minbase $suite from $mirror"
debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$suite" "$root" "$mirror" >"$root.log" 2>&1 || { tail -5 "$root.log"; exit 1; }
rm -f "$root.log"
components="$suite"
case $suite in sid|unstable|experimental) ;; *) components="$suite $suite-updates";; esac
{
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$mirror" "$components" /usr/share/keyrings/debian-archive-keyring.gpg
    case $suite in sid|unstable|experimental) ;; *)
        printf '\nTypes: deb\nURIs: %s-security\nSuites: %s-security\nComponents: main\nSigned-By: %s\n' \
            "${mirror%/}" "$suite" /usr/share/keyrings/debian-archive-keyring.gpg;;
    esac
} > "$root/etc/apt/sources.list.d/debian.sources"
rm -f "$root/etc/apt/sources.list"
# a site whose mirror serves frozen snapshots tells the host's apt to accept expired
# Release files; the image follows the host's policy (never turned off otherwise)
if apt-config dump 2>/dev/null | grep -q '^Acquire::Check-Valid-Until "false"'; then
    echo 'Acquire::Check-Valid-Until "false";' > "$root/etc/apt/apt.conf.d/99cr3rig-site-mirror"
fi
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$engine" "${eargs[@]}" import --change 'CMD ["/bin/bash"]' - "$image"
echo "$image: imported"
