# shellcheck shell=bash disable=SC2154  # $here, $tmp, pids: set by the sourcing script
# A throw-away PostgreSQL server for the bench/*.sh scripts (sourced, not
# run; needs bench/lib/common.sh first, for $tmp, the pids array and
# bench_die). It runs tests/lib/pgtest.sh serve as a coprocess: a fresh
# cluster in its own temp directory, run as the postgres user when we are
# root, on a free loopback port, trust authentication, stock settings
# (fsync and synchronous_commit on, as a real deployment has them).
#
#   pg_start                 starts it; sets PG_URL (postgres://...) and PG_PORT
#   pg_new_database NAME     creates an empty database; prints its URL
#   pg_sql DB STATEMENT      runs one statement, prints the rows (unaligned)
#   pg_server_pid            the postmaster's pid
#
# The server stops and its directory goes when the script ends: the exit
# trap's kill of the recorded pid runs pgtest.sh's own clean-up, and the
# coprocess' stdin closing (even if we are killed) makes it quit as well.

PG_URL=""
PG_PORT=""
PSQL=${PSQL:-/usr/bin/psql}

pg_start() {
  local line
  [ -x "$PSQL" ] || bench_die "$PSQL not found (scripts/install-deps.sh installs postgresql)"
  coproc PGTEST { exec bash "$here/tests/lib/pgtest.sh" serve 2>>"$tmp/pgtest.log"; }
  pids+=("$PGTEST_PID")
  while IFS= read -r -t 120 line <&"${PGTEST[0]}"; do
    case "$line" in
    url\ *) PG_URL=${line#url } ;;
    port\ *) PG_PORT=${line#port } ;;
    ready)
      PG_URL=${PG_URL/#postgresql:\/\//postgres://}
      return 0
      ;;
    error*) bench_die "PostgreSQL: ${line#error }" ;;
    esac
  done
  bench_die "PostgreSQL did not start (see KEEP=1 $tmp/pgtest.log)"
}

pg_sql() {
  "$PSQL" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$1" -c "$2"
}

# pg_server_pid: the postmaster's pid (its children are the backends and
# the WAL writer, so cpu_ticks of it counts the whole server)
pg_server_pid() {
  head -1 "$(pg_sql tollgate_test 'SHOW data_directory')/postmaster.pid"
}

# PG_ICU_LOCALE (e.g. en-US): the databases sort by that ICU locale, as a
# cluster set up with a linguistic locale does; default: the cluster's C.
pg_new_database() {
  local how=""
  if [ -n "${PG_ICU_LOCALE:-}" ]; then
    how=" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '$PG_ICU_LOCALE'"
  fi
  pg_sql tollgate_test "CREATE DATABASE $1$how" >/dev/null || bench_die "CREATE DATABASE $1 failed"
  echo "${PG_URL%/*}/$1"
}
