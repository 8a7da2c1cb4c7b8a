#!/usr/bin/env bash
# Regenerates every lock file in requirements/ from pyproject.toml; run it after changing a dependency.
#
#   requirements/refresh.sh                              # keeps each pin that still fits, resolves the rest
#   requirements/refresh.sh --upgrade                    # takes the newest releases the bounds allow
#   requirements/refresh.sh --upgrade-package pandas     # moves one package (and what it needs)
#
# Arguments go to `uv pip compile`. Needs uv on PATH: `pip install uv` into any environment, or
# `pipx install uv`. It reads package metadata from PyPI; nothing is installed.
#
#   dev.lock       extra `dev`: everything the tests need       -> .ci/run
#   worker.lock    extra `worker`                               -> Dockerfile.worker
#   flower.lock    pyproject.toml's dependencies plus flower.in -> Dockerfile.flower
#   producer.lock  pyproject.toml's dependencies (enqueue jobs and read results; no torch)
#
# Each install puts torch in first (its CPU or CUDA build, from the index the installer chooses; see
# torch.txt), then the lock, then the project itself with --no-deps. So torch and the packages only its CUDA
# build needs (nvidia-*, triton, cuda-*) are left out of every lock; they are resolved with torch.txt, so the
# pure-Python packages torch needs are pinned at versions it accepts.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null 2>&1; then
    echo "requirements/refresh.sh needs uv: pip install uv" >&2
    exit 1
fi

# The images and CI: CPython 3.11 on x86_64 Linux (python:3.11-slim-bookworm has glibc 2.36).
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28
        --constraint requirements/torch.txt --custom-compile-command requirements/refresh.sh --quiet "$@")

# torch's own CUDA-only dependencies on that platform, by name: they change with torch releases (cu12 -> cu13).
no_emit=()
for name in $(uv pip compile requirements/torch.txt "${common[@]}" --no-header --no-annotate \
              | grep -oiE '^(torch|triton|nvidia-[a-z0-9._-]+|cuda-[a-z0-9._-]+)=='); do
    no_emit+=(--no-emit-package "${name%==}")
done

lock() {
    local output=$1
    shift
    uv pip compile "$@" "${common[@]}" "${no_emit[@]}" --generate-hashes --output-file "$output"
}
lock requirements/dev.lock pyproject.toml --extra dev
# The others within dev.lock: an image gets the versions CI tested (a conflict, such as flower.in's pin
# against a newer Flower the dev extra would take, stops the refresh instead).
lock requirements/worker.lock pyproject.toml --extra worker --constraint requirements/dev.lock
lock requirements/flower.lock pyproject.toml requirements/flower.in --constraint requirements/dev.lock
lock requirements/producer.lock pyproject.toml --constraint requirements/dev.lock
