#!/usr/bin/env bash
# Cost of tenant limits: the same wrk load (small non-streaming chat
# completions) against tollgate in front of the simulator three ways:
#
#   off     the tenant has no rate_limits and no budget
#   memory  rate limits, concurrency and budgets on, `state: memory`
#   redis   the same limits, `state: redis://...` (a redis-server started here)
#
# The limits are far above what the load can reach, so nothing is refused:
# what is measured is the admission and settlement work itself. Prints req/s,
# p50 and p99 per configuration and the ratios to "off" (targets: memory
# req/s >= 0.95, redis >= 0.85). Each round also prints the CPU time the
# gateway and redis-server used per request in the measured run (from
# /proc): on a shared machine req/s moves with the neighbours' load, CPU
# time per request much less.
#
#   bench/limits.sh [BUILD_DIR]       (default: build, from `make build`)
#
# "cpu us/req" is the gateway's CPU time per request, plus redis-server's for
# the redis target (the lowest round).
#
# Environment: DURATION (10s), CONNECTIONS (64), WORKERS (1: tollgate
# workers), WRK_THREADS (1), SIM_WORKERS (1), WARMUP (2s, per run, not
# measured), TARGETS ("off memory redis": a subset runs only those), ROUNDS
# (1: each round measures every target once, every other round in the
# opposite order; the best req/s of each target is reported, and with more
# than one round the median of the per-round ratios to off), REDIS_SERVER (/usr/bin/redis-server),
# REDIS_ARGS (more redis-server options, e.g. "--zset-max-listpack-entries
# 0"), KEEP=1 keeps the temp dir.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib/common.sh
. "$here/bench/lib/common.sh"

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
WORKERS=${WORKERS:-1}
WRK_THREADS=${WRK_THREADS:-1}
SIM_WORKERS=${SIM_WORKERS:-1}
WARMUP=${WARMUP:-2s}
TARGETS=${TARGETS:-off memory redis}
ROUNDS=${ROUNDS:-1}
REDIS_SERVER=${REDIS_SERVER:-/usr/bin/redis-server}
MODEL=llama-3.1-8b

want() { case " $TARGETS " in *" $1 "*) return 0 ;; esac; return 1; }

LUA="$here/bench/lib/chat.lua"

bench_init limits.sh
bench_build "${1:-build}"
command -v wrk >/dev/null || bench_die "wrk not installed (scripts/install-deps.sh)"
if want redis; then
  [ -x "$REDIS_SERVER" ] || bench_die "redis-server not installed (scripts/install-deps.sh)"
fi
warn_if_sanitized "$BUILD_DIR"

SIM_PORT=$(free_port)

# ---- the simulator: no delays, so the gateway is what is measured ----------
"$SIM" --listen "127.0.0.1:$SIM_PORT" --workers "$SIM_WORKERS" --ttft-ms 0 --token-ms 0 \
  --max-num-seqs 4096 --models "$MODEL" 2>"$tmp/sim.log" &
pids+=($!)
wait_http "http://127.0.0.1:$SIM_PORT/health"

# ---- redis ---------------------------------------------------------------------
REDIS_PORT=""
REDIS_PID=""
if want redis; then
  REDIS_PORT=$(free_port)
  mkdir -p "$tmp/redis"
  read -ra redis_args <<<"${REDIS_ARGS:-}"
  "$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$tmp/redis" --daemonize no --logfile '' "${redis_args[@]}" >"$tmp/redis/redis.log" 2>&1 &
  REDIS_PID=$!
  pids+=($!)
  n=100
  until [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null || true)" = PONG ]; do
    n=$((n - 1))
    [ $n -gt 0 ] || bench_die "redis-server did not come up (see KEEP=1 logs)"
    sleep 0.1
  done
fi

# ---- tollgate, one configuration at a time ---------------------------------------
TG_PID=""
TG_PORT=""
KEY=""

# start_tollgate MODE (off | memory | redis)
start_tollgate() {
  local mode=$1 dir="$tmp/tg-$1" admin state limits
  TG_PORT=$(free_port)
  admin=$(free_port)
  mkdir -p "$dir/data"
  state=memory
  if [ "$mode" = redis ]; then state="redis://127.0.0.1:$REDIS_PORT/0"; fi
  limits=""
  if [ "$mode" != off ]; then
    limits=$BENCH_TENANT_LIMITS
  fi
  cat >"$dir/tollgate.yaml" <<EOF
listen: 127.0.0.1:$TG_PORT
admin_listen: 127.0.0.1:$admin
workers: $WORKERS
data_dir: $dir/data
access_log: "off"
health_check_interval: 2s
state: $state
state_failure: closed
tenants:
  bench:
    tier: enterprise
    models_allowed: [$MODEL]
$limits
    priority: high
models:
  $MODEL:
    endpoints:
      - {url: "http://127.0.0.1:$SIM_PORT", max_inflight: 4096}
    pricing: {prompt_per_1k_usd: "0.0005", completion_per_1k_usd: "0.0015"}
EOF
  KEY=$("$TOLLGATE" keys create --config "$dir/tollgate.yaml" --tenant bench --name bench \
    2>>"$dir/keys.log")
  "$TOLLGATE" serve --config "$dir/tollgate.yaml" 2>>"$dir/tollgate.log" &
  TG_PID=$!
  pids+=("$TG_PID")
  wait_http "http://127.0.0.1:$admin/readyz"
  wait_chat_200 "http://127.0.0.1:$TG_PORT" "$KEY" "$MODEL"
  if [ "$mode" != off ]; then
    # the limits are really on: every answer carries the rate-limit headers
    curl -s -D - -o /dev/null -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
      -d "{\"model\":\"$MODEL\",\"max_tokens\":1,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" \
      "http://127.0.0.1:$TG_PORT/v1/chat/completions" | grep -qi '^x-ratelimit-remaining-requests:' \
      || echo "limits.sh: warning: $mode: no x-ratelimit headers (are limits enforced?)" >&2
  fi
}

echo "# tollgate tenant-limits benchmark"
machine_header
echo "# load: wrk -t $WRK_THREADS -c $CONNECTIONS -d $DURATION, POST /v1/chat/completions (16 tokens), tollgate workers $WORKERS, sim workers $SIM_WORKERS, rounds $ROUNDS"
if [ -n "$REDIS_PORT" ]; then echo "# redis: $("$REDIS_SERVER" --version | cut -d' ' -f1-3)"; fi
echo "# build: $BUILD_DIR"

export TG_BENCH_MODEL="$MODEL"
results=()
rounds=()
for round in $(seq 1 "$ROUNDS"); do
  for mode in $(round_order "$round" off memory redis); do
    want "$mode" || continue
    start_tollgate "$mode"
    export TG_BENCH_KEY="$KEY"
    line=$(run_wrk_cpu "$mode" "http://127.0.0.1:$TG_PORT" "$TG_PID" "$REDIS_PID") || exit 1
    results+=("$line")
    rounds+=("$round $line")
    if [ "$mode" = redis ]; then cpu="redis-server $(echo "$line" | awk '{ print $8 }') us/req"; else cpu=""; fi
    echo "# round $round: $line  (gateway CPU $(echo "$line" | awk '{ print $7 }') us/req${cpu:+, $cpu})"
    bench_stop "$TG_PID"
  done
done

printf '%s\n' "${results[@]}" | awk '
  BEGIN { printf "%-10s %12s %10s %10s %8s %8s %14s\n", "target", "req/s", "p50 ms", "p99 ms", "non-2xx", "errors", "cpu us/req" }
  # the best round of each target (by req/s); CPU per request: the lowest
  { c = $7 + ($1 == "redis" ? $8 : 0); if (!($1 in cpu) || c < cpu[$1]) cpu[$1] = c }
  !($1 in rps) || $2 > rps[$1] { rps[$1] = $2; p50[$1] = $3; p99[$1] = $4; n2[$1] = $5; er[$1] = $6; if (!($1 in seen)) { order[++n] = $1; seen[$1] = 1 } }
  END {
    for (i = 1; i <= n; i++) { t = order[i]; printf "%-10s %12d %10.2f %10.2f %8d %8d %14.1f\n", t, rps[t], p50[t], p99[t], n2[t], er[t], cpu[t] }
    goal["memory"] = 0.95; goal["redis"] = 0.85
    if (rps["off"] > 0 && p99["off"] > 0) {
      for (i = 1; i <= n; i++) {
        t = order[i]
        if (t == "off") continue
        r = rps[t] / rps["off"]
        printf "%s/off: req/s %.3f  p99 %.2f  (target req/s >= %.2f: %s)\n", t, r, p99[t] / p99["off"], goal[t], (r >= goal[t]) ? "met" : "NOT met"
      }
    }
  }'

if [ "$ROUNDS" -gt 1 ]; then
  printf '%s\n' "${rounds[@]}" | round_ratio_medians off "memory:0.95 redis:0.85"
fi

bad=$(printf '%s\n' "${results[@]}" | awk '$5 > 0 || $6 > 0 { print $1 }' | sort -u)
if [ -n "$bad" ]; then
  echo "limits.sh: non-2xx answers or socket errors from: $bad (see KEEP=1 logs)" >&2
fi
