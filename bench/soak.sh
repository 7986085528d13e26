#!/usr/bin/env bash
# Soak benchmark (not a test, not in CI): one `mcpbox serve` with the echo fixture
# (tests/fixtures/echo_mcp.py) as a session-isolated server `echo` and a shared one `echos`,
# driven by bench/soak.py:
#   A. 2000 sessions opened and closed in a row (Streamable HTTP and legacy SSE, a sandbox each);
#   B. 200 idle legacy SSE streams and 500 half-sent requests held while a normal client
#      initializes and makes 300 tool calls;
#   C. the half-sent requests left alone: how many mcpbox closes by itself within 15 s;
#   D. 1100 idle connections from one address, then a normal client (10 s timeout);
#   then mcpbox's descriptors, threads, RSS and sandbox processes against the baseline.
# Run as root (the full sandbox, as on a VPS). Prints the JSON of the run and a table.
#
#   bench/soak.sh                              # builds the release binary
#   MCPBOX_BIN=/path/to/mcpbox bench/soak.sh   # another build (e.g. an older commit)
#   SESSIONS=200 STREAMS=50 HALF_OPEN=100 bench/soak.sh
#   NOFILE=1024 bench/soak.sh                  # mcpbox under a descriptor limit of 1024
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
if [ -z "${MCPBOX_BIN:-}" ]; then
    (cd "$repo" && cargo build --release --quiet --bin mcpbox)
    MCPBOX_BIN="${CARGO_TARGET_DIR:-$repo/target}/$(rustc --print host-tuple)/release/mcpbox"
fi

# The backend, world-readable (servers run under their own uid when mcpbox is root).
work="$(mktemp -d /tmp/mcpbox-soak.XXXXXX)"
chmod 0755 "$work"
cp "$repo/tests/fixtures/echo_mcp.py" "$work/echo.py"
chmod 0644 "$work/echo.py"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
server='"command": "/usr/bin/python3", "args": ["'"$work"'/echo.py"],
   "policy": {"extends": "python", "filesystem": {"read": ["'"$work"'/echo.py"]}}'
# Only keys every version knows: the same config runs before and after the edge limits.
# The shared server takes the 200 streams: "maxSessions" high rather than 0 (0 was an error).
cat > "$work/mcpbox.json" <<EOF
{"mcpProxy": {"addr": "127.0.0.1:$port", "options": {"authTokens": ["soak-token"]}},
 "mcpServers": {"echo": {$server},
                "echos": {$server, "isolation": "shared", "maxSessions": 100000}}}
EOF
# NOFILE=1024: run mcpbox under that descriptor limit (soft and hard), as on a default system.
limit=()
[ -n "${NOFILE:-}" ] && limit=(prlimit --nofile="$NOFILE:$NOFILE")
RUST_LOG="${RUST_LOG:-warn}" "${limit[@]}" "$MCPBOX_BIN" serve --config "$work/mcpbox.json" --state-dir "$work/state" \
    2> "$work/mcpbox.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
echo "mcpbox $MCPBOX_BIN (pid $pid, nofile $(awk '/Max open files/ {print $4 "/" $5}' /proc/$pid/limits))" >&2

MCPBOX_PID=$pid MCPBOX_PORT=$port python3 "$here/soak.py" > "$work/result.json"
cat "$work/result.json"
python3 - "$work/result.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print()
print("| | fds | threads | RSS MiB | sandboxes | processes |")
print("|---|---|---|---|---|---|")
rows = [("baseline", "baseline"), ("after_A", f"after {r['A']['sessions']} sessions"),
        ("peak", f"{r['B']['streams']} streams + {r['B']['half_open']} half-sent held")]
rows += [(k, f"after round {k.rsplit('_', 1)[1]} of B+C") for k in sorted(r) if k.startswith("after_round_")]
rows += [("end", "end")]
for k, label in rows:
    s = r[k]
    print(f"| {label} | {s['fds']} | {s['threads']} | {s['rss_kib'] / 1024:.1f} | {s['sandboxes']} | {s['processes']} |")
a, b, c = r["A"], r["B"], r["C"]
print(f"\nA: {a['sessions']} sessions in {a['seconds']} s (p50 {a['session_ms_p50']} ms, p99 {a['session_ms_p99']} ms each)")
print(f"B: under load the client initialized in {b['client_init_ms']} ms; {b['calls']} calls p50 {b['call_ms_p50']} ms, p99 {b['call_ms_p99']} ms")
print(f"C: {c['closed']} of {c['half_open']} abandoned half-sent requests closed by mcpbox within {c['closed_by_mcpbox_within_s']} s")
d = r["D"]
print(f"D: {d['flood']} idle connections from one address ({d['fds_held']} descriptors held by mcpbox); a normal client: "
      + (f"served in {d['client_ms']} ms" if d["client_ok"] else f"failed after {d['client_ms']} ms ({d['error']})"))
print(f"descriptors added since the baseline: {r['fds_added'] or 'none'}")
EOF
# What mcpbox logged (warnings and errors), counted by message.
echo "mcpbox log:" >&2
sed -E 's/^[^ ]+ +//' "$work/mcpbox.log" | sed -E 's/[0-9]+/N/g' | sort | uniq -c | sort -rn | head -20 >&2
