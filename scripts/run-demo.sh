#!/usr/bin/env bash
# `make run`: starts the bundled simulator on 127.0.0.1:8000 and the gateway
# with examples/tollgate.yaml, with a demo key for the seed tenant
# startup-xyz, and prints a curl line that works once both answer. Ctrl-C
# (or SIGTERM to this script) stops both.
set -euo pipefail

build=${1:-build}
config=${2:-examples/tollgate.yaml}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
tg="$build/tollgate"
sim="$build/tollgate-sim"

"$tg" check-config --config "$config" >/dev/null

data_dir=$(dirname "$config")/data
mkdir -p "$data_dir"
sim_log="$data_dir/tollgate-sim.log"
sim_pid=
tg_pid=
stop() {
  if [ -n "$tg_pid" ]; then
    kill -TERM "$tg_pid" 2>/dev/null || true
    wait "$tg_pid" 2>/dev/null || true
  fi
  if [ -n "$sim_pid" ]; then
    kill -TERM "$sim_pid" 2>/dev/null || true
  fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The simulator plays the seed's three models, with a little latency so the
# stream is visible.
"$sim" --listen 127.0.0.1:8000 --ttft-ms 80 --token-ms 15 --answer-tokens 64 \
  --models llama-3.1-70b,llama-3.1-8b,nomic-embed-text 2>"$sim_log" &
sim_pid=$!
for _ in $(seq 50); do
  grep -q "listening on" "$sim_log" 2>/dev/null && break
  if ! kill -0 "$sim_pid" 2>/dev/null; then
    echo "run-demo: tollgate-sim did not start ($sim_log):" >&2
    cat "$sim_log" >&2
    exit 1
  fi
  sleep 0.1
done

# The demo key, made once and kept in the data directory; made again when
# it was revoked or expired.
keyfile="$data_dir/demo.key"
key=$(cat "$keyfile" 2>/dev/null || true)
id=$(printf '%s' "$key" | sed -n 's/^tg-\([0-9a-f]\{12\}\)-[0-9a-f]\{48\}$/\1/p')
if [ -z "$id" ] || ! "$tg" keys list --config "$config" --json |
    grep -q "\"id\":\"$id\".*\"status\":\"active\""; then
  key=$("$tg" keys create --config "$config" --tenant startup-xyz --name demo)
  (umask 077 && printf '%s\n' "$key" >"$keyfile")
fi

tg_log="$data_dir/tollgate.log"
: >"$tg_log"
"$tg" serve --config "$config" 2> >(tee "$tg_log" >&2) &
tg_pid=$!
# the gateway says "serving on" once it listens; a failure ends it
for _ in $(seq 100); do
  grep -q "serving on" "$tg_log" && break
  if ! kill -0 "$tg_pid" 2>/dev/null; then
    tg_pid=
    echo "run-demo: tollgate did not start (above)" >&2
    exit 1
  fi
  sleep 0.1
done

cat <<MSG

Tollgate is running on http://127.0.0.1:8080 (admin http://127.0.0.1:8081) in
front of tollgate-sim on 127.0.0.1:8000 (its log: $sim_log). Demo key for
tenant startup-xyz: $key

Try:
  curl -s http://127.0.0.1:8080/v1/chat/completions -H "Authorization: Bearer $key" \\
    -H 'Content-Type: application/json' \\
    -d '{"model":"llama-3.1-8b","messages":[{"role":"user","content":"Hello!"}],"max_tokens":16}'

Streaming: add "stream": true to the body and pass -N to curl.
More keys: $tg keys create --config $config --tenant acme-corp
Stop with Ctrl-C.

MSG
wait "$tg_pid"
