#!/usr/bin/env bash
# Builds tests/rmcp-client, a small client on the official Rust MCP SDK (rmcp), into
# TARGET/rmcp-client/debug/mcpbox-rmcp-client (TARGET: this checkout's cargo target dir), where
# the rmcp_client:: integration tests look for it. A crate of its own with its own lock file:
# the main build does not grow. scripts/test.sh runs this before the integration suite. From
# nothing: 42 s and 313 MB on the 2-core development machine (57 s of CPU), debug, no debug info.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
CARGO_TARGET_DIR="$target/rmcp-client" cargo build --quiet --locked --manifest-path tests/rmcp-client/Cargo.toml
