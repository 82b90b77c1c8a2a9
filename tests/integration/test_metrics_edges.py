"""Metrics at their edges: counters that stay monotonic across reloads."""

import copy
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import tgtest  # noqa: E402

M1, M2 = tgtest.DEFAULT_MODELS[0], tgtest.DEFAULT_MODELS[1]


def _samples(gw, name):
    """{labels text: value} of the gateway's own exposition for name."""
    text = tgtest.admin(gw, "/metrics").body.decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^%s(\{[^}]*\}) (\S+)$" % re.escape(name), text, re.M)}


def test_upstream_error_counters_survive_a_model_removed_and_added_back(tg):
    """A model taken out of the config by a reload and put back by the next
    keeps its endpoints' error counts: a counter that went back to 0 would
    read as a reset, and the errors before it would be lost to an alert
    that sums the increase over the window."""
    sim1, sim2 = tg.sim(), tg.sim()
    tenants = {"acme": tgtest.limited_tenant(models=[M1, M2])}
    # one worker: after a request and a scrape, no thread holds the old config
    gw = tg.gateway({M1: [sim1.url], M2: [sim2.url]}, tenants=tenants, workers=1,
                    overrides={"health_check_interval": "60s"})
    key = gw.keys["acme"]
    for _ in range(3):
        r = tgtest.chat(gw.port, key, model=M2, max_tokens=2,
                        headers={"x-sim-fault": "status:500"})
        assert r.status == 500, r
    series = '{pool="%s",endpoint="%s",kind="status"}' % (M2, sim2.url)
    assert _samples(gw, "llm_upstream_errors_total")[series] == 3

    full = copy.deepcopy(gw.config)
    gw.config["models"].pop(M2)
    gw.config["tenants"]["acme"]["models_allowed"] = [M1]
    tgtest.gateway_reload(gw)
    assert tgtest.chat(gw.port, key, model=M1, max_tokens=2).status == 200
    assert series not in _samples(gw, "llm_upstream_errors_total")
    assert tgtest.chat(gw.port, key, model=M1, max_tokens=2).status == 200

    gw.config = full
    tgtest.gateway_reload(gw)
    r = tgtest.chat(gw.port, key, model=M2, max_tokens=2, headers={"x-sim-fault": "status:500"})
    assert r.status == 500, r
    assert _samples(gw, "llm_upstream_errors_total")[series] == 4



def test_a_tenant_a_reload_removes_shows_its_last_figures_then_goes(tg):
    """A tenant taken out of the config keeps its series until a scrape has
    shown their last figures, then they leave /metrics (Prometheus marks
    them stale) and its entries make room for new tenants. Every scrape in
    between shows the whole count or nothing: a part of it would read as a
    counter reset. Before, the series stayed for the process's life."""
    sim = tg.sim()
    tenants = {"acme": tgtest.limited_tenant(models=[M1]),
               "leaving": tgtest.limited_tenant(models=[M1])}
    gw = tg.gateway({M1: [sim.url]}, tenants=tenants, keys=("acme", "leaving"), workers=2)
    for _ in range(4):
        assert tgtest.chat(gw.port, gw.keys["leaving"], model=M1, max_tokens=2).status == 200
    assert tgtest.chat(gw.port, gw.keys["acme"], model=M1, max_tokens=2).status == 200
    gone = '{tenant="leaving"}'
    assert _samples(gw, "llm_tenant_requests_total")[gone] == 4

    gw.config["tenants"].pop("leaving")
    tgtest.gateway_reload(gw)
    seen = []

    def left():
        s = _samples(gw, "llm_tenant_requests_total")
        seen.append(s.get(gone))
        return gone not in s
    tgtest.wait_for(left, timeout=10.0, interval=0.2, what="the removed tenant's series to go")
    assert set(seen) <= {4.0, None}, seen
    assert 4.0 in seen, seen  # its last figures were shown before they went
    s = _samples(gw, "llm_tenant_requests_total")
    assert gone not in s and s['{tenant="acme"}'] == 1
    text = tgtest.admin(gw, "/metrics").body.decode()
    assert re.search(r"^llm_metrics_overflow_requests_total 0$", text, re.M), text[-2000:]

def _hold(gw, key, model):
    """A stream that takes its slot and keeps it (the upstream stalls)."""
    st = tgtest.SSEStream(gw.port, tgtest.chat_body(model, max_tokens=5, stream=True),
                          key=key, headers={"x-sim-fault": "stall-after:1"})
    assert st.status == 200, st.headers
    return st


def test_each_refusal_counts_under_the_limit_that_refused(tg):
    """Every kind of refusal counts in llm_rate_limit_rejections_total under
    the limit its answer names (a daily and a monthly budget both under
    `budget`, a shed under `queue`), once, and never as an error."""
    sim, sim2 = tg.sim(), tg.sim()
    lt = tgtest.limited_tenant
    tenants = {"rpm": lt(rpm=1), "tpm": lt(tpm=100), "day": lt(daily="0.000001"),
               "month": lt(monthly="0.000001"), "conc": lt(concurrency=1),
               "q": lt(models=[M2])}
    models = {M1: [sim.url], M2: tgtest.model_entry([sim2.url], max_inflight=1)}
    gw = tg.gateway(models, tenants=tenants, keys=tuple(tenants),
                    overrides={"queue_max": 0, "health_check_interval": "60s"})
    want = {"rpm": ("requests", 429), "tpm": ("tokens", 429), "day": ("budget", 402),
            "month": ("budget", 402), "conc": ("concurrency", 429), "q": ("queue", 503)}
    held = [_hold(gw, gw.keys["conc"], M1), _hold(gw, gw.keys["q"], M2)]
    try:
        refused = {}
        for tenant in ("rpm", "tpm", "day", "month", "conc", "q"):
            model = M2 if tenant == "q" else M1
            for _ in range(2):
                r = tgtest.chat(gw.port, gw.keys[tenant], model=model, max_tokens=60)
                if r.status != 200:
                    refused[tenant] = refused.get(tenant, 0) + 1
                    assert r.status == want[tenant][1], (tenant, r)
        assert refused == {"rpm": 1, "tpm": 1, "day": 2, "month": 2, "conc": 2, "q": 2}, refused
        rej = {k: v for k, v in _samples(gw, "llm_rate_limit_rejections_total").items() if v}
        assert rej == {'{tenant="%s",limit="%s"}' % (t, want[t][0]): float(n)
                       for t, n in refused.items()}, rej
        errors = _samples(gw, "llm_tenant_errors_total")
        assert not errors, errors
    finally:
        for st in held:
            st.abort()
