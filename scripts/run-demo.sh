#!/usr/bin/env bash
# `make run`: starts the bundled simulator on 127.0.0.1:8000 and the gateway
# with examples/tollgate.yaml in the foreground, with a demo key for the seed
# tenant startup-xyz, and prints a curl line that works. Ctrl-C stops both.
set -euo pipefail

build=${1:-build}
config=${2:-examples/tollgate.yaml}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
tg="$build/tollgate"
sim="$build/tollgate-sim"

"$tg" check-config --config "$config" >/dev/null

# The simulator plays the seed's three models, with a little latency so the
# stream is visible.
"$sim" --listen 127.0.0.1:8000 --ttft-ms 80 --token-ms 15 \
  --models llama-3.1-70b,llama-3.1-8b,nomic-embed-text 2>/tmp/tollgate-sim.log &
sim_pid=$!
trap 'kill $sim_pid 2>/dev/null || true' EXIT

data_dir=$(dirname "$config")/data
mkdir -p "$data_dir"
keyfile="$data_dir/demo.key"
if [ ! -s "$keyfile" ]; then
  (umask 077 && "$tg" keys create --config "$config" --tenant startup-xyz --name demo \
    >"$keyfile" 2>/dev/null)
fi
key=$(cat "$keyfile")

cat <<MSG

Tollgate is starting on http://127.0.0.1:8080 (admin http://127.0.0.1:8081) in
front of tollgate-sim on 127.0.0.1:8000. Demo key for tenant startup-xyz: $key

Try:
  curl -s http://127.0.0.1:8080/v1/chat/completions -H "Authorization: Bearer $key" \\
    -H 'Content-Type: application/json' \\
    -d '{"model":"llama-3.1-8b","messages":[{"role":"user","content":"Hello!"}],"max_tokens":16}'

Streaming: add "stream": true to the body and pass -N to curl.
More keys: $tg keys create --config $config --tenant acme-corp
Stop with Ctrl-C.

MSG
"$tg" serve --config "$config"
