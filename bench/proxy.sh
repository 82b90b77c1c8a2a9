#!/usr/bin/env bash
# Proxy overhead benchmark: the same wrk load (small non-streaming chat
# completions) against the simulator directly, nginx in front of it, and
# tollgate in front of it, all on loopback. Prints req/s, p50 and p99 per
# target and tollgate's ratios to nginx.
#
#   bench/proxy.sh [BUILD_DIR]        (default: build, from `make build`)
#
# Environment: DURATION (10s), CONNECTIONS (64), WORKERS (1: nginx
# worker_processes and tollgate workers), WRK_THREADS (1), SIM_WORKERS (1),
# WARMUP (2s, per target, not measured), TARGETS ("sim nginx tollgate": a
# subset runs only those), KEEP=1 keeps the temp dir.
#
# nginx is Debian's nginx-light, run in the foreground from a generated
# config (upstream keepalive, HTTP/1.1 to the upstream, access_log off).
# tollgate runs with access_log off and one tenant whose limits cannot bind.
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
TARGETS=${TARGETS:-sim nginx tollgate}
MODEL=llama-3.1-8b

want() { case " $TARGETS " in *" $1 "*) return 0 ;; esac; return 1; }

TOLLGATE="$BUILD_DIR/tollgate"
SIM="$BUILD_DIR/tollgate-sim"
LUA="$here/bench/lib/chat.lua"
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}

bins=("$SIM")
if want tollgate; then bins+=("$TOLLGATE"); fi
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

# ---- the simulator: no delays, so the proxies are what is measured --------
"$SIM" --listen "127.0.0.1:$SIM_PORT" --workers "$SIM_WORKERS" --ttft-ms 0 --token-ms 0 \
  --max-num-seqs 4096 --models "$MODEL" 2>"$tmp/sim.log" &
pids+=($!)
wait_http "http://127.0.0.1:$SIM_PORT/health"

# ---- nginx ------------------------------------------------------------------
start_nginx() {
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx/nginx.conf" <<EOF
worker_processes $WORKERS;
daemon off;
master_process on;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $tmp/nginx/body;
  proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi;
  uwsgi_temp_path $tmp/nginx/uwsgi;
  scgi_temp_path $tmp/nginx/scgi;
  keepalive_requests 1000000;
  upstream sim {
    server 127.0.0.1:$SIM_PORT;
    keepalive 128;
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
}

# ---- tollgate -----------------------------------------------------------------
start_tollgate() {
mkdir -p "$tmp/tg/data"
cat >"$tmp/tg/tollgate.yaml" <<EOF
listen: 127.0.0.1:$TG_PORT
admin_listen: 127.0.0.1:$TG_ADMIN
workers: $WORKERS
data_dir: $tmp/tg/data
access_log: "off"
health_check_interval: 2s
tenants:
  bench:
    tier: enterprise
    models_allowed: [$MODEL]
    rate_limits:
      requests_per_minute: 1000000000
      tokens_per_minute: 1000000000000
      concurrent_requests: 100000
    budget:
      daily_limit_usd: 1000000000.00
      monthly_limit_usd: 1000000000.00
      alert_threshold_percent: 80
    priority: high
models:
  $MODEL:
    endpoints:
      - {url: "http://127.0.0.1:$SIM_PORT", max_inflight: 4096}
    pricing: {prompt_per_1k_usd: "0.0005", completion_per_1k_usd: "0.0015"}
EOF
KEY=$("$TOLLGATE" keys create --config "$tmp/tg/tollgate.yaml" --tenant bench --name bench \
  2>>"$tmp/tg/keys.log")
"$TOLLGATE" serve --config "$tmp/tg/tollgate.yaml" 2>"$tmp/tg/tollgate.log" &
pids+=($!)
wait_http "http://127.0.0.1:$TG_ADMIN/readyz"
}

KEY=""
urls=()
want sim && urls+=("http://127.0.0.1:$SIM_PORT")
if want nginx; then start_nginx; urls+=("http://127.0.0.1:$NGINX_PORT"); fi
if want tollgate; then start_tollgate; urls+=("http://127.0.0.1:$TG_PORT"); fi

# every target must answer 200 before it is measured
for url in "${urls[@]}"; do
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

export TG_BENCH_KEY="$KEY" TG_BENCH_MODEL="$MODEL"

# run_wrk NAME URL: prints "NAME req/s p50_ms p99_ms non2xx errors"
run_wrk() {
  local name=$1 url=$2 line
  wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$WARMUP" -s "$LUA" "$url/v1/chat/completions" \
    >/dev/null 2>&1 || true
  line=$(wrk -t "$WRK_THREADS" -c "$CONNECTIONS" -d "$DURATION" -s "$LUA" \
    "$url/v1/chat/completions" 2>&1 | grep '^TGBENCH ' || true)
  [ -n "$line" ] || { echo "proxy.sh: wrk against $name printed no result" >&2; exit 1; }
  echo "$line" | awk -v n="$name" '{ printf "%s %.0f %.3f %.3f %d %d\n", n, $2 / ($3 / 1e6), $4 / 1000, $5 / 1000, $6, $7 }'
}

echo "# tollgate proxy benchmark"
echo "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "# kernel: $(uname -r); $("$NGINX" -v 2>&1); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"
echo "# load: wrk -t $WRK_THREADS -c $CONNECTIONS -d $DURATION, POST /v1/chat/completions (16 tokens), workers $WORKERS (nginx, tollgate), sim workers $SIM_WORKERS"
echo "# build: $BUILD_DIR"

results=()
if want sim; then results+=("$(run_wrk sim "http://127.0.0.1:$SIM_PORT")"); fi
if want nginx; then results+=("$(run_wrk nginx "http://127.0.0.1:$NGINX_PORT")"); fi
if want tollgate; then results+=("$(run_wrk tollgate "http://127.0.0.1:$TG_PORT")"); fi

printf '%s\n' "${results[@]}" | awk '
  BEGIN { printf "%-10s %12s %10s %10s %8s %8s\n", "target", "req/s", "p50 ms", "p99 ms", "non-2xx", "errors" }
  { printf "%-10s %12d %10.2f %10.2f %8d %8d\n", $1, $2, $3, $4, $5, $6; rps[$1] = $2; p99[$1] = $4 }
  END {
    if (rps["nginx"] > 0 && p99["nginx"] > 0 && ("tollgate" in rps))
      printf "tollgate/nginx: req/s %.2f  p99 %.2f\n", rps["tollgate"] / rps["nginx"], p99["tollgate"] / p99["nginx"]
  }'

bad=$(printf '%s\n' "${results[@]}" | awk '$5 > 0 || $6 > 0 { print $1 }')
if [ -n "$bad" ]; then
  echo "proxy.sh: non-2xx answers or socket errors from: $bad (see KEEP=1 logs)" >&2
fi
