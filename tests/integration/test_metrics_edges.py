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
