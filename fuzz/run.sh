#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 20) and prints one summary line per
# target: executions, corpus size and the outcome. Exit 1 if any target finds a crash (the
# input is kept in fuzz/artifacts/<target>/ — add it as a regression test, then fix).
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). When they are
# missing this prints `skipped:` and exits 0 locally, but fails under CI=true.
#
# New corpus entries go to a scratch directory; the committed seeds in fuzz/corpus/<target>/
# are read but never grown, so the repository stays small. Keep a longer local run's corpus
# with FUZZ_KEEP_CORPUS=1 (written to fuzz/corpus-local/<target>/, git-ignored).
set -euo pipefail
secs="${1:-20}"
cd "$(dirname "$0")"

skip() {
  if [ "${CI:-}" = true ]; then
    echo "error: fuzzing cannot run: $1" >&2
    exit 1
  fi
  echo "skipped: fuzzing cannot run: $1"
  exit 0
}
cargo +nightly --version >/dev/null 2>&1 || skip "the nightly toolchain is missing (rustup toolchain install nightly)"
cargo +nightly fuzz --version >/dev/null 2>&1 || skip "cargo-fuzz is missing (cargo install cargo-fuzz)"

echo "== building fuzz targets"
cargo +nightly fuzz build 2>&1 | tail -n 1
failed=0
for target in $(cargo +nightly fuzz list); do
  if [ "${FUZZ_KEEP_CORPUS:-}" = 1 ]; then
    work="corpus-local/$target"
    mkdir -p "$work"
  else
    work="$(mktemp -d)"
  fi
  mkdir -p "corpus/$target"
  dict=()
  [ -f "$target.dict" ] && dict=("-dict=$target.dict")
  log="$(mktemp)"
  if cargo +nightly fuzz run "$target" "$work" "corpus/$target" -- \
      -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 "${dict[@]}" >"$log" 2>&1; then
    outcome="ok"
  else
    outcome="FAILED (see fuzz/artifacts/$target/)"
    failed=1
    tail -n 40 "$log"
  fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  corpus="$(ls "$work" | wc -l)"
  echo "$target: ${runs:-?} executions in ${secs}s, $corpus new corpus entries: $outcome"
  rm -f "$log"
  [ "${FUZZ_KEEP_CORPUS:-}" = 1 ] || rm -rf "$work"
done
exit "$failed"
