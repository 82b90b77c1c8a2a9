"""The usage ledger with its embedded database (`database: sqlite`): one row
per request that reached an upstream, durable before the answer's last byte.

- 10,000 mixed requests (chat and legacy completions, streamed with and
  without include_usage, streams the client abandons) from concurrent
  clients over three tenants and three models with different prices: every
  request has exactly one row holding what the client observed, and each
  tenant's invoice and daily usage equal the client-observed usage x prices
  to the nano-USD;
- kill -9 in the middle of that load, restart on the same data_dir: every
  response the client saw complete (a non-streamed 200 with its body, a
  stream that delivered `data: [DONE]`) has exactly one row;
- daily and monthly budgets are rebuilt from the ledger at start: after a
  kill -9 and with the saved spend figures erased, the tenant is still
  refused (402) and has exactly the room it had before;
- the admin route serves the CLI's invoice and usage, 401 without or with a
  wrong key, 403 for a tenant key;
- retention: the purge (30 s after start) removes each tenant's rows past
  its retention_days, but never one of the current or previous month;
- faults, abandons and refusals from concurrent clients: one row for each
  request that reached the upstream (an upstream 500, a hang-up before or
  during the answer, a broken body, a stream the client left), none for a
  refusal, and the rows are exactly the access log's requests with an
  endpoint;
- `ledger: off` writes nothing.

Prices: 500/1500, 2650/3500 and 123/987 nano-USD per prompt/completion token.
All money is compared as integers (nano-USD) or decimal.Decimal, never as
float."""

import calendar
import csv
import io
import json
import os
import random
import re
import sqlite3
import subprocess
import threading
import time

import pytest

import tgtest

PRICES_USD = {
    "llama-3.1-8b": ("0.0005", "0.0015"),
    "llama-3.1-70b": ("0.00265", "0.0035"),
    "mistral-7b": ("0.000123", "0.000987"),
}
PRICES = {m: (tgtest.nano_per_token(p), tgtest.nano_per_token(c))
          for m, (p, c) in PRICES_USD.items()}
M = "llama-3.1-8b"
HELLO = "Hello there"      # estimate 27 tokens, sim prompt 9 (see test_budgets.py)


def ledger_tenant(models, **extra):
    """A tenant whose limits never bind (only the ledger is under test)."""
    t = {"tier": "enterprise", "models_allowed": list(models), "priority": "high",
         "rate_limits": {"requests_per_minute": 10000000, "tokens_per_minute": 10000000000,
                         "concurrent_requests": 10000},
         "budget": {"daily_limit_usd": "100000.00", "monthly_limit_usd": "1000000.00",
                    "alert_threshold_percent": 99}}
    t.update(extra)
    return t


TENANTS = {
    "alpha": ledger_tenant(PRICES_USD),
    "beta": ledger_tenant(["llama-3.1-8b", "mistral-7b"]),
    "gamma": ledger_tenant(["llama-3.1-70b"]),
}
KEYS_PER_TENANT = {"alpha": 2, "beta": 1, "gamma": 1}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = tgtest.Sim(workdir=str(tmp_path_factory.mktemp("sim")), workers=2,
                   models=tuple(PRICES_USD))
    s.start()
    try:
        yield s
    finally:
        s.stop(timeout=5)
        s.kill()


def models_cfg(sim):
    return {m: tgtest.model_entry([sim.url], max_inflight=256, prompt=p, completion=c)
            for m, (p, c) in PRICES_USD.items()}


def start_gw(tg, sim, tenants=None, start=True, **overrides):
    gw = tg.gateway(models_cfg(sim), tenants=tenants or TENANTS, keys=(), start=False,
                    overrides=overrides or None)
    if start:
        gw.start()
    return gw


def load_tenants(gw):
    """Keys for the load: {tenant: {"keys": [...], "models": [...]}}."""
    out = {}
    for t, n in KEYS_PER_TENANT.items():
        out[t] = {"keys": [gw.create_key(t, name="load-%s-%d" % (t, i)) for i in range(n)],
                  "models": list(TENANTS[t]["models_allowed"])}
    return out


def failed(outcomes):
    return [o for o in outcomes if o.kind != "abandon" and not o.complete]


# ---------------------------------------------------------------------------

def test_invoices_equal_client_usage_over_10000_requests(tg, sim):
    gw = start_gw(tg, sim)
    tenants = load_tenants(gw)
    load = tgtest.LedgerLoad(gw.port, tenants, count=10000, threads=8, seed=11, abandon=6)
    outcomes = load.run()
    bad = failed(outcomes)
    assert not bad, "%d requests failed, e.g. %r" % (len(bad), bad[:3])
    kinds = {}
    for o in outcomes:
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    # the mix is what the test claims it is
    assert kinds["abandon"] == 6 and min(kinds.values()) >= 6, kinds
    assert kinds["chat"] > 3000 and kinds["stream_usage"] > 2000 and kinds["stream"] > 800, kinds
    ab = [o for o in outcomes if o.kind == "abandon"]
    assert all(o.status == 200 and 1 <= o.events <= 4 for o in ab), ab

    # one row per request, holding exactly what the client saw
    rows = tgtest.sqlite_ledger_rows(gw.db_path)
    assert len(rows) == 10006, len(rows)
    tgtest.check_ledger_rows(outcomes, rows, PRICES, endpoint=sim.url)
    # every tenant's invoice and daily usage: client-observed usage x prices
    tgtest.check_invoices(gw, outcomes, PRICES, tenants)

    # the CSV invoice carries the same lines and total as the JSON one
    month = tgtest.utc_month(outcomes[0].t_start)
    inv = gw.invoice("alpha", month)
    csv = gw.invoice("alpha", month, fmt="csv").splitlines()
    assert csv[0] == "tenant_id,billing_period,model,requests,prompt_tokens," \
                     "completion_tokens,cost_usd,cost_nano_usd", csv[0]
    lines = [ln.split(",") for ln in csv[1:]]
    assert [ln[2] for ln in lines] == sorted(inv["usage_by_model"]) + ["TOTAL"], lines
    for ln in lines[:-1]:
        m = inv["usage_by_model"][ln[2]]
        assert ln[:2] == ["alpha", month]
        assert [int(ln[3]), int(ln[4]), int(ln[5])] == \
            [m["requests"], m["prompt_tokens"], m["completion_tokens"]], ln
        assert re.match(r"^\d+\.\d{9}$", ln[6]) and tgtest.nano_of_usd(ln[6]) == \
            tgtest.nano_of_usd(m["cost_usd"]), ln
        assert re.match(r"^\d+$", ln[7]) and int(ln[7]) == m["cost_nano_usd"], ln
    assert int(lines[-1][3]) == inv["summary"]["total_requests"]
    assert tgtest.nano_of_usd(lines[-1][6]) == tgtest.nano_of_usd(inv["summary"]["total_cost_usd"])
    assert int(lines[-1][7]) == inv["summary"]["total_cost_nano_usd"], lines[-1]

    # a tenant's month with no traffic invoices zero, not an error; a name
    # that is no tenant's and holds no rows is unknown (as on the admin route)
    empty = gw.invoice("alpha", "2001-01")
    assert empty["summary"]["total_requests"] == 0 and empty["usage_by_model"] == {}, empty
    assert tgtest.nano_of_usd(empty["summary"]["total_cost_usd"]) == 0
    cp = gw.tool("invoice", "--tenant", "nobody", "--month", month, check=False)
    assert cp.returncode == 1 and "no tenant 'nobody'" in cp.stderr, cp


def kill9_under_load(gw, tenants, seed):
    """Kills gateway gw with SIGKILL once 1,500 requests of a mixed load
    completed; returns (load, completed outcomes)."""
    load = tgtest.LedgerLoad(gw.port, tenants, count=100000, threads=8, seed=seed,
                             timeout=10).start()
    try:
        tgtest.wait_for(lambda: load.completed() >= 1500, timeout=60,
                        what="1,500 completed requests before the kill")
        t_kill = time.time()
        gw.proc.kill()                       # SIGKILL, mid-load
        assert gw.proc.popen.returncode == -9
        gw.checked_exit = True
        time.sleep(0.3)                      # the clients see the gateway gone
    finally:
        load.stop()
    outcomes = load.wait()
    done = [o for o in outcomes if o.complete]
    cut = [o for o in outcomes if not o.complete and o.t_start is not None and o.t_start < t_kill]
    assert len(done) >= 1500 and cut, "the kill cut no request"
    gw.checked_exit = False
    return load, done


def check_rows_after_kill9(gw, tenants, load, done, rows_of):
    """After the restart of a killed gateway: every response the client saw
    complete has exactly one row; any other row is a request the kill cut;
    the ledger goes on and the invoices add up the rows. rows_of(rid) reads
    the rows of one request id, rows_of(None) all of them."""
    rows = rows_of(None)
    ids = tgtest.by_request_id(rows)         # asserts no request id twice
    # every response the client saw complete has its row, with its usage
    tgtest.check_ledger_rows(done, rows, PRICES, exact_set=False)
    # any other row is a request the kill cut (its record committed, its
    # answer not delivered in full): one that was inside the gateway when it
    # died, so at most one per client thread
    seen = {o.rid for o in done}
    extra = [rid for rid in ids if rid not in seen]
    assert len(extra) <= load.threads, extra

    # after the restart the ledger goes on: the invoice adds up the rows
    key = tenants["beta"]["keys"][0]
    r = tgtest.chat(gw.port, key, model="mistral-7b", max_tokens=7, content=HELLO)
    assert r.status == 200, r
    rows = rows_of(r.header("x-request-id"))
    assert len(rows) == 1 and rows[0]["completion_tokens"] == 7, rows
    all_rows = rows_of(None)
    for tenant in tenants:
        mine = [x for x in all_rows if x["tenant"] == tenant]
        nano = 0
        n = 0
        for month in sorted({time.strftime("%Y-%m", time.gmtime(x["ts_ms"] / 1000))
                             for x in mine}):
            inv = gw.invoice(tenant, month)
            n += inv["summary"]["total_requests"]
            nano += tgtest.nano_of_usd(inv["summary"]["total_cost_usd"])
        assert (n, nano) == (len(mine), sum(x["cost_nano"] for x in mine)), tenant


def test_kill9_mid_load_every_completed_response_has_one_row(tg, sim):
    gw = start_gw(tg, sim)
    tenants = load_tenants(gw)
    load, done = kill9_under_load(gw, tenants, seed=22)
    gw.start()                               # same data_dir, same config
    db = sqlite3.connect(gw.db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()

    def rows_of(rid):
        if rid is None:
            return tgtest.sqlite_ledger_rows(gw.db_path)
        return tgtest.sqlite_ledger_rows(gw.db_path, "WHERE request_id = ?", (rid,))
    check_rows_after_kill9(gw, tenants, load, done, rows_of)


# ---------------------------------------------------------------------------
# budgets come back from the ledger

def usd(nano):
    return "%d.%09d" % (nano // 10**9, nano % 10**9)


def reserve(max_tokens, est=27):
    p, c = PRICES[M]
    return est * p + max_tokens * c


def cost(max_tokens, prompt=9):
    p, c = PRICES[M]
    return prompt * p + max_tokens * c


def ask(gw, key, max_tokens=50):
    return tgtest.chat(gw.port, key, model=M, max_tokens=max_tokens, content=HELLO)


def assert_refused(r, code):
    assert r.status == 402, r
    err = r.error()
    assert (err["type"], err["code"]) == ("insufficient_quota", code), err


def test_budgets_rebuilt_from_the_ledger_after_kill9(tg, sim):
    """200,000 nano-USD budgets; two requests cost 2 x 79,500 and the third
    (88,500 reserved) is refused. After kill -9 and with the saved spend
    figures deleted, only the ledger knows the spend: still 402, and exactly
    41,000 left (40,500 admitted, 42,000 refused)."""
    assert (cost(50), reserve(50), reserve(18), reserve(19)) == (79500, 88500, 40500, 42000)
    tenants = {"day": tgtest.limited_tenant(models=[M], daily=usd(200000)),
               "month": tgtest.limited_tenant(models=[M], monthly=usd(200000))}
    gw = start_gw(tg, sim, tenants=tenants, start=False)
    keys = {t: gw.create_key(t) for t in tenants}
    gw.start()
    for t in tenants:
        assert ask(gw, keys[t]).status == 200
        assert ask(gw, keys[t]).status == 200
        assert_refused(ask(gw, keys[t]), t == "day" and "daily_budget" or "monthly_budget")
    gw.kill()                # at once: the figures saved every second may lag
    gw.checked_exit = True
    db = sqlite3.connect(gw.db_path)
    try:
        with db:
            db.execute("DELETE FROM tenant_spend")
        spent = dict(db.execute("SELECT tenant, SUM(cost_nano) FROM ledger GROUP BY tenant"))
    finally:
        db.close()
    assert spent == {"day": 159000, "month": 159000}, spent
    gw.checked_exit = False
    gw.start()
    for t, code in (("day", "daily_budget"), ("month", "monthly_budget")):
        assert_refused(ask(gw, keys[t]), code)
        assert_refused(ask(gw, keys[t], max_tokens=19), code)
        assert ask(gw, keys[t], max_tokens=18).status == 200
        assert_refused(ask(gw, keys[t], max_tokens=1), code)
    # a clean restart keeps the same (ledger: 159,000 + 40,500 spent)
    assert gw.stop() == 0
    gw.start()
    for t, code in (("day", "daily_budget"), ("month", "monthly_budget")):
        assert_refused(ask(gw, keys[t], max_tokens=1), code)
        inv = gw.invoice(t, tgtest.utc_month())
        assert inv["summary"]["total_requests"] == 3, inv
        assert tgtest.nano_of_usd(inv["summary"]["total_cost_usd"]) == 2 * 79500 + cost(18)


# ---------------------------------------------------------------------------
# the admin route

def month_ms(month):
    """[first ms, end ms) (UTC) of month "YYYY-MM"."""
    y, m = map(int, month.split("-"))
    return (calendar.timegm((y, m, 1, 0, 0, 0)) * 1000,
            calendar.timegm((y + m // 12, m % 12 + 1, 1, 0, 0, 0)) * 1000)


def strip_generated(doc):
    doc = dict(doc)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", doc.pop("generated_at")), doc
    return doc


def test_admin_invoice_route_equals_cli_and_needs_an_admin_key(tg, sim):
    gw = start_gw(tg, sim)
    tenants = load_tenants(gw)
    outcomes = tgtest.LedgerLoad(gw.port, tenants, count=300, threads=4, seed=33).run()
    assert not failed(outcomes)
    admin_key = gw.create_admin_key(name="billing")
    month, day = tgtest.utc_month(), tgtest.utc_day()
    path = "/admin/v1/tenants/%s/invoices/%s"

    # a new key is seen by the running gateway within a fraction of a second
    gw.wait_admin_key(admin_key)
    for tenant in tenants:
        r = tgtest.admin(gw, path % (tenant, month), key=admin_key)
        assert r.status == 200, r
        assert r.header("content-type", "").startswith("application/json"), r
        text = r.body.decode()
        tgtest.usd9_fields(text)
        cli = gw.invoice(tenant, month)
        assert strip_generated(tgtest.money_json(text)) == strip_generated(cli), (text, cli)
        assert cli["summary"]["total_requests"] > 0
        # the integer nano-USD fields are the sums of the ledger rows' cost_nano
        lo, hi = month_ms(month)
        tgtest.check_invoice_nano(cli, tgtest.sqlite_ledger_rows(
            gw.db_path, "WHERE tenant = ? AND ts_ms >= ? AND ts_ms < ?", (tenant, lo, hi)))
        r = tgtest.admin(gw, path % (tenant, month) + "?format=csv", key=admin_key)
        assert r.status == 200 and r.body.decode() == gw.invoice(tenant, month, fmt="csv"), r
        r = tgtest.admin(gw, "/admin/v1/tenants/%s/usage/%s" % (tenant, day), key=admin_key)
        assert r.status == 200, r
        assert tgtest.money_json(r.body) == gw.usage(tenant, day), r
    # a day's usage has no CSV form: JSON when asked so, a 400 for CSV
    r = tgtest.admin(gw, "/admin/v1/tenants/alpha/usage/%s?format=json" % day, key=admin_key)
    assert r.status == 200 and r.header("content-type", "").startswith("application/json"), r
    assert tgtest.money_json(r.body) == gw.usage("alpha", day), r
    r = tgtest.admin(gw, "/admin/v1/tenants/alpha/usage/%s?format=csv" % day, key=admin_key)
    assert r.status == 400 and r.error()["code"] == "bad_format", r
    # format is a parameter of its own, not a substring of another; a value
    # the route has no form for (or two of them) is refused, never answered
    # in another format than asked
    for q in ("?xformat=csv", "?a=format=csv", "?format=json"):
        r = tgtest.admin(gw, path % ("alpha", month) + q, key=admin_key)
        assert r.status == 200 and r.header("content-type", "").startswith("application/json"), (q, r)
    for q in ("?format=csvx", "?format=CSV", "?format=xml", "?format=", "?format=csv&format=json"):
        r = tgtest.admin(gw, path % ("alpha", month) + q, key=admin_key)
        assert r.status == 400 and r.error()["code"] == "bad_format", (q, r)
    r = tgtest.admin(gw, path % ("alpha", month) + "?a=1&format=csv", key=admin_key)
    assert r.status == 200 and r.body.decode() == gw.invoice("alpha", month, fmt="csv"), r
    tgtest.check_invoices(gw, outcomes, PRICES, tenants)

    p = path % ("alpha", month)
    r = tgtest.admin(gw, p)
    assert r.status == 401 and r.error()["code"] == "missing_api_key", r
    r = tgtest.admin(gw, p, key="tg-000000000000-nope")
    assert r.status == 401 and r.error()["code"] == "invalid_api_key", r
    r = tgtest.admin(gw, p, key=admin_key[:-2] + ("xx" if not admin_key.endswith("xx") else "yy"))
    assert r.status == 401 and r.error()["code"] == "invalid_api_key", r
    r = tgtest.admin(gw, p, key=tenants["alpha"]["keys"][0])
    assert r.status == 403, r
    assert r.error()["type"] == "permission_error", r
    # a tenant key cannot read its own invoice through the admin API either
    r = tgtest.admin(gw, "/admin/v1/tenants/alpha/usage/%s" % day, key=tenants["alpha"]["keys"][0])
    assert r.status == 403, r
    # an admin key is not a tenant key: the API refuses it
    r = tgtest.chat(gw.port, admin_key, model=M, max_tokens=1)
    assert r.status in (401, 403), r
    # a month or day only in its one spelling: 2026-01, 2026-01-05
    for month in ("2026-13", "2026-+1"):
        r = tgtest.admin(gw, path % ("alpha", month), key=admin_key)
        assert r.status == 400, (month, r)
    for d in ("2026-01-+5", "2026-02-30"):
        r = tgtest.admin(gw, "/admin/v1/tenants/alpha/usage/%s" % d, key=admin_key)
        assert r.status == 400, (d, r)
    # a tenant taken out of the config is still invoiced from its rows; a
    # name without any in the period is unknown
    gone, now_month = sorted(tenants)[-1], tgtest.utc_month()
    want = gw.invoice(gone, now_month)
    assert want["summary"]["total_requests"] > 0
    # a new mapping: the tenants' one is shared with the other tests
    gw.config["tenants"] = {t: v for t, v in gw.config["tenants"].items() if t != gone}
    tgtest.gateway_reload(gw)
    r = tgtest.admin(gw, path % (gone, now_month), key=admin_key)
    assert r.status == 200, r
    assert strip_generated(tgtest.money_json(r.body)) == strip_generated(want), r
    r = tgtest.admin(gw, "/admin/v1/tenants/%s/usage/%s" % (gone, day), key=admin_key)
    assert r.status == 200 and tgtest.money_json(r.body) == gw.usage(gone, day), r
    for t, m in (("ghost", now_month), (gone, "2020-01"), ("bad%20name", now_month)):
        r = tgtest.admin(gw, path % (t, m), key=admin_key)
        assert r.status == 404 and r.error()["code"] == "tenant_not_found", (t, m, r)
    # a revoked admin key stops working
    gw.revoke_key(admin_key)
    tgtest.wait_for(lambda: tgtest.admin(gw, p, key=admin_key).status == 401, timeout=3,
                    what="the revoked admin key to be refused")


# ---------------------------------------------------------------------------
# retention

def month_start_ms(t, back):
    """First ms (UTC) of the month `back` months before the month of t."""
    g = time.gmtime(t)
    y, m = g.tm_year, g.tm_mon - back
    while m < 1:
        y, m = y - 1, m + 12
    return calendar.timegm((y, m, 1, 0, 0, 0)) * 1000


def test_retention_purge_removes_old_rows_per_tenant(tg, sim):
    """Rows written straight into the database with old timestamps; the
    purge runs 30 s after the gateway starts (then hourly), so the test
    waits for its `ledger_retention_purge` line once (~30 s)."""
    tenants = {"short": ledger_tenant([M], retention_days=1), "long": ledger_tenant([M])}
    gw = start_gw(tg, sim, tenants=tenants, start=False)
    key = gw.create_key("short")
    gw.start()
    t0 = time.time()
    now_ms = int(t0 * 1000)
    prev = month_start_ms(t0, 1)          # the previous month is never purged
    day = 86400000
    rows = [
        # (id, tenant, ts_ms, kept?)
        ("old-short-1", "short", prev - 1, False),                 # before the previous month
        ("old-short-2", "short", prev - 40 * day, False),
        ("old-short-3", "short", prev, True),                      # first ms of the previous month
        ("old-short-4", "short", now_ms - 2 * day, True),          # past 1 day, but this/last month
        ("old-long-1", "long", prev - 1, True),                    # default retention: 400 days
        ("old-long-2", "long", now_ms - 399 * day, True),
        ("old-long-3", "long", now_ms - 401 * day, False),
        ("old-gone-1", "gone", now_ms - 500 * day, False),         # tenant no longer configured
        ("old-gone-2", "gone", now_ms - 100 * day, True),
    ]
    db = sqlite3.connect(gw.db_path, timeout=10)
    try:
        with db:
            for rid, tenant, ts, _ in rows:
                db.execute("INSERT INTO ledger (request_id, ts_ms, tenant, key_id, model, endpoint,"
                           " prompt_tokens, completion_tokens, cost_nano, status, usage_counted,"
                           " queue_us, ttft_us, total_us)"
                           " VALUES (?, ?, ?, 'k', ?, 'http://old', 10, 20, 35000, 200, 0, 1, 2, 3)",
                           (rid, ts, tenant, M))
    finally:
        db.close()
    old_month = time.strftime("%Y-%m", time.gmtime((prev - 1) / 1000))
    inv = gw.invoice("short", old_month)
    assert inv["summary"]["total_requests"] == 1, inv    # the CLI sees the inserted row
    r = tgtest.chat(gw.port, key, model=M, max_tokens=3, content=HELLO)
    assert r.status == 200, r
    live = r.header("x-request-id")

    ev = tgtest.wait_for(lambda: tgtest.gateway_events(gw, "ledger_retention_purge"),
                         timeout=45, interval=0.5, what="the retention purge (30 s after start)")
    assert time.time() - t0 >= 20, "the purge ran long before its 30 s"
    gone = [rid for rid, _, _, kept in rows if not kept]
    assert ev[0]["detail"].startswith("%d ledger records " % len(gone)), ev
    left = {r["request_id"] for r in tgtest.sqlite_ledger_rows(gw.db_path)}
    assert left == {rid for rid, _, _, kept in rows if kept} | {live}, left
    inv = gw.invoice("short", old_month)
    assert inv["summary"]["total_requests"] == 0, inv
    inv = gw.invoice("long", old_month)
    assert inv["summary"]["total_requests"] == 1, inv
    m = tgtest.parse_metrics(tgtest.admin(gw, "/metrics").body.decode())
    assert (m["llm_ledger_purges_total"], m["llm_ledger_purge_failures_total"],
            m["llm_ledger_purged_records_total"]) == (1, 0, len(gone)), m


# ---------------------------------------------------------------------------

def test_an_answer_whose_record_cannot_be_kept_is_withheld(tg, sim):
    """When neither the database nor the spool can keep a record, the
    client never gets a complete answer that no record bills: a whole
    answer becomes 503 ledger_unavailable with Retry-After, a stream ends
    without [DONE], an answer relayed past 1 MiB without its closing brace,
    and /readyz says not ready. Once the disk is back, answers and rows come
    back, and /readyz says ready."""
    gw = start_gw(tg, sim, workers=1)
    key = gw.create_key("beta", name="eio")
    assert tgtest.chat(gw.port, key, model=M, max_tokens=2).status == 200
    spool = gw.spool_path
    lock = sqlite3.connect(gw.db_path, isolation_level=None, timeout=5)
    try:
        lock.execute("BEGIN EXCLUSIVE")   # the database refuses every write
        os.mkdir(spool)                   # and the spool cannot be opened
        r = tgtest.chat(gw.port, key, model=M, max_tokens=3, timeout=30)
        assert r.status == 503, r
        assert r.error()["code"] == "ledger_unavailable", r
        assert tgtest.retry_after(r) == 1, r
        # a load balancer probing /readyz sends its traffic elsewhere
        ready = tgtest.admin(gw, "/readyz")
        assert ready.status == 503, ready
        assert ready.json()["ledger"] == "losing_records", ready
        s = tgtest.SSEStream(gw.port, tgtest.chat_body(M, max_tokens=3, stream=True),
                             key=key, timeout=30)
        assert s.status == 200
        events = s.read_all()
        s.close()
        assert len([e for e in events if e.data != "[DONE]"]) >= 3 and not s.done, events
        # an answer past 1 MiB, relayed as it came: cut before its closing brace
        big = tgtest.RawConn(gw.port, timeout=30)
        try:
            big.send(tgtest.http_request_bytes(
                "POST", "/v1/completions", {"model": M, "prompt": "go", "max_tokens": 100000,
                                            "n": 2}, key=key))
            b = big.read_response(method="POST")
        finally:
            big.close()
        assert b.status == 200 and not b.complete and len(b.body) > 1 << 20, b
        with pytest.raises(ValueError):
            json.loads(b.body)
        assert json.loads(b.body + b"}")["usage"]["completion_tokens"] == 200000
        lost = {r.header("x-request-id"), s.headers["x-request-id"], b.header("x-request-id")}
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        if os.path.isdir(spool):
            os.rmdir(spool)
    r = tgtest.wait_for(lambda: (lambda x: x if x.status == 200 else None)(
        tgtest.chat(gw.port, key, model=M, max_tokens=2, timeout=30)),
        timeout=20, what="a 200 once the disk is back")
    rid = r.header("x-request-id")
    tgtest.wait_for(lambda: tgtest.sqlite_ledger_rows(gw.db_path, "WHERE request_id = ?", (rid,)),
                    timeout=20, what="the row of the answer after the outage")
    rows = tgtest.by_request_id(tgtest.sqlite_ledger_rows(gw.db_path))
    assert not lost & set(rows), "a withheld answer has a row"
    assert "records could not be kept" in gw.proc.stderr_text()
    # ready again once no record has been lost for five seconds
    tgtest.wait_for(lambda: tgtest.admin(gw, "/readyz").status == 200, timeout=10,
                    what="/readyz 200 five seconds after the last record lost")


# ---------------------------------------------------------------------------
# faults, abandons and refusals, concurrently

# What a client of test_faults_abandons_and_refusals_have_exactly_their_rows
# asks (ask_kind); the refusals never reach an upstream.
FAULT_KINDS = ("ok", "ok_stream", "status500", "disconnect", "garbage", "cut", "abandon",
               "stall_abandon", "bad_key", "no_model", "out_of_scope", "bad_json")
REFUSALS = {"bad_key": 401, "no_model": 404, "out_of_scope": 403, "bad_json": 400}


def ask_kind(gw, kind, key, scoped_key):
    """One request of the given kind; returns what the client saw:
    {"kind", "rid", "status", "usage", "events", "done"}."""
    fault = {"status500": "status:500", "disconnect": "disconnect", "garbage": "garbage",
             "cut": "disconnect-after:3", "stall_abandon": "stall-after:2"}.get(kind)
    headers = {"x-sim-fault": fault} if fault else {}
    out = {"kind": kind, "usage": None, "events": 0, "done": False}
    if kind in ("ok_stream", "cut", "abandon", "stall_abandon"):
        if kind == "abandon":
            headers["x-sim-token-ms"] = "20"
        body = tgtest.chat_body(M, max_tokens=40 if kind == "abandon" else 12, stream=True,
                                include_usage=True, content=HELLO)
        s = tgtest.SSEStream(gw.port, body, key=key, headers=headers)
        out["rid"], out["status"] = s.headers.get("x-request-id"), s.status
        try:
            for ev in s.events():
                if ev.data == "[DONE]":
                    continue
                doc = ev.json()
                if doc.get("usage"):
                    out["usage"] = doc["usage"]
                if doc.get("choices") and doc["choices"][0]["delta"].get("content"):
                    out["events"] += 1       # a token (not the role chunk, not the finish)
                if kind in ("abandon", "stall_abandon") and out["events"] == 2:
                    break                    # the client leaves mid-stream
        finally:
            s.close()
        out["done"] = s.done
        return out
    if kind == "bad_key":
        r = tgtest.chat(gw.port, "tg_" + "x" * 40, model=M, max_tokens=3)
    elif kind == "no_model":
        r = tgtest.chat(gw.port, key, model="no-such-model", max_tokens=3)
    elif kind == "out_of_scope":
        r = tgtest.chat(gw.port, scoped_key, model=M, max_tokens=3)
    elif kind == "bad_json":
        r = tgtest.request(gw.port, "POST", "/v1/chat/completions", body='{"model": "x", ',
                           key=key, headers={"Content-Type": "application/json"})
    else:
        r = tgtest.chat(gw.port, key, model=M, max_tokens=9, content=HELLO, headers=headers)
    out["rid"], out["status"] = r.header("x-request-id"), r.status
    if kind == "ok" and r.status == 200:
        out["usage"] = r.json()["usage"]
    return out


def test_faults_abandons_and_refusals_have_exactly_their_rows(tg, sim):
    """Under concurrent load from two loops, every request that reached the
    upstream has exactly one row, whatever became of it (an upstream error
    status, an upstream that hung up before or during its answer, a broken
    body, a client that left mid-stream, an upstream that stalled and was
    left), with what the gateway saw of it; no refusal has one; and the
    rows are exactly the access log's requests with an endpoint."""
    gw = start_gw(tg, sim)
    key = gw.create_key("beta", name="faults")
    scoped = gw.create_key("beta", models=["mistral-7b"], name="faults-scoped")
    per_thread, threads = 40, 8
    seen, errors = [], []

    def run(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(per_thread):
                seen.append(ask_kind(gw, rnd.choice(FAULT_KINDS), key, scoped))
        except Exception as e:              # reported below, not lost in the thread
            errors.append(repr(e))

    ts = [threading.Thread(target=run, args=(100 + i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors[:3]
    assert len(seen) == per_thread * threads
    kinds = {k: [o for o in seen if o["kind"] == k] for k in FAULT_KINDS}
    assert all(len(v) >= 8 for v in kinds.values()), {k: len(v) for k, v in kinds.items()}

    # what each client saw
    assert all(o["rid"] for o in seen), [o for o in seen if not o["rid"]][:3]
    for k, status in REFUSALS.items():
        assert {o["status"] for o in kinds[k]} == {status}, (k, kinds[k][:2])
    assert {o["status"] for o in kinds["ok"] + kinds["ok_stream"]} == {200}
    assert {o["status"] for o in kinds["status500"]} == {500}
    assert {o["status"] for o in kinds["disconnect"] + kinds["garbage"]} == {502}
    assert all(o["done"] and o["usage"] for o in kinds["ok_stream"]), kinds["ok_stream"][:2]
    assert all(o["status"] == 200 and o["events"] == 3 and not o["done"]
               for o in kinds["cut"]), kinds["cut"][:2]
    assert all(o["status"] == 200 and o["events"] == 2
               for o in kinds["abandon"] + kinds["stall_abandon"])

    reached = [o for o in seen if o["kind"] not in REFUSALS]
    rids = {o["rid"] for o in reached}
    # abandoned streams are recorded once the gateway has cancelled them
    tgtest.wait_for(lambda: len(tgtest.sqlite_ledger_rows(gw.db_path)) >= len(rids),
                    timeout=10, what="a row for each of %d requests" % len(rids))
    tgtest.wait_for(lambda: len(gw.access_log_entries()) >= len(seen), timeout=5,
                    what="an access-log line for each request")
    time.sleep(0.5)                          # a row too many would show by now
    rows = tgtest.by_request_id(tgtest.sqlite_ledger_rows(gw.db_path))
    log = {e["request_id"]: e for e in gw.access_log_entries()}

    # exactly one row for each request that reached the upstream, none else
    assert set(rows) == rids, (len(set(rows) - rids), len(rids - set(rows)))
    assert {rid for rid, e in log.items() if e.get("endpoint")} == rids
    for o in reached:
        row, e = rows[o["rid"]], log[o["rid"]]
        assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == \
            (e["status"], e["prompt_tokens"], e["completion_tokens"]), (o, row, e)
        assert (row["tenant"], row["model"], row["endpoint"]) == ("beta", M, sim.url), row
        p, c = PRICES[M]
        assert row["cost_nano"] == row["prompt_tokens"] * p + row["completion_tokens"] * c, row
        if o["usage"]:
            # the upstream's own usage, as the client saw it
            assert (row["prompt_tokens"], row["completion_tokens"]) == \
                (o["usage"]["prompt_tokens"], o["usage"]["completion_tokens"]), (o, row)
            assert row["status"] == 200 and row["usage_counted"] == 0, row
        elif o["kind"] in ("cut", "stall_abandon"):
            # no usage came: a token an event relayed, all of which the client read
            assert row["usage_counted"] == 1 and row["completion_tokens"] == o["events"], (o, row)
        elif o["kind"] == "abandon":
            # relayed events the client left unread are billed too
            assert row["usage_counted"] == 1 and row["completion_tokens"] >= o["events"], (o, row)
        else:
            assert row["completion_tokens"] == 0 and row["status"] == o["status"], (o, row)
    assert {rows[o["rid"]]["status"] for o in kinds["abandon"] + kinds["stall_abandon"]} == {499}


# ---------------------------------------------------------------------------

def test_ledger_off_records_nothing(tg, sim):
    gw = start_gw(tg, sim, ledger="off")
    tenants = load_tenants(gw)
    outcomes = tgtest.LedgerLoad(gw.port, tenants, count=200, threads=4, seed=44).run()
    assert not failed(outcomes)
    assert all(o.status == 200 and o.rid for o in outcomes)
    if os.path.exists(gw.db_path):
        assert tgtest.sqlite_ledger_rows(gw.db_path) == []
    inv = gw.invoice("alpha", tgtest.utc_month())
    assert inv["summary"]["total_requests"] == 0, inv


def test_migrate_command_brings_the_sqlite_schema_up_to_date(tg, sim):
    gw = start_gw(tg, sim, start=False)
    cp = gw.tool("migrate")
    m = re.fullmatch(r"sqlite schema migrated from version 0 to (\d+)\n", cp.stdout)
    assert m, cp.stdout
    version = int(m.group(1))
    d = sqlite3.connect(gw.db_path)
    try:
        assert d.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (version,)
        assert d.execute("SELECT 1 FROM sqlite_master WHERE name = 'ledger'").fetchone()
    finally:
        d.close()
    assert gw.tool("migrate").stdout == "sqlite schema at version %d: nothing to do\n" % version
    # the gateway starts on the migrated database and records as usual
    gw.start()
    key = gw.create_key("alpha")
    assert ask(gw, key).status == 200
    gw.stop()
    assert len(tgtest.sqlite_ledger_rows(gw.db_path)) == 1
    # bad usage is told apart from a failure
    for args in (("--timeout", "soon"), ("--timeout", "-1"), ("--timeout", "604801"),
                 ("--frobnicate", "1"), ("--timeout",)):
        cp = gw.tool("migrate", *args, check=False)
        assert cp.returncode == 2 and "usage: tollgate migrate" in cp.stderr, (args, cp)
    # a schema newer than this binary knows is refused, not touched
    d = sqlite3.connect(gw.db_path)
    try:
        with d:
            d.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version + 1,))
    finally:
        d.close()
    cp = gw.tool("migrate", check=False)
    assert cp.returncode == 1 and cp.stdout == "", cp
    assert "newer than this binary knows (%d)" % version in cp.stderr, cp.stderr


def test_invoice_and_usage_of_a_name_that_is_no_tenants_are_refused(tg, sim):
    """A --tenant no tenant could have (quotes, a comma, past 64 bytes) is
    refused before the ledger is read (exit 2), so nothing prints broken
    JSON or CSV; the longest name a tenant may have is printed whole. So
    are options the commands do not take, and options without a value."""
    gw = start_gw(tg, sim, start=False,
                  tenants=dict(TENANTS, **{"x" * 64: ledger_tenant(["llama-3.1-8b"])}))
    gw.tool("migrate")
    for cmd, period in (("invoice", ["--month", tgtest.utc_month()]),
                        ("usage", ["--day", tgtest.utc_day()])):
        for bad in ('"' * 400, 'a,"b', "x" * 65):
            cp = gw.tool(cmd, "--tenant", bad, *period, check=False)
            assert cp.returncode == 2 and cp.stdout == "", (cmd, bad, cp.stdout[:200])
            assert "is not a tenant name" in cp.stderr, (cmd, cp.stderr)
        cp = gw.tool(cmd, "--tenant", "x" * 64, *period)
        assert tgtest.money_json(cp.stdout)["tenant_id"] == "x" * 64, (cmd, cp.stdout)
        # a name no tenant has and no row holds is unknown, as on the admin
        # route (a misspelled tenant got an empty invoice)
        cp = gw.tool(cmd, "--tenant", "ghost", *period, check=False)
        assert cp.returncode == 1 and cp.stdout == "", (cmd, cp.returncode, cp.stdout[:200])
        assert "no tenant 'ghost' in the configuration" in cp.stderr, cp.stderr
    cp = gw.tool("invoice", "--tenant", "x" * 64, "--month", tgtest.utc_month(),
                 "--format", "csv")
    assert cp.stdout.splitlines()[-1].startswith("x" * 64 + ","), cp.stdout
    # a misspelled option, an option without its value, one given twice:
    # usage and exit 2, not a JSON invoice of what was understood
    month = ["--tenant", "alpha", "--month", tgtest.utc_month()]
    for args in (("invoice", *month, "--fromat", "csv"), ("invoice", *month, "--format"),
                 ("invoice", *month, "--tenant", "beta"),
                 ("usage", "--tenant", "alpha", "--day", tgtest.utc_day(), "--month", "x")):
        cp = gw.tool(*args, check=False)
        assert cp.returncode == 2 and cp.stdout == "", (args, cp.returncode, cp.stdout[:200])
        assert "usage: tollgate " + args[0] in cp.stderr, (args, cp.stderr)


def test_totals_past_64_bits_are_refused_not_wrapped(tg, sim):
    """Two records whose costs each fit 64 bits but whose sum does not (two
    models: each model's sum still fits): the invoice and the day's usage,
    from the command line and from the admin route, refuse with a clear
    error instead of printing a wrapped, negative total."""
    gw = start_gw(tg, sim)
    admin_key = gw.create_admin_key(name="billing")
    now_ms = int(time.time() * 1000)
    db = sqlite3.connect(gw.db_path, timeout=10)
    try:
        with db:
            for i, model in enumerate(("m-a", "m-b")):
                db.execute("INSERT INTO ledger (request_id, ts_ms, tenant, key_id, model, "
                           "endpoint, prompt_tokens, completion_tokens, cost_nano, status) "
                           "VALUES (?, ?, 'alpha', 'k', ?, 'http://x', 1, 1, ?, 200)",
                           ("req_big%d" % i, now_ms, model, 6 * 10 ** 18))
    finally:
        db.close()
    month, day = tgtest.utc_month(now_ms / 1000), tgtest.utc_day(now_ms / 1000)
    for args in (("invoice", "--tenant", "alpha", "--month", month),
                 ("invoice", "--tenant", "alpha", "--month", month, "--format", "csv"),
                 ("usage", "--tenant", "alpha", "--day", day)):
        cp = gw.tool(*args, check=False)
        assert cp.returncode == 1 and cp.stdout == "", (args, cp)
        assert "do not fit 64-bit integers" in cp.stderr, (args, cp.stderr)
    gw.wait_admin_key(admin_key)
    for path in ("/admin/v1/tenants/alpha/invoices/%s" % month,
                 "/admin/v1/tenants/alpha/usage/%s" % day):
        r = tgtest.admin(gw, path, key=admin_key)
        assert r.status == 500, r
        assert r.error()["code"] == "ledger_totals_too_large", r


def gw_with_a_row_and_an_admin_key(tg, sim):
    """A gateway whose tenant alpha has one record, and an admin key it
    already honours."""
    gw = start_gw(tg, sim)
    admin_key = gw.create_admin_key(name="billing")
    key = gw.create_key("alpha")
    gw.wait_admin_key(admin_key)
    assert ask(gw, key).status == 200
    return gw, admin_key


def test_the_admin_apis_money_answers_are_never_stored_by_a_cache(tg, sim):
    """A tenant's invoice and a day's spend change with every request and
    are one tenant's business: their answers (JSON, CSV, HEAD alike) carry
    `Cache-Control: no-store`, so no browser or proxy in front of the admin
    listener keeps a copy; they had no Cache-Control at all."""
    gw, admin_key = gw_with_a_row_and_an_admin_key(tg, sim)
    month, day = tgtest.utc_month(), tgtest.utc_day()
    for path in ("/admin/v1/tenants/alpha/invoices/%s" % month,
                 "/admin/v1/tenants/alpha/invoices/%s?format=csv" % month,
                 "/admin/v1/tenants/alpha/usage/%s" % day):
        for method in ("GET", "HEAD"):
            r = tgtest.request(gw.admin_port, method, path, key=admin_key)
            assert r.status == 200, (method, path, r)
            assert r.header("cache-control") == "no-store", (method, path, r.headers)


def test_the_admin_apis_error_answers_are_never_stored_by_a_cache(tg, sim):
    """Every /admin answer is no-store, its refusals too: a 401 or 403 a
    cache kept would go on refusing a caller given its key since, a 404
    tenant_not_found a tenant's first request makes wrong at once. They had
    no Cache-Control; only the 200 answers said no-store."""
    gw, admin_key = gw_with_a_row_and_an_admin_key(tg, sim)
    tenant_key = gw.create_key("alpha")
    gw.wait_admin_key(tenant_key)  # answered 403 once the watcher has it
    month = tgtest.utc_month()
    inv = "/admin/v1/tenants/alpha/invoices/%s" % month
    cases = [  # method, path, key, status, code
        ("GET", inv, None, 401, "missing_api_key"),
        ("GET", inv, "tg-000000000000-" + "0" * 64, 401, "invalid_api_key"),
        ("GET", inv, tenant_key, 403, "admin_only"),
        ("GET", "/admin/v1/tenants/alpha/invoices/2026-13", admin_key, 400, "bad_period"),
        ("GET", inv + "?format=xml", admin_key, 400, "bad_format"),
        ("GET", "/admin/v1/tenants/nobody/invoices/%s" % month, admin_key, 404,
         "tenant_not_found"),
        ("GET", "/admin/v1/tenants/no%%20body/invoices/%s" % month, admin_key, 404,
         "tenant_not_found"),
        ("GET", "/admin/v1/tenants/alpha/nope/x", admin_key, 404, "not_found"),
        ("GET", "/admin/v2", admin_key, 404, "not_found"),
        ("POST", inv, admin_key, 405, "method_not_allowed"),
    ]
    for method, path, key, status, code in cases:
        for m in (method, "HEAD") if method == "GET" else (method,):
            r = tgtest.request(gw.admin_port, m, path, key=key)
            assert r.status == status, (m, path, r)
            if m != "HEAD":
                assert r.error()["code"] == code, (m, path, r)
            assert r.header("cache-control") == "no-store", (m, path, r.headers)


def test_a_percent_encoded_tenant_name_names_the_tenant(tg, sim):
    """A client may percent-encode any character of a path (RFC 3986 2.1):
    "alph%61" and "%61lpha" are the tenant alpha, and got 404
    tenant_not_found. They now get alpha's invoice and usage, and the audit
    line names alpha. An encoded '/' or NUL makes no tenant's name."""
    gw, admin_key = gw_with_a_row_and_an_admin_key(tg, sim)
    month, day = tgtest.utc_month(), tgtest.utc_day()
    for name in ("alph%61", "%61lpha", "%61%6C%70%68%61"):
        r = tgtest.admin(gw, "/admin/v1/tenants/%s/invoices/%s" % (name, month), key=admin_key)
        assert r.status == 200, (name, r)
        assert strip_generated(tgtest.money_json(r.body)) == \
            strip_generated(gw.invoice("alpha", month)), (name, r)
        assert gw.access_entry(r.header("x-request-id"))["tenant"] == "alpha", name
        r = tgtest.admin(gw, "/admin/v1/tenants/%s/usage/%s" % (name, day), key=admin_key)
        assert r.status == 200 and tgtest.money_json(r.body) == gw.usage("alpha", day), (name, r)
    for name in ("alpha%00", "alp%2Fha", "alpha%2", "alpha%zz"):
        r = tgtest.admin(gw, "/admin/v1/tenants/%s/invoices/%s" % (name, month), key=admin_key)
        assert r.status == 404, (name, r)
        assert r.error()["code"] in ("tenant_not_found", "not_found"), (name, r)


def test_every_admin_api_request_leaves_an_audit_line(tg, sim):
    """Each /admin/v1 request, answered or refused, writes one access-log
    line: its request id, the path, the tenant whose data was asked for, the
    key's id (the admin key's; a tenant key that tried the route, its own;
    none without a key) and the status."""
    gw = start_gw(tg, sim)
    admin_key = gw.create_admin_key(name="audit")
    tenant_key = gw.create_key("alpha")
    gw.wait_admin_key(admin_key)
    month = tgtest.utc_month()
    inv = "/admin/v1/tenants/alpha/invoices/%s" % month
    cases = [  # key, path, status, key id on the line, tenant on the line
        (admin_key, inv, 200, tgtest.key_id(admin_key), "alpha"),
        (admin_key, "/admin/v1/tenants/alpha/usage/%s" % tgtest.utc_day(), 200,
         tgtest.key_id(admin_key), "alpha"),
        (tenant_key, inv, 403, tgtest.key_id(tenant_key), "alpha"),
        (None, inv, 401, None, "alpha"),
        ("tg-000000000000-" + "0" * 64, inv, 401, None, "alpha"),
        (admin_key, "/admin/v1/tenants/alpha/invoices/2026-13", 400,
         tgtest.key_id(admin_key), "alpha"),
        (admin_key, "/admin/v1/tenants/alpha/nope/x", 404, None, None),
    ]
    for key, path, status, kid, tenant in cases:
        r = tgtest.admin(gw, path, key=key)
        assert r.status == status, (path, r)
        e = gw.access_entry(r.header("x-request-id"))
        assert (e["path"], e["status"], e["key_id"], e["tenant"]) == \
            (path, status, kid, tenant), (path, e)


def test_an_admin_api_audit_line_says_how_long_the_request_took(tg, sim):
    """An admin API request's access-log line carries its duration, from
    its first byte to its answer, as an API request's does: every admin
    line said `duration_ms: 0`, the invoice's ledger query included. The
    ledger is held locked for a moment, so the invoice waits for it."""
    gw = start_gw(tg, sim)
    admin_key = gw.create_admin_key(name="audit")
    gw.wait_admin_key(admin_key)
    path = "/admin/v1/tenants/alpha/invoices/%s" % tgtest.utc_month()
    db = sqlite3.connect(gw.db_path, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        db.execute("BEGIN EXCLUSIVE")
        t = threading.Timer(0.4, db.execute, ("COMMIT",))
        t.start()
        t0 = time.monotonic()
        r = tgtest.admin(gw, path, key=admin_key)
        wall_ms = (time.monotonic() - t0) * 1000
        t.join()
    finally:
        db.close()
    assert r.status == 200, r
    e = gw.access_entry(r.header("x-request-id"))
    assert e["status"] == 200 and e["path"] == path, e
    assert 0 < e["duration_ms"] <= wall_ms, (e, wall_ms)
    r = tgtest.admin(gw, path)
    e = gw.access_entry(r.header("x-request-id"))
    assert r.status == 401 and e["status"] == 401, (r, e)
    assert e["duration_ms"] > 0, e


def test_a_long_admin_path_leaves_its_beginning_on_the_audit_line(tg, sim):
    """A probe of the admin listener with a long path (within the header
    bound) left `path: "?"` on its line: the quoted path did not fit the
    log's field, so nothing said what was tried. The field now holds the
    path's beginning, still one JSON line, never cut inside an escape (a
    path of backslashes quotes to twice its length)."""
    gw = start_gw(tg, sim)
    for seg in ("a" * 3000, "%22" * 400, "\\" * 400):
        path = "/admin/v1/tenants/%s/invoices/2026-12" % seg
        r = tgtest.request(gw.admin_port, "GET", path)
        assert r.status == 404, r
        e = gw.access_entry(r.header("x-request-id"))
        assert e["status"] == 404 and e["error"] == "not_found", e
        assert len(e["path"]) >= 100 and path.startswith(e["path"]), (e["path"][:80], path[:80])


def test_no_model_can_be_named_as_the_csv_invoices_total_line(tg):
    """The CSV invoice's last line is the total, TOTAL in its model column:
    a model named TOTAL (in any case: spreadsheets compare text without it)
    made that line one of two alike. check-config and serve refuse the
    name, saying where. A model's name is its cell as the config spells it,
    as in the JSON invoice and the ledger, one that starts with @ too
    (decisions.md)."""
    at = "@cf/meta/llama-3.1-8b+lora-v2"
    sim = tg.sim(models=(M, at))
    models = {m: tgtest.model_entry([sim.url], prompt="0.0005", completion="0.0015")
              for m in (M, at)}
    for name in ("TOTAL", "total"):
        bad = tg.gateway(dict(models, **{name: [sim.url]}), start=False, keys=(),
                         tenants={"alpha": ledger_tenant((M,))})
        cp = bad.tool("check-config", check=False)
        assert cp.returncode == 1, (name, cp.returncode, cp.stdout, cp.stderr)
        assert "tollgate.yaml:" in cp.stderr and \
            "model name '%s' is reserved (the CSV invoice's total line)" % name in cp.stderr, \
            cp.stderr
        proc = tgtest.Proc("tollgate-%s" % name, bad.tool_argv("serve"), bad.workdir)
        assert proc.wait(15.0) == 1, proc.tail()
        assert "serving on" not in proc.stderr_text()

    gw = tg.gateway(models, tenants={"alpha": ledger_tenant((M, at))}, keys=(), start=False)
    key = gw.create_key("alpha")
    gw.start()
    for m in (M, at, at):
        assert tgtest.chat(gw.port, key, m, max_tokens=3).status == 200
    tgtest.wait_for(lambda: len(tgtest.sqlite_ledger_rows(gw.db_path)) == 3, what="3 rows")
    month = tgtest.utc_month()
    lines = [ln.split(",") for ln in gw.invoice("alpha", month, fmt="csv").splitlines()[1:]]
    assert [ln[2] for ln in lines] == [at, M, "TOTAL"], lines
    assert [ln[3] for ln in lines] == ["2", "1", "3"], lines
    assert lines[-1][4:6] == ["", ""], lines
    assert sorted(gw.invoice("alpha", month)["usage_by_model"]) == [at, M]


def test_a_period_malformed_or_not_begun_is_refused_not_an_empty_invoice(tg, sim):
    """A month or day in any other spelling than 2026-01 / 2026-01-05, or
    one that is no date (2026-13, 2026-02-29), is a usage error (exit 2) on
    the command line and a 400 on the admin route. So is one that has not
    begun: 2062-01 typed for 2026-01 printed an empty invoice and exit 0, a
    $0 bill a script could not tell from a true one. The current month and
    day are answered."""
    gw, admin_key = gw_with_a_row_and_an_admin_key(tg, sim)
    now = time.time()
    g = time.gmtime(now)
    next_year = "%04d-%02d" % (g.tm_year + 1, g.tm_mon)
    months = {"2026-13": "wants YYYY-MM", "2026-00": "wants YYYY-MM",
              "0000-01": "wants YYYY-MM", "99999-01": "wants YYYY-MM",
              "2026-1": "wants YYYY-MM", "2026-01x": "wants YYYY-MM",
              next_year: "has not begun", "9999-12": "has not begun"}
    days = {"2026-02-30": "wants YYYY-MM-DD", "2026-02-29": "wants YYYY-MM-DD",
            "2026-1-01": "wants YYYY-MM-DD", "2026-01-01 ": "wants YYYY-MM-DD",
            next_year + "-01": "has not begun",
            tgtest.utc_day(now + 2 * 86400): "has not begun"}
    for cmd, opt, route, periods in (("invoice", "--month", "invoices", months),
                                     ("usage", "--day", "usage", days)):
        for period, says in periods.items():
            cp = gw.tool(cmd, "--tenant", "alpha", opt, period, check=False)
            assert cp.returncode == 2 and cp.stdout == "", (cmd, period, cp)
            assert says in cp.stderr, (cmd, period, cp.stderr)
            if " " in period:
                continue
            r = tgtest.admin(gw, "/admin/v1/tenants/alpha/%s/%s" % (route, period),
                             key=admin_key)
            assert r.status == 400 and r.error()["code"] == "bad_period", (period, r)
            assert says.split()[-1] in r.error()["message"], (period, r.error())
    inv = gw.invoice("alpha", tgtest.utc_month(now))
    assert inv["summary"]["total_requests"] == 1, inv
    assert gw.usage("alpha", tgtest.utc_day(now))["requests"] == 1
    r = tgtest.admin(gw, "/admin/v1/tenants/alpha/invoices/%s" % tgtest.utc_month(now),
                     key=admin_key)
    assert r.status == 200, r


def test_a_csv_invoice_keeps_a_foreign_model_name_in_its_one_cell(tg, sim):
    """A ledger row some other program wrote (the database is the
    operator's, PostgreSQL maybe shared) may name a model with a comma, a
    quote, a line break or a formula: the CSV printed it bare, so a comma
    made a line of nine cells, a line break a line of its own (here one
    forging a second TOTAL) and =HYPERLINK(...) a live formula. Such a name
    is now quoted (RFC 4180) and one that starts as a formula begins with
    '; a name the config could give is written as it is."""
    gw = start_gw(tg, sim, start=False)
    gw.tool("migrate")
    now_ms = int(time.time() * 1000)
    month = tgtest.utc_month(now_ms / 1000)
    names = ['a,b', 'say "hi"', "two\nalpha,%s,TOTAL,9,,,9.000000000,9000000000" % month,
             '=HYPERLINK("http://x","y")', "@cf/meta/x+y", "-1+2 ok"]
    db = sqlite3.connect(gw.db_path, timeout=10)
    try:
        with db:
            for i, model in enumerate(names):
                db.execute("INSERT INTO ledger (request_id, ts_ms, tenant, key_id, model, "
                           "endpoint, prompt_tokens, completion_tokens, cost_nano, status) "
                           "VALUES (?, ?, 'alpha', 'k', ?, 'http://x', 1, 2, ?, 200)",
                           ("req_csv%d" % i, now_ms, model, 1000 + i))
    finally:
        db.close()
    text = gw.invoice("alpha", month, fmt="csv")
    lines = list(csv.reader(io.StringIO(text, newline="")))
    assert all(len(ln) == 8 for ln in lines), lines
    assert [ln[0] for ln in lines[1:]] == ["alpha"] * (len(names) + 1), lines
    shown = {"=HYPERLINK(\"http://x\",\"y\")": "'=HYPERLINK(\"http://x\",\"y\")",
             "-1+2 ok": "'-1+2 ok"}
    assert [ln[2] for ln in lines[1:]] == [shown.get(m, m) for m in sorted(names)] + ["TOTAL"]
    assert [ln[2] for ln in lines].count("TOTAL") == 1, lines
    assert lines[-1][3] == str(len(names)), lines
    assert "\n@cf/meta/x+y," not in text and ",@cf/meta/x+y," in text, text
    assert sorted(gw.invoice("alpha", month)["usage_by_model"]) == sorted(names)


def test_invoice_and_usage_of_a_data_dir_without_a_ledger_fail(tg, sim, tmp_path):
    """`tollgate invoice` and `usage` read a ledger: pointed at a data_dir
    that holds none (a typo, another config's copy) they say so and exit
    non-zero; they made the directories and an empty database there and
    printed a $0 invoice."""
    gw = start_gw(tg, sim, start=False, data_dir=str(tmp_path / "typo" / "data"))
    for args in (("invoice", "--tenant", "alpha", "--month", "2026-12"),
                 ("usage", "--tenant", "alpha", "--day", "2026-12-01")):
        cp = gw.tool(*args, check=False)
        assert cp.returncode == 1 and cp.stdout == "", (args, cp.returncode, cp.stdout)
        assert "no ledger in %s" % (tmp_path / "typo" / "data") in cp.stderr, cp.stderr
    assert not os.path.exists(str(tmp_path / "typo"))


def test_an_invoice_that_cannot_be_written_out_fails(tg, sim):
    """`tollgate invoice > inv.json` on a full disk, or with stdout closed,
    exited 0 with nothing on stderr: a billing script took the empty file
    for the tenant's invoice. The command now says it could not write and
    exits 1; so does any command whose output is lost (the usage of
    `--help` too), while a command that failed keeps its own status."""
    gw = start_gw(tg, sim, start=False)
    gw.tool("migrate")
    cmds = (("invoice", "--tenant", "alpha", "--month", tgtest.utc_month()),
            ("invoice", "--tenant", "alpha", "--month", tgtest.utc_month(), "--format", "csv"),
            ("usage", "--tenant", "alpha", "--day", tgtest.utc_day()),
            ("check-config",), ("migrate",))
    for args in cmds:
        assert gw.tool(*args).stdout != "", args
        for out in ("full", "closed"):
            argv = gw.tool_argv(*args)
            with open("/dev/full", "w") as full:
                cp = subprocess.run(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    stdout=full if out == "full" else None,
                                    text=True, timeout=60,
                                    env=tgtest.cli_env(), cwd=gw.workdir,
                                    preexec_fn=(lambda: os.close(1)) if out == "closed" else None)
            assert cp.returncode == 1, (args, out, cp.returncode, cp.stderr)
            assert "tollgate: cannot write to stdout" in cp.stderr, (args, out, cp.stderr)
    with open("/dev/full", "w") as full:
        cp = subprocess.run([tgtest.binary("tollgate"), "--help"], stdout=full,
                            stderr=subprocess.PIPE, text=True, timeout=60)
    assert cp.returncode == 1 and "cannot write to stdout" in cp.stderr, cp
    # a command that fails says why, once, with its own status
    with open("/dev/full", "w") as full:
        cp = subprocess.run(gw.tool_argv("invoice", "--tenant", "ghost", "--month",
                                         tgtest.utc_month()), stdout=full,
                            stderr=subprocess.PIPE, text=True, timeout=60,
                            env=tgtest.cli_env(), cwd=gw.workdir)
    assert cp.returncode == 1 and "cannot write" not in cp.stderr, cp.stderr


def test_the_database_files_are_private(tg, sim, tmp_path):
    """The database holds key hashes and every tenant's usage: its files
    are 0600 even in a data_dir the operator made readable (0755), as the
    spool is; they were made with the umask's mode (0644)."""
    import stat
    d = tmp_path / "data"
    d.mkdir()
    os.chmod(str(d), 0o755)
    gw = start_gw(tg, sim, start=False, data_dir=str(d))
    key = gw.create_key("alpha")
    gw.start()
    assert tgtest.chat(gw.port, key, M, max_tokens=2).status == 200
    modes = {f: stat.S_IMODE(os.stat(str(d / f)).st_mode) for f in os.listdir(str(d))}
    assert "tollgate.db" in modes and "tollgate.db-wal" in modes, modes
    assert all(m & 0o077 == 0 for m in modes.values()), {f: oct(m) for f, m in modes.items()}


# ---------------------------------------------------------------------------
# the UTC day and month of a record and of the budgets it was charged to

faked_clock = tgtest.faked_clock
stepped_clock = tgtest.stepped_clock


def spend_gauges(gw, tenant):
    """(daily, monthly) spend of tenant in /metrics, exact nano-USD."""
    text = tgtest.admin(gw, "/metrics").body.decode()
    out = []
    for name in ("llm_tenant_daily_spend_usd", "llm_tenant_monthly_spend_usd"):
        m = re.search(r'^%s\{tenant="%s"\} (\S+)$' % (name, re.escape(tenant)), text, re.M)
        assert m, (name, text[:2000])
        out.append(tgtest.usd_nano(m.group(1)))
    return tuple(out)


def restart_at(gw, when):
    """Kills gw, forgets its saved spend (so the budgets come from the
    ledger alone) and starts it again with its wall clock at `when`."""
    gw.kill()
    gw.checked_exit = True
    db = sqlite3.connect(gw.db_path)
    try:
        with db:
            db.execute("DELETE FROM tenant_spend")
    finally:
        db.close()
    gw.checked_exit = False
    gw.env = faked_clock(when)
    gw.start()


def test_a_request_admitted_after_midnight_is_recorded_in_the_windows_it_was_charged(tg, sim):
    """A request whose head came at 23:59:5x on 31 January and whose body
    came after midnight is admitted on 1 February: its cost goes to that
    day's and month's budgets. Its record must be in the same day and month,
    or `usage --day`, the invoice and a restart (which rebuilds the budgets
    from the ledger) disagree with the budgets the gateway enforced: the
    record was dated at the head's arrival, in January, and a restart gave
    the tenant its February spend back."""
    tenants = {"late": tgtest.limited_tenant(models=[M], daily="1.00", monthly="10.00")}
    gw = start_gw(tg, sim, tenants=tenants, start=False, timeouts={"client_request": "30s"})
    key = gw.create_key("late")
    gw.env = faked_clock("2026-01-31 23:59:50")
    t0 = time.monotonic()
    gw.start()
    raw = tgtest.http_request_bytes("POST", "/v1/chat/completions",
                                    body=tgtest.chat_body(M, 50, content=HELLO), key=key)
    conn = tgtest.RawConn(gw.port, timeout=30)
    try:
        conn.send(raw[:-5])
        if time.monotonic() - t0 > 8.5:
            pytest.skip("the gateway took too long to start: its head came after midnight")
        time.sleep(max(0.0, t0 + 11.5 - time.monotonic()))   # its clock: past 00:00:01
        conn.send(raw[-5:])
        r = conn.read_response(method="POST")
    finally:
        conn.close()
    assert r is not None and r.status == 200, r
    spent = cost(50)
    assert spend_gauges(gw, "late") == (spent, spent)
    assert gw.usage("late", "2026-02-01")["spend_nano_usd"] == spent
    assert gw.usage("late", "2026-01-31")["spend_nano_usd"] == 0
    inv = gw.invoice("late", "2026-02")
    assert tgtest.nano_of_usd(inv["summary"]["total_cost_usd"]) == spent, inv

    # a restart rebuilds the windows from the ledger: nothing given back
    restart_at(gw, "2026-02-01 00:00:30")
    assert spend_gauges(gw, "late") == (spent, spent)


def test_a_clock_stepped_back_across_midnight_gives_no_budget_back(tg, sim, tmp_path):
    """The gateway's wall clock passes midnight, then an NTP correction steps
    it back a minute into the day before, then it passes midnight again. A
    tenant that had spent its daily budget on March 31st must not get it
    again: the memory backend reopened March 31st with nothing spent (two
    more requests on that day's bill), and when the clock passed midnight
    again April 1st started over too (three requests on a day whose budget
    holds two). The open window, April 1st's, is charged meanwhile; each
    day's usage stays within the budget the gateway enforced."""
    tenants = {"ntp": tgtest.limited_tenant(models=[M], daily="0.0002", monthly="10.00")}
    gw = start_gw(tg, sim, tenants=tenants, start=False)
    key = gw.create_key("ntp")
    clock = tmp_path / "clock"

    def set_clock(when):
        clock.write_text("@%s\n" % when)
        time.sleep(0.2)

    clock.write_text("@2026-03-31 12:00:00\n")
    gw.env = stepped_clock(str(clock))
    gw.start()
    # 200,000 nano-USD a day: two requests (79,500 each, 88,500 reserved)
    assert ask(gw, key).status == 200
    assert ask(gw, key).status == 200
    assert_refused(ask(gw, key), "daily_budget")
    set_clock("2026-04-01 00:00:30")
    assert ask(gw, key).status == 200
    set_clock("2026-03-31 23:59:30")
    assert ask(gw, key).status == 200            # April 1st's second
    assert_refused(ask(gw, key), "daily_budget")
    assert spend_gauges(gw, "ntp") == (2 * cost(50), 2 * cost(50))   # April's
    set_clock("2026-04-01 00:01:00")
    assert_refused(ask(gw, key), "daily_budget")
    assert gw.usage("ntp", "2026-03-31")["spend_nano_usd"] == 2 * cost(50)
    assert gw.usage("ntp", "2026-04-01")["spend_nano_usd"] == 2 * cost(50)


def test_a_record_dated_after_the_restart_counts_in_its_own_day_only(tg, sim, tmp_path):
    """A record of April 1st exists when the gateway starts on March 31st
    (its clock was stepped back after writing it). The budgets rebuilt from
    the ledger counted it in March 31st's day and March's month, and would
    count it again on April 1st: each record counts in its own period, and
    a restart in the last hour of March 31st opens April 1st's window, as
    the running gateway charged it."""
    tenants = {"ntp": tgtest.limited_tenant(models=[M], daily="1.00", monthly="10.00")}
    gw = start_gw(tg, sim, tenants=tenants, start=False)
    key = gw.create_key("ntp")
    clock = tmp_path / "clock"
    clock.write_text("@2026-03-31 12:00:00\n")
    gw.env = stepped_clock(str(clock))
    gw.start()
    assert ask(gw, key).status == 200
    clock.write_text("@2026-04-01 00:00:30\n")
    time.sleep(0.2)
    assert ask(gw, key).status == 200
    assert gw.usage("ntp", "2026-04-01")["spend_nano_usd"] == cost(50)

    restart_at(gw, "2026-03-31 12:00:10")
    assert spend_gauges(gw, "ntp") == (cost(50), cost(50))     # March's own
    restart_at(gw, "2026-03-31 23:59:40")
    assert spend_gauges(gw, "ntp") == (cost(50), cost(50))     # April's open window
