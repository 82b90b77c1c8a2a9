#!/usr/bin/env bash
# Checks the shipped Prometheus files with promtool (Debian's `prometheus`
# package, installed by scripts/install-deps.sh):
#   promtool check rules   deploy/prometheus/tenant-alerts.yaml
#   promtool check config  deploy/prometheus/prometheus.yml   (loads the rules too)
#   promtool test rules    deploy/prometheus/tenant-alerts.test.yaml
# Prints each command and its output; runs all three even when one fails and
# exits non-zero when any failed (or promtool is missing). Runs from any
# directory.
set -u

here=$(cd "$(dirname "$0")/../.." && pwd)
prom="$here/deploy/prometheus"

promtool=$(command -v promtool || true)
if [ -z "$promtool" ] && [ -x /usr/bin/promtool ]; then
  promtool=/usr/bin/promtool
fi
if [ -z "$promtool" ]; then
  echo "test_promtool: promtool not found (apt-get install prometheus, or run scripts/install-deps.sh)" >&2
  exit 2
fi
echo "test_promtool: using $promtool ($("$promtool" --version 2>&1 | head -n 1))"

failed=0
run() {
  echo "+ $*"
  # promtool reports failures on stderr: keep them in order with the rest
  if "$@" 2>&1; then
    echo "  -> ok"
  else
    echo "  -> FAILED (exit $?)"
    failed=$((failed + 1))
  fi
}

run "$promtool" check rules "$prom/tenant-alerts.yaml"
run "$promtool" check config "$prom/prometheus.yml"
run "$promtool" test rules "$prom/tenant-alerts.test.yaml"

if [ "$failed" -ne 0 ]; then
  echo "test_promtool: $failed of 3 checks FAILED"
  exit 1
fi
echo "test_promtool: all 3 checks passed"
exit 0
