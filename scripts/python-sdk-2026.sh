#!/bin/bash
# A real 2026-07-28 client against mcpbox: the Python SDK 2.x client (pinned to 2026-07-28, then
# in its auto mode) through `mcpbox serve` in front of the 2025-era stdio fixture
# tests/fixtures/echo_mcp.py, sandboxed (isolation "principal"). Run as root from the repository.
# Needs uv (the package index is whatever uv is configured with). Exit status 0 only if both pass.
set -euo pipefail
cd "$(dirname "$0")/.."
MCP_VERSION=${MCP_VERSION:-2.3.0}
work=$(mktemp -d /tmp/mcpbox-pysdk.XXXXXX)
chmod 755 "$work"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
pid=
if command -v uv >/dev/null; then uv=(uv); else uv=(python3 -m uv); fi
"${uv[@]}" venv -q "$work/venv"
VIRTUAL_ENV="$work/venv" "${uv[@]}" pip install -q "mcp==$MCP_VERSION"
cargo build -q
bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
for b in "$bin"/*/debug/mcpbox "$bin"/debug/mcpbox; do [ -x "$b" ] && { bin=$b; break; }; done
install -m 644 tests/fixtures/echo_mcp.py "$work/echo_mcp.py"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/mcpbox.json" <<JSON
{"mcpProxy":{"addr":"127.0.0.1:$port","options":{"authTokens":["pysdk-token"]}},
 "mcpServers":{"echo":{"command":"/usr/bin/python3","args":["$work/echo_mcp.py"],"isolation":"principal",
   "policy":{"extends":"python","filesystem":{"read":["$work/echo_mcp.py"]}}}}}
JSON
"$bin" serve --config "$work/mcpbox.json" --state-dir "$work/state" >"$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
for mode in 2026-07-28 auto; do
    "$work/venv/bin/python" tests/fixtures/py_client_2026.py "http://127.0.0.1:$port/echo/mcp" pysdk-token "$mode" ||
        { echo "FAILED in mode $mode; mcpbox's log:"; tail -20 "$work/serve.log"; exit 1; }
done
