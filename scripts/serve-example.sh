#!/usr/bin/env bash
# Serve examples/mcpbox.json on a fresh Debian/Ubuntu machine: installs what is missing (build
# tools, Rust, node/npm, python3, uv, git), builds mcpbox, prepares the example's packages and
# serves them on 127.0.0.1:9090.
#
#   MCPBOX_TOKEN=change-me scripts/serve-example.sh
#
# Environment:
#   MCPBOX_TOKEN     the bearer token clients must send (default: change-me — change it)
#   MCPBOX_DEMO_DIR  the filesystem server's root (default: /srv/mcpbox-demo as root,
#                    ~/.local/share/mcpbox-demo otherwise), seeded from examples/demo
#   SKIP_INSTALL=1   do not install system packages
# Extra arguments are passed to `mcpbox serve` (e.g. --state-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need() { ! command -v "$1" >/dev/null 2>&1; }

if [ "${SKIP_INSTALL:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; then
    missing=()
    need cc && missing+=(build-essential)
    need pkg-config && missing+=(pkg-config)
    need curl && missing+=(curl ca-certificates)
    need git && missing+=(git)
    need node && missing+=(nodejs)
    need npm && missing+=(npm)
    need python3 && missing+=(python3)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    [ -d /usr/share/zoneinfo ] || missing+=(tzdata)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> installing ${missing[*]}"
        $SUDO apt-get update -q
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
fi

# uv comes from the Python package index through pip; the servers use the system Python.
if need uv; then
    echo "==> installing uv with pip"
    $SUDO python3 -m pip install --quiet uv 2>/dev/null \
        || $SUDO python3 -m pip install --quiet --break-system-packages uv
fi

# Rust: the distribution's cargo may be too old (mcpbox needs 1.91+); use a rustup toolchain.
if need cargo; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "mcpbox: no Rust toolchain found. Install one with rustup (Rust 1.91 or newer), then run this again." >&2
        exit 1
    fi
fi

echo "==> building mcpbox"
cargo build --release --locked
mcpbox=./target/release/mcpbox

if [ -z "${MCPBOX_DEMO_DIR:-}" ]; then
    if [ "$(id -u)" -eq 0 ]; then MCPBOX_DEMO_DIR=/srv/mcpbox-demo; else MCPBOX_DEMO_DIR="${XDG_DATA_HOME:-$HOME/.local/share}/mcpbox-demo"; fi
fi
export MCPBOX_DEMO_DIR
if [ ! -d "$MCPBOX_DEMO_DIR" ]; then
    mkdir -p "$MCPBOX_DEMO_DIR"
    cp -r examples/demo/. "$MCPBOX_DEMO_DIR/"
    # As root every server runs under its own uid: let the filesystem server write the demo.
    if [ "$(id -u)" -eq 0 ]; then chmod -R a+rwX "$MCPBOX_DEMO_DIR"; fi
fi

export MCPBOX_TOKEN="${MCPBOX_TOKEN:-change-me}"
if [ "$MCPBOX_TOKEN" = change-me ]; then
    echo "==> warning: MCPBOX_TOKEN is the default 'change-me'; set your own before exposing mcpbox" >&2
fi

"$mcpbox" doctor || true
echo "==> serving examples/mcpbox.json on http://127.0.0.1:9090 (token: \$MCPBOX_TOKEN)"
echo "    e.g. http://127.0.0.1:9090/time/mcp  with  Authorization: Bearer \$MCPBOX_TOKEN"
exec "$mcpbox" serve --config examples/mcpbox.json "$@"
