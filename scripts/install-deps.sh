#!/usr/bin/env bash
# Installs every Debian package the build, the tests and the benchmarks need,
# and the npm packages of the JS conformance client. Idempotent: when all is
# present it only checks and returns.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)

PKGS=(
  build-essential cmake pkg-config
  libuv1-dev node-llhttp libcurl4-openssl-dev libssl-dev libjansson-dev libcjson-dev
  libyaml-dev libsqlite3-dev libhiredis-dev libpq-dev libcmocka-dev
  python3 python3-pytest python3-pytest-xdist sqlite3 curl libfaketime
  redis-server postgresql prometheus nginx-light wrk
)
# Node.js and npm for the JS conformance client: Debian's, unless the machine
# already has a node and npm of its own (npm then ships with that nodejs).
command -v node >/dev/null 2>&1 || PKGS+=(nodejs)
command -v npm >/dev/null 2>&1 || PKGS+=(npm)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts these services on install; the tests start their own.
  for svc in nginx redis-server prometheus postgresql; do
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
fi

# The official OpenAI JS client for the conformance test (npm registry).
if [ -f "$here/tests/client/package.json" ] && [ ! -d "$here/tests/client/node_modules/openai" ]; then
  echo "install-deps: npm install in tests/client"
  if ! (cd "$here/tests/client" && npm install --no-audit --no-fund --loglevel=error); then
    # the gateway and its demo do not need it: only the conformance test
    echo "install-deps: npm install failed (is the npm registry reachable?): the JS" \
         "conformance test (make test) needs it, the build and make run do not" >&2
    [ "${TG_DEPS_NPM_OPTIONAL:-0}" = 1 ] || exit 1
  fi
fi
exit 0
