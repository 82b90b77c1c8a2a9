"""A real Prometheus for the integration tests (stdlib only).

`Prometheus(targets)` runs Debian's `prometheus` binary (package
`prometheus`, installed by scripts/install-deps.sh) on a free loopback port
with the shipped deploy/prometheus/prometheus.yml, changed only where a test
must: the scrape targets (the gateways' admin listeners, or any exporter),
1 s scrape and evaluation intervals, a 1 s scrape timeout and an absolute path
to the shipped rules. Its TSDB lives in a temp dir of the harness; the
process is a tgtest.Proc, so tgtest.kill_all() (and the pytest fixtures)
end it even when a test fails.

Queries go through the HTTP API (/api/v1/...): `query(expr)` returns the
result vector, `series(expr)` a {labels: value} map without the scrape's
job/instance labels, `value(expr)` a single sample. `wait_scrape_after(t)`
waits until every target has been scraped at or after wall-clock time t, so
a test can assert what Prometheus holds about traffic that ended before t
without polling for the values it expects.
"""

import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request

import tgtest

PROM_DIR = os.path.join(tgtest.REPO, "deploy", "prometheus")
RULES = os.path.join(PROM_DIR, "tenant-alerts.yaml")
PROM_CONFIG = os.path.join(PROM_DIR, "prometheus.yml")
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# labels Prometheus adds to every scraped series
SCRAPE_LABELS = ("job", "instance")


def available():
    """True when the prometheus binary is installed."""
    return os.access(PROMETHEUS, os.X_OK)


def config_text(targets, rules=RULES, interval_s=1):
    """The shipped prometheus.yml with the test's targets ("host:port"
    strings), intervals of interval_s seconds and an absolute rules path
    (or no rules when rules is None). Raises AssertionError when the shipped
    file no longer has a line this edits (the test would silently use it
    unchanged otherwise)."""
    with open(PROM_CONFIG, encoding="utf-8") as f:
        text = f.read()
    tlist = ", ".join('"%s"' % t for t in targets)
    edits = [("scrape_interval: 15s", "scrape_interval: %ds" % interval_s),
             ("evaluation_interval: 15s", "evaluation_interval: %ds" % interval_s),
             ("scrape_timeout: 10s", "scrape_timeout: %ds" % interval_s),
             ('targets: ["127.0.0.1:8081"]', "targets: [%s]" % tlist),
             ("  - tenant-alerts.yaml", "  - %s" % rules if rules else "  []")]
    for old, new in edits:
        assert old in text, "deploy/prometheus/prometheus.yml has no %r" % old
        text = text.replace(old, new)
    if rules is None:
        text = text.replace("rule_files:\n  []", "rule_files: []")
    return text


class Prometheus:
    """Debian's prometheus scraping `targets` ("host:port", the /metrics
    path of the shipped config) every interval_s seconds; started by the
    constructor, ready (GET /-/ready 200) when it returns."""

    def __init__(self, targets, rules=RULES, interval_s=1, timeout=30.0):
        self.targets = list(targets)
        self.dir = tgtest.make_tmpdir("tg-prom-")
        self.config = os.path.join(self.dir, "prometheus.yml")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(config_text(self.targets, rules, interval_s))
        self.port = tgtest.free_port()
        self.proc = tgtest.Proc("prometheus-%d" % self.port, [
            PROMETHEUS, "--config.file=" + self.config,
            "--storage.tsdb.path=" + os.path.join(self.dir, "data"),
            "--web.listen-address=127.0.0.1:%d" % self.port,
            "--log.level=warn"], self.dir)
        tgtest.wait_for(tgtest.alive_check(self.proc)(self.ready), timeout=timeout,
                        what="prometheus ready")

    def ready(self):
        with urllib.request.urlopen("http://127.0.0.1:%d/-/ready" % self.port, timeout=2) as r:
            return r.status == 200

    def api(self, path, **params):
        """GET /api/v1/<path>?params; the decoded JSON (also for a 4xx, whose
        body says why)."""
        url = "http://127.0.0.1:%d/api/v1/%s" % (self.port, path)
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def query(self, expr):
        """The instant vector of expr (the API's result list)."""
        r = self.api("query", query=expr)
        assert r["status"] == "success", "%s: %s" % (expr, r)
        assert r["data"]["resultType"] == "vector", (expr, r["data"]["resultType"])
        return r["data"]["result"]

    def series(self, expr, text=False):
        """{(("label", "value"), ...): value} for expr, without job/instance
        (labels sorted by name). Values are floats, or Prometheus' own text
        with text=True. Two samples that differ only in job/instance are an
        error (the tests scrape each gateway once)."""
        out = {}
        for s in self.query(expr):
            key = tuple(sorted((k, v) for k, v in s["metric"].items() if k not in SCRAPE_LABELS))
            assert key not in out, "%s: two samples for %s" % (expr, key)
            out[key] = s["value"][1] if text else float(s["value"][1])
        return out

    def value(self, expr, text=False):
        """The single sample of expr (float, or its text); None when empty."""
        res = self.series(expr, text=text)
        assert len(res) <= 1, "%s: %d samples: %s" % (expr, len(res), res)
        return next(iter(res.values())) if res else None

    def targets_health(self):
        """{scrapeUrl: (health, lastScrape text, lastError)} of the active targets."""
        return {t["scrapeUrl"]: (t["health"], t["lastScrape"], t.get("lastError", ""))
                for t in self.api("targets")["data"]["activeTargets"]}

    def wait_scrape_after(self, t, timeout=15.0):
        """Waits until every target has a successful scrape (up == 1) whose
        timestamp is >= t (Unix seconds); returns the oldest such timestamp."""
        want = len(self.targets)

        def scraped():
            # timestamp() of a plain selector is the sample's own (scrape)
            # time; of an expression (`up == 1`) it would be the query's time
            stamps = [float(s["value"][1]) for s in self.query("timestamp(up)")]
            ups = [float(s["value"][1]) for s in self.query("up")]
            if len(stamps) == want and min(stamps) >= t and ups == [1.0] * want:
                return min(stamps)
            return None

        return tgtest.wait_for(tgtest.alive_check(self.proc)(scraped), timeout=timeout,
                               interval=0.2, what="a scrape of every target after %.3f" % t)

    def alerts(self):
        """{(alertname, tenant or ""): alert} from /api/v1/alerts."""
        out = {}
        for a in self.api("alerts")["data"]["alerts"]:
            out[(a["labels"]["alertname"], a["labels"].get("tenant", ""))] = a
        return out

    def stop(self, timeout=15.0):
        """SIGTERM; returns the exit code (0 on a clean shutdown)."""
        return self.proc.stop(timeout)

    def kill(self):
        self.proc.kill()

    def tail(self, n=40):
        return self.proc.tail(n)


def wait_until(pred, timeout=10.0, what="condition"):
    """tgtest.wait_for with a 0.2 s interval (a scrape every second)."""
    return tgtest.wait_for(pred, timeout=timeout, interval=0.2, what=what)


def now():
    return time.time()
