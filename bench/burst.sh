#!/usr/bin/env bash
# Bursts of new sessions and memory per idle session (issue 13), for `time` (uvx
# mcp-server-time) and `everything` (npx server-everything) from examples/mcpbox.json: one cold
# start of each through `mcpbox run` (median of 3), then under `mcpbox serve`, per server, twice:
# 60 s idle, a burst of 10 concurrent new Streamable HTTP sessions (p50/p99 of the time to the
# initialize answer), 30 s idle, PSS summed over each session sandbox's processes. Then the same
# prepared servers, unsandboxed, behind supergateway --stateful (npm, in a scratch prefix), same
# bursts and PSS per session, as ratios to mcpbox. Not part of CI.
# Needs root (cgroups: PSS is grouped by sandbox cgroup) and the registries (prepare).
#
#   bench/burst.sh                        # this tree's binary (debug build)
#   BEFORE=/path/to/old/mcpbox bench/burst.sh   # and an older binary first, for before/after
#   BURST=10 GAP_S=60 IDLE_S=30 WARM_POOL_BYTES=… bench/burst.sh
#   SUPERGATEWAY=0 bench/burst.sh         # without the supergateway --stateful comparison
# Writes bench/burst.json (one JSON object per binary, one a line).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "bench/burst.sh: run as root (PSS is summed per sandbox cgroup)" >&2
    exit 2
fi
cargo build --quiet --bin mcpbox
after="${CARGO_TARGET_DIR:-target}/debug/mcpbox"
out=${BENCH_JSON:-bench/burst.json}
: > "$out"
if [ -n "${BEFORE:-}" ]; then
    python3 bench/burst.py "$BEFORE" before >> "$out"
fi
# supergateway --stateful in front of the same prepared servers, after this tree's run: installed
# with npm's own configuration into a scratch prefix (never globally). SUPERGATEWAY=0 skips it.
sg_js=""
if [ "${SUPERGATEWAY:-1}" != 0 ]; then
    sg=$(mktemp -d /tmp/mcpbox-burst-sg.XXXXXX)
    trap 'rm -rf "$sg"' EXIT
    npm install --prefix "$sg" --no-audit --no-fund --silent "supergateway@${SUPERGATEWAY_VERSION:-4.0.0}" >&2
    sg_js="$sg/node_modules/supergateway/dist/index.js"
fi
SUPERGATEWAY_JS="$sg_js" python3 bench/burst.py "$after" after >> "$out"
python3 - "$out" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    for n, s in r["servers"].items():
        print(f"{r['label']:6s} {n:10s} cold {s['cold_start_s']*1e3:6.0f} ms", end="")
        for k in ("burst1", "burst2"):
            b = s[k]
            print(f" | {k} p50 {b['p50_s']*1e3:6.0f} p99 {b['p99_s']*1e3:6.0f} ms PSS {b.get('pss_median_mb', 0):5.1f} MB", end="")
        print()
        g = s.get("supergateway")
        if g:
            print(f"{'supergw':6s} {n:10s} {'':17s}", end="")
            for k in ("burst1", "burst2"):
                b, m = g[k], s[k]
                print(f" | {k} p50 {b['p50_s']*1e3:6.0f} p99 {b['p99_s']*1e3:6.0f} ms PSS {b.get('pss_median_mb', 0):5.1f} MB", end="")
                print(f" (x{b['p50_s']/m['p50_s']:.2f} / x{b['p99_s']/m['p99_s']:.2f} / x{b.get('pss_median_mb', 0)/max(m.get('pss_median_mb', 0), 1e-9):.2f} of mcpbox)", end="")
            print()
PY
