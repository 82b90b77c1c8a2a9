"""Tenant budgets (memory state backend): daily and monthly USD limits per UTC
day and month, charged at admission with a reservation (prompt estimate x
prompt price + max_tokens x completion price, exact nano-USD) and settled to
the upstream's usage; 402 refusals with the time until the window ends; the
budget_threshold event written once per window; spend that survives a
restart (saved to the SQLite store every second and at shutdown).

Prices in these tests are the default 0.0005 / 0.0015 USD per 1K tokens,
500 / 1500 nano-USD per token. "Hello there" is 11 bytes: the gateway's
estimate is 27 tokens, the simulator's prompt_tokens 9. So max_tokens 50
reserves 88,500 nano-USD and costs 79,500."""

import json
import os
import re
import time

import pytest

import tgtest

M = "llama-3.1-8b"
M2 = "llama-3.1-70b"
EMBED = "nomic-embed-text"
MODEL_CAP = 300
PRICES = {M: (500, 1500), M2: (900, 2700), EMBED: (500, 1500)}
HELLO = "Hello there"
EST, SIM_PROMPT = 27, 9


def reserve(max_tokens, model=M, est=EST):
    p, c = PRICES[model]
    return est * p + max_tokens * c


def cost(max_tokens, model=M, prompt=SIM_PROMPT):
    p, c = PRICES[model]
    return prompt * p + max_tokens * c


def usd(nano):
    """Exact decimal USD text of a nano-USD amount."""
    return "%d.%09d" % (nano // 10**9, nano % 10**9)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = tgtest.Sim(workdir=str(tmp_path_factory.mktemp("sim")), workers=2)
    s.start()
    try:
        yield s
    finally:
        s.stop(timeout=5)
        s.kill()


def models_cfg(sim):
    m = tgtest.model_entry([sim.url])
    m["max_tokens"] = MODEL_CAP
    m2 = tgtest.model_entry([sim.url], prompt="0.0009", completion="0.0027")
    e = tgtest.model_entry([sim.url])
    e["kind"] = "embedding"
    return {M: m, M2: m2, EMBED: e}


def start_gw(tg, sim, tenants, **overrides):
    return tg.gateway(models_cfg(sim), tenants=tenants, keys=tuple(tenants),
                      overrides=overrides or None)


def ask(gw, tenant, max_tokens=50, model=M, **kw):
    return tgtest.chat(gw.port, gw.keys[tenant], model=model, max_tokens=max_tokens,
                       content=HELLO, **kw)


def assert_budget_refused(r, code):
    """A 402 of the daily or monthly budget; returns its Retry-After."""
    assert r.status == 402, r
    err = r.error()
    assert err["type"] == "insufficient_quota", err
    assert err["code"] == code, err
    word = "daily" if code == "daily_budget" else "monthly"
    assert re.search(word, err["message"], re.I), "message does not name the limit: %r" % err
    return tgtest.retry_after(r)


def window_end_ok(ra, seconds_left):
    # the Retry-After of a budget points at the end of its UTC window
    return abs(ra - seconds_left) <= 5


# ---------------------------------------------------------------------------

@pytest.mark.parametrize("window", ["daily", "monthly"])
def test_budget_refusal_and_exact_remaining_room(tg, sim, window):
    limit = 200000       # 2 x 79,500 spent leaves 41,000: 40,500 fits, 42,000 does not
    kw = {"daily": usd(limit)} if window == "daily" else {"monthly": usd(limit)}
    gw = start_gw(tg, sim, {"b": tgtest.limited_tenant(**kw)})
    code = "%s_budget" % window
    assert ask(gw, "b").status == 200
    assert ask(gw, "b").status == 200
    before = sim.metric(tgtest.SIM_REQUESTS)
    r = ask(gw, "b")
    ra = assert_budget_refused(r, code)
    left = tgtest.seconds_to_utc_day_end() if window == "daily" else \
        tgtest.seconds_to_utc_month_end()
    assert window_end_ok(ra, left), (ra, left)
    assert sim.metric(tgtest.SIM_REQUESTS) == before, "a refused request reached the upstream"

    assert reserve(19) == 42000 and reserve(18) == 40500
    assert_budget_refused(ask(gw, "b", max_tokens=19), code)
    r = ask(gw, "b", max_tokens=18)
    assert r.status == 200, r
    # 41,000 - 31,500 = 9,500 left: even one token (15,000 reserved) is refused
    assert_budget_refused(ask(gw, "b", max_tokens=1), code)
    # a streamed request is refused the same way, before any event
    st = tgtest.SSEStream(gw.port, tgtest.chat_body(M, max_tokens=1, stream=True, content=HELLO),
                          key=gw.keys["b"])
    assert st.status == 402
    body = st.body_bytes()
    assert b'"%s"' % code.encode() in body, body
    st.close()


def test_the_smaller_window_decides(tg, sim):
    tenants = {
        "day_first": tgtest.limited_tenant(daily=usd(100000), monthly=usd(300000)),
        "month_first": tgtest.limited_tenant(daily=usd(300000), monthly=usd(100000)),
    }
    gw = start_gw(tg, sim, tenants)
    for t, code in (("day_first", "daily_budget"), ("month_first", "monthly_budget")):
        assert ask(gw, t).status == 200
        assert_budget_refused(ask(gw, t), code)


def test_reservation_priced_exactly(tg, sim):
    """A budget of exactly one request's reservation admits it; one nano-USD
    less refuses it: the reservation is prompt estimate x prompt price +
    max_tokens (or the model's cap) x completion price, per model."""
    embed_body = {"model": EMBED, "input": "abcd"}
    tools_body = tgtest.chat_body(M, max_tokens=5, content=HELLO, tools=[{
        "type": "function", "function": {"name": "f", "description": "x" * 4000,
                                         "parameters": {"type": "object"}}}])
    # the member's text, keys included: tools type function function name f
    # description x*4000 parameters type object
    tools_res = (EST + 5 + 4 + 8 + 8 + 4 + 1 + 11 + 4000 + 10 + 4 + 6) * 500 + 5 * 1500
    assert tgtest.prompt_estimate(tools_body) * 500 + 5 * 1500 == tools_res
    legacy_mct = {"model": M, "prompt": HELLO, "max_tokens": 50, "max_completion_tokens": 1}
    embed_res = tgtest.prompt_estimate(embed_body) * 500       # no completion tokens
    cases = {
        "mt": (reserve(50), lambda gw, t: ask(gw, t)),
        "cap": (reserve(MODEL_CAP), lambda gw, t: tgtest.chat(gw.port, gw.keys[t], model=M,
                                                               content=HELLO)),
        "price2": (reserve(10, model=M2), lambda gw, t: ask(gw, t, max_tokens=10, model=M2)),
        "embed": (embed_res, lambda gw, t: tgtest.request(gw.port, "POST", "/v1/embeddings",
                                                          body=embed_body, key=gw.keys[t])),
        # tools are rendered into the prompt: their text is reserved too
        "tools": (tools_res, lambda gw, t: tgtest.request(gw.port, "POST", "/v1/chat/completions",
                                                          body=tools_body, key=gw.keys[t])),
        # /v1/completions knows no max_completion_tokens: max_tokens is reserved
        "legacy_mct": (tgtest.prompt_estimate(legacy_mct) * 500 + 50 * 1500,
                       lambda gw, t: tgtest.request(gw.port, "POST", "/v1/completions",
                                                    body=legacy_mct, key=gw.keys[t])),
        # on chat a max_completion_tokens of 0 leaves max_tokens in force
        "chat_mct0": (reserve(40), lambda gw, t: ask(gw, t, max_tokens=40,
                                                     max_completion_tokens=0)),
    }
    assert cases["mt"][0] == 88500 and cases["cap"][0] == 463500
    assert cases["price2"][0] == 51300 and embed_res == 6000
    tenants = {}
    for name, (res, _) in cases.items():
        tenants[name + "_fits"] = tgtest.limited_tenant(models=(M, M2, EMBED), daily=usd(res))
        tenants[name + "_short"] = tgtest.limited_tenant(models=(M, M2, EMBED),
                                                         daily=usd(res - 1))
    gw = start_gw(tg, sim, tenants)
    for name, (res, send) in cases.items():
        r = send(gw, name + "_fits")
        assert r.status == 200, (name, res, r)
        r = send(gw, name + "_short")
        assert_budget_refused(r, "daily_budget")


def test_reservation_covers_every_completion_asked_for(tg, sim):
    """`n` completions (or `best_of`, when larger), and for /v1/completions one
    set per prompt of a list, each up to max_tokens: the reservation holds
    them all, so a budget of one request's reservation is never passed by
    what that request costs."""
    chat_n4 = tgtest.chat_body(M, max_tokens=50, content=HELLO, n=4)
    two_prompts = {"model": M, "prompt": [HELLO, HELLO], "max_tokens": 10, "n": 2}
    token_ids = {"model": M, "prompt": [1, 2, 3, 4], "max_tokens": 10, "n": 3}
    best_of = {"model": M, "prompt": HELLO, "max_tokens": 10, "n": 2, "best_of": 3}
    cases = {       # path, body, prompt estimate, completion tokens at most
        "chat_n": ("/v1/chat/completions", chat_n4, EST, 4 * 50),
        "prompts": ("/v1/completions", two_prompts, 8 + 2 * (len(HELLO) + 8), 2 * 2 * 10),
        "token_ids": ("/v1/completions", token_ids, 8 + 4, 3 * 10),
        "best_of": ("/v1/completions", best_of, 8 + len(HELLO), 3 * 10),
    }
    assert tgtest.prompt_estimate(chat_n4) == EST
    assert tgtest.prompt_estimate(two_prompts) == 8 + 2 * (len(HELLO) + 8)
    tenants = {}
    for name, (_, _, est, completion) in cases.items():
        res = est * 500 + completion * 1500
        tenants[name + "_fits"] = tgtest.limited_tenant(daily=usd(res))
        tenants[name + "_short"] = tgtest.limited_tenant(daily=usd(res - 1))
    gw = start_gw(tg, sim, tenants)
    for name, (path, body, _, completion) in cases.items():
        r = tgtest.request(gw.port, "POST", path, body=body, key=gw.keys[name + "_short"])
        assert_budget_refused(r, "daily_budget")
        r = tgtest.request(gw.port, "POST", path, body=body, key=gw.keys[name + "_fits"])
        assert r.status == 200, (name, r)
        u = r.json()["usage"]
        # the simulator writes n completions: best_of's are reserved, not written
        assert u["completion_tokens"] == (2 * 10 if name == "best_of" else completion), (name, u)
        # and the one request admitted cannot spend past its budget
        r = tgtest.request(gw.port, "POST", path, body=body, key=gw.keys[name + "_fits"])
        assert_budget_refused(r, "daily_budget")


def test_concurrent_burst_stays_within_budget(tg, sim):
    limit = 1000000
    mt = 40
    R, A = reserve(mt), cost(mt)
    assert (R, A) == (73500, 64500)
    gw = start_gw(tg, sim, {"burst": tgtest.limited_tenant(daily=usd(limit))})
    key = gw.keys["burst"]
    slow = {"x-sim-token-ms": "15"}

    def one(i):
        if i % 2:
            st = tgtest.SSEStream(gw.port, tgtest.chat_body(M, max_tokens=mt, stream=True,
                                                             content=HELLO,
                                                             include_usage=bool(i % 4 == 1)),
                                  key=key, headers=slow, timeout=20)
            st.read_all()
            st.close()
            return st.status
        return ask(gw, "burst", max_tokens=mt, headers=slow, timeout=20).status

    statuses = tgtest.parallel(one, [(i,) for i in range(40)], threads=10)
    assert set(statuses) <= {200, 402}, statuses
    n_ok = statuses.count(200)
    # at least every request whose reservation fit in an empty budget,
    # at most what the budget can pay for
    assert limit // R <= n_ok <= limit // A, (n_ok, statuses)

    def settled():
        es = [e for e in gw.access_log_entries() if e.get("tenant") == "burst"]
        return es if len(es) == 40 else None
    entries = tgtest.wait_for(settled, timeout=5, what="40 access-log records")
    paid = [e for e in entries if e["status"] == 200]
    assert len(paid) == n_ok
    spent = sum(tgtest.entry_cost_nano(e, PRICES) for e in paid)
    assert spent == n_ok * A and spent <= limit, (spent, limit)

    # the rest of the day's budget, one request at a time: exactly as many
    # as still fit (spent + reservation <= limit), then 402
    extra = 0
    while True:
        r = ask(gw, "burst", max_tokens=mt)
        if r.status != 200:
            assert_budget_refused(r, "daily_budget")
            break
        extra += 1
        assert extra <= 15
    total = n_ok + extra
    assert total == 15, (n_ok, extra)     # 15 x 64,500 = 967,500; 16 would be 1,032,000
    assert total * A <= limit < total * A + R


def test_threshold_event_once_per_window(tg, sim):
    # 1,000,000 a day and 1,200,000 a month with alerts at 50%: each request
    # costs 154,500; the 4th (618,000) crosses both thresholds
    tenants = {"alert": tgtest.limited_tenant(daily=usd(1000000), monthly=usd(1200000), alert=50),
               "quiet": tgtest.limited_tenant(daily=usd(100000000), alert=50)}
    gw = start_gw(tg, sim, tenants)
    assert cost(100) == 154500
    for _ in range(3):
        assert ask(gw, "alert", max_tokens=100).status == 200
        assert ask(gw, "quiet", max_tokens=100).status == 200
    time.sleep(0.5)
    assert tgtest.gateway_events(gw, "budget_threshold") == []
    assert ask(gw, "alert", max_tokens=100).status == 200
    evs = tgtest.wait_for(lambda: (lambda x: x if len(x) >= 2 else None)(
        tgtest.gateway_events(gw, "budget_threshold")), timeout=3,
        what="two budget_threshold events")
    for _ in range(2):
        assert ask(gw, "alert", max_tokens=100).status == 200
    assert_budget_refused(ask(gw, "alert", max_tokens=100), "daily_budget")
    time.sleep(0.5)
    evs = tgtest.gateway_events(gw, "budget_threshold")
    assert sorted(e.get("window") for e in evs) == ["day", "month"], evs
    assert all(e.get("tenant") == "alert" for e in evs), evs
    now = time.time()
    g = time.gmtime(now)
    for e in evs:
        p = e.get("period")
        if e["window"] == "day":
            assert p in (time.strftime("%Y-%m-%d", g), int(now // 86400)), e
        else:
            assert p in (time.strftime("%Y-%m", g), (g.tm_year - 1970) * 12 + g.tm_mon - 1), e


def _spend_to_the_edge(gw):
    assert ask(gw, "keep").status == 200
    assert ask(gw, "keep").status == 200
    assert_budget_refused(ask(gw, "keep"), "daily_budget")


def _exactly_41000_left(gw):
    # 200,000 - 2 x 79,500: a 42,000 reservation is refused, 40,500 admitted
    assert_budget_refused(ask(gw, "keep", max_tokens=19), "daily_budget")
    assert ask(gw, "keep", max_tokens=18).status == 200


def test_spend_survives_a_restart(tg, sim):
    gw = start_gw(tg, sim, {"keep": tgtest.limited_tenant(daily=usd(200000))})
    _spend_to_the_edge(gw)
    assert gw.stop() == 0
    gw.start()
    _exactly_41000_left(gw)


def test_spend_saved_within_a_second_survives_sigkill(tg, sim):
    gw = start_gw(tg, sim, {"keep": tgtest.limited_tenant(daily=usd(200000))})
    _spend_to_the_edge(gw)
    time.sleep(1.6)        # saved every second
    gw.kill()
    gw.start()
    _exactly_41000_left(gw)


def test_threshold_event_not_raised_again_when_the_ledger_rebuilds_spend(tg, sim):
    """A window whose spend, rebuilt from the ledger at start, has already
    reached the threshold raised its event before the restart: the next
    settlement does not raise it again. The saved figures (which carry the
    event's flag) are lost here as after a kill -9 within their second, or
    with a new data_dir beside a shared PostgreSQL ledger."""
    import sqlite3
    gw = start_gw(tg, sim, {"alert": tgtest.limited_tenant(daily=usd(1000000), alert=50)})
    for _ in range(4):      # 4 x 154,500 = 618,000: past 50 % at the 4th
        assert ask(gw, "alert", max_tokens=100).status == 200
    tgtest.wait_for(lambda: len(tgtest.gateway_events(gw, "budget_threshold")) == 1,
                    timeout=3, what="one budget_threshold event")
    assert gw.stop() == 0
    db = sqlite3.connect(gw.db_path)
    with db:
        assert db.execute("DELETE FROM tenant_spend").rowcount > 0
    db.close()
    gw.start()
    # the day's spend came back from the ledger: 2 more fit, the 3rd does not
    assert ask(gw, "alert", max_tokens=100).status == 200
    assert ask(gw, "alert", max_tokens=100).status == 200
    assert_budget_refused(ask(gw, "alert", max_tokens=100), "daily_budget")
    time.sleep(0.5)
    evs = tgtest.gateway_events(gw, "budget_threshold")
    assert len(evs) == 1, evs
    m = tgtest.parse_metrics(tgtest.admin(gw, "/metrics").body.decode())
    assert m.get('llm_budget_threshold_events_total{tenant="alert",window="day"}', 0) == 0, m


def test_spend_save_held_off_by_a_lock_is_retried(tg, sim):
    """The saver's write of a tenant's spend that finds the database locked
    past its busy timeout is tried again once the lock goes, though the
    spend does not change meanwhile: before, the failed round had already
    cleared the tenant's changed mark and the saved figure stayed behind."""
    import sqlite3
    gw = start_gw(tg, sim, {"keep": tgtest.limited_tenant(daily=usd(200000))})
    db = sqlite3.connect(gw.db_path, timeout=10)

    def saved():
        row = db.execute("SELECT spent_nano FROM tenant_spend WHERE tenant = 'keep'"
                         " AND period LIKE 'day:%'").fetchone()
        return row[0] if row else None

    assert ask(gw, "keep").status == 200
    one = tgtest.wait_for(saved, timeout=5, what="the first save")
    lock = sqlite3.connect(gw.db_path, isolation_level=None, timeout=5)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        assert ask(gw, "keep", timeout=20).status == 200   # its record spools
        time.sleep(7)       # a save round waits its 5 s busy timeout and fails
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    tgtest.wait_for(lambda: saved() == 2 * one, timeout=5,
                    what="the second request's spend saved (%d saved)" % saved())
    assert "saving tenant spend failed" in gw.proc.stderr_text()
    db.close()
    # the record that spooled while the database was locked goes in too,
    # so the stop leaves nothing behind (a stop with a spool exits 75)
    tgtest.wait_for(lambda: not os.path.exists(gw.spool_path), timeout=30,
                    what="the spooled record replayed")


def test_a_request_recording_at_shutdown_is_settled(tg, sim):
    """A request whose ledger record is still being committed when the
    gateway stops (SIGTERM twice: drain, then close) is settled before the
    policy state goes: the gateway exits 0 and the spend it saved at
    shutdown holds both requests."""
    import signal
    import sqlite3
    import threading
    gw = start_gw(tg, sim, {"keep": tgtest.limited_tenant(daily=usd(200000))})
    assert ask(gw, "keep").status == 200
    lock = sqlite3.connect(gw.db_path, isolation_level=None, timeout=5)
    lock.execute("BEGIN EXCLUSIVE")     # the record waits: database locked
    try:
        def second():
            try:
                ask(gw, "keep", timeout=20)
            except OSError:
                pass        # the gateway closed the connection: it stopped
        t = threading.Thread(target=second, daemon=True)
        t.start()
        time.sleep(0.3)
        gw.proc.signal(signal.SIGTERM)
        time.sleep(0.2)
        gw.proc.signal(signal.SIGTERM)
        time.sleep(0.2)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    rc = gw.proc.wait(20)
    gw.checked_exit = True
    t.join(5)
    assert rc == 0, gw.proc.tail(30)
    gw.start()
    _exactly_41000_left(gw)
