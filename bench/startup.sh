#!/usr/bin/env bash
# Start-up cost of a sandbox: bare /bin/true, `mcpbox run -- /bin/true` under the default policy's
# grants, and bubblewrap with comparable isolation, in one hyperfine run. Not part of CI. Run as
# root. The policy is `default` without its CPU and disk limits (bwrap has neither; what they cost
# is measured by bench/limits.sh).
# Usage: [BASELINE=/path/to/mcpbox] bench/startup.sh [--cold] [--interleaved ROUNDS] [extra hyperfine args, e.g. --runs 500]
#   --cold: drop the page cache first (sync; echo 1 > /proc/sys/vm/drop_caches, the whole
#           machine's), so that every binary is read back from disk as after a reboot.
#   --interleaved ROUNDS: instead of hyperfine, bench/interleave.c (built with cc): each round
#           runs every command once in a shuffled order; steadier on a machine whose load
#           changes during the run. Medians, and each over bwrap's.
#   BASELINE: another mcpbox binary (e.g. a build of an earlier commit) measured in the same
#           run, installed the same way, for a before/after pair that shares the machine's noise.
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
rounds=0
while [ $# -gt 0 ]; do
    case $1 in
    --cold) cold=true; shift ;;
    --interleaved) rounds=${2:?--interleaved needs a number of rounds}; shift 2 ;;
    *) break ;;
    esac
done

cargo build --release --quiet
state=$(mktemp -d /tmp/mcpbox-bench.XXXXXX)
bin=$(mktemp -d /tmp/mcpbox-bench-bin.XXXXXX)
out=${BENCH_JSON:-bench/startup.json}
trap 'rm -rf "$state" "$bin"' EXIT
# An installed copy, as docs/DEPLOY.md installs it, not the linker's output: how a binary's page
# cache was filled changes what each start pays in page faults, and mcpbox's 10 MB binary is far
# more exposed to it than bwrap's 70 KB (docs/BENCHMARKS.md).
install -m 0755 target/release/mcpbox "$bin/mcpbox"
mcpbox=$bin/mcpbox
# With the kernel's audit subsystem on, every mcpbox start also starts its reader of Landlock's
# audit records (a thread, a netlink socket, a settle round trip at exit); bwrap reads nothing.
if "$mcpbox" doctor 2>/dev/null | grep -Eq '^  landlock +ok '; then
    echo "bench/startup.sh: the kernel's audit subsystem is on, so mcpbox reads Landlock denials from it at every start; docs/BENCHMARKS.md's figures are with it off (auditctl -e 0)" >&2
fi
policy=$bin/startup.toml
sed -e '/^cpu = /d' -e '/^disk = /d' policies/default.toml > "$policy"
baseline=()
if [ -n "${BASELINE:-}" ]; then
    install -m 0755 "$BASELINE" "$bin/mcpbox-baseline"
    baseline=(-n baseline "$bin/mcpbox-baseline run --policy $policy --state-dir $state --name bench -- /bin/true")
fi
if $cold; then
    sync
    echo 1 > /proc/sys/vm/drop_caches
fi

# bwrap: every namespace, read-only system dirs, fresh /proc and /dev, private /tmp.
bwrap_cmd="bwrap --unshare-all --die-with-parent --new-session --ro-bind /usr /usr \
--symlink usr/lib /lib --symlink usr/lib64 /lib64 --symlink usr/bin /bin \
--ro-bind /etc/ld.so.cache /etc/ld.so.cache --proc /proc --dev /dev --tmpfs /tmp /bin/true"

if [ "$rounds" -gt 0 ]; then
    cc -O2 -o "$bin/interleave" bench/interleave.c
    read -ra bw <<<"$bwrap_cmd"
    bw[0]=$(command -v bwrap)
    cmds=(bwrap "${bw[@]}" ";" mcpbox $mcpbox run --policy "$policy" --state-dir "$state" --name bench -- /bin/true)
    if [ -n "${BASELINE:-}" ]; then
        cmds+=(";" baseline "$bin/mcpbox-baseline" run --policy "$policy" --state-dir "$state" --name bench -- /bin/true)
    fi
    cmds+=(";" bare /bin/true)
    "$bin/interleave" "$rounds" "${cmds[@]}"
    exit 0
fi

hyperfine -N --warmup 20 --min-runs 300 --export-json "$out" "$@" \
    -n bare /bin/true \
    -n mcpbox "$mcpbox run --policy $policy --state-dir $state --name bench -- /bin/true" \
    -n bwrap "$bwrap_cmd" "${baseline[@]}"

python3 - "$out" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
names = [n for n in ("bare", "mcpbox", "bwrap", "baseline") if n in r]
for n in names:
    x = r[n]
    print(f"{n:8s} mean {x['mean']*1e3:7.2f} ms ± {x['stddev']*1e3:5.2f} ms  (median {x['median']*1e3:.2f} ms)")
print(f"mcpbox/bwrap   = {r['mcpbox']['mean']/r['bwrap']['mean']:.2f} (medians {r['mcpbox']['median']/r['bwrap']['median']:.2f})")
if "baseline" in r:
    print(f"baseline/bwrap = {r['baseline']['mean']/r['bwrap']['mean']:.2f} (medians {r['baseline']['median']/r['bwrap']['median']:.2f})")
print(f"mcpbox/bare    = {r['mcpbox']['mean']/r['bare']['mean']:.2f}")
PY
