#!/usr/bin/env bash
# Proxy overhead benchmark: the same wrk load (small non-streaming chat
# completions) against the simulator directly, nginx in front of it, and
# tollgate in front of it (once with the default `upstream_client: auto`,
# the native HTTP/1.1 client for http:// endpoints, as target "tollgate",
# once with `upstream_client: curl`, libcurl's multi interface, as target
# "curl"), all on loopback. Their tenant has every limit and both budgets
# (none can bind), so each request goes through admission and settlement
# and its answer carries the x-ratelimit-* headers. Target "core" (not run
# unless named in TARGETS) is the native client with a tenant that has no
# limits and no budget: the request path without the limits' work. Prints req/s, p50, p99 and the target's CPU
# time per request (all its threads and child processes) per target, and
# each tollgate's ratios to nginx.
#
#   bench/proxy.sh [BUILD_DIR]        (default: build, from `make build`)
#
# Environment: DURATION (10s), CONNECTIONS (64), WORKERS (1: nginx
# worker_processes and tollgate workers), WRK_THREADS (1), SIM_WORKERS (1),
# WARMUP (2s, per target, not measured), TARGETS ("sim nginx tollgate
# curl", and "core": a subset runs only those), ROUNDS (1: with more, the targets are
# measured in turn ROUNDS times, so a load that comes and goes on a shared
# machine hits each alike, and the median round of each is printed),
# TG_EXTRA_CONFIG (top-level YAML lines added to both tollgates' config,
# e.g. "ledger: off"), RATE (0: each connection sends its next request as
# soon as its answer is in, a closed loop that measures capacity, where
# p99 is about CONNECTIONS / req/s; N: each connection first waits a random
# pause of mean CONNECTIONS / N seconds, so every target is offered about N
# req/s and p99 compares the latency each adds at the same rate; see
# docs/performance.md), ACCESS_LOG (0: no proxy logs requests; 1: each logs
# every request to a file in the temp dir, nginx in its combined format with
# `buffer=64k flush=1s`, tollgate its JSON lines), KEEP=1 keeps the temp dir.
#
# nginx is Debian's nginx-light, run in the foreground from a generated
# config (upstream keepalive: up to 4,096 idle connections per worker, as
# tollgate keeps; HTTP/1.1 to the upstream; access_log off unless ACCESS_LOG=1).
# tollgate runs with one tenant whose limits cannot bind, access_log off
# unless ACCESS_LOG=1.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
BUILD_DIR=${1:-build}
case "$BUILD_DIR" in /*) ;; *) BUILD_DIR="$here/$BUILD_DIR" ;; esac
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
WORKERS=${WORKERS:-1}
WRK_THREADS=${WRK_THREADS:-1}
SIM_WORKERS=${SIM_WORKERS:-1}
WARMUP=${WARMUP:-2s}
ROUNDS=${ROUNDS:-1}
ACCESS_LOG=${ACCESS_LOG:-0}
RATE=${RATE:-0}
TARGETS=${TARGETS:-sim nginx tollgate curl}
MODEL=llama-3.1-8b

want() { case " $TARGETS " in *" $1 "*) return 0 ;; esac; return 1; }

TOLLGATE="$BUILD_DIR/tollgate"
SIM="$BUILD_DIR/tollgate-sim"
LUA="$here/bench/lib/chat.lua"
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}

bins=("$SIM")
if want tollgate || want curl || want core; then bins+=("$TOLLGATE"); fi
for bin in "${bins[@]}"; do
  [ -x "$bin" ] || { echo "proxy.sh: $bin not found (run 'make build' first)" >&2; exit 1; }
done
command -v wrk >/dev/null || { echo "proxy.sh: wrk not installed (scripts/install-deps.sh)" >&2; exit 1; }
[ -x "$NGINX" ] || { echo "proxy.sh: nginx not installed (scripts/install-deps.sh)" >&2; exit 1; }
if [ -f "$BUILD_DIR/CMakeCache.txt" ] && grep -q '^TG_SANITIZE:BOOL=ON' "$BUILD_DIR/CMakeCache.txt"; then
  echo "proxy.sh: warning: $BUILD_DIR is a sanitizer build; figures are not representative" >&2
fi

tmp=$(mktemp -d /tmp/tg-bench.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do
    kill "$p" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do
    wait "$p" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ]; then
    echo "proxy.sh: kept $tmp" >&2
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port and wait_http are shared with the other benchmarks.
BENCH_NAME=proxy.sh
# shellcheck source=bench/lib/common.sh
. "$here/bench/lib/common.sh"

SIM_PORT=$(free_port)
NGINX_PORT=$(free_port)
TG_PORT=$(free_port)
TG_ADMIN=$(free_port)
CURL_PORT=$(free_port)
CURL_ADMIN=$(free_port)
CORE_PORT=$(free_port)
CORE_ADMIN=$(free_port)

# ---- the simulator: no delays, so the proxies are what is measured --------
"$SIM" --listen "127.0.0.1:$SIM_PORT" --workers "$SIM_WORKERS" --ttft-ms 0 --token-ms 0 \
  --max-num-seqs 4096 --models "$MODEL" 2>"$tmp/sim.log" &
pids+=($!)
declare -A PIDS   # target name → the process whose CPU time (with its children) is counted
PIDS[sim]=$!
wait_http "http://127.0.0.1:$SIM_PORT/health"

# ---- nginx ------------------------------------------------------------------
start_nginx() {
local log="access_log off;"
if [ "$ACCESS_LOG" = 1 ]; then
  log="access_log $tmp/nginx/access.log combined buffer=64k flush=1s;"
fi
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx/nginx.conf" <<EOF
worker_processes $WORKERS;
daemon off;
master_process on;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 4096; }
http {
  $log
  client_body_temp_path $tmp/nginx/body;
  proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi;
  uwsgi_temp_path $tmp/nginx/uwsgi;
  scgi_temp_path $tmp/nginx/scgi;
  keepalive_requests 1000000;
  upstream sim {
    server 127.0.0.1:$SIM_PORT;
    keepalive 4096;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT reuseport;
    location / {
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
"$NGINX" -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -e "$tmp/nginx/error.log" \
  2>>"$tmp/nginx/error.log" &
pids+=($!)
PIDS[nginx]=$!
}

# ---- tollgate -----------------------------------------------------------------
# start_tollgate NAME PORT ADMIN_PORT CLIENT [LIMITS]: a gateway in $tmp/NAME
# with `upstream_client: CLIENT`; its tenant has limits and budgets unless
# LIMITS is 0; its key goes to KEYS[NAME].
declare -A KEYS
start_tollgate() {
local name=$1 port=$2 admin=$3 client=$4 dir="$tmp/$1" log='"off"' limits=""
if [ "${5:-1}" = 1 ]; then
  limits=$BENCH_TENANT_LIMITS
fi
if [ "$ACCESS_LOG" = 1 ]; then log="$dir/access.log"; fi
mkdir -p "$dir/data"
cat >"$dir/tollgate.yaml" <<EOF
listen: 127.0.0.1:$port
admin_listen: 127.0.0.1:$admin
workers: $WORKERS
data_dir: $dir/data
access_log: $log
health_check_interval: 2s
upstream_client: $client
${TG_EXTRA_CONFIG:-}
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
KEYS[$name]=$("$TOLLGATE" keys create --config "$dir/tollgate.yaml" --tenant bench --name bench \
  2>>"$dir/keys.log")
"$TOLLGATE" serve --config "$dir/tollgate.yaml" 2>"$dir/tollgate.log" &
pids+=($!)
PIDS[$name]=$!
wait_http "http://127.0.0.1:$admin/readyz"
}

# target name → URL; only the tollgates need a key
declare -A URLS
names=()
if want sim; then names+=(sim); URLS[sim]="http://127.0.0.1:$SIM_PORT"; fi
if want nginx; then start_nginx; names+=(nginx); URLS[nginx]="http://127.0.0.1:$NGINX_PORT"; fi
if want tollgate; then
  start_tollgate tollgate "$TG_PORT" "$TG_ADMIN" auto
  names+=(tollgate); URLS[tollgate]="http://127.0.0.1:$TG_PORT"
fi
if want curl; then
  start_tollgate curl "$CURL_PORT" "$CURL_ADMIN" curl
  names+=(curl); URLS[curl]="http://127.0.0.1:$CURL_PORT"
fi
if want core; then
  start_tollgate core "$CORE_PORT" "$CORE_ADMIN" auto 0
  names+=(core); URLS[core]="http://127.0.0.1:$CORE_PORT"
fi

# every target must answer 200 before it is measured
for name in "${names[@]}"; do
  url=${URLS[$name]}
  KEY=${KEYS[$name]:-}
  n=100
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" \
      -H 'Content-Type: application/json' \
      -d "{\"model\":\"$MODEL\",\"max_tokens\":16,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" \
      "$url/v1/chat/completions" || true)" = 200 ]; do
    n=$((n - 1))
    [ $n -gt 0 ] || { echo "proxy.sh: $url does not answer 200" >&2; exit 1; }
    sleep 0.1
  done
done

export TG_BENCH_MODEL="$MODEL"
if [ "$RATE" -gt 0 ]; then
  TG_BENCH_DELAY_MS=$(awk -v c="$CONNECTIONS" -v r="$RATE" 'BEGIN { printf "%.3f", c * 1000 / r }')
  export TG_BENCH_DELAY_MS
fi

CLK_TCK=$(getconf CLK_TCK)

# run_wrk NAME: prints "NAME req/s p50_ms p99_ms non2xx errors
# cpu_us_per_req sim_us_per_req machine_us_per_req"
# The CPU time the target spent per request does not depend on what else
# runs on the machine the way req/s does: on a shared machine it is the
# steadier comparison (it leaves out the simulator behind the proxies).
# The simulator's and the whole machine's (every process and the kernel's
# interrupts) show what a proxy costs the processes around it: a proxy
# that costs less itself but makes the client or the upstream work more
# still serves fewer requests on a machine they share.
run_wrk() {
  local name=$1 url=${URLS[$1]} line c0 c1 s0 s1 m0 m1
  export TG_BENCH_KEY="${KEYS[$1]:-}"
  wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$WARMUP" -s "$LUA" "$url/v1/chat/completions" \
    >/dev/null 2>&1 || true
  c0=$(cpu_ticks "${PIDS[$name]}")
  s0=$(cpu_ticks "${PIDS[sim]}")
  m0=$(busy_ticks)
  line=$(wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$DURATION" -s "$LUA" \
    "$url/v1/chat/completions" 2>&1 | grep '^TGBENCH ' || true)
  c1=$(cpu_ticks "${PIDS[$name]}")
  s1=$(cpu_ticks "${PIDS[sim]}")
  m1=$(busy_ticks)
  [ -n "$line" ] || { echo "proxy.sh: wrk against $name printed no result" >&2; exit 1; }
  echo "$line" | awk -v n="$name" -v ticks=$((c1 - c0)) -v sticks=$((s1 - s0)) \
    -v mticks=$((m1 - m0)) -v hz="$CLK_TCK" '{
    printf "%s %.0f %.3f %.3f %d %d %.1f %.1f %.1f\n", n, $2 / ($3 / 1e6), $4 / 1000, $5 / 1000,
      $6, $7, ($2 > 0 ? ticks / hz * 1e6 / $2 : 0), ($2 > 0 ? sticks / hz * 1e6 / $2 : 0),
      ($2 > 0 ? mticks / hz * 1e6 / $2 : 0) }'
}

echo "# tollgate proxy benchmark"
echo "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "# kernel: $(uname -r); $("$NGINX" -v 2>&1); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"
echo "# load: wrk -t $WRK_THREADS -c $CONNECTIONS -d $DURATION x $ROUNDS rounds, POST /v1/chat/completions (16 tokens), workers $WORKERS (nginx, tollgate), sim workers $SIM_WORKERS"
if [ "$RATE" -gt 0 ]; then
  echo "# paced: each connection waits a random pause (exponential, mean $TG_BENCH_DELAY_MS ms) before each request: about $RATE req/s offered to every target"
fi
echo "# build: $BUILD_DIR${TG_EXTRA_CONFIG:+; tollgate config adds: $TG_EXTRA_CONFIG}"
echo "# access logs: $([ "$ACCESS_LOG" = 1 ] && echo "on (nginx combined, buffer=64k; tollgate JSON lines), to files" || echo off)"

# every round measures every target, in the opposite order every other
# round so a machine that speeds up or slows down favours no target; per
# target, the round with the median req/s is kept (its p50 and p99 with it)
rounds=()
for ((r = 1; r <= ROUNDS; r++)); do
  for name in $(round_order "$r" "${names[@]}"); do
    rounds+=("$(echo "$r $(run_wrk "$name")")")
  done
done
results=()
for name in "${names[@]}"; do
  results+=("$(printf '%s\n' "${rounds[@]}" | cut -d' ' -f2- | awk -v n="$name" '$1 == n' |
    sort -k2,2n | awk '{ l[NR] = $0 } END { print l[int((NR + 1) / 2)] }')")
done
if [ "$ROUNDS" -gt 1 ]; then
  echo "# rounds (round target req/s p50 p99 cpu-us/req: target, sim, machine):"
  printf '%s\n' "${rounds[@]}" |
    awk '{ printf "#   %2d %-9s %7d %7.2f %7.2f %7.1f %7.1f %7.1f\n", $1, $2, $3, $4, $5, $8, $9, $10 }'
  # the targets of one round ran back to back: the median of their
  # per-round ratios is the steadier figure on a machine whose speed drifts
  for t in tollgate curl core; do
    want nginx && want "$t" || continue
    printf '%s\n' "${rounds[@]}" | awk -v t="$t" '
      $2 == "nginx" { nr[$1] = $3; np[$1] = $5 }
      $2 == t { tr[$1] = $3; tp[$1] = $5 }
      function median(a, n,   i, j, x) {
        for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { x = a[j]; a[j] = a[j - 1]; a[j - 1] = x }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
      }
      END {
        n = w = 0
        for (r in nr) if ((r in tr) && nr[r] > 0 && np[r] > 0) {
          n++; q[n] = tr[r] / nr[r]; p[n] = tp[r] / np[r]; if (p[n] <= 1) w++
        }
        if (n > 0) printf "%s/nginx, median of %d per-round ratios: req/s %.2f  p99 %.2f (p99 at or below nginx'"'"'s in %d rounds)\n", t, n, median(q, n), median(p, n), w
      }'
  done
fi

printf '%s\n' "${results[@]}" | awk '
  BEGIN { printf "%-10s %12s %10s %10s %8s %8s %12s %12s %12s\n", "target", "req/s", "p50 ms", "p99 ms", "non-2xx", "errors", "cpu us/req", "sim us/req", "all us/req" }
  { printf "%-10s %12d %10.2f %10.2f %8d %8d %12.1f %12.1f %12.1f\n", $1, $2, $3, $4, $5, $6, $7, $8, $9; rps[$1] = $2; p99[$1] = $4; cpu[$1] = $7 }
  END {
    if (rps["nginx"] > 0 && p99["nginx"] > 0 && ("tollgate" in rps))
      printf "tollgate/nginx: req/s %.2f  p99 %.2f  cpu/req %.2f\n", rps["tollgate"] / rps["nginx"], p99["tollgate"] / p99["nginx"], (cpu["nginx"] > 0 ? cpu["tollgate"] / cpu["nginx"] : 0)
    if (rps["nginx"] > 0 && p99["nginx"] > 0 && ("curl" in rps))
      printf "curl/nginx:     req/s %.2f  p99 %.2f  cpu/req %.2f\n", rps["curl"] / rps["nginx"], p99["curl"] / p99["nginx"], (cpu["nginx"] > 0 ? cpu["curl"] / cpu["nginx"] : 0)
    if (rps["nginx"] > 0 && p99["nginx"] > 0 && ("core" in rps))
      printf "core/nginx:     req/s %.2f  p99 %.2f  cpu/req %.2f\n", rps["core"] / rps["nginx"], p99["core"] / p99["nginx"], (cpu["nginx"] > 0 ? cpu["core"] / cpu["nginx"] : 0)
  }'

bad=$(printf '%s\n' "${results[@]}" | awk '$5 > 0 || $6 > 0 { print $1 }')
if [ -n "$bad" ]; then
  echo "proxy.sh: non-2xx answers or socket errors from: $bad (see KEEP=1 logs)" >&2
fi
