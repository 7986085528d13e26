#!/usr/bin/env bash
# Regenerate link/startup-order.txt: the functions a sandbox start runs, which the linker puts
# side by side at the front of mcpbox's code (build.rs passes the file to lld as
# --symbol-ordering-file). Every process of a start (mcpbox, sandbox-init, PID 1, the server
# before its execve) faults in the code it runs on its own, a fork does not share those
# mappings, and with the binary's pages read back by page faults (after a reboot) every
# 64 KB window costs a fault: packed, the start touches ~1 MB instead of most of the 6 MB.
# docs/BENCHMARKS.md has the numbers.
#
# How: perf samples user-mode code of every process over many starts; a function that runs
# once per start is still sampled once its time, summed over the starts, passes a few sampling
# periods. Order: what mcpbox itself runs, then what only sandbox-init runs.
# Not part of CI. Run as root (perf -a, the sandbox as root). Usage: bench/startup-order.sh [STARTS]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bench/startup-order.sh: run as root" >&2
    exit 2
fi
command -v perf >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf
}

starts=${1:-2000}
cargo build --release --quiet
work=$(mktemp -d /tmp/mcpbox-order.XXXXXX)
trap 'rm -rf "$work"' EXIT
# A name of its own, so that perf's per-process names tell mcpbox from sandbox-init.
install -m 0755 "target/$(rustc --print host-tuple)/release/mcpbox" "$work/mcpbox-order"
bin=$work/mcpbox-order
"$bin" run --policy default --state-dir "$work/state" --name order -- /bin/true
perf record -q -o "$work/perf.data" -e cpu-clock:u -F 40000 -a -- \
    bash -c "for i in \$(seq $starts); do '$bin' run --policy default --state-dir '$work/state' --name order -- /bin/true; done"
perf report -i "$work/perf.data" --dsos mcpbox-order --sort comm,sym -g none --stdio --no-demangle 2>/dev/null \
    | python3 -c '
import sys
rows = []
for line in sys.stdin:
    if "%" not in line or line.lstrip().startswith("#"):
        continue
    f = line.split()
    # percent, comm, "[.]", symbol (mangled names hold no spaces)
    if len(f) >= 4 and f[2] == "[.]":
        rows.append((f[1], f[3]))
seen, out = set(), []
for group in ("mcpbox-order", "sandbox-init"):
    for comm, sym in rows:
        if comm == group and sym not in seen and not sym.startswith("0x"):
            seen.add(sym)
            out.append(sym)
sys.stdout.write("".join(s + "\n" for s in out))
' > link/startup-order.txt.new
n=$(wc -l < link/startup-order.txt.new)
if [ "$n" -lt 100 ]; then
    echo "bench/startup-order.sh: only $n functions sampled; keeping the old file" >&2
    rm -f link/startup-order.txt.new
    exit 1
fi
mv link/startup-order.txt.new link/startup-order.txt
echo "link/startup-order.txt: $n functions from $starts starts"
