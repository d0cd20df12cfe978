# cr3rig in a container, one image per Debian suite (= one QEMU version):
#   bookworm -> QEMU 7.2, trixie -> 10.0, sid -> 11.1; any later suite works unchanged.
# Build:  podman build --build-arg SUITE=trixie -t cr3rig:trixie .     (or docker build)
# Run:    python -m rig.tools.matrix --cell trixie:reference-7.2      (does the build too)
#
# The image holds the system packages and the venv, installed by the same
# scripts/setup.sh as on a host, but no kernels: the kernel cache ($CR3RIG_CACHE) is
# mounted at run time and shared by every cell, so a kernel is built once for the whole
# matrix (its entries are keyed by content and guarded by flock). Without a mounted
# cache, `scripts/setup.sh cache` (or pytest itself) builds into the container.
# The base image debian:SUITE is pulled from a registry, or, air-gapped, made with
# scripts/debian-base-image.sh SUITE (debootstrap + `podman import`).
ARG SUITE=bookworm
FROM debian:${SUITE}
ARG SUITE
LABEL org.cr3rig.suite=${SUITE}
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        python3 python3-venv ca-certificates
# a site's own CA certificates (a TLS-intercepting proxy), PEM text; the matrix runner
# passes the host's /usr/local/share/ca-certificates here
ARG EXTRA_CA_CERTS=""
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/cr3rig-site.crt && update-ca-certificates; \
    fi
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# scripts/setup.sh: no container tools inside the image
ENV CR3RIG_IN_IMAGE=1
WORKDIR /cr3rig
# the package step first, from only the files it reads, so that a source change
# reuses this layer
COPY scripts/setup.sh scripts/
COPY guests/linux/build-deps.txt guests/linux/
RUN scripts/setup.sh packages
COPY . /cr3rig
RUN rm -rf .venv && scripts/setup.sh venv
# with the cache mounted: -v ~/.cache/cr3rig:/cache -e CR3RIG_CACHE=/cache
CMD ["sh", "-c", "scripts/setup.sh cache && .venv/bin/pytest testcases/"]
