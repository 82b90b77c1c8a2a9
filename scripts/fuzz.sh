#!/usr/bin/env bash
# Runs each libFuzzer target built by `make fuzz` for SECONDS, starting from
# a copy of its committed seed corpus (tests/fuzz/corpus/NAME). New inputs
# stay in BUILD_DIR/corpus/NAME; a failure leaves its input in
# BUILD_DIR/fuzz_NAME-crash-* (or -leak-, -timeout-) and fails the run. Worth committing: any crash input (as a new seed, after the
# fix) and inputs that reach code the seeds do not.
#
#   scripts/fuzz.sh BUILD_DIR [SECONDS] [TARGET...]
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "$1" && pwd)
seconds=${2:-60}
shift $(( $# >= 2 ? 2 : 1 ))
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in "$here"/tests/fuzz/fuzz_*.c; do
    t=$(basename "$f" .c)
    targets+=("${t#fuzz_}")
  done
fi

status=0
for t in "${targets[@]}"; do
  bin="$build/fuzz_$t"
  [ -x "$bin" ] || { echo "fuzz.sh: $bin not built" >&2; exit 1; }
  work="$build/corpus/$t"
  mkdir -p "$work"
  cp -n "$here/tests/fuzz/corpus/$t"/* "$work"/ 2>/dev/null || true
  echo "== fuzz_$t for ${seconds}s (corpus $work, log $build/fuzz_$t.log)"
  if (cd "$build" && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
      "./fuzz_$t" -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 \
      -artifact_prefix="$build/fuzz_$t-" "$work" >"$build/fuzz_$t.log" 2>&1); then
    grep -E "^stat::(number_of_executed_units|new_units_added)" "$build/fuzz_$t.log" || true
  else
    echo "fuzz.sh: fuzz_$t failed; its input is in $build/fuzz_$t-*:" >&2
    grep -E "ERROR|runtime error|SUMMARY|Test unit written" "$build/fuzz_$t.log" >&2 || tail -20 "$build/fuzz_$t.log" >&2
    status=1
  fi
done
exit $status
