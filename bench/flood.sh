#!/usr/bin/env bash
# Memory under a flooding server: a release `mcpbox serve` with the hostile fixture
# (tests/fixtures/flood_mcp.py, full sandbox, python policy) as `flood` and a healthy `calm`
# beside it, then, one after the other:
#   1. STDERR_MB MiB of stderr without a newline,
#   2. FLOOD_MB MiB of 1 MiB notifications to a Streamable HTTP session with no GET stream,
#   3. FLOOD_MB MiB of 1 MiB notifications to a legacy SSE client that reads nothing,
#   4. 5000 small notifications to a legacy SSE client reading at full speed;
# `calm` is called between the steps. Prints mcpbox's RSS after each step and its peak (VmHWM),
# and how long each step took. Not part of CI.
#
#   bench/flood.sh
#   FLOOD_MB=4096 STDERR_MB=1024 bench/flood.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
FLOOD_MB="${FLOOD_MB:-1024}"
STDERR_MB="${STDERR_MB:-512}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
(cd "$repo" && cargo build --release --quiet --bin mcpbox)
mcpbox="$CARGO_TARGET_DIR/$(rustc --print host-tuple)/release/mcpbox"

work="$(mktemp -d /tmp/mcpbox-flood.XXXXXX)"
chmod 0755 "$work"
cp "$repo/tests/fixtures/flood_mcp.py" "$work/flood.py"
chmod 0644 "$work/flood.py"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
server() {
    printf '{"command": "/usr/bin/python3", "args": ["%s/flood.py"], "isolation": "%s", "policy": {"extends": "python", "filesystem": {"read": ["%s"]}}}' "$work" "$1" "$work"
}
cat > "$work/mcpbox.json" <<EOF
{"mcpProxy": {"addr": "127.0.0.1:$port", "options": {"authTokens": ["bench"]}},
 "mcpbox": {"maxLineBytes": 2000000},
 "mcpServers": {"flood": $(server session), "calm": $(server shared)}}
EOF
"$mcpbox" serve --config "$work/mcpbox.json" --state-dir "$work/state" 2> "$work/mcpbox.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT

python3 - "$port" "$pid" "$FLOOD_MB" "$STDERR_MB" <<'EOF'
import http.client, json, sys, time
port, pid, flood_mb, stderr_mb = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
H = {"Authorization": "Bearer bench", "Content-Type": "application/json", "Accept": "application/json"}

def vm(field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) // 1024

def post(path, msg, headers=None, timeout=600):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", path, json.dumps(msg), {**H, **(headers or {})})
    r = c.getresponse()
    return r.status, r.getheader("mcp-session-id"), r.read()

def call(i, name, args):
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": name, "arguments": args}}

init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}}

for _ in range(100):
    try:
        http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/healthz"); break
    except OSError:
        time.sleep(0.1)

def open_streamable(server):
    st, sid, _ = post(f"/{server}/mcp", init)
    assert st == 200, st
    return sid

calm = open_streamable("calm")
def calm_ok():
    t = time.time()
    st, _, body = post("/calm/mcp", call(1, "echo", {"text": "calm"}), {"Mcp-Session-Id": calm}, timeout=30)
    assert json.loads(body)["result"]["content"][0]["text"] == "calm", body
    return time.time() - t

def step(name, f):
    t = time.time()
    f()
    print(f"{name:<66} {time.time() - t:7.1f} s   RSS {vm('VmRSS:'):4} MiB   peak {vm('VmHWM:'):4} MiB   calm answered in {calm_ok() * 1000:.0f} ms")

print(f"{'start':<66} {'':9}   RSS {vm('VmRSS:'):4} MiB   peak {vm('VmHWM:'):4} MiB")
sid = open_streamable("flood")
step(f"1. {stderr_mb} MiB of stderr without a newline", lambda: post("/flood/mcp", call(2, "stderr", {"mb": stderr_mb}), {"Mcp-Session-Id": sid}))
step(f"2. {flood_mb} MiB of notifications, Streamable, no GET stream",
     lambda: post("/flood/mcp", call(3, "flood", {"mb": flood_mb, "size": 1 << 20}), {"Mcp-Session-Id": sid}))

def legacy():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("GET", "/flood/sse", headers={"Authorization": "Bearer bench", "Accept": "text/event-stream"})
    r = c.getresponse()
    endpoint = None
    while endpoint is None:
        line = r.fp.readline().decode()
        if line.startswith("data: "):
            endpoint = line[6:].strip()
    return c, r, endpoint

def non_reader():
    c, r, endpoint = legacy()
    post(endpoint, init)
    post(endpoint, call(4, "flood", {"mb": flood_mb, "size": 1 << 20}))
    deadline = time.time() + 120
    while post(endpoint, {"jsonrpc": "2.0", "method": "notifications/initialized"})[0] != 404:
        assert time.time() < deadline, "the non-reading session was not ended"
        time.sleep(0.05)
    c.close()
step(f"3. {flood_mb} MiB of notifications, legacy SSE client reading nothing", non_reader)

def burst():
    c, r, endpoint = legacy()
    post(endpoint, init)
    post(endpoint, call(5, "burst", {"n": 5000}))
    seen = 0
    while True:
        line = r.fp.readline()
        assert line, "the stream ended"
        if line.startswith(b"data: "):
            m = json.loads(line[6:])
            if m.get("id") == 5:
                break
            seen += "method" in m
    assert seen == 5000, seen
    c.close()
step("4. 5000 small notifications, legacy SSE client reading", burst)
EOF
grep -E "sessionBufferBytes exceeded|more bytes of this line dropped" "$work/mcpbox.log" | cut -c1-300 | sed 's/^/log: /'
