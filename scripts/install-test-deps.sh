#!/usr/bin/env bash
# Installs what the end-to-end tests (tests/serve.rs) need beside the Rust toolchain: the MCP
# reference server @modelcontextprotocol/server-everything, from npm, into /opt/mcpbox-test.
# The tests look for it under $MCPBOX_TEST_NODE_MODULES (default /opt/mcpbox-test/node_modules)
# and fail, naming this script, when it is missing.
#
# As root, mcpbox runs servers under unprivileged uids: the tree must be world-readable and
# its directories world-traversable, hence the chmod.
set -euo pipefail

PREFIX="${MCPBOX_TEST_PREFIX:-/opt/mcpbox-test}"
# Pinned: tool names (echo, get-sum, get-env, trigger-long-running-operation) and the `stdio`
# argument have changed between releases; the tests are written against this one.
VERSION="${SERVER_EVERYTHING_VERSION:-2026.8.31}"

command -v node >/dev/null || { echo "install-test-deps: node is required (apt-get install nodejs npm)" >&2; exit 1; }
command -v npm >/dev/null || { echo "install-test-deps: npm is required (apt-get install npm)" >&2; exit 1; }

mkdir -p "$PREFIX"
npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error \
    "@modelcontextprotocol/server-everything@$VERSION"
chmod -R a+rX "$PREFIX"
chmod 0755 "$PREFIX" "$PREFIX/node_modules"

pkg="$PREFIX/node_modules/@modelcontextprotocol/server-everything/package.json"
installed=$(node -p "require('$pkg').version")
echo "install-test-deps: @modelcontextprotocol/server-everything $installed in $PREFIX/node_modules (node $(node --version))"
