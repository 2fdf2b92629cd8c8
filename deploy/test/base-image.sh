#!/usr/bin/env bash
# Builds the local base images `make deploy-test` needs where no container registry is reachable
# (the real deploy/Dockerfile keeps `FROM python:3.11-slim`; docker-compose.yaml keeps
# postgres:16 and MinIO). From Debian's own packages, no registry:
#
#   lora-pipeline-base:bookworm   debootstrap'ed Debian 12 (Python 3.11) with a venv on PATH,
#                                 plus a CPU build of torch (the run containers train the tiny
#                                 model on the local backend)
#   lora-pipeline-postgres:test   that base + Debian's postgresql-15, with an entrypoint that acts
#                                 like the official image's (POSTGRES_USER/_PASSWORD/_DB)
#   lora-pipeline-s3:test         that base + moto's S3 server (stands in for MinIO)
#
# Needs root, debootstrap, a Docker engine, and Debian's and PyPI's package servers. Builds run
# with --network host (an engine started with --bridge=none has no default bridge). Torch comes
# from the host's pip configuration (`pip download torch`): point PIP_INDEX_URL at PyTorch's CPU
# index where plain PyPI would give the multi-GB CUDA build. Images that exist are kept
# (REBUILD=1 rebuilds).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY="${PY:-python3}"
# The CPU torch the project image's lock (locks/cpu.txt) pins, so that its install finds it present.
TORCH="${TORCH:-$(grep -o '^torch==[^ ]*' "$here/../../locks/cpu.txt")}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

have() { [ -z "${REBUILD:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }

if ! have lora-pipeline-base:bookworm || ! have lora-pipeline-base:bookworm-bare; then
  echo "[base] debootstrap bookworm (python3, python3-venv) from $MIRROR"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
  chroot "$work/rootfs" python3 -m venv /opt/venv
  # The host's CA bundle: the same trust as the host (a TLS-inspecting proxy's CA included).
  cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  echo "[base] torch: $TORCH (CPU build, through the host's pip configuration)"
  mkdir -p "$work/wheels"
  "$PY" -m pip download -q --no-deps "$TORCH" -d "$work/wheels"
  tar -C "$work/rootfs" -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' - lora-pipeline-base:bookworm-bare >/dev/null
  docker build -q --network host -t lora-pipeline-base:bookworm -f - "$work/wheels" <<'DOCKERFILE'
FROM lora-pipeline-base:bookworm-bare
COPY *.whl /tmp/wheels/
RUN pip install -q --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels
DOCKERFILE
fi

if ! have lora-pipeline-postgres:test; then
  echo "[postgres] Debian's postgresql-15"
  docker build -q --network host -t lora-pipeline-postgres:test -f "$here/postgres.Dockerfile" "$here"
fi

if ! have lora-pipeline-s3:test; then
  echo "[s3] moto's S3 server"
  docker build -q --network host -t lora-pipeline-s3:test -f "$here/s3.Dockerfile" "$here"
fi
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^lora-pipeline-'
