"""Tenant limits kept in Redis (`state: redis://...`): a real redis-server
started on a free loopback port for each test, shared by one or two gateways.

- the refusals and headers are the same as with the memory backend;
- two gateways on one Redis admit exactly a tenant's requests per minute
  between them under concurrent load from both sides;
- concurrency slots are leases: a gateway killed with SIGKILL gives its
  slots back within the 30 s lease expiry;
- Redis stopped mid-load: `state_failure: closed` answers 503
  state_unavailable (and /readyz 503) while it is down, `open` keeps serving with each
  gateway's own limits and logs the outage; both recover by themselves when
  Redis returns;
- budget spend lives in Redis, so it survives a gateway restart and is seen
  by every gateway; keys are hash-tagged by tenant for Redis Cluster;
- a Redis that lost its data (FLUSHALL, a restart without persistence) gets
  its budget windows back from the ledger."""

import json
import re
import signal
import sqlite3
import sys
import threading
import time

import pytest

import tgtest

M = "llama-3.1-8b"
HELLO = "Hello there"      # estimate 27 tokens, sim prompt 9
LEASE_S = 30
RECONNECT_S = 2.5    # the longest reconnect backoff of a loop, with slack
SETTLE_S = 0.3       # for the settlement script sent after a response


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = tgtest.Sim(workdir=str(tmp_path_factory.mktemp("sim")), workers=2)
    s.start()
    try:
        yield s
    finally:
        s.stop(timeout=5)
        s.kill()


@pytest.fixture
def redis(request, tmp_path):
    d = tmp_path / "redis"
    d.mkdir()
    r = tgtest.Redis(workdir=str(d))
    r.start()
    try:
        yield r
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            # Redis logs to stdout: whether it restarted, crashed or
            # dropped a client is there, not in the gateway's log.
            sys.stderr.write("\n==== redis of %s ====\n%s\n" % (request.node.nodeid,
                                                               r.log_tail()))
        r.kill()


def start_gw(tg, sim, redis, tenants, failure="closed", ready=True, **overrides):
    ov = {"state": redis.url(), "state_failure": failure}
    ov.update(overrides)
    return tg.gateway({M: [sim.url]}, tenants=tenants, keys=tuple(tenants), overrides=ov,
                      ready=ready)


def ask(gw, tenant, max_tokens=1, timeout=10.0, **kw):
    return tgtest.chat(gw.port, gw.keys[tenant], max_tokens=max_tokens, content=HELLO,
                       timeout=timeout, **kw)


def refused(r, status, type_, code):
    assert r.status == status, r
    err = r.error()
    assert (err["type"], err["code"]) == (type_, code), err
    return tgtest.retry_after(r)


def hdr_int(r, name):
    v = r.header(name)
    assert v is not None and re.match(r"^-?[0-9]+$", v), "%s: %r in %r" % (name, v, r)
    return int(v)


def ok_or_none(r):
    return r if r.status == 200 else None


def open_stream(gw, tenant, body, token_ms=100):
    """A slow stream that was admitted (200), or None (closed) when refused."""
    st = tgtest.SSEStream(gw.port, body, key=gw.keys[tenant],
                          headers={"x-sim-token-ms": str(token_ms)})
    if st.status == 200:
        return st
    st.close()
    return None


def admitted_soon(send, timeout=1.0):
    """send() until it is not refused for concurrency, at most timeout s.

    With Redis the slot of a request that just completed is released by a
    script sent after the response: a request that follows at once, handled
    by another loop thread on another Redis connection, may get there
    first. Used only where a test follows a completed request at once."""
    deadline = time.monotonic() + timeout
    while True:
        r = send()
        if r.status != 429 or r.error()["code"] != "concurrency" or \
                time.monotonic() >= deadline:
            return r
        time.sleep(0.05)


def usd(nano):
    return "%d.%09d" % (nano // 10**9, nano % 10**9)


# ---------------------------------------------------------------------------

def test_refusals_and_headers(tg, sim, redis):
    tenants = {
        "rq": tgtest.limited_tenant(rpm=3, tpm=10000),
        "tk": tgtest.limited_tenant(tpm=100),
        "cc": tgtest.limited_tenant(concurrency=1),
        "dy": tgtest.limited_tenant(daily=usd(200000)),
        "mo": tgtest.limited_tenant(monthly=usd(100000)),
    }
    gw = start_gw(tg, sim, redis, tenants)

    got = []
    for _ in range(3):
        r = ask(gw, "rq", max_tokens=10)
        assert r.status == 200, r
        assert hdr_int(r, "x-ratelimit-limit-requests") == 3
        assert hdr_int(r, "x-ratelimit-limit-tokens") == 10000
        assert 0 < tgtest.parse_duration_s(r.header("x-ratelimit-reset-requests")) <= 60
        got.append(hdr_int(r, "x-ratelimit-remaining-requests"))
        if len(got) == 1:
            assert hdr_int(r, "x-ratelimit-remaining-tokens") == 10000 - 37
    assert got == [2, 1, 0]
    assert 55 <= refused(ask(gw, "rq"), 429, "rate_limit_error", "requests") <= 60

    assert ask(gw, "tk", max_tokens=50).status == 200
    refused(ask(gw, "tk", max_tokens=50), 429, "rate_limit_error", "tokens")

    st = tgtest.SSEStream(gw.port, tgtest.chat_body(M, max_tokens=30, stream=True),
                          key=gw.keys["cc"], headers={"x-sim-token-ms": "100"})
    assert st.status == 200
    refused(ask(gw, "cc"), 429, "rate_limit_error", "concurrency")
    st.abort()
    tgtest.wait_for(lambda: ok_or_none(ask(gw, "cc")), timeout=3,
                    what="the slot back after a disconnect")
    # completion and an upstream error give it back too
    assert admitted_soon(lambda: ask(gw, "cc")).status == 200
    assert admitted_soon(lambda: ask(gw, "cc", headers={"x-sim-fault": "status:500"})).status == 500
    assert admitted_soon(lambda: ask(gw, "cc")).status == 200

    assert ask(gw, "dy", max_tokens=50).status == 200
    assert ask(gw, "dy", max_tokens=50).status == 200
    ra = refused(ask(gw, "dy", max_tokens=50), 402, "insufficient_quota", "daily_budget")
    assert abs(ra - tgtest.seconds_to_utc_day_end()) <= 5
    # the settlement script follows the response: give it a moment before
    # checking the exact amount left
    time.sleep(SETTLE_S)
    refused(ask(gw, "dy", max_tokens=19), 402, "insufficient_quota", "daily_budget")
    assert ask(gw, "dy", max_tokens=18).status == 200      # 41,000 left, 40,500 reserved

    assert ask(gw, "mo", max_tokens=50).status == 200
    ra = refused(ask(gw, "mo", max_tokens=50), 402, "insufficient_quota", "monthly_budget")
    assert abs(ra - tgtest.seconds_to_utc_month_end()) <= 5

    # every tenant's keys carry its hash tag
    keys = redis.keys()
    for t in tenants:
        assert any("{%s}" % t in k for k in keys), (t, keys)


def test_a_tenant_over_its_own_limit_leaves_the_global_limit_to_others(tg, sim, redis):
    """As with the memory state: the global slot of a request its tenant
    refused goes back to Redis's global log."""
    tenants = {"noisy": tgtest.limited_tenant(rpm=1), "quiet": tgtest.limited_tenant()}
    gw = start_gw(tg, sim, redis, tenants, global_rate_limit={"requests_per_second": 4})
    tgtest.check_global_limit_left_to_others(lambda t: ask(gw, t), "noisy", "quiet", 4)


def test_two_gateways_share_requests_per_minute(tg, sim, redis):
    tenants = {"shared": tgtest.limited_tenant(rpm=60)}
    a = start_gw(tg, sim, redis, tenants)
    b = start_gw(tg, sim, redis, tenants)
    jobs = [(a if i % 2 == 0 else b,) for i in range(130)]
    rs = tgtest.parallel(lambda gw: (gw, ask(gw, "shared")), jobs, threads=12, timeout=90)
    for x in rs:
        assert isinstance(x, tuple), x
    ok = [(gw, r) for gw, r in rs if r.status == 200]
    assert len(ok) == 60, [r.status for _, r in rs]
    by_a = sum(1 for gw, _ in ok if gw is a)
    assert 0 < by_a < 60, by_a     # both gateways admitted some
    # one admission per count left across both gateways: atomic in Redis
    assert sorted(hdr_int(r, "x-ratelimit-remaining-requests") for _, r in ok) == list(range(60))
    for gw, r in rs:
        if r.status != 200:
            refused(r, 429, "rate_limit_error", "requests")
    assert ask(a, "shared").status == 429 and ask(b, "shared").status == 429


def evalsha_calls(redis):
    m = re.search(r"cmdstat_evalsha:calls=([0-9]+)", redis.cmd("INFO", "commandstats"))
    return int(m.group(1)) if m else 0


def test_two_gateways_with_holdings_admit_exactly_the_limit(tg, sim, redis):
    """A busy tenant far from its limits is admitted from grants each
    gateway loop holds (docs/state-redis.md, Holdings), not one script call
    a request. Near the limit they stop; a grant left unused goes back
    within half a second; the two gateways never admit more than the limit
    between them, and exactly the limit once the grants are back."""
    rpm = 600
    tenants = {"busy": tgtest.limited_tenant(rpm=rpm)}
    a = start_gw(tg, sim, redis, tenants)
    b = start_gw(tg, sim, redis, tenants)
    def burst(n):
        jobs = [(a if i % 2 == 0 else b,) for i in range(n)]
        rs = tgtest.parallel(lambda gw: ask(gw, "busy"), jobs, threads=16, timeout=120)
        return rs, [r.status for r in rs]

    # far from the limit: most requests never reach Redis on their own
    calls0 = evalsha_calls(redis)
    _, far = burst(300)
    assert far == [200] * 300, far
    calls = evalsha_calls(redis) - calls0
    print("far: %d script calls for 300 requests" % calls)
    assert calls < 150, calls
    # up to the limit and past it: never more
    _, first = burst(500)
    assert all(st in (200, 429) for st in first), first
    assert 300 + first.count(200) <= rpm
    time.sleep(1.0)
    # the grants left unused are back: exactly the limit in all
    rs, second = burst(200)
    assert 300 + first.count(200) + second.count(200) == rpm, (first.count(200), second.count(200))
    for r in rs:
        if r.status != 200:
            refused(r, 429, "rate_limit_error", "requests")


def test_concurrency_shared_between_gateways(tg, sim, redis):
    tenants = {"cc": tgtest.limited_tenant(concurrency=2)}
    a = start_gw(tg, sim, redis, tenants)
    b = start_gw(tg, sim, redis, tenants)
    body = tgtest.chat_body(M, max_tokens=40, stream=True)
    sa = tgtest.SSEStream(a.port, body, key=a.keys["cc"], headers={"x-sim-token-ms": "100"})
    sb = tgtest.SSEStream(b.port, body, key=b.keys["cc"], headers={"x-sim-token-ms": "100"})
    assert (sa.status, sb.status) == (200, 200)
    refused(ask(a, "cc"), 429, "rate_limit_error", "concurrency")
    refused(ask(b, "cc"), 429, "rate_limit_error", "concurrency")
    sa.abort()
    tgtest.wait_for(lambda: ok_or_none(ask(b, "cc")), timeout=3,
                    what="B admitted once A's client left")
    sb.abort()


def test_killed_gateway_slots_expire(tg, sim, redis):
    """SIGKILL leaves no chance to give slots back: the leases expire."""
    tenants = {"lease": tgtest.limited_tenant(concurrency=2)}
    a = start_gw(tg, sim, redis, tenants)
    b = start_gw(tg, sim, redis, tenants)
    body = tgtest.chat_body(M, max_tokens=200, stream=True)
    held = [tgtest.SSEStream(a.port, body, key=a.keys["lease"], headers={"x-sim-token-ms": "500"},
                             timeout=60) for _ in range(2)]
    assert [s.status for s in held] == [200, 200]
    refused(ask(b, "lease"), 429, "rate_limit_error", "concurrency")
    time.sleep(1.0)
    a.kill()
    a.checked_exit = True
    t_kill = time.monotonic()
    for s in held:
        s.close()
    first = ask(b, "lease")
    refused(first, 429, "rate_limit_error", "concurrency")

    # poll B: refused for concurrency until the leases expire, then admitted
    history = []
    deadline = t_kill + LEASE_S + 8
    while True:
        t = time.monotonic() - t_kill
        try:
            r = ask(b, "lease")
            history.append((round(t, 1), r.status, r.error()["code"] if r.status != 200 else ""))
        except OSError as e:
            history.append((round(t, 1), "error", repr(e)))
            r = None
        if r is not None and r.status == 200:
            break
        assert time.monotonic() < deadline, \
            "the killed gateway's slots did not come back: %s" % history[-20:]
        time.sleep(0.5)
    waited = time.monotonic() - t_kill
    assert all(h[1] in (200, 429) and h[2] in ("", "concurrency") for h in history), history
    # a lease renewed every 10 s runs 20..30 s past the last renewal
    assert 15 <= waited <= LEASE_S + 5, (waited, history[-5:])
    # both slots are back (the poll's own slot is released asynchronously:
    # allow it a moment)
    body = tgtest.chat_body(M, max_tokens=20, stream=True)
    streams = []
    for _ in range(2):
        st = tgtest.wait_for(lambda: open_stream(b, "lease", body), timeout=2,
                             what="a slot on B")
        streams.append(st)
    s1, s2 = streams
    refused(ask(b, "lease"), 429, "rate_limit_error", "concurrency")
    s1.abort()
    s2.abort()


class Load:
    """Requests from a background thread, one at a time, recording
    (monotonic time sent, status, error code, seconds taken). Bounded by
    `limit` seconds; stop() ends it."""

    def __init__(self, gw, tenant, limit=60.0, pause=0.05):
        self.gw, self.tenant, self.limit, self.pause = gw, tenant, limit, pause
        self.log = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        end = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < end:
            t = time.monotonic()
            try:
                r = ask(self.gw, self.tenant, timeout=10)
                code = r.error()["code"] if r.status != 200 else None
                rec = (t, r.status, code, time.monotonic() - t)
            except Exception as e:  # noqa: BLE001 - recorded, asserted below
                rec = (t, -1, repr(e), time.monotonic() - t)
            with self.lock:
                self.log.append(rec)
            time.sleep(self.pause)

    def since(self, t):
        with self.lock:
            return [x for x in self.log if x[0] >= t]

    def wait_status(self, status, after, timeout, what):
        return tgtest.wait_for(lambda: next((x for x in self.since(after) if x[1] == status), None),
                               timeout=timeout, what=what)

    def stop(self):
        self._stop.set()
        self.thread.join(15)
        return list(self.log)


def test_redis_down_fail_closed_then_recovers(tg, sim, redis):
    tenants = {"load": tgtest.limited_tenant(rpm=100000, concurrency=50)}
    gw = start_gw(tg, sim, redis, tenants, failure="closed")
    load = Load(gw, "load")
    try:
        load.wait_status(200, 0, 5, "a first 200")
        time.sleep(0.3)
        t_stop = time.monotonic()
        redis.stop()
        first503 = load.wait_status(503, t_stop, 5, "503 while Redis is down")
        assert first503[2] == "state_unavailable", first503
        time.sleep(1.0)
        t_restart = time.monotonic()
        redis.start()
        t_up = time.monotonic()
        back = load.wait_status(200, t_up, 15, "automatic recovery after Redis returns")
        # each loop thread reconnects on its own (backoff up to 2 s): give
        # the slowest its time, then everything must be admitted
        t_stable = back[0] + RECONNECT_S
        time.sleep(max(0.0, t_stable + 1.0 - time.monotonic()))
    finally:
        log = load.stop()
    statuses = {x[1] for x in log}
    assert statuses <= {200, 503}, [x for x in log if x[1] not in (200, 503)]
    # nothing admitted from the first refusal until Redis came back
    down = [x for x in log if first503[0] <= x[0] and x[0] + x[3] < t_restart]
    assert down and all(x[1] == 503 and x[2] == "state_unavailable" for x in down), down
    # recovered for good
    after = [x for x in log if x[0] >= t_stable]
    assert len(after) >= 5 and all(x[1] == 200 for x in after), after
    # no request hung while Redis was away
    assert max(x[3] for x in log) < 5, max(x[3] for x in log)
    # the refusal as a client sees it
    assert tgtest.admin(gw, "/readyz").status == 200
    redis.stop()
    r = tgtest.wait_for(lambda: (lambda x: x if x.status == 503 else None)(ask(gw, "load")),
                        timeout=5, what="503")
    err = r.error()
    assert err["code"] == "state_unavailable", err
    assert re.search(r"state|redis|unavailable", err["message"], re.I), err
    assert tgtest.retry_after(r) >= 1
    # a gateway that refuses everything says so to its load balancer
    ready = tgtest.wait_for(lambda: (lambda x: x if x.status == 503 else None)(
        tgtest.admin(gw, "/readyz")), timeout=5, what="/readyz 503 while Redis is down")
    assert json.loads(ready.body)["state"] == "unavailable", ready
    redis.start()
    tgtest.wait_for(lambda: tgtest.admin(gw, "/readyz").status == 200, timeout=15,
                    what="/readyz 200 once every loop is connected again")
    tgtest.wait_for(lambda: ok_or_none(ask(gw, "load")), timeout=15, what="recovery again")


def test_not_ready_before_redis_answers(tg, sim, redis):
    """With state_failure: closed a gateway that starts while Redis is away
    is not ready (it would refuse every request); it is once Redis comes,
    and then admits at once. With open it is ready all along."""
    tenants = {"t": tgtest.limited_tenant(rpm=100)}
    redis.stop()
    closed = start_gw(tg, sim, redis, tenants, failure="closed", ready=False)
    opened = start_gw(tg, sim, redis, tenants, failure="open", ready=False)
    tgtest.wait_for(lambda: tgtest.admin(opened, "/readyz").status == 200, timeout=10,
                    what="the open gateway ready without Redis")
    r = tgtest.admin(closed, "/readyz")
    assert r.status == 503 and json.loads(r.body)["state"] == "unavailable", r
    refused(ask(closed, "t"), 503, "server_error", "state_unavailable")
    redis.start()
    tgtest.wait_for(lambda: tgtest.admin(closed, "/readyz").status == 200, timeout=15,
                    what="/readyz 200 once Redis answers")
    # ready means admitted: the first request after it is not refused
    assert ask(closed, "t").status == 200


def test_redis_down_fail_open_uses_local_limits(tg, sim, redis):
    tenants = {"busy": tgtest.limited_tenant(rpm=100000),
               "lim": tgtest.limited_tenant(rpm=4)}
    gw = start_gw(tg, sim, redis, tenants, failure="open")
    assert ask(gw, "busy").status == 200
    assert any("{busy}" in k for k in redis.keys())
    load = Load(gw, "busy")
    try:
        time.sleep(0.3)
        t_stop = time.monotonic()
        redis.stop()
        tgtest.wait_for(lambda: tgtest.gateway_events(gw, "state_backend_unavailable"),
                        timeout=5, what="a state_backend_unavailable line")
        time.sleep(0.5)
        # each gateway on its own: the tenant's limit still holds locally
        got = [ask(gw, "lim").status for _ in range(6)]
        assert got == [200] * 4 + [429] * 2, got
        refused(ask(gw, "lim"), 429, "rate_limit_error", "requests")
        t_restart = time.monotonic()
        redis.start()
        tgtest.wait_for(lambda: tgtest.gateway_events(gw, "state_backend_recovered"),
                        timeout=15, what="a state_backend_recovered line")
        time.sleep(0.5)
    finally:
        log = load.stop()
    during = [x for x in log if x[0] >= t_stop]
    assert during and all(x[1] == 200 for x in during), \
        [x for x in during if x[1] != 200]
    assert any(x[0] < t_restart for x in during)
    text = gw.proc.stderr_text()
    assert text.index("state_backend_unavailable") < text.index("state_backend_recovered")
    # back on Redis: its (empty) window decides again, not the local one
    tgtest.wait_for(lambda: ok_or_none(ask(gw, "lim")), timeout=5,
                    what="the tenant admitted by Redis again")
    assert any("{lim}" in k for k in redis.keys()), redis.keys()


def test_requests_at_start_wait_for_the_first_connection(tg, sim, redis):
    """A gateway that has just started and is still connecting to Redis does
    not decide by state_failure: its first requests wait for the connection
    (up to its timeout) and are then admitted by Redis. Deciding by local
    limits there let a tenant's first requests past Redis's windows."""
    tenants = {"early": tgtest.limited_tenant(rpm=1000)}
    redis.proc.signal(signal.SIGSTOP)  # connects are accepted, never answered
    try:
        gw = start_gw(tg, sim, redis, tenants, failure="open")
        got = []
        t = threading.Thread(target=lambda: got.append(ask(gw, "early")))
        t.start()
        time.sleep(0.6)
        assert t.is_alive(), got
    finally:
        redis.proc.signal(signal.SIGCONT)
    t.join(10)
    assert got and got[0].status == 200, got
    assert any("{early}" in k for k in redis.keys()), redis.keys()
    assert not tgtest.gateway_events(gw, "state_backend_unavailable")


def test_fail_open_keeps_the_spend_and_gives_redis_what_it_admitted(tg, sim, redis):
    """state_failure: open decides by local limits while Redis cannot
    answer, but not with budgets started again from 0: a tenant whose day's
    budget is spent is still refused. What the local limits admit meanwhile
    is added to Redis's windows once it answers again, so they equal the
    ledger (it was spent on the GPU, and Redis never saw it)."""
    tenants = {"fo": tgtest.limited_tenant(daily=usd(200000)),
               "fo2": tgtest.limited_tenant(daily=usd(10 ** 9))}
    gw = start_gw(tg, sim, redis, tenants, failure="open")
    assert ask(gw, "fo", max_tokens=50).status == 200
    assert ask(gw, "fo", max_tokens=50).status == 200
    refused(ask(gw, "fo", max_tokens=50), 402, "insufficient_quota", "daily_budget")
    assert ask(gw, "fo2", max_tokens=20).status == 200
    redis.proc.signal(signal.SIGSTOP)
    try:
        # the first waits for Redis's reply timeout, then the local limits decide
        got = [ask(gw, "fo", max_tokens=50).status for _ in range(3)]
        assert tgtest.gateway_events(gw, "state_backend_unavailable")
        outage = [ask(gw, "fo2", max_tokens=20 + i).status for i in range(3)]
    finally:
        redis.proc.signal(signal.SIGCONT)
    assert got == [402] * 3, got
    assert outage == [200] * 3, outage
    assert ledger_nano(gw, "fo") <= 200000
    tgtest.wait_for(lambda: int(window(redis, "fo2").get("spent", 0)) == ledger_nano(gw, "fo2"),
                    timeout=10, what="Redis's window of fo2 equal to the ledger again")
    assert int(window(redis, "fo")["spent"]) == ledger_nano(gw, "fo")
    # and it stays so: nothing is added twice
    time.sleep(2.5)
    assert int(window(redis, "fo2")["spent"]) == ledger_nano(gw, "fo2")


def test_budget_spend_kept_in_redis(tg, sim, redis):
    tenants = {"spend": tgtest.limited_tenant(daily=usd(200000))}
    a = start_gw(tg, sim, redis, tenants)
    assert ask(a, "spend", max_tokens=50).status == 200
    assert ask(a, "spend", max_tokens=50).status == 200
    refused(ask(a, "spend", max_tokens=50), 402, "insufficient_quota", "daily_budget")
    # another gateway (its own data_dir) sees the same spend
    b = start_gw(tg, sim, redis, tenants)
    refused(ask(b, "spend", max_tokens=19), 402, "insufficient_quota", "daily_budget")
    # and so does the first after a restart
    assert a.stop() == 0
    a.start()
    refused(ask(a, "spend", max_tokens=19), 402, "insufficient_quota", "daily_budget")
    assert ask(a, "spend", max_tokens=18).status == 200    # exactly 41,000 was left
    refused(ask(b, "spend", max_tokens=1), 402, "insufficient_quota", "daily_budget")


def test_a_stop_under_load_leaves_redis_spend_equal_to_the_ledger(tg, sim, redis):
    """A gateway stopped (SIGTERM) while 16 clients keep a tenant busy: what
    its loops owed Redis when they closed (the holdings' spend not reported
    yet, the last settlements) goes out first. Redis's spend for the day
    then equals the ledger's to the nano-USD, and nothing stays reserved."""
    tenants = {"busy": tgtest.limited_tenant(daily=usd(10**15), monthly=usd(10**16))}
    gw = start_gw(tg, sim, redis, tenants)
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                ask(gw, "busy", max_tokens=20, timeout=5)
            except OSError:
                pass

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(2.5)
    gw.proc.signal(signal.SIGTERM)
    stop.set()
    for t in threads:
        t.join(30)
    assert gw.proc.wait(30) == 0
    gw.checked_exit = True
    db = sqlite3.connect(gw.db_path)
    rows, nano = db.execute("SELECT COUNT(*), SUM(cost_nano) FROM ledger").fetchone()
    db.close()
    assert rows > 1000, rows
    day = int(time.time() // 86400)
    window = redis.cmd("HGETALL", "tg:{busy}:day:%d" % day)
    got = dict(zip(window[::2], window[1::2]))
    assert int(got["spent"]) == nano, (got, nano, rows)
    assert int(got.get("reserved", 0)) == 0, got


def spend_gauges(gw, tenant):
    """The (daily, monthly) spend gauges of tenant on gw's /metrics, as the
    exposition's text."""
    expo = tgtest.admin(gw, "/metrics").body.decode()
    got = []
    for name in ("llm_tenant_daily_spend_usd", "llm_tenant_monthly_spend_usd"):
        m = re.search(r'^%s\{tenant="%s"\} (\S+)$' % (name, re.escape(tenant)), expo, re.M)
        got.append(m.group(1) if m else None)
    return tuple(got)


def test_spend_gauges_read_redis(tg, sim, redis):
    """With state redis the spend gauges show what Redis counted: the
    ledger's spend on the gateway that served the traffic, and the same
    figure, within a refresh, on a gateway sharing the Redis that served
    none of it."""
    tenants = {"sg": tgtest.limited_tenant(daily="1000", monthly="5000"),
               "idle": tgtest.limited_tenant()}
    a = start_gw(tg, sim, redis, tenants)
    b = start_gw(tg, sim, redis, tenants)
    for n in (5, 12, 30, 7):
        assert ask(a, "sg", max_tokens=n).status == 200
    time.sleep(SETTLE_S)
    spend = tgtest.money_json(a.tool("usage", "--tenant", "sg",
                                     "--day", tgtest.utc_day()).stdout)["spend_usd"]
    assert spend > 0, spend
    want = ("%s" % spend, "%s" % spend)    # a fresh Redis: the month is the day
    tgtest.wait_for(lambda: spend_gauges(a, "sg") == want, timeout=5,
                    what="A's gauges show the ledger's spend")
    # B never served sg: its figures come from its periodic read of Redis
    assert b.usage("sg", tgtest.utc_day())["spend_usd"] == 0
    tgtest.wait_for(lambda: spend_gauges(b, "sg") == want, timeout=6,
                    what="B's gauges show the spend A's traffic made")
    # a tenant without traffic reads 0 on both
    for gw in (a, b):
        assert tuple(float(x) for x in spend_gauges(gw, "idle")) == (0.0, 0.0)
    # more traffic through B shows on A too (A learns it from Redis)
    assert ask(b, "sg", max_tokens=9).status == 200
    time.sleep(SETTLE_S)
    more = tgtest.money_json(b.tool("usage", "--tenant", "sg",
                                    "--day", tgtest.utc_day()).stdout)["spend_usd"]
    total = "%s" % (spend + more)
    tgtest.wait_for(lambda: spend_gauges(a, "sg")[0] == total, timeout=6,
                    what="A's daily gauge includes B's spend")
    tgtest.wait_for(lambda: spend_gauges(b, "sg")[0] == total, timeout=6,
                    what="B's daily gauge includes its own spend")



def test_spend_follows_the_tenants_a_reload_brings(tg, sim, redis):
    """The spend followed in Redis is the config's tenants', at most 4,096:
    a reload that replaces tenants frees the places of those it drops, so a
    new tenant's spend gauge shows its spend (before, the places of every
    tenant ever seen were kept, and a new one read 0 for good); one past
    the bound has no spend gauge, is counted and said on stderr."""
    def with_fillers(prefix, first, named):
        t = {n: tgtest.limited_tenant(daily="1000") for n in named}
        t.update({"%s%d" % (prefix, i): tgtest.limited_tenant()
                  for i in range(first, 4096 - len(named) + first)})
        return t

    def series(gw, name):
        return re.findall(r"^%s\{[^}]*\} \S+$" % name, tgtest.admin(gw, "/metrics").body.decode(),
                          re.M)

    gw = tg.gateway({M: [sim.url]}, tenants=with_fillers("t", 0, ["payer"]),
                    keys=("payer",), overrides={"state": redis.url()})
    assert len(series(gw, "llm_tenant_daily_spend_usd")) == 4096
    gw.config["tenants"] = with_fillers("u", 0, ["payer", "newco"])
    tgtest.gateway_reload(gw)
    gw.keys["newco"] = gw.create_key("newco")
    r = tgtest.chat(gw.port, gw.keys["newco"], max_tokens=5, content=HELLO)
    assert r.status == 200, r
    time.sleep(SETTLE_S)
    spend = tgtest.money_json(gw.tool("usage", "--tenant", "newco",
                                      "--day", tgtest.utc_day()).stdout)["spend_usd"]
    assert spend > 0, spend
    tgtest.wait_for(lambda: spend_gauges(gw, "newco") == ("%s" % spend, "%s" % spend),
                    timeout=6, what="newco's gauges show its spend")
    assert "not followed" not in gw.proc.stderr_text()
    expo = tgtest.admin(gw, "/metrics").body.decode()
    assert re.search(r"^llm_tenant_spend_untracked 0$", expo, re.M)

    gw.config["tenants"]["extra"] = tgtest.limited_tenant(daily="1000")
    tgtest.gateway_reload(gw)
    expo = tgtest.admin(gw, "/metrics").body.decode()
    assert re.search(r"^llm_tenant_spend_untracked 1$", expo, re.M)
    assert len(series(gw, "llm_tenant_daily_spend_usd")) == 4096
    assert spend_gauges(gw, "extra") == (None, None)
    assert re.search(r'^llm_tenant_daily_budget_usd\{tenant="extra"\} ', expo, re.M)
    assert gw.proc.stderr_text().count("the spend of 1 of 4097 tenants is not followed") == 1

# ---------------------------------------------------------------------------
# Redis that lost its data: the budget windows come back from the ledger

def ledger_nano(gw, tenant):
    """The tenant's spend today in gw's SQLite ledger (nano-USD)."""
    db = sqlite3.connect("file:%s?mode=ro" % gw.db_path, uri=True, timeout=10)
    try:
        (nano,) = db.execute("SELECT COALESCE(SUM(cost_nano), 0) FROM ledger "
                             "WHERE tenant = ? AND ts_ms >= ?",
                             (tenant, int(time.time() // 86400) * 86400000)).fetchone()
    finally:
        db.close()
    return nano


def window(redis, tenant, month=False):
    """The tenant's current day (or month) window in Redis, as a dict."""
    if month:
        g = time.gmtime()
        key = "tg:{%s}:month:%d" % (tenant, (g.tm_year - 1970) * 12 + g.tm_mon - 1)
    else:
        key = "tg:{%s}:day:%d" % (tenant, int(time.time() // 86400))
    got = redis.cmd("HGETALL", key) or []
    return dict(zip(got[::2], got[1::2]))


def test_a_flushed_redis_gets_its_budget_windows_back_from_the_ledger(tg, sim, redis):
    """FLUSHALL while a tenant is near its daily budget (past its alert
    threshold): within a few seconds Redis's day and month windows hold the
    ledger's spend again, with their TTLs and the alert marked raised; the
    tenant is refused as before, with exactly what was left, and no second
    threshold event is written."""
    tenants = {"fl": tgtest.limited_tenant(daily=usd(200000), alert=50)}
    gw = start_gw(tg, sim, redis, tenants)
    assert ask(gw, "fl", max_tokens=50).status == 200
    assert ask(gw, "fl", max_tokens=50).status == 200
    time.sleep(SETTLE_S)
    spent = ledger_nano(gw, "fl")
    assert spent == 159000, spent
    assert int(window(redis, "fl")["spent"]) == spent
    tgtest.wait_for(lambda: len(tgtest.gateway_events(gw, "budget_threshold")) == 1,
                    timeout=3, what="the threshold event")

    redis.cmd("FLUSHALL")
    assert window(redis, "fl") == {}
    tgtest.wait_for(lambda: window(redis, "fl").get("spent") == str(spent), timeout=5,
                    what="the day window raised to the ledger's spend")
    assert window(redis, "fl", month=True).get("spent") == str(spent)
    assert window(redis, "fl").get("alerted") == "1"
    day_key = "tg:{fl}:day:%d" % int(time.time() // 86400)
    ttl_s = redis.cmd("PTTL", day_key) / 1000.0
    assert abs(ttl_s - (tgtest.seconds_to_utc_day_end() + 3 * 86400)) <= 5, ttl_s
    assert "state_redis_reseed" in gw.proc.stderr_text()
    # the budget holds as before the loss: exactly 41,000 nano-USD left
    refused(ask(gw, "fl", max_tokens=19), 402, "insufficient_quota", "daily_budget")
    assert ask(gw, "fl", max_tokens=18).status == 200
    time.sleep(SETTLE_S)
    assert int(window(redis, "fl")["spent"]) == ledger_nano(gw, "fl")
    assert spend_gauges(gw, "fl")[0] == usd(ledger_nano(gw, "fl"))
    assert len(tgtest.gateway_events(gw, "budget_threshold")) == 1


def test_a_running_requests_lease_comes_back_after_redis_lost_its_data(tg, sim, redis):
    """FLUSHALL while a stream holds the tenant's only slot: within about
    a second of noticing the loss, the gateway adds the stream's lease back
    with its reservation, so another request is refused for concurrency
    (before, it was admitted until the stream ended); when the stream ends
    its settlement gives both back."""
    tenants = {"lr": tgtest.limited_tenant(concurrency=1, daily="1")}
    gw = start_gw(tg, sim, redis, tenants)
    leases = "tg:{lr}:leases"
    st = tgtest.SSEStream(gw.port, tgtest.chat_body(M, max_tokens=60, stream=True),
                          key=gw.keys["lr"], headers={"x-sim-token-ms": "100"}, timeout=30)
    assert st.status == 200
    (member,) = redis.cmd("ZRANGE", leases, 0, -1)
    cost = int(member.split()[3])
    assert cost > 0 and int(window(redis, "lr")["reserved"]) == cost
    refused(ask(gw, "lr"), 429, "rate_limit_error", "concurrency")

    redis.cmd("FLUSHALL")
    tgtest.wait_for(lambda: redis.cmd("ZRANGE", leases, 0, -1) == [member], timeout=4,
                    what="the stream's lease added back")
    assert not st.done
    assert int(window(redis, "lr")["reserved"]) == cost
    assert int(window(redis, "lr", month=True)["reserved"]) == cost
    assert redis.cmd("PTTL", leases) == -1  # as every leases key: no TTL
    assert redis.cmd("PTTL", "tg:{lr}:day:%d" % int(time.time() // 86400)) > 0
    refused(ask(gw, "lr"), 429, "rate_limit_error", "concurrency")
    assert len(tgtest.gateway_events(gw, "state_redis_lease_restored")) == 1

    for _ in st.events():
        pass
    assert st.done
    tgtest.wait_for(lambda: redis.cmd("ZCARD", leases) == 0, timeout=3,
                    what="the settlement's lease removal")
    time.sleep(SETTLE_S)
    assert int(window(redis, "lr")["reserved"]) == 0
    assert int(window(redis, "lr")["spent"]) == ledger_nano(gw, "lr") > 0
    assert ask(gw, "lr").status == 200


def held_in_redis(redis, tenant):
    """(slots, nano-USD reserved) the tenant's leases and holdings hold."""
    slots = cost = 0
    for m in redis.cmd("ZRANGE", "tg:{%s}:leases" % tenant, 0, -1) or []:
        slots, cost = slots + 1, cost + int(m.split()[3])
    for m in redis.cmd("ZRANGE", "tg:{%s}:holds" % tenant, 0, -1) or []:
        f = m.split()
        slots, cost = slots + int(f[1]), cost + int(f[4])
    return slots, cost


def test_holdings_and_leases_come_back_after_redis_lost_its_data(tg, sim, redis):
    """30 streams opened at once: some hold leases, the rest run on the
    loops' holdings (the tenant is busy). After FLUSHALL the gateway makes
    both again within a few seconds (a holding that admits nothing more is
    otherwise renewed only every 10 s): 30 slots held, and the windows
    reserve exactly what the members say. When the streams end, every slot
    and every nano-USD goes back."""
    tenants = {"hl": tgtest.limited_tenant(concurrency=200, daily="10")}
    gw = start_gw(tg, sim, redis, tenants)
    body = tgtest.chat_body(M, max_tokens=80, stream=True)
    sts = [tgtest.SSEStream(gw.port, body, key=gw.keys["hl"], headers={"x-sim-token-ms": "100"},
                            timeout=30) for _ in range(30)]
    assert [s.status for s in sts] == [200] * 30
    tgtest.wait_for(lambda: held_in_redis(redis, "hl")[0] == 30, timeout=3,
                    what="unused grants given back: 30 slots held")
    assert redis.cmd("ZCARD", "tg:{hl}:holds") >= 1
    time.sleep(1.0)  # every grant's period over: the holdings sit idle
    assert held_in_redis(redis, "hl")[0] == 30

    redis.cmd("FLUSHALL")
    tgtest.wait_for(lambda: held_in_redis(redis, "hl")[0] == 30, timeout=4,
                    what="the leases and holdings made again")
    assert not any(s.done for s in sts)
    _, cost = held_in_redis(redis, "hl")
    assert cost > 0
    assert int(window(redis, "hl")["reserved"]) == cost
    assert int(window(redis, "hl", month=True)["reserved"]) == cost

    for s in sts:
        s.abort()
    tgtest.wait_for(lambda: held_in_redis(redis, "hl") == (0, 0), timeout=5,
                    what="every slot back")
    tgtest.wait_for(lambda: int(window(redis, "hl")["reserved"]) == 0, timeout=3,
                    what="every reservation back")


def test_a_reseed_judges_raised_alerts_by_the_reloaded_threshold(tg, sim, redis):
    """A reload lowers the tenant's alert threshold below what it has spent;
    the next request raises the event. After FLUSHALL the re-seed marks
    the window's event raised by the running threshold (50%), not the one
    the gateway started with (90%), so the next request raises none again."""
    tenants = {"ra": tgtest.limited_tenant(daily=usd(200000), alert=90)}
    gw = start_gw(tg, sim, redis, tenants)
    assert ask(gw, "ra", max_tokens=50).status == 200
    assert ask(gw, "ra", max_tokens=50).status == 200
    time.sleep(SETTLE_S)
    assert ledger_nano(gw, "ra") == 159000  # 79.5%: under 90, no event
    assert tgtest.gateway_events(gw, "budget_threshold") == []
    assert window(redis, "ra").get("alerted", "0") == "0"

    gw.config["tenants"]["ra"]["budget"]["alert_threshold_percent"] = 50
    tgtest.gateway_reload(gw)
    assert ask(gw, "ra", max_tokens=1).status == 200
    tgtest.wait_for(lambda: len(tgtest.gateway_events(gw, "budget_threshold")) == 1,
                    timeout=3, what="the threshold event at 50%")
    assert window(redis, "ra").get("alerted") == "1"

    time.sleep(SETTLE_S)
    spent = ledger_nano(gw, "ra")
    redis.cmd("FLUSHALL")
    tgtest.wait_for(lambda: window(redis, "ra").get("spent") == str(spent), timeout=5,
                    what="the day window raised to the ledger's spend")
    assert window(redis, "ra").get("alerted") == "1"
    assert ask(gw, "ra", max_tokens=1).status == 200
    time.sleep(SETTLE_S)
    assert int(window(redis, "ra")["spent"]) == ledger_nano(gw, "ra")
    assert len(tgtest.gateway_events(gw, "budget_threshold")) == 1


def test_a_gateway_started_on_an_empty_redis_refuses_what_its_ledger_spent(tg, sim, redis):
    """Redis restarted empty while the gateway was stopped: the gateway
    raises the windows from its ledger before it serves, so its first
    request over the budget is refused and its first scrape shows the
    ledger's spend."""
    tenants = {"es": tgtest.limited_tenant(daily=usd(200000))}
    gw = start_gw(tg, sim, redis, tenants)
    assert ask(gw, "es", max_tokens=50).status == 200
    assert ask(gw, "es", max_tokens=50).status == 200
    assert gw.stop() == 0
    redis.restart()
    assert redis.keys() == []
    gw.start()
    refused(ask(gw, "es", max_tokens=19), 402, "insufficient_quota", "daily_budget")
    assert spend_gauges(gw, "es") == (usd(159000), usd(159000))
    assert ask(gw, "es", max_tokens=18).status == 200


def test_a_request_admitted_before_redis_lost_its_data_still_counts(tg, sim, redis):
    """A stream admitted before FLUSHALL settles after the windows were
    re-seeded (the tenant had no spend, so none was made again): its
    settlement makes its window again, and Redis counts its cost."""
    tenants = {"st": tgtest.limited_tenant(daily="1000")}
    gw = start_gw(tg, sim, redis, tenants)
    st = tgtest.SSEStream(gw.port, tgtest.chat_body(M, max_tokens=40, stream=True),
                          key=gw.keys["st"], headers={"x-sim-token-ms": "100"})
    assert st.status == 200
    redis.cmd("FLUSHALL")
    tgtest.wait_for(lambda: redis.cmd("GET", "tg:epoch") is not None, timeout=3,
                    what="redis marked again")
    assert not st.done
    for _ in st.events():
        pass
    assert st.done
    tgtest.wait_for(lambda: ledger_nano(gw, "st") > 0, timeout=3, what="the ledger record")
    tgtest.wait_for(lambda: window(redis, "st").get("spent") == str(ledger_nano(gw, "st")),
                    timeout=3, what="the stream's cost in the day window")
    assert redis.cmd("PTTL", "tg:{st}:day:%d" % int(time.time() // 86400)) > 0
