#!/usr/bin/env bash
# What finding a runtime costs a one-shot `mcpbox run`: the node/python bases run the interpreter
# once per mcpbox process to learn its paths (`mcpbox serve` remembers the answer per binary).
# Compares, in one hyperfine run, `mcpbox policy check` of `default` (no runtime), `python` and
# `node` (one probe each), and the bare probes' interpreters starting. Not part of CI.
# Usage: bench/runtime-probe.sh [extra hyperfine args, e.g. --runs 100]
set -euo pipefail
cd "$(dirname "$0")/.."

command -v hyperfine >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends hyperfine
}
cargo build --release --quiet
m="target/$(rustc --print host-tuple)/release/mcpbox"
py=$(readlink -f /usr/bin/python3)
node=$(readlink -f "$(command -v node)")
hyperfine --warmup 5 -N "$@" \
    -n "policy check default" "$m policy check default" \
    -n "policy check python" "$m policy check python" \
    -n "policy check node" "$m policy check node" \
    -n "python -I -S -c pass" "$py -I -S -c pass" \
    -n "node -e 0" "$node -e 0"
