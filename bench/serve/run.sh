#!/usr/bin/env bash
# Bridge benchmark: one trivial stdio echo MCP server (tests/fixtures/echo_mcp.py) behind
#   - nothing (the floor: mcpbench talks to the process over stdio),
#   - mcpbox serve (Streamable HTTP and legacy SSE; session isolation, full sandbox), and
#     MCP 2026-07-28 stateless requests on the same server (one principal, 16 principals) and
#     on a shared one (beside the 2025-11-25 session rows for that shared server),
#   - supergateway (npm; --outputTransport sse, and streamableHttp --stateful),
#   - sparfenyuk's mcp-proxy (PyPI mcp-proxy; its /sse and /mcp endpoints),
# measured in one run by bench/serve (mcpbench). Not part of CI. Run as root for the full
# sandbox (as on a VPS). Prints one JSON line per target, then a table.
#
#   bench/serve/run.sh                 # everything
#   ONLY="floor mcpbox" bench/serve/run.sh
#   CALLS=2000 SESSIONS=16 PER_SESSION=300 SESSION_STARTS=30 bench/serve/run.sh
#
# Peers are installed on first use into $PEERS (npm and a Python venv; nothing global).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
PEERS="${PEERS:-/opt/mcpbox-bench}"
CALLS="${CALLS:-2000}"
SESSIONS="${SESSIONS:-16}"
PER_SESSION="${PER_SESSION:-300}"
SESSION_STARTS="${SESSION_STARTS:-30}"
ONLY="${ONLY:-floor mcpbox supergateway mcp-proxy}"
SUPERGATEWAY_VERSION=4.0.0
MCP_PROXY_VERSION=0.13.0

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
(cd "$repo" && cargo build --release --quiet --bin mcpbox)
(cd "$here" && cargo build --release --quiet)
mcpbox="$CARGO_TARGET_DIR/release/mcpbox"
bench="$CARGO_TARGET_DIR/release/mcpbench"

# The backend, world-readable (servers run under their own uid when mcpbox is root).
work="$(mktemp -d /tmp/mcpbench.XXXXXX)"
chmod 0755 "$work"
trap 'rm -rf "$work"' EXIT
cp "$repo/tests/fixtures/echo_mcp.py" "$work/echo.py"
chmod 0644 "$work/echo.py"
py=/usr/bin/python3
backend=("$py" "$work/echo.py")

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
common=(--calls "$CALLS" --sessions "$SESSIONS" --per-session "$PER_SESSION")
results="$work/results.jsonl"
: > "$results"
run() { # label, mcpbench args…
    local label="$1"; shift
    echo "== $label" >&2
    "$bench" --label "$label" "$@" | tee -a "$results" || true
}
want() { [[ " $ONLY " == *" $1 "* ]]; }

if want floor; then
    run "stdio (floor)" --transport stdio "${common[@]}" -- "${backend[@]}"
fi

if want mcpbox; then
    p=$(port)
    # 16 tokens: a 2026-07-28 request's principal is its token, so 16 tokens are 16 principals.
    tokens=(bench-token); for i in $(seq 1 15); do tokens+=("bench-token-$i"); done
    token_json=$(printf '"%s",' "${tokens[@]}"); token_json="[${token_json%,}]"
    token_args=(); for t in "${tokens[@]}"; do token_args+=(--token "$t"); done
    cat > "$work/mcpbox.json" <<EOF
{"mcpProxy": {"addr": "127.0.0.1:$p", "options": {"authTokens": $token_json}},
 "mcpServers": {"echo": {"command": "$py", "args": ["$work/echo.py"],
   "policy": {"extends": "python", "filesystem": {"read": ["$work/echo.py"]}},
   "maxSessions": 0},
  "echo-shared": {"command": "$py", "args": ["$work/echo.py"], "isolation": "shared",
   "policy": {"extends": "python", "filesystem": {"read": ["$work/echo.py"]}},
   "maxSessions": 0}}}
EOF
    box=("$mcpbox" serve --config "$work/mcpbox.json" --state-dir "$work/state")
    export RUST_LOG=warn
    run "mcpbox streamable-http" --transport streamable --url "http://127.0.0.1:$p/echo/mcp" --token bench-token \
        --session-starts "$SESSION_STARTS" "${common[@]}" -- "${box[@]}"
    run "mcpbox streamable-http (Accept: json only)" --transport streamable --accept json \
        --url "http://127.0.0.1:$p/echo/mcp" --token bench-token "${common[@]}" -- "${box[@]}"
    run "mcpbox sse" --transport sse --url "http://127.0.0.1:$p/echo/sse" --token bench-token \
        --session-starts "$SESSION_STARTS" "${common[@]}" -- "${box[@]}"
    # MCP 2026-07-28 on the same server (isolation "session": a stateless request goes to its
    # principal's process): all 16 clients with one token (one process), then 16 tokens (16).
    run "mcpbox 2026-07-28 (1 principal)" --transport stateless --url "http://127.0.0.1:$p/echo/mcp" \
        --token bench-token "${common[@]}" -- "${box[@]}"
    run "mcpbox 2026-07-28 (16 principals)" --transport stateless --url "http://127.0.0.1:$p/echo/mcp" \
        "${token_args[@]}" "${common[@]}" -- "${box[@]}"
    # One shared process for everyone, in both generations.
    run "mcpbox streamable-http (shared)" --transport streamable --url "http://127.0.0.1:$p/echo-shared/mcp" \
        --token bench-token "${common[@]}" -- "${box[@]}"
    run "mcpbox 2026-07-28 (shared)" --transport stateless --url "http://127.0.0.1:$p/echo-shared/mcp" \
        --token bench-token "${common[@]}" -- "${box[@]}"
fi

if want supergateway; then
    if [ ! -x "$PEERS/node_modules/.bin/supergateway" ]; then
        npm install --prefix "$PEERS" --no-audit --no-fund --loglevel=error "supergateway@$SUPERGATEWAY_VERSION" >&2
    fi
    sg=(node "$PEERS/node_modules/supergateway/dist/index.js" --stdio "$py $work/echo.py" --logLevel none)
    p=$(port)
    run "supergateway sse" --transport sse --url "http://127.0.0.1:$p/sse" "${common[@]}" -- "${sg[@]}" --port "$p" --outputTransport sse
    p=$(port)
    run "supergateway streamableHttp --stateful" --transport streamable --url "http://127.0.0.1:$p/mcp" \
        "${common[@]}" -- "${sg[@]}" --port "$p" --outputTransport streamableHttp --stateful
fi

if want mcp-proxy; then
    if [ ! -x "$PEERS/venv/bin/mcp-proxy" ]; then
        python3 -m venv "$PEERS/venv"
        "$PEERS/venv/bin/pip" install --quiet "mcp-proxy==$MCP_PROXY_VERSION" >&2
    fi
    p=$(port)
    run "mcp-proxy sse" --transport sse --url "http://127.0.0.1:$p/sse" "${common[@]}" -- \
        "$PEERS/venv/bin/mcp-proxy" --host 127.0.0.1 --port "$p" --log-level WARNING -- "${backend[@]}"
    p=$(port)
    run "mcp-proxy streamable-http" --transport streamable --url "http://127.0.0.1:$p/mcp" "${common[@]}" -- \
        "$PEERS/venv/bin/mcp-proxy" --host 127.0.0.1 --port "$p" --log-level WARNING -- "${backend[@]}"
fi

python3 - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def f(v, fmt):
    return "-" if v is None else format(v, fmt)
print()
print(f"| target | cold start ms | p50 µs | p99 µs | calls/s (16 sessions) | bridge CPU µs/call (seq/tput) | idle RSS MiB | session start p50 ms | gen CPU % (seq/tput) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if "error" in r:
        print(f"| {r['label']} | failed: {r['error'][:80].strip()} ||||||||")
        continue
    tput = f(r.get("calls_per_s"), ".0f") if r.get("calls_per_s") is not None else "wrong answers: " + "; ".join(r.get("errors", []))[:120]
    rss = r.get("idle_rss_kib")
    print(f"| {r['label']} | {f(r.get('cold_start_ms'), '.1f')} | {f(r.get('p50_us'), '.0f')} | {f(r.get('p99_us'), '.0f')} | {tput} | "
          f"{f(r.get('seq_bridge_cpu_us_per_call'), '.0f')}/{f(r.get('tput_bridge_cpu_us_per_call'), '.0f')} | "
          f"{f(rss / 1024 if rss else None, '.1f')} | {f(r.get('session_start_p50_ms'), '.1f')} | "
          f"{f(r.get('seq_gen_cpu_pct'), '.0f')}/{f(r.get('tput_gen_cpu_pct'), '.0f')} |")
EOF
