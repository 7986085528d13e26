#!/usr/bin/env bash
# Fuzz mcpbox's parsers (docs/FUZZING.md): build the cargo-fuzz targets in fuzz/ and run each
# for SECONDS seconds, starting from its checked-in seed corpus (fuzz/corpus/TARGET). Exits
# non-zero if any target crashed (a panic, a failed property, a timeout or running out of memory);
# the input that did it is in fuzz/artifacts/TARGET/.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]    (default: 20 seconds, every target)
# Reproduce a crash: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none TARGET artifacts/TARGET/crash-…)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${1:-20}
shift || true

if ! command -v cargo-fuzz >/dev/null && ! [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo-fuzz" ]; then
    # A debug build: it only drives cargo, and builds in a fraction of the time.
    echo "== installing cargo-fuzz"
    cargo install --locked --debug cargo-fuzz
fi
# cargo-fuzz passes nightly-only flags to rustc (-Zsanitizer, -Cpasses=sancov-module); a stable
# toolchain accepts them with RUSTC_BOOTSTRAP. No sanitizer: the targets are safe Rust, where
# a memory error is not the risk; a panic is, and it aborts with or without ASan.
export RUSTC_BOOTSTRAP=1
fuzz=(cargo fuzz)
flags=(--sanitizer none)

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <("${fuzz[@]}" list)
fi

echo "== building the fuzz targets"
"${fuzz[@]}" build "${flags[@]}"

failed=()
for t in "${targets[@]}"; do
    # New inputs go to a scratch corpus under target/ (not checked in); the seeds are read only.
    grown=target/corpus/$t
    mkdir -p "$grown" "artifacts/$t"
    echo "== $t: $secs s"
    log=target/fuzz-$t.log
    if ! "${fuzz[@]}" run "${flags[@]}" "$t" "$grown" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        failed+=("$t")
        # The panic message and where the input is (the whole report: $log).
        sed -n '/panicked at/,/^stack backtrace/p' "$log" | head -n 30
        grep -E '^SUMMARY|Test unit written|^Base64' "$log" || true
    fi
    grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" || true
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} targets, $secs s each, no crash"
