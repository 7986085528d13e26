#!/usr/bin/env bash
# The test command (README, .ci/run): unit tests, then the integration binary (tests/all.rs)
# twice, as root and as an unprivileged user, since the sandbox works differently in each mode
# (per-server host uids and cgroups as root; the user's own uid and rlimits rootless).
# Meant for a fresh Debian 12 machine, as root. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

ci_user=mcpboxci
started=$SECONDS
say() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: run as root (the suite runs once as root and once as user $ci_user)" >&2
    exit 2
fi

# House habits first, and they fail the run at once: the code is formatted as rustfmt.toml says,
# and clippy has nothing to say (every target, warnings are errors).
say "cargo fmt --check"
cargo fmt --check
say "cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --all-targets -- -D warnings

# Tools the tests use: a C compiler and libc.a for the probe (built dynamic and static),
# node and python3 for the runtime policies.
need=()
command -v cc >/dev/null || need+=(build-essential)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
[ -x /usr/bin/python3 ] || need+=(python3)
[ -x /usr/bin/node ] || need+=(nodejs)
command -v setpriv >/dev/null || need+=(util-linux)
# mkfs.ext4 makes each server's data-dir image ([limits] disk, as root); the tests read it with debugfs.
[ -x /usr/sbin/mkfs.ext4 ] && [ -x /usr/sbin/debugfs ] || need+=(e2fsprogs)
# The serve and real-server suites: npm (server-everything, npx servers), git (mcp-server-git),
# tzdata (mcp-server-time), pip (uv comes from the Python package index).
command -v npm >/dev/null || need+=(npm)
command -v git >/dev/null || need+=(git)
[ -d /usr/share/zoneinfo ] || need+=(tzdata)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# The replicas test (tests/serve/replicas.rs) runs nginx from the distribution behind three
# mcpbox processes; python3-venv for the Kubernetes manifest checks (kubectl, kubernetes-validate, checkov).
[ -x /usr/sbin/nginx ] || need+=(nginx-light)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    say "installing: ${need[*]}"
    apt-get update -qq
    # No service starts from a package's install script (nginx would take port 80): the tests
    # start what they need themselves.
    policy_rc=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy_rc" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy_rc"; chmod 755 "$policy_rc"; own_policy=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
    if [ "$own_policy" = 1 ]; then rm -f "$policy_rc"; fi
fi

say "test dependencies"
if ! python3 -m uv --version >/dev/null 2>&1 && ! command -v uv >/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check uv \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages uv
fi
bash scripts/install-test-deps.sh

say "build"
cargo build --quiet
# The official Rust SDK client the rmcp_client:: tests run (tests/rmcp-client, a crate of its own).
say "build the Rust SDK client (tests/rmcp-client)"
t0=$SECONDS
bash scripts/build-rmcp-client.sh
echo "built in $((SECONDS - t0)) s"
# The integration binary's path, from cargo's own report.
bin=$(cargo test --quiet --no-run --test all --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "all" and m.get("executable"):
        print(m["executable"])')
[ -n "$bin" ] || { echo "could not find the integration test binary" >&2; exit 1; }

results=()
fail=0
step() { # step NAME COMMAND...
    local name=$1 t0=$SECONDS
    shift
    say "$name"
    if "$@"; then
        results+=("PASS  $name ($((SECONDS - t0)) s)")
    else
        results+=("FAIL  $name ($((SECONDS - t0)) s)")
        fail=1
    fi
}

step "unit tests (root)" cargo test --quiet --lib
step "Dockerfile lint and seccomp profile check" bash .ci/lint-docker.sh
step "Kubernetes manifests: render, schema check, checkov" bash deploy/kubernetes/check.sh

# The checkout must be traversable by other uids: the servers' own (as root, the real-server
# suite keeps its prepared packages under the target dir) and the unprivileged test user, who
# also reads the binary (CARGO_BIN_EXE_mcpbox is compiled in) and the probe source. A clone
# made in a `mktemp -d` directory is not.
chmod -R o+rX target tests policies
d=$PWD
while [ "$d" != / ]; do chmod o+x "$d"; d=$(dirname "$d"); done

# A scratch TMPDIR per mode, removed afterwards (the suite keeps its probe and state there).
tmp_root=$(mktemp -d /tmp/mcpbox-ci-root.XXXXXX)
chmod 755 "$tmp_root"
step "integration tests as root" env TMPDIR="$tmp_root" "$bin" --test-threads=2

id "$ci_user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$ci_user"
tmp_user=$(mktemp -d /tmp/mcpbox-ci-user.XXXXXX)
chown "$ci_user:" "$tmp_user"
# Rootless: the sandbox, the CLI, `serve`, denials and `policy learn` of a command line. The
# real-server suites (npx/uvx packages from the registries: realservers::, learn::real::) run as
# root only: their package tools are installed for root here.
step "integration tests as $ci_user" setpriv --reuid="$ci_user" --regid="$ci_user" --init-groups \
    env -i HOME="/home/$ci_user" PATH=/usr/local/bin:/usr/bin:/bin TMPDIR="$tmp_user" LANG=C.UTF-8 \
    "$bin" --test-threads=2 sandbox:: cli:: serve:: denials:: learn::any_user::

# A real 2026-07-28 client (the Python SDK 2.x, from the Python package index through uv).
step "Python SDK 2.x client (2026-07-28, auto) through mcpbox serve" bash scripts/python-sdk-2026.sh
# The official conformance suite's server scenarios (2025-11-25 in session and shared isolation,
# 2026-07-28 in principal and shared) through mcpbox serve; a table of every scenario.
step "MCP conformance suite through mcpbox serve (scripts/conformance.sh)" bash scripts/conformance.sh

rm -rf "$tmp_root" "$tmp_user"

# The parsers that read hostile input (JSON-RPC framing, request bodies, mcpbox.json, policies,
# allow-list entries, the request path -> server decision), fuzzed briefly from their seed corpus
# (docs/FUZZING.md); a crash fails the suite.
step "fuzz (scripts/fuzz.sh, 6 s per target)" bash scripts/fuzz.sh 6

say "summary ($((SECONDS - started)) s)"
printf '%s\n' "${results[@]}"
exit $fail
