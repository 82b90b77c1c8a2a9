#!/usr/bin/env bash
# The cost of one /metrics render over many workers' tables, without HTTP
# (bench/scrape.c, target bench-scrape, built here): one process per row of
# WORKERS x TENANTS per worker, tenants disjoint (each worker its own, the
# worst case for the merge) or shared (every worker the same ones). 9,000
# tenants fill a table (8,191 pairs, the rest under `_other`). Each row also
# times one request's observation on the request path.
#
#   bench/scrape.sh [BUILD_DIR]        (default: build, from `make build`)
#
# Environment: ROWS ("workers:tenants:disjoint|shared ..."), RENDERS (5).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
RENDERS=${RENDERS:-5}
ROWS=${ROWS:-"1:1:disjoint 8:1:disjoint 64:1:disjoint 64:100:disjoint 4:1000:disjoint
1:9000:disjoint 2:9000:disjoint 4:9000:disjoint 16:9000:disjoint
16:9000:shared 64:9000:shared"}

# shellcheck source=bench/lib/common.sh
. "$here/bench/lib/common.sh"
bench_init scrape.sh
BUILD_DIR=${1:-build}
case "$BUILD_DIR" in /*) ;; *) BUILD_DIR="$here/$BUILD_DIR" ;; esac
[ -f "$BUILD_DIR/CMakeCache.txt" ] || bench_die "$BUILD_DIR is not a build directory (run 'make build' first)"
cmake --build "$BUILD_DIR" --target bench-scrape >/dev/null
warn_if_sanitized "$BUILD_DIR"

echo "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
for row in $ROWS; do
  IFS=: read -r workers tenants kind <<<"$row"
  "$BUILD_DIR/bench-scrape" "$workers" "$tenants" "$kind" "$RENDERS"
done
