# shellcheck shell=bash
# Helpers shared by the bench/*.sh scripts (sourced, not run). They expect
# `set -euo pipefail` in the caller and use these variables when set:
#   DURATION, CONNECTIONS, WRK_THREADS, WARMUP   wrk settings
#   LUA                                          the wrk script (bench/lib/chat.lua)
#   KEEP=1                                       keep the temp dir at exit
#
# bench_init NAME makes the temp dir ($tmp) and the exit trap that stops
# every process recorded in the pids array (bench_spawn adds to it).

# A tenant's every limit and both budgets, far above what a benchmark's
# load reaches (nothing is refused), indented to sit under a tenant's name
# in a generated config.
BENCH_TENANT_LIMITS="    rate_limits:
      requests_per_minute: 1000000000
      tokens_per_minute: 1000000000000
      concurrent_requests: 100000
    budget:
      daily_limit_usd: 1000000000.00
      monthly_limit_usd: 1000000000.00
      alert_threshold_percent: 80"

bench_init() {
  BENCH_NAME=$1
  tmp=$(mktemp -d "/tmp/tg-bench-$BENCH_NAME.XXXXXX")
  pids=()
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

bench_cleanup() {
  local p
  for p in "${pids[@]}"; do
    kill "$p" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do
    wait "$p" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ]; then
    echo "$BENCH_NAME: kept $tmp" >&2
  else
    rm -rf "$tmp"
  fi
}

bench_die() {
  echo "$BENCH_NAME: $*" >&2
  exit 1
}

# bench_stop PID: stops one process started by the script and forgets it.
bench_stop() {
  local p=$1 keep=() q
  kill "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  for q in "${pids[@]}"; do
    [ "$q" = "$p" ] || keep+=("$q")
  done
  pids=("${keep[@]}")
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_http URL [seconds]: until the URL answers 200
wait_http() {
  local url=$1 n=$(( ${2:-15} * 10 ))
  while [ $n -gt 0 ]; do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "$url" || true)" = 200 ]; then
      return 0
    fi
    sleep 0.1
    n=$((n - 1))
  done
  echo "$BENCH_NAME: $url did not come up" >&2
  return 1
}

# wait_chat_200 BASE_URL KEY MODEL: until one small chat completion answers 200
wait_chat_200() {
  local url=$1 key=$2 model=$3 n=100
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" \
      -H 'Content-Type: application/json' \
      -d "{\"model\":\"$model\",\"max_tokens\":16,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" \
      "$url/v1/chat/completions" || true)" = 200 ]; do
    n=$((n - 1))
    [ $n -gt 0 ] || { echo "$BENCH_NAME: $url does not answer 200" >&2; return 1; }
    sleep 0.1
  done
}

# run_wrk NAME URL: a warm-up, then the measured run; prints
# "NAME req/s p50_ms p99_ms non2xx errors". TG_BENCH_KEY / TG_BENCH_MODEL
# must be exported for the Lua script.
run_wrk() {
  local name=$1 url=$2 line
  wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$WARMUP" -s "$LUA" "$url/v1/chat/completions" \
    >/dev/null 2>&1 || true
  line=$(wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$DURATION" -s "$LUA" \
    "$url/v1/chat/completions" 2>&1 | grep '^TGBENCH ' || true)
  [ -n "$line" ] || { echo "$BENCH_NAME: wrk against $name printed no result" >&2; return 1; }
  echo "$line" | awk -v n="$name" '{ printf "%s %.0f %.3f %.3f %d %d\n", n, $2 / ($3 / 1e6), $4 / 1000, $5 / 1000, $6, $7 }'
}

# busy_ticks: the ticks every CPU of the machine spent busy so far (all but
# idle, iowait and the time the hypervisor took; /proc/stat).
busy_ticks() {
  awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat
}

# cpu_ticks PID...: user + system clock ticks used by these processes and
# their child processes (nginx's workers, PostgreSQL's backends), all threads
# included; a process that is gone counts 0
cpu_ticks() {
  local p t=0 v
  for p in "$@" $(for q in "$@"; do pgrep -P "$q" 2>/dev/null || true; done); do
    [ -n "$p" ] || continue
    v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }') || v=0
    t=$((t + ${v:-0}))
  done
  echo "$t"
}

# run_wrk_cpu NAME URL "GW_PIDS" "SERVER_PIDS": run_wrk, plus the CPU time
# per answer that the gateway's processes and a server's (Redis, PostgreSQL;
# may be "") spent during the measured run. Prints run_wrk's line plus
# "gw_us_per_req server_us_per_req". CPU per answer does not move with what
# else runs on a shared machine the way req/s does.
run_wrk_cpu() {
  local name=$1 url=$2 gw=$3 srv=$4 line g0 s0 g1 s1 hz
  hz=$(getconf CLK_TCK)
  wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$WARMUP" -s "$LUA" "$url/v1/chat/completions" \
    >/dev/null 2>&1 || true
  # shellcheck disable=SC2086  # lists of pids
  g0=$(cpu_ticks $gw)
  # shellcheck disable=SC2086
  s0=$(cpu_ticks $srv)
  line=$(wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$DURATION" -s "$LUA" \
    "$url/v1/chat/completions" 2>&1 | grep '^TGBENCH ' || true)
  # shellcheck disable=SC2086
  g1=$(cpu_ticks $gw)
  # shellcheck disable=SC2086
  s1=$(cpu_ticks $srv)
  [ -n "$line" ] || { echo "$BENCH_NAME: wrk against $name printed no result" >&2; return 1; }
  echo "$line" | awk -v n="$name" -v g=$((g1 - g0)) -v s=$((s1 - s0)) -v hz="$hz" '{
    reqs = $2 > 0 ? $2 : 1
    printf "%s %.0f %.3f %.3f %d %d %.1f %.1f\n", n, $2 / ($3 / 1e6), $4 / 1000, $5 / 1000, $6, $7,
      g * 1e6 / hz / reqs, s * 1e6 / hz / reqs }'
}

# bench_build DIR (after bench_init): sets BUILD_DIR (DIR, relative to the
# project unless absolute), TOLLGATE and SIM, and stops when either binary
# is missing.
bench_build() {
  local bin
  BUILD_DIR=$1
  case "$BUILD_DIR" in /*) ;; *) BUILD_DIR="$here/$BUILD_DIR" ;; esac
  TOLLGATE="$BUILD_DIR/tollgate"
  SIM="$BUILD_DIR/tollgate-sim"
  for bin in "$SIM" "$TOLLGATE"; do
    [ -x "$bin" ] || bench_die "$bin not found (run 'make build' first)"
  done
}

# warn_if_sanitized BUILD_DIR
warn_if_sanitized() {
  if [ -f "$1/CMakeCache.txt" ] && grep -q '^TG_SANITIZE:BOOL=ON' "$1/CMakeCache.txt"; then
    echo "$BENCH_NAME: warning: $1 is a sanitizer build; figures are not representative" >&2
  fi
}

machine_header() {
  echo "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
  echo "# kernel: $(uname -r); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"
}

# round_order ROUND NAME...: the names in the order round ROUND measures
# them: as given in odd rounds, reversed in even ones, so a machine that
# speeds up or slows down during a round favours no target.
round_order() {
  local r=$1 i
  shift
  local names=("$@")
  if ((r % 2 == 0)); then
    for ((i = ${#names[@]} - 1; i >= 0; i--)); do printf '%s\n' "${names[i]}"; done
  else
    printf '%s\n' "${names[@]}"
  fi
}

# round_ratio_medians BASE "TARGET:GOAL ...": reads lines "round target
# req/s ..." and prints, per TARGET measured in a round with BASE, the
# median of its per-round req/s ratios to BASE (measured in the same
# round), their range, and whether the median reaches GOAL. The steadier
# figure on a shared machine than best round against best round.
round_ratio_medians() {
  awk -v base="$1" -v goals="$2" '
    { rps[$1, $2] = $3; seen[$1] = 1 }
    END {
      ng = split(goals, g, " ")
      for (i = 1; i <= ng; i++) {
        split(g[i], tg, ":"); m = tg[1]; k = 0
        for (rd in seen) if ((rd, base) in rps && (rd, m) in rps && rps[rd, base] > 0) v[++k] = rps[rd, m] / rps[rd, base]
        if (k == 0) continue
        for (a = 1; a <= k; a++) for (b = a + 1; b <= k; b++) if (v[b] < v[a]) { x = v[a]; v[a] = v[b]; v[b] = x }
        med = (k % 2) ? v[(k + 1) / 2] : (v[k / 2] + v[k / 2 + 1]) / 2
        printf "%s/%s: median of %d per-round req/s ratios %.3f (%.3f to %.3f; target >= %.2f: %s)\n", m, base, k, med, v[1], v[k], tg[2], (med >= tg[2]) ? "met" : "NOT met"
        delete v
      }
    }'
}
