#!/usr/bin/env bash
# What observing costs: one short MCP session (initialize, tools/list, end of input) of a node and
# a python server under `mcpbox run` and under `mcpbox policy learn`, RUNS times each, wall time
# per session, and how many path syscalls learning observed. Not part of CI. Run as root.
# Usage: [MCPBOX=target/debug/mcpbox] [STATE=dir] [RUNS=5] bench/learn.sh
# Packages are prepared into STATE on the first (warm-up) session of each server, not timed.
set -euo pipefail
cd "$(dirname "$0")/.."
MCPBOX=${MCPBOX:-target/debug/mcpbox}
RUNS=${RUNS:-5}
out=$(mktemp -d)
if [ -z "${STATE:-}" ]; then
    STATE=$(mktemp -d /var/tmp/mcpbox-bench-learn.XXXXXX)
    trap 'rm -rf "$out" "$STATE"' EXIT
else
    trap 'rm -rf "$out"' EXIT
fi
session() {
    printf '%s\n' \
        '{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}' \
        '{"jsonrpc":"2.0","method":"notifications/initialized"}' \
        '{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
}
one() { # one MODE NAME POLICY COMMAND... → seconds
    local mode=$1 name=$2 policy=$3 t0
    shift 3
    t0=$(date +%s%N)
    if [ "$mode" = run ]; then
        session | "$MCPBOX" run --state-dir "$STATE" --name "$name" --policy "$policy" -- "$@" >/dev/null 2>"$out/err"
    else
        session | "$MCPBOX" policy learn --state-dir "$STATE" --name "$name" --out "$out/$name.toml" -- "$@" \
            >/dev/null 2>"$out/err"
    fi
    echo "scale=3; ($(date +%s%N) - $t0) / 1000000000" | bc
}
for spec in "time mcp-server-time uvx mcp-server-time" \
    "everything server-everything npx -y @modelcontextprotocol/server-everything"; do
    # shellcheck disable=SC2086
    set -- $spec
    name=$1 policy=$2
    shift 2
    one run "$name" "$policy" "$@" >/dev/null # prepares the package
    for mode in run learn; do
        times=()
        for _ in $(seq "$RUNS"); do times+=("$(one "$mode" "$name" "$policy" "$@")"); done
        echo "$name $mode: ${times[*]} s"
    done
    grep -o 'after [0-9]* path syscalls ([0-9]* distinct paths)' "$out/err" | sed "s/^/$name learn: /"
done
