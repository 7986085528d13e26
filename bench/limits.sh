#!/usr/bin/env bash
# What `[limits] cpu` and `[limits] disk` add to a sandbox start, as root: `mcpbox run -- /bin/true`
# under the default policy's grants with no CPU or disk limit, with `cpu = "1.0"` (the cgroup's
# quota), with `disk = "1G"` (the data dir's ext4 image attached to a loop device and mounted in
# the sandbox), and with both (what the shipped policies give). One hyperfine run.
# Not part of CI. Run as root. Usage: bench/limits.sh [extra hyperfine args, e.g. --runs 300]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bench/limits.sh: run as root (the limits are enforced only there)" >&2
    exit 2
fi
command -v hyperfine >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends hyperfine
}

cargo build --release --quiet
work=$(mktemp -d /tmp/mcpbox-bench-limits.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
install -m 0755 "target/$(rustc --print host-tuple)/release/mcpbox" "$work/mcpbox"
# The default policy's grants, without its [limits] and [sandbox] tables.
base=$(sed '/^# \[limits\] memory, pids/,$d' policies/default.toml)
printf '%s\n' "$base" > "$work/none.toml"
printf '%s\n[limits]\ncpu = "1.0"\n' "$base" > "$work/cpu.toml"
printf '%s\n[limits]\ndisk = "1G"\n' "$base" > "$work/disk.toml"
printf '%s\n[limits]\ncpu = "1.0"\ndisk = "1G"\n' "$base" > "$work/both.toml"
out=${BENCH_JSON:-bench/limits.json}
run() { echo "$work/mcpbox run --policy $work/$1.toml --state-dir $work/state --name bench-$1 -- /bin/true"; }
hyperfine -N --warmup 20 --export-json "$out" "${@:---min-runs=200}" \
    -n none "$(run none)" -n cpu "$(run cpu)" -n disk "$(run disk)" -n both "$(run both)"

python3 - "$out" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
for n in ("none", "cpu", "disk", "both"):
    x = r[n]
    d = (x["mean"] - r["none"]["mean"]) * 1e3
    print(f"{n:5s} mean {x['mean']*1e3:7.2f} ms ± {x['stddev']*1e3:5.2f} ms  (median {x['median']*1e3:.2f} ms)  +{d:.2f} ms")
PY
