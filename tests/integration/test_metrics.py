"""Per-tenant metrics end to end: a real gateway in front of the simulator,
scraped every second by a real Prometheus (Debian's, tests/lib/promtest.py)
loaded with the shipped config and rules; every figure is read back through
Prometheus' query API and compared with what the client saw and with the
ledger.

Traffic (two tenants, one test, well under 90 s):
- tenant A (daily budget 0.0002 USD, alert at 80 %): one unknown model (404),
  one model it may not use (403), one upstream failure (the simulator's
  injected 500), then chats until the budget refuses two of them (402). The
  settled spend crosses 80 % exactly once.
- tenant B (5 requests per minute): a burst of chats, some refused (429).

Checks, through /api/v1/query after a scrape that followed the traffic:
- llm_tenant_daily_spend_usd{A} equals the ledger's spend (`tollgate usage`)
  to the nano-USD, and the gateway's own exposition prints the same text;
- llm_rate_limit_rejections_total{B,requests} equals the 429s the client saw,
  {A,budget} the 402s;
- llm_tenant_requests_total equals the requests sent per tenant;
- llm_tenant_errors_total holds exactly the 4xx/5xx the client saw, and no
  429 or 402;
- the token counters equal the usage the client saw per (tenant, model);
- llm_budget_threshold_events_total{A,day} is 1;
- the seed's TenantBudgetWarning expression returns tenant A (only), and
  the shipped rule's alert is pending for A.
And `metrics: off` takes the route away.
"""

import collections
import decimal
import os
import re
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import promtest  # noqa: E402
import tgtest  # noqa: E402

pytestmark = pytest.mark.skipif(not promtest.available(), reason="prometheus not installed")

M1, M2 = tgtest.DEFAULT_MODELS[0], tgtest.DEFAULT_MODELS[1]
DAILY_A = "0.0002"          # USD: a handful of 20-token chats
ALERT_A = 80                # percent
RPM_B = 5
B_BURST = 9                 # requests B sends at once: RPM_B pass, the rest are 429
NANO = decimal.Decimal("0.000000001")
SEED_BUDGET_EXPR = "llm_tenant_daily_spend_usd / llm_tenant_daily_budget_usd > 0.80"


class Client:
    """What the client saw, per tenant: statuses and the usage of each 200."""

    def __init__(self):
        self.sent = collections.Counter()                  # tenant -> requests
        self.status = collections.defaultdict(collections.Counter)   # tenant -> status -> n
        self.prompt = collections.Counter()                # (tenant, model) -> tokens
        self.completion = collections.Counter()

    def chat(self, port, tenant, key, model, **kw):
        r = tgtest.chat(port, key, model=model, **kw)
        self.sent[tenant] += 1
        self.status[tenant][r.status] += 1
        if r.status == 200:
            u = r.json()["usage"]
            self.prompt[(tenant, model)] += u["prompt_tokens"]
            self.completion[(tenant, model)] += u["completion_tokens"]
        return r

    def errors(self):
        """{(tenant, code text): n} for every status >= 400 but 429 and 402."""
        out = {}
        for tenant, st in self.status.items():
            for code, n in st.items():
                if code >= 400 and code not in (429, 402):
                    out[(tenant, str(code))] = n
        return out


def _by(series, *labels):
    """{label values tuple: value} of promtest series, dropping zero samples."""
    out = {}
    for key, v in series.items():
        d = dict(key)
        if v != 0:
            out[tuple(d[x] for x in labels)] = v
    return out


def test_prometheus_sees_what_the_client_and_the_ledger_saw(tg):
    sim = tg.sim()
    tenants = {
        "A": tgtest.limited_tenant(models=[M1], daily=DAILY_A, alert=ALERT_A),
        "B": tgtest.limited_tenant(models=[M1], rpm=RPM_B),
    }
    gw = tg.gateway({M1: [sim.url], M2: [sim.url]}, tenants=tenants, keys=("A", "B"))
    prom = promtest.Prometheus(["127.0.0.1:%d" % gw.admin_port])
    try:
        _run(gw, prom)
    finally:
        rc = prom.stop()
        assert rc == 0, prom.tail()


def _run(gw, prom):
    c = Client()
    ka, kb = gw.keys["A"], gw.keys["B"]
    # Prometheus scrapes the gateway before any traffic: the target is up
    prom.wait_scrape_after(time.time())
    health = prom.targets_health()
    assert list(health) == ["http://127.0.0.1:%d/metrics" % gw.admin_port], health
    assert all(h[0] == "up" for h in health.values()), health

    # tenant A: errors of three kinds, then chats until the budget refuses twice
    assert c.chat(gw.port, "A", ka, "no-such-model").status == 404
    assert c.chat(gw.port, "A", ka, M2).status == 403
    r = c.chat(gw.port, "A", ka, M1, max_tokens=5, headers={"x-sim-fault": "status:500"})
    assert r.status >= 500, r
    refused = 0
    for _ in range(30):
        r = c.chat(gw.port, "A", ka, M1, max_tokens=20)
        assert r.status in (200, 402), r
        if r.status == 402:
            refused += 1
            if refused == 2:
                break
    assert refused == 2 and c.status["A"][200] >= 4, c.status["A"]

    # tenant B: a burst past its requests per minute
    for _ in range(B_BURST):
        r = c.chat(gw.port, "B", kb, M1, max_tokens=5)
        assert r.status in (200, 429), r
    n429 = c.status["B"][429]
    assert 1 <= n429 <= B_BURST - 1 and c.status["B"][200] >= 1, c.status["B"]

    # one scrape after the last response (settled before its last byte)
    prom.wait_scrape_after(time.time() + 0.2)

    # the ledger's spend for A today, exact
    day = tgtest.utc_day()
    usage_text = gw.tool("usage", "--tenant", "A", "--day", day).stdout
    tgtest.usd9_fields(usage_text)
    spend = tgtest.money_json(usage_text)["spend_usd"]
    assert isinstance(spend, decimal.Decimal) and spend > 0, usage_text
    budget = decimal.Decimal(DAILY_A)
    assert spend / budget > decimal.Decimal("0.80"), (spend, budget)   # the traffic did cross

    # daily spend: Prometheus' float within 1e-9 of the ledger, and the same
    # figure exactly (9 decimals) in the gateway's exposition
    got = prom.value('llm_tenant_daily_spend_usd{tenant="A"}', text=True)
    expo = tgtest.admin(gw, "/metrics").body.decode()
    spend_lines = [x for x in expo.splitlines() if x.startswith("llm_tenant_daily_")]
    assert got is not None, ("no daily spend series for A", spend_lines)
    assert abs(decimal.Decimal(got) - spend) < NANO, (got, spend, spend_lines)
    assert decimal.Decimal(got).quantize(NANO) == spend, (got, spend)
    m = re.search(r'^llm_tenant_daily_spend_usd\{tenant="A"\} (\S+)$', expo, re.M)
    assert m and m.group(1) == "%s" % spend, (m and m.group(0), spend)
    assert prom.value('llm_tenant_daily_budget_usd{tenant="A"}') == float(budget)
    assert prom.value('llm_tenant_daily_budget_usd{tenant="B"}') is None   # B: no budget

    # requests per tenant: every request sent, whatever its answer
    req = _by(prom.series("llm_tenant_requests_total"), "tenant")
    assert req == {(t,): float(n) for t, n in c.sent.items()}, (req, c.sent)

    # limit refusals: B's 429s by `requests`, A's 402s by `budget`, nothing else
    rej = _by(prom.series("llm_rate_limit_rejections_total"), "tenant", "limit")
    assert rej == {("B", "requests"): float(n429), ("A", "budget"): 2.0}, (rej, dict(c.status))

    # errors: exactly the 4xx/5xx the client saw, never a 429 or a 402
    err_all = prom.series("llm_tenant_errors_total")
    codes = {dict(k)["code"] for k in err_all}
    assert not codes & {"429", "402"}, codes
    err = _by(err_all, "tenant", "code")
    want_err = {k: float(v) for k, v in c.errors().items()}
    assert ("A", "404") in want_err and ("A", "403") in want_err, want_err
    assert err == want_err, (err, want_err)

    # tokens: the usage the client saw, per (tenant, model)
    pt = _by(prom.series("llm_tenant_prompt_tokens_total"), "tenant", "model")
    ct = _by(prom.series("llm_tenant_completion_tokens_total"), "tenant", "model")
    assert pt == {k: float(v) for k, v in c.prompt.items()}, (pt, c.prompt)
    assert ct == {k: float(v) for k, v in c.completion.items()}, (ct, c.completion)

    # latency histograms (by tenant): one observation per answered chat of A
    n_ok_a = float(c.status["A"][200])
    assert prom.value('llm_request_duration_seconds_count{tenant="A"}') >= n_ok_a
    assert prom.value('llm_request_duration_seconds_bucket{tenant="A",le="+Inf"}') == \
        prom.value('llm_request_duration_seconds_count{tenant="A"}')

    # the threshold was crossed once, in the day window
    ev = _by(prom.series("llm_budget_threshold_events_total"), "tenant", "window")
    assert ev.get(("A", "day")) == 1.0, ev
    assert ("B", "day") not in ev, ev

    # the seed's budget warning expression finds A, and only A
    warn = prom.series(SEED_BUDGET_EXPR)
    assert list(warn) == [(("tenant", "A"),)], warn
    assert abs(decimal.Decimal(repr(warn[(("tenant", "A"),)])) - spend / budget) < \
        decimal.Decimal("1e-9"), (warn, spend / budget)

    # and the shipped rule (for: 5m) is pending for A at the next evaluation
    a = promtest.wait_until(lambda: prom.alerts().get(("TenantBudgetWarning", "A")),
                            timeout=10, what="TenantBudgetWarning for A")
    assert a["state"] == "pending" and a["labels"]["severity"] == "warning", a
    assert a["annotations"]["summary"] == "Tenant A at 80% of daily budget", a
    assert ("TenantBudgetWarning", "B") not in prom.alerts()


def test_metrics_off_removes_the_route(tg):
    sim = tg.sim()
    gw = tg.gateway({M1: [sim.url]}, overrides={"metrics": "off"})
    r = tgtest.chat(gw.port, gw.keys["acme"], model=M1, max_tokens=3)
    assert r.status == 200, r
    m = tgtest.admin(gw, "/metrics")
    assert m.status == 404, (m.status, m.body[:200])
    assert b"llm_tenant_requests_total" not in m.body
    assert tgtest.admin(gw, "/healthz").status == 200


def test_long_endpoint_urls_keep_whole_labels(tg):
    """An endpoint's label is its whole URL, however long the config lets it
    be: two URLs alike for their first 700 bytes are two series (the label
    was cut at ~600 bytes, and the scrape had duplicate series, which
    Prometheus refuses). The scrape also says nothing was left out."""
    sim = tg.sim()
    base = sim.url + "/" + "p" * 700
    gw = tg.gateway({M1: [base + "/a", base + "/b"]}, ready=False,
                    overrides={"health_check_interval": "60s"})
    text = tgtest.admin(gw, "/metrics").body.decode()
    ups = [line for line in text.splitlines() if line.startswith("llm_endpoint_up{")]
    assert len(ups) == 2, ups
    assert {u.split('endpoint="')[1].split('"')[0] for u in ups} == {base + "/a", base + "/b"}
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines()
              if line and not line.startswith("#")]
    assert len(series) == len(set(series)), [s for s in series if series.count(s) > 1][:3]
    assert "llm_metrics_omitted_families 0" in text.splitlines()
