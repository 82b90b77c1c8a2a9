#!/usr/bin/env bash
# Cost of the usage ledger: the same wrk load (small non-streaming chat
# completions) against tollgate in front of the simulator three ways:
#
#   off       `ledger: off`: no record is written
#   sqlite    `database: sqlite`: one row per request in <data_dir>/tollgate.db
#             (WAL, synchronous=NORMAL: the batch's commit has reached the
#             operating system before the answers go; checkpoints fsync)
#   postgres  `database: postgres://...` on a PostgreSQL server started here
#             as the postgres user (stock settings: fsync and synchronous_commit on)
#
# A response's last byte waits for its record to be durable, so what is
# measured is the group commit: one transaction per batch of records (and
# for PostgreSQL one WAL flush). The tenant has no limits, so only the ledger differs between the
# three. Prints req/s, p50 and p99 per configuration (the best round of
# each), the ratios to "off" (best against best, and the median of the
# ratios within each round; target: req/s >= 0.90 for sqlite and postgres),
# and, as a check that the records were really written, the rows each
# configuration stored against the answers wrk counted.
#
#   bench/ledger.sh [BUILD_DIR]       (default: build, from `make build`)
#
# Each answer waits for a group commit (with PostgreSQL a WAL flush: a millisecond or two), so
# with few connections wrk's closed loop measures that added latency, not
# the gateway's capacity: 64 connections / (3.3 ms + 1.5 ms) is fewer req/s
# than 64 / 3.3 ms even with the CPU idle. The default of 256 connections keeps the
# CPU the bound, which is what the ledger's cost per request is measured
# against; CONNECTIONS=64 shows the latency-bound figure.
#
# Environment: DURATION (10s; whole seconds), CONNECTIONS (256), WORKERS (1: tollgate
# workers), WRK_THREADS (1), SIM_WORKERS (1), WARMUP (2s, per run, not
# measured), TARGETS ("off sqlite postgres": a subset runs only those),
# ROUNDS (1: each round measures every target once, every other round in
# the opposite order; the best
# req/s of each target is reported), DATA_DIR (a directory on the disk to
# measure; default: the temp dir under /tmp), KEEP=1 keeps the temp dir,
# PG_ICU_LOCALE (e.g. en-US: PostgreSQL's databases sort by that locale, as
# on a cluster set up with a linguistic one; default C), TENANTS (1: the
# requests go in turn with the keys of that many tenants), DB_CPUS (unset:
# every process shares every CPU; a CPU list such as 1: the PostgreSQL
# server runs on those CPUs only and wrk, the simulator and every tollgate
# on the others, as where the database has its own host; each target, off
# included, then has the same CPUs for the gateway).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib/common.sh
. "$here/bench/lib/common.sh"
# shellcheck source=bench/lib/pg.sh
. "$here/bench/lib/pg.sh"

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-256}
WORKERS=${WORKERS:-1}
WRK_THREADS=${WRK_THREADS:-1}
SIM_WORKERS=${SIM_WORKERS:-1}
WARMUP=${WARMUP:-2s}
TARGETS=${TARGETS:-off sqlite postgres}
ROUNDS=${ROUNDS:-1}
TENANTS=${TENANTS:-1}
MODEL=llama-3.1-8b

want() { case " $TARGETS " in *" $1 "*) return 0 ;; esac; return 1; }
# the tenants' names: bench, or bench-01 ... bench-NN
tenant_names() {
  if [ "$TENANTS" -le 1 ]; then echo bench; else seq -f 'bench-%02g' 1 "$TENANTS"; fi
}

LUA="$here/bench/lib/chat.lua"

bench_init ledger.sh
bench_build "${1:-build}"
DATA_ROOT=${DATA_DIR:-$tmp}
command -v wrk >/dev/null || bench_die "wrk not installed (scripts/install-deps.sh)"
warn_if_sanitized "$BUILD_DIR"

# ---- DB_CPUS: the database server on its own CPUs ---------------------------------
LOAD_CPUS=""
if [ -n "${DB_CPUS:-}" ]; then
  command -v taskset >/dev/null || bench_die "DB_CPUS needs taskset (util-linux)"
  case "$DB_CPUS" in *[!0-9,]* | "" | ,* | *,) bench_die "DB_CPUS wants a list of CPU numbers, e.g. 1 or 2,3" ;; esac
  for c in $(seq 0 $(($(nproc) - 1))); do
    case ",$DB_CPUS," in *",$c,"*) ;; *) LOAD_CPUS="${LOAD_CPUS:+$LOAD_CPUS,}$c" ;; esac
  done
  [ -n "$LOAD_CPUS" ] || bench_die "DB_CPUS leaves no CPU for wrk, the simulator and tollgate"
  # this script and everything it starts from now on (wrk, the simulator,
  # tollgate, the PostgreSQL server until it is moved below)
  taskset -a -c -p "$LOAD_CPUS" $$ >/dev/null || bench_die "taskset failed"
fi

SIM_PORT=$(free_port)

# ---- the simulator: no delays, so the gateway is what is measured ----------
"$SIM" --listen "127.0.0.1:$SIM_PORT" --workers "$SIM_WORKERS" --ttft-ms 0 --token-ms 0 \
  --max-num-seqs 4096 --models "$MODEL" 2>"$tmp/sim.log" &
pids+=($!)
wait_http "http://127.0.0.1:$SIM_PORT/health"

# ---- PostgreSQL ------------------------------------------------------------------
PG_PID=""
if want postgres; then
  pg_start
  PG_PID=$(pg_server_pid)
  if [ -n "$LOAD_CPUS" ]; then
    # the postmaster and its processes; the backends it forks later inherit
    for p in "$PG_PID" $(pgrep -P "$PG_PID"); do
      taskset -a -c -p "$DB_CPUS" "$p" >/dev/null || bench_die "taskset of PostgreSQL failed"
    done
  fi
fi

# ---- tollgate, one configuration at a time ---------------------------------------
TG_PID=""
TG_PORT=""
ADMIN_PORT=""
KEY=""
RUN_DIR=""
PG_DB=""
RUN_N=0

# start_tollgate MODE (off | sqlite | postgres)
start_tollgate() {
  local mode=$1 dir database ledger
  RUN_N=$((RUN_N + 1))
  dir="$tmp/tg-$mode-$RUN_N"
  RUN_DIR="$DATA_ROOT/ledger-bench-$mode-$RUN_N"
  TG_PORT=$(free_port)
  ADMIN_PORT=$(free_port)
  mkdir -p "$dir" "$RUN_DIR"
  database=sqlite
  ledger=on
  PG_DB=""
  case "$mode" in
  off) ledger=off ;;
  postgres)
    PG_DB="bench_$RUN_N"
    database=$(pg_new_database "$PG_DB")
    ;;
  esac
  cat >"$dir/tollgate.yaml" <<YAML
listen: 127.0.0.1:$TG_PORT
admin_listen: 127.0.0.1:$ADMIN_PORT
workers: $WORKERS
data_dir: $RUN_DIR
access_log: "off"
health_check_interval: 2s
database: "$database"
ledger: "$ledger"
tenants:
$(for t in $(tenant_names); do printf '  %s:\n    tier: enterprise\n    models_allowed: [%s]\n    priority: high\n' "$t" "$MODEL"; done)
models:
  $MODEL:
    endpoints:
      - {url: "http://127.0.0.1:$SIM_PORT", max_inflight: 4096}
    pricing: {prompt_per_1k_usd: "0.0005", completion_per_1k_usd: "0.0015"}
YAML
  KEYS=""
  for t in $(tenant_names); do
    KEY=$("$TOLLGATE" keys create --config "$dir/tollgate.yaml" --tenant "$t" --name bench \
      2>>"$dir/keys.log") || bench_die "keys create failed for $mode (see KEEP=1 $dir/keys.log)"
    KEYS="$KEYS $KEY"
  done
  "$TOLLGATE" serve --config "$dir/tollgate.yaml" 2>>"$dir/tollgate.log" &
  TG_PID=$!
  pids+=("$TG_PID")
  wait_http "http://127.0.0.1:$ADMIN_PORT/readyz"
  wait_chat_200 "http://127.0.0.1:$TG_PORT" "$KEY" "$MODEL"
}

# ledger_rows MODE: rows the configuration stored (after tollgate stopped)
ledger_rows() {
  case "$1" in
  off) echo 0 ;;
  sqlite)
    python3 - "$RUN_DIR/tollgate.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect("file:%s?mode=ro" % sys.argv[1], uri=True)
print(db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])
PY
    ;;
  postgres) pg_sql "$PG_DB" "SELECT COUNT(*) FROM ledger" ;;
  esac
}

echo "# tollgate usage-ledger benchmark"
machine_header
echo "# load: wrk -t $WRK_THREADS -c $CONNECTIONS -d $DURATION, POST /v1/chat/completions (16 tokens), tollgate workers $WORKERS, sim workers $SIM_WORKERS, rounds $ROUNDS, tenants $TENANTS"
echo "# disk: $(df -P "$DATA_ROOT" | awk 'NR == 2 { print $1 }') ($DATA_ROOT); sqlite $(python3 -c 'import sqlite3; print(sqlite3.sqlite_version)')"
if want postgres; then echo "# postgres: $(pg_sql tollgate_test 'SHOW server_version'), fsync $(pg_sql tollgate_test 'SHOW fsync'), synchronous_commit $(pg_sql tollgate_test 'SHOW synchronous_commit'), databases' collation ${PG_ICU_LOCALE:+ICU }${PG_ICU_LOCALE:-C}"; fi
echo "# build: $BUILD_DIR"
if [ -n "$LOAD_CPUS" ]; then
  echo "# cpus: PostgreSQL server on $DB_CPUS; wrk, simulator and tollgate on $LOAD_CPUS"
else
  echo "# cpus: $(nproc), shared by wrk, simulator, tollgate and the PostgreSQL server"
fi

export TG_BENCH_MODEL="$MODEL"
results=()
checks=()
for round in $(seq 1 "$ROUNDS"); do
  for mode in $(round_order "$round" off sqlite postgres); do
    want "$mode" || continue
    start_tollgate "$mode"
    export TG_BENCH_KEY="$KEY"
    if [ "$TENANTS" -gt 1 ]; then export TG_BENCH_KEYS="$KEYS"; fi
    srv=""
    if [ "$mode" = postgres ]; then srv=$PG_PID; fi
    line=$(run_wrk_cpu "$mode" "http://127.0.0.1:$TG_PORT" "$TG_PID" "$srv") || exit 1
    results+=("$round $line")
    # records per committed batch, since the start (warm-up included)
    batch=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '
      /^llm_ledger_transactions_total / { t = $2 }
      /^llm_ledger_records_total\{outcome="committed"\}/ { r = $2 }
      END { if (t > 0) printf "%.1f", r / t; else printf "-" }')
    echo "# round $round: $line  (records per batch $batch)"
    bench_stop "$TG_PID"     # SIGTERM: drains, every record is written
    # answers in the measured run = req/s x seconds; the warm-up and the
    # readiness probe add more rows, never fewer
    answered=$(echo "$line" | awk -v d="$DURATION" '{ sub(/s$/, "", d); printf "%d", $2 * d }')
    checks+=("$mode $(ledger_rows "$mode") $answered")
    rm -rf "$RUN_DIR"
    # the server's dirty pages of this run are flushed now (DROP DATABASE
    # checkpoints), not during a later target's measurement
    if [ -n "$PG_DB" ]; then pg_sql tollgate_test "DROP DATABASE $PG_DB" >/dev/null; fi
  done
done

printf '%s\n' "${results[@]}" | awk '
  BEGIN { printf "%-10s %12s %10s %10s %8s %8s %12s %12s\n", "target", "req/s", "p50 ms", "p99 ms", "non-2xx", "errors", "gw us/req", "db us/req" }
  # fields: round target req/s p50 p99 non2xx errors gw_cpu_us db_cpu_us
  { gw[$2] += $8; db[$2] += $9; nr[$2]++ }
  # the best round of each target (by req/s)
  !($2 in rps) || $3 > rps[$2] { rps[$2] = $3; p50[$2] = $4; p99[$2] = $5; n2[$2] = $6; er[$2] = $7; if (!($2 in seen)) { order[++n] = $2; seen[$2] = 1 } }
  END {
    # CPU per answer: the mean over the rounds
    for (i = 1; i <= n; i++) { t = order[i]; printf "%-10s %12d %10.2f %10.2f %8d %8d %12.1f %12.1f\n", t, rps[t], p50[t], p99[t], n2[t], er[t], gw[t] / nr[t], db[t] / nr[t] }
    if (rps["off"] > 0 && p99["off"] > 0) {
      for (i = 1; i <= n; i++) {
        t = order[i]
        if (t == "off") continue
        printf "%s/off: req/s %.3f (best of each)  p99 %.2f\n", t, rps[t] / rps["off"], p99[t] / p99["off"]
        printf "%s: the ledger costs %.1f us of gateway CPU and %.1f us of database-server CPU per answer\n", t, gw[t] / nr[t] - gw["off"] / nr["off"], db[t] / nr[t]
      }
    }
  }'
# the verdict: the median of the ratios within each round (off measured in
# the same round), steadier than best against best when the machine is shared
printf '%s\n' "${results[@]}" | round_ratio_medians off "sqlite:0.90 postgres:0.90"

# every configuration with a ledger stored at least one row per answer
printf '%s\n' "${checks[@]}" | awk '
  $1 != "off" {
    printf "%s: %d ledger rows for ~%d answers in the measured run%s\n", $1, $2, $3, ($2 >= $3 * 0.99) ? "" : "  (MISSING ROWS)"
    if ($2 < $3 * 0.99) bad = 1
  }
  END { exit bad }' || bench_die "a configuration stored fewer rows than it answered"

bad=$(printf '%s\n' "${results[@]}" | awk '$6 > 0 || $7 > 0 { print $2 }' | sort -u)
if [ -n "$bad" ]; then
  echo "ledger.sh: non-2xx answers or socket errors from: $bad (see KEEP=1 logs)" >&2
fi
