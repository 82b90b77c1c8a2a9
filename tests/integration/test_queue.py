"""Waiting for a saturated pool, and the gauges and counters that show it.

A model whose endpoints are all at max_inflight makes new admitted requests
wait in a bounded per-model queue served in weighted round robin across
tenants; a full queue or the queue timeout sheds with 503 and Retry-After,
counted as llm_rate_limit_rejections_total{limit="queue"}. The metrics
llm_queue_length and llm_inflight_requests (by pool and tenant) and
llm_upstream_errors_total (by endpoint and kind) are read from the gateway's
/metrics while the traffic runs.

The simulator's x-sim-ttft-ms header makes each request hold its slot for a
known time, so the tests decide exactly how many requests wait."""

import concurrent.futures
import contextlib
import os
import sqlite3
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import tgtest  # noqa: E402

M1 = tgtest.DEFAULT_MODELS[0]


def gateway(sim, max_inflight=1, workers=1, overrides=None, tenants=None):
    models = {M1: tgtest.model_entry([sim.url], max_inflight=max_inflight)}
    gw = tgtest.Gateway(models, tenants=tenants, workers=workers, overrides=overrides)
    return gw.start()


def slow_chat(gw, key, ms, timeout=20.0):
    return tgtest.chat(gw.port, key, model=M1, headers={"x-sim-ttft-ms": str(ms)},
                       timeout=timeout)


def hold_the_slot(ex, gw, key, ms):
    """A request of ms that takes the pool's one slot, submitted to executor
    ex; returns its future once the gateway shows the slot held."""
    holder = ex.submit(slow_chat, gw, key, ms)
    tgtest.wait_for(lambda: series(gw, "llm_inflight_requests", pool=M1, tenant="acme") == 1,
                    timeout=5, what="slot held")
    return holder


def hold_the_slot_and_queue_one(ex, gw, key, ms):
    """hold_the_slot, then a short request that waits in the queue behind
    it: (holder, waiter) once the gateway shows it queued."""
    holder = hold_the_slot(ex, gw, key, ms)
    waiter = ex.submit(slow_chat, gw, key, 10)
    tgtest.wait_for(lambda: series(gw, "llm_queue_length", pool=M1, tenant="acme") == 1,
                    timeout=5, what="one queued")
    return holder, waiter


def series(gw, name, **labels):
    """The value of one series of the gateway's /metrics (0 when absent)."""
    want = ",".join('%s="%s"' % kv for kv in sorted(labels.items()))
    for k, v in tgtest.parse_metrics(tgtest.admin(gw, "/metrics").body.decode()).items():
        base, _, rest = k.partition("{")
        if base != name:
            continue
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if got == want:
            return v
    return 0.0


def test_requests_wait_for_a_slot_and_show_in_the_gauges():
    sim = tgtest.Sim().start()
    gw = gateway(sim, max_inflight=2)
    try:
        key = gw.create_key("acme")
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            futs = [ex.submit(slow_chat, gw, key, 1500) for _ in range(6)]
            # two run, four wait
            tgtest.wait_for(lambda: series(gw, "llm_queue_length", pool=M1, tenant="acme") == 4,
                            timeout=5, what="4 queued")
            assert series(gw, "llm_inflight_requests", pool=M1, tenant="acme") == 2
            statuses = [f.result().status for f in futs]
        # nobody was shed: each waited for a slot and then got its answer
        assert statuses == [200] * 6
        assert series(gw, "llm_queue_length", pool=M1, tenant="acme") == 0
        assert series(gw, "llm_inflight_requests", pool=M1, tenant="acme") == 0
        assert series(gw, "llm_rate_limit_rejections_total", tenant="acme", limit="queue") == 0
        # the ledger's queue figure holds the wait: two waited one 1.5 s turn,
        # two waited two turns
        db = sqlite3.connect("file:%s?mode=ro" % gw.db_path, uri=True, timeout=10)
        try:
            waits = sorted(r[0] for r in db.execute("SELECT queue_us FROM ledger"))
        finally:
            db.close()
        assert len(waits) == 6
        assert waits[1] < 500000 and waits[2] > 1300000 and waits[4] > 2800000, waits
    finally:
        gw.stop()
        sim.stop()


def test_a_noisy_tenant_does_not_make_a_quiet_one_wait_behind_it():
    """One slot; the noisy tenant queues 11 requests behind its running one,
    then the quiet one sends 2: they leave after at most one more noisy
    request each, not after all of the noisy tenant's backlog."""
    sim = tgtest.Sim().start()
    tenants = tgtest.default_tenants((M1,))
    tenants["small"]["priority"] = "high"      # same weight as acme
    gw = gateway(sim, max_inflight=1, tenants=tenants)
    try:
        noisy = gw.create_key("acme")
        quiet = gw.create_key("small")
        done = []
        lock = threading.Lock()

        def run(tenant, key):
            r = slow_chat(gw, key, 300, timeout=60)
            with lock:
                done.append((tenant, r.status))

        threads = [threading.Thread(target=run, args=("noisy", noisy)) for _ in range(12)]
        for t in threads:
            t.start()
        tgtest.wait_for(lambda: series(gw, "llm_queue_length", pool=M1, tenant="acme") >= 8,
                        timeout=10, what="noisy requests queued")
        quiet_threads = [threading.Thread(target=run, args=("quiet", quiet)) for _ in range(2)]
        for t in quiet_threads:
            t.start()
        tgtest.wait_for(lambda: series(gw, "llm_queue_length", pool=M1, tenant="small") == 2,
                        timeout=10, what="quiet requests queued")
        with lock:
            before = len(done)       # noisy answers finished before quiet waited
        assert before <= 4
        for t in threads + quiet_threads:
            t.join(60)
        assert all(st == 200 for _, st in done), done
        order = [tenant for tenant, _ in done]
        assert len(order) == 14
        # FIFO would finish the quiet ones 13th and 14th; alternation finishes
        # them within the next four answers (the one running, then turns)
        positions = [i for i, t in enumerate(order) if t == "quiet"]
        assert positions[-1] <= before + 4, order
    finally:
        gw.stop()
        sim.stop()


@pytest.mark.parametrize("high,low", [(300, 100), (300000000, 100000000)])
def test_priority_classes_weigh_the_turns(high, low):
    """high: 300, low: 100: once both have six waiting, three of the high
    tenant's requests leave per turn for one of the low tenant's. Only the
    ratio counts: class values as large as Kubernetes' give the same turns."""
    sim = tgtest.Sim().start()
    gw = gateway(sim, max_inflight=1,
                 overrides={"priority_classes": {"high": high, "low": low}})
    try:
        hi = gw.create_key("acme")     # priority high
        lo = gw.create_key("small")    # priority low
        done = []
        lock = threading.Lock()

        def run(tenant, key, ms):
            r = slow_chat(gw, key, ms, timeout=30)
            with lock:
                done.append((tenant, r.status))

        holder = threading.Thread(target=run, args=("holder", hi, 1500))
        holder.start()
        tgtest.wait_for(lambda: series(gw, "llm_inflight_requests", pool=M1,
                                       tenant="acme") == 1, timeout=5, what="slot held")
        threads = []
        for i in range(12):
            tenant, key = ("hi", hi) if i % 2 else ("lo", lo)
            threads.append(threading.Thread(target=run, args=(tenant, key, 50)))
            threads[-1].start()
        tgtest.wait_for(lambda: series(gw, "llm_queue_length", pool=M1, tenant="acme") == 6
                        and series(gw, "llm_queue_length", pool=M1, tenant="small") == 6,
                        timeout=5, what="6 + 6 queued")
        for t in [holder] + threads:
            t.join(30)
        assert all(st == 200 for _, st in done), done
        order = [tenant for tenant, _ in done if tenant != "holder"]
        assert len(order) == 12
        # weighted turns: six of the first eight are high (round robin: four)
        assert order[:8].count("hi") == 6, order
    finally:
        gw.stop()
        sim.stop()


def test_full_queue_and_queue_timeout_shed_with_503_and_retry_after():
    sim = tgtest.Sim().start()
    gw = gateway(sim, max_inflight=1, overrides={"queue_max": 1,
                                                  "timeouts": {"queue": "400ms"}})
    try:
        key = gw.create_key("acme")
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            holder, waiter = hold_the_slot_and_queue_one(ex, gw, key, 2000)
            # the queue holds one: the next is shed at once
            t0 = time.monotonic()
            full = slow_chat(gw, key, 10)
            assert time.monotonic() - t0 < 0.35
            assert full.status == 503
            assert full.error()["code"] == "queue_full"
            assert tgtest.retry_after(full) == 1
            # the waiter times out after 400 ms in the queue, the holder finishes
            timed_out = waiter.result()
            assert timed_out.status == 503
            assert timed_out.error()["code"] == "queue_timeout"
            assert tgtest.retry_after(timed_out) == 1
            assert holder.result().status == 200
        assert series(gw, "llm_rate_limit_rejections_total", tenant="acme", limit="queue") == 2
        # shedding is not an error of the tenant's
        assert series(gw, "llm_tenant_errors_total", tenant="acme", code="503") == 0
        assert series(gw, "llm_queue_length", pool=M1, tenant="acme") == 0
    finally:
        gw.stop()
        sim.stop()


def test_queue_max_bounds_the_waiters_of_every_loop_together():
    """queue_max is the model's bound, not each loop's: with two workers and
    queue_max 1, twelve requests behind a busy slot leave one waiting and
    shed the rest (each loop took half the bound, rounded up: two waited)."""
    sim = tgtest.Sim().start()
    gw = gateway(sim, max_inflight=1, workers=2,
                 overrides={"queue_max": 1, "timeouts": {"queue": "10s"}})
    try:
        key = gw.create_key("acme")
        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            holder = hold_the_slot(ex, gw, key, 2500)
            # 12 connections: the kernel spreads them over both loops
            futs = [ex.submit(slow_chat, gw, key, 10) for _ in range(12)]
            tgtest.wait_for(lambda: series(gw, "llm_rate_limit_rejections_total",
                                           tenant="acme", limit="queue") == 11,
                            timeout=5, what="eleven shed")
            queued = series(gw, "llm_queue_length", pool=M1, tenant="acme")
            res = [f.result() for f in futs]
            assert holder.result().status == 200
        assert queued == 1, queued
        assert sorted(r.status for r in res) == [200] + [503] * 11, [r.status for r in res]
        assert all(r.error()["code"] == "queue_full" for r in res if r.status == 503)
    finally:
        gw.stop()
        sim.stop()


def test_a_client_leaving_the_queue_frees_its_place():
    sim = tgtest.Sim().start()
    gw = gateway(sim, max_inflight=1, overrides={"queue_max": 1})
    try:
        key = gw.create_key("acme")
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            holder = hold_the_slot(ex, gw, key, 1000)
            conn = tgtest.RawConn(gw.port)
            conn.send(tgtest.http_request_bytes(
                "POST", "/v1/chat/completions", tgtest.chat_body(model=M1), key=key))
            tgtest.wait_for(lambda: series(gw, "llm_queue_length", pool=M1,
                                           tenant="acme") == 1, timeout=5, what="queued")
            conn.abort()
            tgtest.wait_for(lambda: series(gw, "llm_queue_length", pool=M1,
                                           tenant="acme") == 0, timeout=5, what="left the queue")
            # its place is free again: the next request waits instead of being shed
            nxt = ex.submit(slow_chat, gw, key, 10)
            assert holder.result().status == 200
            assert nxt.result().status == 200
        assert series(gw, "llm_rate_limit_rejections_total", tenant="acme", limit="queue") == 0
    finally:
        gw.stop()
        sim.stop()


def test_a_reload_that_adds_an_endpoint_serves_new_requests_there():
    """A saturated model's one endpoint is held and a request waits for it.
    A reload adds a second endpoint: a request that comes after is served
    there at once, not behind the waiter, which still waits for the
    endpoint of the config it was admitted under (it took 4 s, the new
    endpoint idle)."""
    a, b = tgtest.Sim().start(), tgtest.Sim().start()
    gw = gateway(a, overrides={"timeouts": {"queue": "10s", "upstream_first_byte": "20s"}})
    try:
        key = gw.create_key("acme")
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            holder, waiter = hold_the_slot_and_queue_one(ex, gw, key, 4000)
            gw.config["models"][M1] = tgtest.model_entry([a.url, b.url], max_inflight=1)
            tgtest.gateway_reload(gw)
            t0 = time.monotonic()
            r = slow_chat(gw, key, 0)
            took = time.monotonic() - t0
            assert r.status == 200, r
            assert took < 1.5, took
            assert b.metric(tgtest.SIM_REQUESTS) == 1
            assert waiter.result().status == 200
            assert holder.result().status == 200
        assert series(gw, "llm_queue_length", pool=M1, tenant="acme") == 0
    finally:
        gw.stop()
        a.stop()
        b.stop()


@contextlib.contextmanager
def two_one_slot_endpoints(timeouts, overrides=None):
    """A gateway (one worker, the timeouts and other overrides given) in
    front of two simulators of one slot each, both endpoints of M1."""
    sims = [tgtest.Sim().start(), tgtest.Sim().start()]
    gw = None
    try:
        models = {M1: tgtest.model_entry([s.url for s in sims], max_inflight=1)}
        gw = tgtest.Gateway(models, workers=1,
                            overrides=dict(overrides or {}, timeouts=timeouts)).start()
        yield gw, sims
    finally:
        if gw is not None:
            gw.stop()
        for s in sims:
            s.stop()


def hold_one_and_queue_a_broken_one(ex, gw, key):
    """With two_one_slot_endpoints: one endpoint held 4 s, and a request
    whose attempt broke on the other waits in the queue for the held one
    (it does not go back to the one that broke it): (holder, broken)."""
    holder = hold_the_slot(ex, gw, key, 4000)
    broken = ex.submit(tgtest.chat, gw.port, key, model=M1,
                       headers={"x-sim-fault": "disconnect"}, timeout=20)
    tgtest.wait_for(lambda: series(gw, "llm_queue_length", pool=M1,
                                   tenant="acme") == 1, timeout=5, what="broken queued")
    return holder, broken


def test_a_request_back_after_a_failed_attempt_does_not_hold_up_the_queue():
    """Two endpoints of one slot each. One is held; a request whose attempt
    on the other broke waits for the held one (it does not go back to the
    one that broke it). The other endpoint is free meanwhile: a request of
    another tenant that arrives then is served there at once, not after the
    first one's queue timeout (it waited 2.7 s behind it, the free endpoint
    idle)."""
    with two_one_slot_endpoints({"queue": "3s"}) as (gw, sims):
        acme = gw.create_key("acme")
        small = gw.create_key("small")
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            holder, broken = hold_one_and_queue_a_broken_one(ex, gw, acme)
            t0 = time.monotonic()
            r = tgtest.chat(gw.port, small, model=M1, max_tokens=2)
            took = time.monotonic() - t0
            assert r.status == 200, r
            assert took < 1.0, took
            # nor at the next tick (every 100 ms): it leaves the queue as it
            # enters it, and so do the ones after it
            ids = [r.header("x-request-id")]
            for _ in range(4):
                r = tgtest.chat(gw.port, small, model=M1, max_tokens=2)
                assert r.status == 200, r
                ids.append(r.header("x-request-id"))
            waits = [row["queue_us"] for row in tgtest.sqlite_ledger_rows(
                gw.db_path, "WHERE request_id IN (%s)" % ",".join("?" * len(ids)), ids)]
            assert len(waits) == 5 and max(waits) < 20000, waits
            # the one that broke still waits for an endpoint it has not tried
            timed_out = broken.result()
            assert timed_out.status == 503
            assert timed_out.error()["code"] == "queue_timeout"
            assert holder.result().status == 200
        assert series(gw, "llm_queue_length", pool=M1, tenant="acme") == 0
        assert series(gw, "llm_queue_length", pool=M1, tenant="small") == 0


def test_waits_around_a_failed_attempt_share_one_queue_timeout():
    """A request waits 1 s for a slot, its attempt then breaks before
    anything is relayed (the simulator closes at the first token, 2.5 s in;
    the gateway tries once more on a fresh connection, so about 5 s), and it
    waits again for the other endpoint, held 7 s: its two waits together
    are bounded by one queue timeout (3 s), not the time since it first
    queued. It used to be shed with queue_timeout on coming back, 6 s after
    it first queued, though it had waited 1 s."""
    with two_one_slot_endpoints({"queue": "3s", "upstream_first_byte": "20s"}) as (gw, sims):
        acme = gw.create_key("acme")
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            short = ex.submit(slow_chat, gw, acme, 1000)
            long_ = ex.submit(slow_chat, gw, acme, 7000)
            tgtest.wait_for(lambda: series(gw, "llm_inflight_requests", pool=M1,
                                           tenant="acme") == 2, timeout=5, what="slots held")
            t0 = time.monotonic()
            broken = ex.submit(tgtest.chat, gw.port, acme, model=M1, timeout=40,
                               headers={"x-sim-ttft-ms": "2500",
                                        "x-sim-fault": "disconnect-after:1"})
            r = broken.result()
            took = time.monotonic() - t0
            assert short.result().status == 200 and long_.result().status == 200
        # it reached the second endpoint (which broke it too, as the fault says)
        # instead of being shed on coming back to the queue
        assert r.status == 502 and r.error()["code"] == "bad_upstream_response", (r, took)
        assert took > 9.0, took
        for s in sims:
            assert series(gw, "llm_upstream_errors_total", pool=M1, endpoint=s.url,
                          kind="broken") >= 1
        assert series(gw, "llm_queue_length", pool=M1, tenant="acme") == 0


def test_upstream_errors_are_counted_by_endpoint_and_kind():
    sim = tgtest.Sim().start()
    dead = "http://127.0.0.1:%d" % tgtest.closed_port()
    models = {M1: tgtest.model_entry([sim.url], max_inflight=8),
              tgtest.DEFAULT_MODELS[1]: tgtest.model_entry([dead], max_inflight=8)}
    # no probes: the dead endpoint is tried, and fails to connect
    gw = tgtest.Gateway(models, workers=1,
                        overrides={"health_check_interval": "0s"}).start(ready=False)
    try:
        key = gw.create_key("acme")
        for _ in range(3):
            r = tgtest.chat(gw.port, key, model=M1, headers={"x-sim-fault": "status:500"})
            assert r.status == 500
        r = tgtest.chat(gw.port, key, model=M1, headers={"x-sim-fault": "garbage"})
        assert r.status == 502
        r = tgtest.chat(gw.port, key, model=tgtest.DEFAULT_MODELS[1])
        assert r.status == 503
        assert tgtest.chat(gw.port, key, model=M1).status == 200
        assert series(gw, "llm_upstream_errors_total", pool=M1, endpoint=sim.url,
                      kind="status") == 3
        assert series(gw, "llm_upstream_errors_total", pool=M1, endpoint=sim.url,
                      kind="connect") == 0
        assert series(gw, "llm_upstream_errors_total", pool=tgtest.DEFAULT_MODELS[1],
                      endpoint=dead, kind="connect") == 1
        # a 200 whose body is not JSON: the client gets 502, the endpoint a bad_response
        assert series(gw, "llm_upstream_errors_total", pool=M1, endpoint=sim.url,
                      kind="bad_response") == 1
        assert series(gw, "llm_upstream_errors_total", pool=M1, endpoint=sim.url,
                      kind="broken") == 0
    finally:
        gw.stop()
        sim.stop()



def test_a_waiter_that_cannot_take_the_free_slot_does_not_shed_a_request_that_can():
    """queue_max 1, two endpoints of one slot each, one held. The one
    waiter broke on the other endpoint and may not go back there. A
    request that arrives then is served on that free endpoint; it was shed
    with 503 queue_full, the queue full of a waiter that could not use the
    slot."""
    with two_one_slot_endpoints({"queue": "3s"}, {"queue_max": 1}) as (gw, sims):
        acme = gw.create_key("acme")
        small = gw.create_key("small")
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            holder, broken = hold_one_and_queue_a_broken_one(ex, gw, acme)
            r = tgtest.chat(gw.port, small, model=M1, max_tokens=2)
            assert r.status == 200, r
            timed_out = broken.result()
            assert timed_out.status == 503
            assert timed_out.error()["code"] == "queue_timeout"
            assert holder.result().status == 200
        assert series(gw, "llm_rate_limit_rejections_total", tenant="small", limit="queue") == 0
        assert series(gw, "llm_queue_length", pool=M1, tenant="acme") == 0
        assert series(gw, "llm_inflight_requests", pool=M1, tenant="small") == 0


def test_a_model_added_after_4096_others_were_removed_still_waits_for_a_slot():
    """Each loop keeps a queue per model that had a request waiting, at most
    4,096 (one per model a config may hold). 4,096 models each have one
    waiter that times out; a reload then replaces them with a new model.
    The old models' queues are empty and their models gone, so they make
    room: a request for the new model waits for the busy slot and is
    served, instead of being shed at once with queue_full."""
    sim = tgtest.Sim().start()
    hog = "hog"
    fillers = ["m%04d" % i for i in range(4095)]
    models = {name: tgtest.model_entry([sim.url], max_inflight=1) for name in [hog] + fillers}
    gw = tgtest.Gateway(models, workers=1, overrides={
        "timeouts": {"queue": "100ms", "upstream_first_byte": "120s"}}).start()
    try:
        key = gw.create_key("acme")
        # one request holds the endpoint's one slot, which every model shares
        held = tgtest.RawConn(gw.port)
        held.send(tgtest.http_request_bytes(
            "POST", "/v1/chat/completions", tgtest.chat_body(model=hog), key=key,
            headers={"x-sim-ttft-ms": "100000"}))
        tgtest.wait_for(lambda: series(gw, "llm_inflight_requests", pool=hog,
                                       tenant="acme") == 1, timeout=5, what="slot held")
        res = tgtest.parallel(lambda m: tgtest.chat(gw.port, key, model=m, timeout=30),
                              [(m,) for m in fillers + [hog]], threads=32, timeout=300)
        assert all(not isinstance(r, Exception) for r in res), \
            [r for r in res if isinstance(r, Exception)][:3]
        codes = {(r.status, r.error()["code"]) for r in res}
        assert codes == {(503, "queue_timeout")}, codes   # every one waited in its queue
        held.abort()
        tgtest.wait_for(lambda: series(gw, "llm_inflight_requests", pool=hog,
                                       tenant="acme") == 0, timeout=10, what="slot free")

        fresh = "fresh"
        gw.config["models"] = {name: tgtest.model_entry([sim.url], max_inflight=1)
                               for name in (hog, fresh)}
        gw.config["tenants"] = tgtest.default_tenants((hog, fresh))
        gw.config["timeouts"]["queue"] = "10s"
        tgtest.gateway_reload(gw)
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            holder = ex.submit(tgtest.chat, gw.port, key, model=hog,
                               headers={"x-sim-ttft-ms": "1500"}, timeout=20)
            tgtest.wait_for(lambda: series(gw, "llm_inflight_requests", pool=hog,
                                           tenant="acme") == 1, timeout=5, what="slot held")
            r = tgtest.chat(gw.port, key, model=fresh, timeout=20)
            assert r.status == 200, (r.status, r.body[:200])
            assert holder.result().status == 200
        assert series(gw, "llm_rate_limit_rejections_total", tenant="acme", limit="queue") == 4096
    finally:
        gw.stop()
        sim.stop()


def test_a_request_waiting_for_a_model_a_reload_removes_is_still_served():
    """A reload removes the model (and the tenant) a request waits for. Its
    queue is not freed under it: the loop's sweeps of queues and tenants
    pass it by while it waits, and it is served when the slot comes free."""
    sim = tgtest.Sim().start()
    gw = gateway(sim, overrides={"timeouts": {"queue": "10s", "upstream_first_byte": "20s"}})
    try:
        key = gw.create_key("acme")
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            holder, waiter = hold_the_slot_and_queue_one(ex, gw, key, 3000)
            gw.config["models"] = {"other": tgtest.model_entry([sim.url], max_inflight=1)}
            gw.config["tenants"] = {"small": tgtest.default_tenants(("other",))["small"]}
            tgtest.gateway_reload(gw)
            time.sleep(1.5)     # the loop's tick sweeps its queues meanwhile
            assert series(gw, "llm_queue_length", pool=M1, tenant="acme") == 1
            assert holder.result().status == 200
            assert waiter.result().status == 200
        # the removed model's tenant and model get no new request
        r = tgtest.chat(gw.port, key, model=M1)
        assert r.status in (401, 403, 404), r.status
    finally:
        gw.stop()
        sim.stop()


def test_one_server_written_in_two_cases_has_one_slot_count():
    """Two models list the same one-slot server, one as localhost and one
    as LOCALHOST. Scheme and host are case-insensitive: it is one endpoint
    with one slot, so while one model's request holds it the other's
    waits, and both are answered."""
    sim = tgtest.Sim().start()
    models = {"lower": tgtest.model_entry(["http://localhost:%d" % sim.port], max_inflight=1),
              "upper": tgtest.model_entry(["http://LOCALHOST:%d" % sim.port], max_inflight=1)}
    gw = tgtest.Gateway(models, workers=1, overrides={"timeouts": {"queue": "10s"}}).start()
    try:
        key = gw.create_key("acme")
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            holder = ex.submit(tgtest.chat, gw.port, key, model="lower",
                               headers={"x-sim-ttft-ms": "1500"}, timeout=20)
            tgtest.wait_for(lambda: series(gw, "llm_inflight_requests", pool="lower",
                                           tenant="acme") == 1, timeout=5, what="slot held")
            waiter = ex.submit(tgtest.chat, gw.port, key, model="upper", timeout=20)
            tgtest.wait_for(lambda: series(gw, "llm_queue_length", pool="upper",
                                           tenant="acme") == 1, timeout=5, what="upper queued")
            assert holder.result().status == 200
            assert waiter.result().status == 200
        assert sim.metric(tgtest.SIM_REQUESTS) == 2
    finally:
        gw.stop()
        sim.stop()
