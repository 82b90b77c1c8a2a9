#!/usr/bin/env bash
# A long mixed and faulty load against one gateway, to find what the test
# suite's short runs cannot: memory or descriptors that grow while still
# referenced (no sanitizer reports those), calls that never end, records
# that go missing over many thousands of requests.
#
#   scripts/soak.sh [BUILD_DIR] [SECONDS]     (defaults: build, 120)
#
# Two simulators (5 ms to the first token, 1 ms a token, 64 sequences
# each), one gateway (2 loops, SQLite ledger, access log to a file) in front
# of them with small max_inflight (so requests queue), and CONNECTIONS (64)
# clients asking, at random: answers, streams read to the end, streams left
# after their first event, embeddings, pipelined requests, upstream faults
# (a 500, a hang-up before the answer or after 3 events, a broken body, a
# stall the client leaves) and refusals (bad key, unknown model, a model
# outside the tenant's or the key's scope, malformed JSON, 429 from a tight
# tenant). Every 10 s it prints the gateway's RSS and open descriptors; at
# the end, each kind's statuses, the RSS growth after the first 10 s, and
# whether the ledger holds exactly one row for every access-log line with
# an endpoint, with the same status and tokens. It fails when that check
# fails, when a client saw a status its kind never gets, or when the
# gateway does not exit 0 on SIGTERM, when a client connection stays open
# after its client left, or (with a sanitizer build, such as build-asan) when
# a sanitizer reported anything. KEEP=1 keeps the work directory.
#
# STATE=redis keeps the limits in a redis-server started here (default:
# memory); DATABASE=postgres keeps the keys and the ledger in a PostgreSQL
# server started here through tests/lib/pgtest.sh (default: sqlite).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
STATE=${STATE:-memory}
DATABASE=${DATABASE:-sqlite}
if [ "$DATABASE" = postgres ] && [ -z "${TG_PG_URL:-}" ]; then
  exec bash "$here/tests/lib/pgtest.sh" run bash "$0" "$@"
fi
# shellcheck source=bench/lib/common.sh
. "$here/bench/lib/common.sh"

SECONDS_RUN=${2:-120}
CONNECTIONS=${CONNECTIONS:-64}

bench_init soak.sh
bench_build "${1:-build}"

SIM_A=$(free_port)
SIM_B=$(free_port)
PORT=$(free_port)
ADMIN=$(free_port)
mkdir -p "$tmp/data"
state=memory
if [ "$STATE" = redis ]; then
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$tmp" >"$tmp/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  state="redis://127.0.0.1:$REDIS_PORT/0"
fi
database=sqlite
if [ "$DATABASE" = postgres ]; then database=$TG_PG_URL; fi
cat >"$tmp/tollgate.yaml" <<YAML
listen: 127.0.0.1:$PORT
admin_listen: 127.0.0.1:$ADMIN
workers: 2
data_dir: $tmp/data
database: "$database"
state: "$state"
access_log: $tmp/access.log
forward_headers: [x-sim-fault]
health_check_interval: 1s
timeouts:
  client_request: 10s
  upstream_connect: 1s
  upstream_first_byte: 3s
  upstream_idle: 2s
  drain: 5s
global_rate_limit: {requests_per_second: 1000000}
priority_classes: {high: 1000, low: 100}
tenants:
  big:
    tier: enterprise
    models_allowed: [llama-3.1-70b, llama-3.1-8b, nomic-embed-text]
    rate_limits: {requests_per_minute: 100000000, tokens_per_minute: 100000000000, concurrent_requests: 100000}
    budget: {daily_limit_usd: 1000000.00, monthly_limit_usd: 10000000.00, alert_threshold_percent: 99}
    priority: high
  tight:
    tier: free
    models_allowed: [llama-3.1-8b, nomic-embed-text]
    rate_limits: {requests_per_minute: 600, tokens_per_minute: 200000, concurrent_requests: 4}
    budget: {daily_limit_usd: 1000.00, monthly_limit_usd: 10000.00, alert_threshold_percent: 99}
    priority: low
models:
  llama-3.1-70b:
    endpoints:
      - {url: "http://127.0.0.1:$SIM_A", max_inflight: 32}
      - {url: "http://127.0.0.1:$SIM_B", max_inflight: 32}
    pricing: {prompt_per_1k_usd: "0.004", completion_per_1k_usd: "0.012"}
  llama-3.1-8b:
    endpoints:
      - {url: "http://127.0.0.1:$SIM_A", max_inflight: 32}
    pricing: {prompt_per_1k_usd: "0.0005", completion_per_1k_usd: "0.0015"}
  nomic-embed-text:
    kind: embedding
    endpoints:
      - {url: "http://127.0.0.1:$SIM_B", max_inflight: 32}
    pricing: {prompt_per_1k_usd: "0.0001", completion_per_1k_usd: "0.0"}
YAML

"$SIM" --listen "127.0.0.1:$SIM_A" --ttft-ms 5 --token-ms 1 --max-num-seqs 64 \
  --models llama-3.1-70b,llama-3.1-8b 2>"$tmp/sim-a.log" &
pids+=($!)
"$SIM" --listen "127.0.0.1:$SIM_B" --ttft-ms 5 --token-ms 1 --max-num-seqs 64 \
  --models llama-3.1-70b,nomic-embed-text 2>"$tmp/sim-b.log" &
pids+=($!)
keys=()
keys+=("$("$TOLLGATE" keys create --config "$tmp/tollgate.yaml" --tenant big 2>/dev/null)")
keys+=("$("$TOLLGATE" keys create --config "$tmp/tollgate.yaml" --tenant big --models llama-3.1-8b 2>/dev/null)")
keys+=("$("$TOLLGATE" keys create --config "$tmp/tollgate.yaml" --tenant tight 2>/dev/null)")
"$TOLLGATE" serve --config "$tmp/tollgate.yaml" 2>"$tmp/tollgate.log" &
TG_PID=$!
pids+=("$TG_PID")
wait_http "http://127.0.0.1:$ADMIN/readyz"

echo "# soak: ${SECONDS_RUN}s, $CONNECTIONS clients, build $BUILD_DIR, state $STATE, database $DATABASE, work dir $tmp"
status=0
python3 "$here/scripts/soak.py" --port "$PORT" --pid "$TG_PID" --seconds "$SECONDS_RUN" \
  --clients "$CONNECTIONS" --big-key "${keys[0]}" --scoped-key "${keys[1]}" \
  --tight-key "${keys[2]}" || status=1

kill -TERM "$TG_PID"
if wait "$TG_PID"; then
  echo "gateway: exit 0 on SIGTERM"
else
  echo "gateway: exit $? on SIGTERM" >&2
  status=1
fi
if grep -E "runtime error|Sanitizer" "$tmp/tollgate.log" >&2; then
  echo "gateway: the sanitizers reported the above ($tmp/tollgate.log)" >&2
  status=1
fi
if [ "$DATABASE" = postgres ]; then ledger=$TG_PG_URL; else ledger=$tmp/data/tollgate.db; fi
python3 "$here/scripts/soak.py" --check-ledger "$ledger" --access-log "$tmp/access.log" ||
  status=1
exit $status
