#!/usr/bin/env bash
# A throw-away PostgreSQL server for tests: a fresh cluster in its own
# temporary directory, listening on 127.0.0.1 on a free port (and on a unix
# socket inside that directory), trust authentication, one database
# `tollgate_test`, removed again at the end whatever happened.
#
# Two ways to use it:
#
#   pgtest.sh run CMD [ARG...]
#       starts a server, runs CMD with TG_PG_URL (and PGHOST, PGPORT, PGUSER,
#       PGDATABASE) in its environment, stops the server, removes the
#       directory and exits with CMD's status.
#
#   pgtest.sh serve [PORT]
#       for test programs that need to stop and restart the server: prints
#       `url URL`, `dir DIR`, `port PORT` and `ready`, one per line, then
#       reads commands, one per line, on stdin and answers each:
#         stop   -> `stopped`  (fast shutdown: sessions are cut)
#         start  -> `started`  (same port, same data)
#         quit   -> stops, cleans up, exits
#       End of input counts as quit, so a caller that dies (even by SIGKILL)
#       still gets its server stopped and its directory removed: keep the
#       pipe to our stdin open for as long as the server is needed.
#       Any failure prints `error WHY` and exits non-zero.
#
# PostgreSQL refuses to run as root: as root, the cluster belongs to the
# `postgres` user and its programs run through runuser. The binaries are
# found in PG_BIN, else the newest /usr/lib/postgresql/*/bin.
set -u

die() {
  echo "error $*"
  exit 1
}

pick_bin() {
  local d
  if [ -n "${PG_BIN:-}" ]; then
    echo "$PG_BIN"
    return
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
      echo "$d"
      return
    fi
  done
}

# A port nobody listens on now (the kernel's pick for a bind to port 0).
free_port() {
  /usr/bin/python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

BIN=$(pick_bin)
[ -n "$BIN" ] || die "no PostgreSQL server binaries (install the postgresql package or set PG_BIN)"

AS=()
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || die "running as root and there is no postgres user"
  AS=(runuser -u postgres --)
fi

DIR=""
PORT=""
RUNNING=0

cleanup() {
  if [ "$RUNNING" = 1 ]; then
    "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m fast -w -t 20 stop >/dev/null 2>&1 ||
      "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m immediate -w -t 10 stop >/dev/null 2>&1
    RUNNING=0
  fi
  if [ -n "$DIR" ] && [ -d "$DIR" ]; then
    rm -rf "$DIR"
  fi
  DIR=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

server_start() {
  "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 30 \
    -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=40" \
    start >/dev/null 2>&1 || return 1
  RUNNING=1
}

server_stop() {
  "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m fast -w -t 20 stop >/dev/null 2>&1 || return 1
  RUNNING=0
}

# Creates the cluster and the database and starts the server on $PORT (or on
# a free port, trying again when another process took it meanwhile).
setup() {
  local want=${1:-} try
  DIR=$(mktemp -d /tmp/tg-pg-XXXXXX) || die "mktemp failed"
  chmod 0700 "$DIR"
  [ ${#AS[@]} -eq 0 ] || chown postgres: "$DIR"
  "${AS[@]}" "$BIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 \
    --no-locale --no-sync --no-instructions >"$DIR/initdb.log" 2>&1 ||
    die "initdb failed: $(tail -n 3 "$DIR/initdb.log" | tr '\n' ' ')"
  for try in 1 2 3 4 5; do
    PORT=${want:-$(free_port)}
    server_start && break
    [ -z "$want" ] || die "cannot start on port $want: $(tail -n 3 "$DIR/server.log" | tr '\n' ' ')"
  done
  [ "$RUNNING" = 1 ] || die "cannot start the server: $(tail -n 3 "$DIR/server.log" | tr '\n' ' ')"
  "${AS[@]}" "$BIN/psql" -X -q -h "$DIR" -p "$PORT" -U postgres -d postgres \
    -c "CREATE DATABASE tollgate_test" >/dev/null 2>&1 || die "CREATE DATABASE failed"
}

url() {
  echo "postgresql://postgres@127.0.0.1:$PORT/tollgate_test"
}

case "${1:-}" in
run)
  shift
  [ $# -gt 0 ] || die "usage: pgtest.sh run CMD [ARG...]"
  setup "" >&2
  TG_PG_URL=$(url) PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres \
    PGDATABASE=tollgate_test "$@"
  exit $?
  ;;
serve)
  setup "${2:-}"
  echo "url $(url)"
  echo "dir $DIR"
  echo "port $PORT"
  echo "ready"
  while IFS= read -r cmd; do
    case "$cmd" in
    stop)
      if [ "$RUNNING" = 0 ] || server_stop; then echo "stopped"; else echo "error stop failed"; fi
      ;;
    start)
      if [ "$RUNNING" = 1 ] || server_start; then echo "started"; else echo "error start failed"; fi
      ;;
    quit)
      break
      ;;
    *)
      echo "error unknown command $cmd"
      ;;
    esac
  done
  exit 0
  ;;
*)
  echo "usage: pgtest.sh run CMD [ARG...] | pgtest.sh serve [PORT]" >&2
  exit 2
  ;;
esac
