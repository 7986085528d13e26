#!/usr/bin/env bash
# Where the start-up time of bench/startup.sh goes, by phase: `mcpbox run -- /bin/true` and the
# same bwrap command, each started N times under `perf record` of the scheduler's fork, exec and
# exit tracepoints only (cheap: no syscall tracing, which would slow every system call), then
# bench/startup_phases.py prints the median time of each fork, exec and exit after the top
# process's exec. Not part of CI. Run as root, with audit off (`auditctl -e 0`) to compare with
# docs/BENCHMARKS.md.
# Usage: bench/startup-phases.sh [N]   (default 400)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bench/startup-phases.sh: run as root (as bench/startup.sh)" >&2
    exit 2
fi
n=${1:-400}
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v perf >/dev/null || need+=(linux-perf)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

cargo build --release --quiet
work=$(mktemp -d /tmp/mcpbox-phases.XXXXXX)
trap 'rm -rf "$work"' EXIT
# An installed copy, as bench/startup.sh uses (how the page cache holds the binary matters).
install -m 0755 target/release/mcpbox "$work/mcpbox"
sed -e '/^cpu = /d' -e '/^disk = /d' policies/default.toml > "$work/startup.toml"
mkdir "$work/state"

cat > "$work/mcpbox.sh" <<EOF
#!/bin/sh
i=0
while [ \$i -lt $n ]; do
    "$work/mcpbox" run --policy "$work/startup.toml" --state-dir "$work/state" --name bench -- /bin/true
    i=\$((i + 1))
done
EOF
cat > "$work/bwrap.sh" <<EOF
#!/bin/sh
i=0
while [ \$i -lt $n ]; do
    bwrap --unshare-all --die-with-parent --new-session --ro-bind /usr /usr \
        --symlink usr/lib /lib --symlink usr/lib64 /lib64 --symlink usr/bin /bin \
        --ro-bind /etc/ld.so.cache /etc/ld.so.cache --proc /proc --dev /dev --tmpfs /tmp /bin/true
    i=\$((i + 1))
done
EOF

events=sched:sched_process_fork,sched:sched_process_exec,sched:sched_process_exit
for who in mcpbox bwrap; do
    perf record -q -a -e "$events" -o "$work/$who.data" sh "$work/$who.sh" >/dev/null 2>&1
    perf script -i "$work/$who.data" -F comm,tid,time,event,trace 2>/dev/null > "$work/$who.txt"
done
# The process tree: mcpbox → sandbox-init (outer) → network helper, PID 1 → server; bwrap →
# its PID 1 → the command. Threads of mcpbox (the seccomp listener's) are numbered children too.
python3 bench/startup_phases.py "$work/mcpbox.txt" mcpbox \
    "1=sandbox-init,1.1=network helper,1.2=PID 1,1.2.1=server,2=notify thread"
python3 bench/startup_phases.py "$work/bwrap.txt" bwrap "1=bwrap PID 1,1.1=command"
