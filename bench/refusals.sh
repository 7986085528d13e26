#!/usr/bin/env bash
# Refusals must always name their reason. Runs the refusal tests of the integration binary
# N times in a row (default 200), as root and as the unprivileged CI user (refusals used to
# lose their reason to `Broken pipe` on a busy machine), and counts the
# runs whose refusal came back without its reason. Not part of CI. Run as root.
# Usage: [BUSY=1] [CARGO_TARGET_DIR=DIR] bench/refusals.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bench/refusals.sh: run as root (it runs the tests as root and as user mcpboxci)" >&2
    exit 2
fi
n=${1:-200}
ci_user=mcpboxci
tests=(
    sandbox::container_level_is_refused_unless_permitted
    sandbox::privileged_and_kernel_surface_syscalls_are_refused
    cli::a_command_the_policy_does_not_allow_is_refused
)

cargo build --quiet
bin=$(cargo test --quiet --no-run --test all --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "all" and m.get("executable"):
        print(m["executable"])')
[ -n "$bin" ] || { echo "could not find the integration test binary" >&2; exit 1; }
id "$ci_user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$ci_user"
chmod -R o+rX "${CARGO_TARGET_DIR:-target}" tests policies
d=$PWD
while [ "$d" != / ]; do chmod o+x "$d"; d=$(dirname "$d"); done

# BUSY=1: one spinning shell per core beside the loop (on a shared machine, leave it off: the
# other users make it busy enough).
busy=()
if [ "${BUSY:-0}" = 1 ]; then
    for _ in $(seq "$(nproc)"); do
        (while :; do :; done) &
        busy+=($!)
    done
fi
tmp_root=$(mktemp -d /tmp/mcpbox-refusals-root.XXXXXX)
tmp_user=$(mktemp -d /tmp/mcpbox-refusals-user.XXXXXX)
chmod 755 "$tmp_root"
chown "$ci_user:" "$tmp_user"
log=$(mktemp /tmp/mcpbox-refusals-log.XXXXXX)
cleanup() { [ ${#busy[@]} -eq 0 ] || kill "${busy[@]}" 2>/dev/null || true; rm -rf "$tmp_root" "$tmp_user" "$log"; }
trap cleanup EXIT

as_root() { env TMPDIR="$tmp_root" "$bin" --exact --test-threads=1 "$@"; }
as_user() {
    setpriv --reuid="$ci_user" --regid="$ci_user" --init-groups \
        env -i HOME="/home/$ci_user" PATH=/usr/local/bin:/usr/bin:/bin TMPDIR="$tmp_user" LANG=C.UTF-8 \
        "$bin" --exact --test-threads=1 "$@"
}

for mode in root user; do
    for t in "${tests[@]}"; do
        ok=0 lost=0 other=0
        for _ in $(seq "$n"); do
            if "as_$mode" "$t" >"$log" 2>&1; then
                ok=$((ok + 1))
            elif grep -q "Broken pipe\|should mention\|exited before the server started\|no report" "$log"; then
                # The refusal came back without its reason.
                lost=$((lost + 1))
                grep -m1 "mcpbox:" "$log" >&2 || true
            else
                other=$((other + 1))
                tail -n 20 "$log" >&2
            fi
        done
        printf '%-5s %-60s %4d runs: %4d ok, %4d lost reasons, %4d other failures\n' "$mode" "$t" "$n" "$ok" "$lost" "$other"
    done
done
