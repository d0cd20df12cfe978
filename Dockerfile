# cr3rig in a container: the same set-up script as the README, then `pytest testcases/`.
# Build:  podman build -t cr3rig .        (or docker build)
# Run:    podman run --rm cr3rig          (add --device /dev/kvm and `--accel kvm` on KVM hosts)
FROM debian:bookworm
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /cr3rig
COPY . /cr3rig
RUN rm -rf .venv && scripts/setup.sh
# prove the image works while building (podman run is not available on every host)
ARG CR3RIG_VERIFY=0
RUN if [ "$CR3RIG_VERIFY" = 1 ]; then .venv/bin/pytest -q testcases/; fi
CMD [".venv/bin/pytest", "testcases/"]
