#!/usr/bin/env bash
# Start-up cost of a sandbox: bare /bin/true, `mcpbox run --policy default -- /bin/true`, and
# bubblewrap with comparable isolation, in one hyperfine run. Not part of CI. Run as root.
# Usage: bench/startup.sh [--cold] [extra hyperfine args, e.g. --runs 500]
#   --cold: drop the page cache first (sync; echo 1 > /proc/sys/vm/drop_caches, the whole
#           machine's), so that every binary is read back from disk as after a reboot.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bench/startup.sh: run as root (the comparison is for root on a bare host)" >&2
    exit 2
fi
need=()
command -v hyperfine >/dev/null || need+=(hyperfine)
command -v bwrap >/dev/null || need+=(bubblewrap)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

cold=false
if [ "${1:-}" = --cold ]; then
    cold=true
    shift
fi

cargo build --release --quiet
state=$(mktemp -d /tmp/mcpbox-bench.XXXXXX)
bin=$(mktemp -d /tmp/mcpbox-bench-bin.XXXXXX)
out=${BENCH_JSON:-bench/startup.json}
trap 'rm -rf "$state" "$bin"' EXIT
# An installed copy, as docs/DEPLOY.md installs it, not the linker's output: how a binary's page
# cache was filled changes what each start pays in page faults, and mcpbox's 10 MB binary is far
# more exposed to it than bwrap's 70 KB (docs/BENCHMARKS.md).
install -m 0755 "target/$(rustc --print host-tuple)/release/mcpbox" "$bin/mcpbox"
mcpbox=$bin/mcpbox
# The start-up code is packed by link/startup-order.txt (build.rs); names it no longer matches
# (after a version bump or a dependency or toolchain update) are left where they were.
if command -v nm >/dev/null && [ -s link/startup-order.txt ]; then
    total=$(wc -l < link/startup-order.txt)
    found=$(nm --defined-only "$mcpbox" | awk '{print $3}' | sort -u | comm -12 - <(sort -u link/startup-order.txt) | wc -l)
    echo "link/startup-order.txt: $found of $total functions found in the binary"
    if [ $((found * 5)) -lt $((total * 4)) ]; then
        echo "  (stale: regenerate it with bench/startup-order.sh)" >&2
    fi
fi
if $cold; then
    sync
    echo 1 > /proc/sys/vm/drop_caches
fi

# bwrap: every namespace, read-only system dirs, fresh /proc and /dev, private /tmp.
bwrap_cmd="bwrap --unshare-all --die-with-parent --new-session --ro-bind /usr /usr \
--symlink usr/lib /lib --symlink usr/lib64 /lib64 --symlink usr/bin /bin \
--ro-bind /etc/ld.so.cache /etc/ld.so.cache --proc /proc --dev /dev --tmpfs /tmp /bin/true"

hyperfine -N --warmup 20 --min-runs 300 --export-json "$out" "$@" \
    -n bare /bin/true \
    -n mcpbox "$mcpbox run --policy default --state-dir $state --name bench -- /bin/true" \
    -n bwrap "$bwrap_cmd"

python3 - "$out" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
for n in ("bare", "mcpbox", "bwrap"):
    x = r[n]
    print(f"{n:7s} mean {x['mean']*1e3:7.2f} ms ± {x['stddev']*1e3:5.2f} ms  (median {x['median']*1e3:.2f} ms)")
print(f"mcpbox/bwrap = {r['mcpbox']['mean']/r['bwrap']['mean']:.2f}")
print(f"mcpbox/bare  = {r['mcpbox']['mean']/r['bare']['mean']:.2f}")
PY
