#!/usr/bin/env bash
# Metrics benchmark, two parts, one run:
#
# 1. Scrape cost at scale: a gateway whose config has TENANTS tenants (1,000)
#    and MODELS models (5), one key per tenant (created with the CLI before
#    the gateway starts), and one chat completion per (tenant, model) pair, so
#    every per-tenant and per-(tenant, model) series exists. Then SCRAPES (20)
#    sequential GET /metrics on the admin listener: median and max time,
#    bytes, and the number of (tenant, model) token series found.
# 2. Throughput with metrics on vs `metrics: off`: two otherwise identical
#    one-tenant gateways in front of the simulator, the same wrk load as
#    bench/proxy.sh, measured alternately ROUNDS times (off, on, off, on, ...);
#    while the metrics-on gateway is measured, /metrics is scraped every
#    second as Prometheus would. Prints the mean req/s of each and the ratio
#    on/off (target >= 0.97).
#
#   bench/metrics.sh [BUILD_DIR]        (default: build, from `make build`)
#
# Environment: TENANTS (1000), MODELS (5), SCRAPES (20), DURATION (10s),
# CONNECTIONS (64), WORKERS (1: tollgate workers), WRK_THREADS (1),
# SIM_WORKERS (1), WARMUP (2s), ROUNDS (2), KEEP=1 keeps the temp dir.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
TENANTS=${TENANTS:-1000}
MODELS=${MODELS:-5}
SCRAPES=${SCRAPES:-20}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
WORKERS=${WORKERS:-1}
WRK_THREADS=${WRK_THREADS:-1}
SIM_WORKERS=${SIM_WORKERS:-1}
WARMUP=${WARMUP:-2s}
ROUNDS=${ROUNDS:-2}
LUA="$here/bench/lib/chat.lua"

# shellcheck source=bench/lib/common.sh
. "$here/bench/lib/common.sh"
bench_init metrics.sh
bench_build "${1:-build}"

command -v wrk >/dev/null || bench_die "wrk not installed (scripts/install-deps.sh)"
if [ "$TENANTS" -lt 1 ] || [ "$TENANTS" -gt 100000 ]; then bench_die "TENANTS must be 1..100000"; fi
if [ "$MODELS" -lt 1 ] || [ "$MODELS" -gt 50 ]; then bench_die "MODELS must be 1..50"; fi
warn_if_sanitized "$BUILD_DIR"

models=()
for i in $(seq 1 "$MODELS"); do models+=("bench-model-$i"); done
model_csv=$(IFS=,; echo "${models[*]}")

SIM_PORT=$(free_port)
"$SIM" --listen "127.0.0.1:$SIM_PORT" --workers "$SIM_WORKERS" --ttft-ms 0 --token-ms 0 \
  --max-num-seqs 4096 --models "$model_csv" 2>"$tmp/sim.log" &
pids+=($!)
wait_http "http://127.0.0.1:$SIM_PORT/health"

# write_config FILE PORT ADMIN DATA_DIR NTENANTS METRICS(on|off)
write_config() {
  python3 - "$@" "$SIM_PORT" "$model_csv" <<'EOF'
import sys
path, port, admin, data, n, metrics, sim_port, models = sys.argv[1:9]
models = models.split(",")
out = ["listen: 127.0.0.1:%s" % port, "admin_listen: 127.0.0.1:%s" % admin,
       "workers: WORKERS", "data_dir: %s" % data, 'access_log: "off"',
       "health_check_interval: 2s", "metrics: %s" % ("on" if metrics == "on" else '"off"'),
       "tenants:"]
for i in range(int(n)):
    out += ["  bench-%d:" % i,
            "    tier: enterprise",
            "    models_allowed: [%s]" % ", ".join(models),
            "    rate_limits: {requests_per_minute: 1000000000, tokens_per_minute: 1000000000000,"
            " concurrent_requests: 100000}",
            "    budget: {daily_limit_usd: 1000000000.00, monthly_limit_usd: 1000000000.00,"
            " alert_threshold_percent: 80}",
            "    priority: high"]
out.append("models:")
for m in models:
    out += ["  %s:" % m,
            "    endpoints:",
            '      - {url: "http://127.0.0.1:%s", max_inflight: 4096}' % sim_port,
            '    pricing: {prompt_per_1k_usd: "0.0005", completion_per_1k_usd: "0.0015"}']
with open(path, "w") as f:
    f.write("\n".join(out) + "\n")
EOF
  sed -i "s/^workers: WORKERS$/workers: $WORKERS/" "$1"
}

# start_gateway NAME CONFIG ADMIN: starts it, records its pid in gw_pid
start_gateway() {
  "$TOLLGATE" serve --config "$2" 2>"$tmp/$1.log" &
  gw_pid=$!
  pids+=("$gw_pid")
  wait_http "http://127.0.0.1:$3/readyz" 30 || { tail -5 "$tmp/$1.log" >&2; exit 1; }
}

echo "# tollgate metrics benchmark"
machine_header
echo "# build: $BUILD_DIR; tollgate workers $WORKERS, sim workers $SIM_WORKERS"

# ---- 1. scrape time and size: TENANTS x MODELS -------------------------------
mkdir -p "$tmp/big/data"
BIG_PORT=$(free_port)
BIG_ADMIN=$(free_port)
write_config "$tmp/big/tollgate.yaml" "$BIG_PORT" "$BIG_ADMIN" "$tmp/big/data" "$TENANTS" on
t0=$(date +%s.%N)
: >"$tmp/big/keys.txt"
for i in $(seq 0 $((TENANTS - 1))); do
  key=$("$TOLLGATE" keys create --config "$tmp/big/tollgate.yaml" --tenant "bench-$i" \
    --name bench 2>>"$tmp/big/keys.log") || bench_die "keys create failed for bench-$i"
  echo "bench-$i $key" >>"$tmp/big/keys.txt"
done
t1=$(date +%s.%N)
start_gateway big "$tmp/big/tollgate.yaml" "$BIG_ADMIN"

# one chat per (tenant, model) pair, over keep-alive connections
python3 - "$BIG_PORT" "$tmp/big/keys.txt" "$model_csv" >"$tmp/big/drive.txt" <<'EOF'
import http.client, json, sys, threading
port, keys_path, models = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
pairs = []
with open(keys_path) as f:
    for line in f:
        tenant, key = line.split()
        pairs += [(key, m) for m in models]
lock = threading.Lock()
status = {}
def work(chunk):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for key, model in chunk:
        body = json.dumps({"model": model, "max_tokens": 8,
                           "messages": [{"role": "user", "content": "hello"}]})
        conn.request("POST", "/v1/chat/completions", body,
                     {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        with lock:
            status[r.status] = status.get(r.status, 0) + 1
    conn.close()
threads = [threading.Thread(target=work, args=(pairs[i::8],)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(pairs), status.get(200, 0), " ".join("%s:%d" % kv for kv in sorted(status.items())))
EOF
read -r npairs nok drive_status <"$tmp/big/drive.txt"
t2=$(date +%s.%N)
[ "$nok" = "$npairs" ] || bench_die "only $nok of $npairs requests answered 200 ($drive_status)"

: >"$tmp/big/scrapes.txt"
for _ in $(seq 1 "$SCRAPES"); do
  curl -s -o "$tmp/big/metrics.txt" -w '%{http_code} %{time_total} %{size_download}\n' \
    "http://127.0.0.1:$BIG_ADMIN/metrics" >>"$tmp/big/scrapes.txt"
done
awk '$1 != 200 { bad = 1 } END { exit bad }' "$tmp/big/scrapes.txt" \
  || bench_die "a scrape did not answer 200"
series=$(grep -c '^llm_tenant_prompt_tokens_total{' "$tmp/big/metrics.txt" || true)
tseries=$(grep -c '^llm_tenant_requests_total{' "$tmp/big/metrics.txt" || true)
lines=$(grep -vc '^#' "$tmp/big/metrics.txt" || true)

echo
echo "## scrape: $TENANTS tenants x $MODELS models"
printf 'keys created: %d in %.1f s; requests: %d (%s) in %.1f s\n' "$TENANTS" \
  "$(echo "$t1 - $t0" | bc)" "$npairs" "$drive_status" "$(echo "$t2 - $t1" | bc)"
printf 'series: %d tenant, %d (tenant, model) prompt-token, %d sample lines\n' \
  "$tseries" "$series" "$lines"
sort -n -k2 "$tmp/big/scrapes.txt" | awk -v n="$SCRAPES" '
  { t[NR] = $2 * 1000; b[NR] = $3 }
  END {
    med = (n % 2) ? t[(n + 1) / 2] : (t[n / 2] + t[n / 2 + 1]) / 2
    printf "scrapes: %d, median %.2f ms, min %.2f ms, max %.2f ms, %d bytes (%.1f KiB)\n",
      n, med, t[1], t[n], b[1], b[1] / 1024
  }'
[ "$series" = "$npairs" ] || echo "metrics.sh: warning: $series (tenant, model) series for $npairs pairs" >&2
bench_stop "$gw_pid"

# ---- 2. throughput: metrics on vs off -----------------------------------------
declare -A GW_PORT GW_ADMIN KEYS
for mode in on off; do
  mkdir -p "$tmp/$mode/data"
  GW_PORT[$mode]=$(free_port)
  GW_ADMIN[$mode]=$(free_port)
  write_config "$tmp/$mode/tollgate.yaml" "${GW_PORT[$mode]}" "${GW_ADMIN[$mode]}" \
    "$tmp/$mode/data" 1 "$mode"
  KEYS[$mode]=$("$TOLLGATE" keys create --config "$tmp/$mode/tollgate.yaml" --tenant bench-0 \
    --name bench 2>>"$tmp/$mode/keys.log")
done

# measure MODE: starts that gateway, runs wrk (scraping when on), stops it
measure() {
  local mode=$1 scraper="" line
  start_gateway "gw-$mode" "$tmp/$mode/tollgate.yaml" "${GW_ADMIN[$mode]}"
  wait_chat_200 "http://127.0.0.1:${GW_PORT[$mode]}" "${KEYS[$mode]}" "${models[0]}"
  if [ "$mode" = on ]; then
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${GW_ADMIN[on]}/metrics")" = 200 ] \
      || bench_die "metrics-on gateway does not serve /metrics"
    ( while :; do curl -s -o /dev/null "http://127.0.0.1:${GW_ADMIN[on]}/metrics" || true; sleep 1; done ) &
    scraper=$!
    pids+=("$scraper")
  else
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${GW_ADMIN[off]}/metrics")" = 404 ] \
      || bench_die "metrics-off gateway still serves /metrics"
  fi
  export TG_BENCH_KEY="${KEYS[$mode]}" TG_BENCH_MODEL="${models[0]}"
  line=$(run_wrk "$mode" "http://127.0.0.1:${GW_PORT[$mode]}")
  [ -n "$scraper" ] && bench_stop "$scraper"
  bench_stop "$gw_pid"
  echo "$line"
}

results=()
for r in $(seq 1 "$ROUNDS"); do
  results+=("$(measure off) $r")
  results+=("$(measure on) $r")
done

echo
echo "## throughput: metrics on vs off (wrk -t $WRK_THREADS -c $CONNECTIONS -d $DURATION, $ROUNDS rounds each, alternating)"
printf '%s\n' "${results[@]}" | awk '
  BEGIN { printf "%-6s %6s %12s %10s %10s %8s %8s\n", "mode", "round", "req/s", "p50 ms", "p99 ms", "non-2xx", "errors" }
  { printf "%-6s %6d %12d %10.2f %10.2f %8d %8d\n", $1, $7, $2, $3, $4, $5, $6
    sum[$1] += $2; n[$1]++; if ($5 > 0 || $6 > 0) bad = 1 }
  END {
    on = sum["on"] / n["on"]; off = sum["off"] / n["off"]
    printf "mean req/s: on %.0f, off %.0f; on/off %.3f (target >= 0.97)\n", on, off, on / off
    if (bad) print "metrics.sh: non-2xx answers or socket errors (see KEEP=1 logs)" > "/dev/stderr"
  }'
