"""Routing across a model's endpoints: failed connections and 502/503/504
answers move the request to another endpoint before anything was relayed;
when no endpoint can serve, the client gets 503 no_healthy_endpoint and
/readyz says so; a backend that dies mid-stream truncates only that
stream."""

import threading
import time

import pytest

import tgtest
from tgtest import SSEStream, chat, chat_body, closed_port

M8B, M70B, EMBED = tgtest.DEFAULT_MODELS


def _err(r, status, etype, code):
    assert r.status == status, r
    e = r.error()
    assert (e["type"], e["code"]) == (etype, code), e
    assert r.header("x-request-id")
    return e


def test_retry_on_refused_connection(tg):
    sim = tg.sim()
    dead = "http://127.0.0.1:%d" % closed_port()
    # health probes are slow here so the dead endpoint stays a candidate
    gw = tg.gateway({M8B: [dead, sim.url]}, overrides={"health_check_interval": "60s"})
    key = gw.keys["acme"]
    rids = []
    for i in range(8):
        r = chat(gw.port, key, M8B, max_tokens=i + 1)
        assert r.status == 200, r
        assert r.json()["usage"]["completion_tokens"] == i + 1
        rids.append(r.header("x-request-id"))
    # streaming too
    s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=3), key=key)
    assert s.status == 200
    s.read_all()
    s.close()
    assert s.done
    for rid in rids:
        assert gw.access_entry(rid)["endpoint"] == sim.url


@pytest.mark.parametrize("status", [502, 503, 504])
def test_retry_on_upstream_gateway_errors(tg, status):
    fake = tgtest.FakeUpstream(status)
    try:
        sim = tg.sim()
        gw = tg.gateway({M8B: [fake.url, sim.url]}, overrides={"health_check_interval": "60s"})
        key = gw.keys["acme"]
        for _ in range(6):
            r = chat(gw.port, key, M8B, max_tokens=2)
            assert r.status == 200, r
            assert r.json()["usage"]["completion_tokens"] == 2
            assert gw.access_entry(r.header("x-request-id"))["endpoint"] == sim.url
        assert fake.posts >= 1, "the failing endpoint was never tried"
        # streaming requests are retried the same way (nothing was relayed yet)
        s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=3), key=key)
        assert s.status == 200
        s.read_all()
        s.close()
        assert s.done
    finally:
        fake.close()


def test_upstream_500_not_retried(tg):
    fake = tgtest.FakeUpstream(500, {"error": {"message": "boom", "type": "server_error",
                                               "code": "internal"}})
    try:
        gw = tg.gateway({M8B: [fake.url]}, overrides={"health_check_interval": "60s"})
        key = gw.keys["acme"]
        r = chat(gw.port, key, M8B)
        assert r.status == 500
        assert r.json() == {"error": {"message": "boom", "type": "server_error",
                                      "code": "internal"}}
        assert fake.posts == 1
    finally:
        fake.close()


def _retry_afters(r):
    """The answer's Retry-After values, checking that retry-after-ms says
    the same wait when it is seconds (none for a date)."""
    got = [v for k, v in r.header_list if k == "retry-after"]
    ms = [v for k, v in r.header_list if k == "retry-after-ms"]
    assert ms == [str(int(v) * 1000) for v in got if v.isdigit()], r.header_list
    return got


@pytest.mark.parametrize("client", ["native", "curl"])
def test_an_upstreams_retry_after_reaches_the_client(tg, client):
    """A replica or a hosted backend that answers 429 or 503 says in
    Retry-After when to come back; the client's backoff needs it. The
    error answer the client gets (relayed, or wrapped when its body is not
    JSON) carries the upstream's Retry-After, streamed request or not,
    when it is delta-seconds or an IMF-fixdate; anything else, and two of
    them, is dropped, as is a 100 Continue's. 429 is not retried; a 503 is retried on the other
    endpoint first, and the last answer's Retry-After (or none) goes out.
    (Every upstream Retry-After was dropped.)"""
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    one = tgtest.FakeUpstream(429)
    pair = [tgtest.FakeUpstream(503), tgtest.FakeUpstream(503)]
    try:
        gw = tg.gateway({M8B: [one.url], M70B: [u.url for u in pair]}, workers=1,
                        overrides={"upstream_client": client, "health_check_interval": "60s"})
        key = gw.keys["acme"]
        for stream in (False, True):
            for value in ("7", "0", "2147483648", date):
                one.headers = [("Retry-After", value)]
                r = chat(gw.port, key, M8B, max_tokens=2, stream=stream)
                assert r.status == 429 and r.json()["error"]["code"] == "fake", r
                assert _retry_afters(r) == [value], (stream, value, r.header_list)
        assert one.posts == 8, "a 429 was retried"
        # a proxy's HTML page keeps its status, wrapped, and its Retry-After
        one.body, one.content_type = b"<html>slow down</html>", "text/html"
        one.headers = [("Retry-After", "12")]
        r = chat(gw.port, key, M8B, max_tokens=2)
        _err(r, 429, "invalid_request_error", "upstream_status")
        assert _retry_afters(r) == ["12"], r.header_list
        for bad in ([("Retry-After", "soon")], [("Retry-After", "-1")],
                    [("Retry-After", "1.5")], [("Retry-After", "12345678901")],
                    [("Retry-After", "Wed, 21 Oct 2015 07:28:00 UTC")],
                    [("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT, soon")],
                    [("Retry-After", "1"), ("Retry-After", "2")]):
            one.headers = bad
            r = chat(gw.port, key, M8B, max_tokens=2)
            assert r.status == 429 and _retry_afters(r) == [], (bad, r.header_list)
        # a 100 Continue's fields are not the answer's
        one.interim = [("Retry-After", "1")]
        for headers, want in (([], []), ([("Retry-After", "5")], ["5"])):
            one.headers = headers
            r = chat(gw.port, key, M8B, max_tokens=2)
            assert r.status == 429 and _retry_afters(r) == want, (headers, r.header_list)

        # both endpoints answer 503: each tried once, the last one's answer relayed
        values = {pair[0].url: [("Retry-After", "30")], pair[1].url: [("Retry-After", date)]}
        for rounds in range(2):
            for u in pair:
                u.headers = values[u.url]
            for stream in (False, True):
                posts = sum(u.posts for u in pair)
                r = chat(gw.port, key, M70B, max_tokens=2, stream=stream)
                assert r.status == 503 and r.json()["error"]["code"] == "fake", r
                assert sum(u.posts for u in pair) == posts + 2
                last = gw.access_entry(r.header("x-request-id"))["endpoint"]
                want = [v for _, v in values[last]]
                assert _retry_afters(r) == want, (last, r.header_list)
            # the second round: only the first endpoint says when
            values[pair[1].url] = []
    finally:
        for u in [one] + pair:
            u.close()


def test_an_endpoint_that_says_it_is_overloaded_is_passed_over(tg):
    """A replica that answers 429 or 503 with Retry-After is passed over by
    the requests that follow until that time has passed, while the other
    replica is idle; once it has, it gets its share again. When every
    replica said so, requests still go to them (the gateway does not refuse
    in their name). (Requests kept going to the replica that had just said
    it was overloaded.) The simulator's 429 and 503 carry Retry-After: 1."""
    sims = [tg.sim(), tg.sim()]
    gw = tg.gateway({M8B: [s.url for s in sims]}, overrides={"health_check_interval": "60s"})
    key = gw.keys["acme"]

    def endpoint(r):
        assert r.status == 200, r
        return gw.access_entry(r.header("x-request-id"))["endpoint"]

    urls = {s.url for s in sims}
    # a 429 (relayed, not retried): the other replica gets what follows
    t0 = time.monotonic()
    r = chat(gw.port, key, M8B, max_tokens=1, headers={"x-sim-fault": "status:429"})
    assert r.status == 429 and _retry_afters(r) == ["1"], r
    busy = gw.access_entry(r.header("x-request-id"))["endpoint"]
    within = []
    while True:
        r = chat(gw.port, key, M8B, max_tokens=1)
        if time.monotonic() >= t0 + 1.0:
            break  # the back-off may have ended when this one was routed
        within.append(endpoint(r))
    assert len(within) >= 3, "too slow to route requests within the back-off"
    assert busy not in within, (busy, within)
    time.sleep(max(0.0, t0 + 1.2 - time.monotonic()))
    assert {endpoint(chat(gw.port, key, M8B, max_tokens=1)) for _ in range(8)} == urls

    # a 503, retried on the other replica, which says the same: both back
    # off, and requests are still served by them
    r = chat(gw.port, key, M8B, max_tokens=1, headers={"x-sim-fault": "status:503"})
    assert r.status == 503 and _retry_afters(r) == ["1"], r
    assert gw.access_entry(r.header("x-request-id"))["attempts"] == 2
    assert {endpoint(chat(gw.port, key, M8B, max_tokens=1)) for _ in range(8)} == urls


def test_retries_try_each_endpoint_of_a_large_pool_once(tg):
    """A model may have up to 256 endpoints. A request that every one of
    them answers with 503 tries each once and then gets the last answer.
    (Only the first 64 used to be remembered as tried: with more, the
    retries went round the others for ever and the client never got an
    answer.)"""
    fake = tgtest.FakeUpstream(503)
    try:
        n = 80
        # distinct endpoints (by URL) served by the one fake upstream
        urls = ["%s/replica%d" % (fake.url, i) for i in range(n)]
        gw = tg.gateway({M8B: urls}, overrides={"health_check_interval": "60s"})
        r = chat(gw.port, gw.keys["acme"], M8B, max_tokens=2, timeout=30)
        assert r.status == 503, r
        assert r.json()["error"]["code"] == "fake"
        assert fake.posts == n
        assert gw.access_entry(r.header("x-request-id"))["attempts"] == n
    finally:
        fake.close()


def test_failed_attempt_waits_for_a_full_endpoint(tg):
    """When an attempt fails to connect and the model's other endpoints are
    up but at max_inflight, the request waits in the queue for a slot like
    any request finding them full, and is served. (It used to get 503
    no_healthy_endpoint, "no upstream endpoint of this model could be
    reached", while a healthy endpoint was only busy.)"""
    sim = tg.sim()
    dead = "http://127.0.0.1:%d" % closed_port()
    # no probes: a refused endpoint is tried again after its 2 s cool-off
    gw = tg.gateway({M8B: tgtest.model_entry([dead, sim.url], max_inflight=1)}, workers=1,
                    ready=False, overrides={"health_check_interval": "0"})
    key = gw.keys["acme"]
    busy = []  # takes the simulator's only slot for 3.5 s
    t = threading.Thread(target=lambda: busy.append(
        chat(gw.port, key, M8B, max_tokens=1, headers={"x-sim-ttft-ms": "3500"})))
    t.start()
    tgtest.wait_for(lambda: sim.metric(tgtest.SIM_RUNNING) == 1, what="the busy request")
    time.sleep(2.3)  # the dead endpoint is a candidate again, whichever way busy went
    t0 = time.monotonic()
    r = chat(gw.port, key, M8B, max_tokens=2)
    assert r.status == 200, r
    assert r.json()["usage"]["completion_tokens"] == 2
    assert time.monotonic() - t0 > 0.5, "served before the busy request gave its slot back"
    e = gw.access_entry(r.header("x-request-id"))
    assert (e["endpoint"], e["attempts"]) == (sim.url, 2), e
    t.join()
    assert busy[0].status == 200


class _Hangup(tgtest.TcpServer):
    """An upstream that answers health probes (GET) and hangs up on every
    POST without answering it. Counts the POSTs."""

    def __init__(self):
        self.posts = 0
        super().__init__()

    def handle(self, c):
        with c:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    d = c.recv(65536)
                    if not d:
                        return
                    head += d
                if not head.startswith(b"GET"):
                    self.posts += 1
                    return
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def test_failed_attempt_waits_without_coming_back_to_its_endpoint(tg):
    """A request back in the queue after its attempt broke is not sent to
    the endpoint that broke it again, and its waits together stay within
    the queue timeout: here the other endpoint never frees its slot, so the
    request gets 503 queue_timeout after 2 s, with one POST to the broken
    endpoint."""
    sim = tg.sim()
    bad = _Hangup()
    try:
        gw = tg.gateway({M8B: tgtest.model_entry([bad.url, sim.url], max_inflight=1)},
                        workers=1, overrides={"health_check_interval": "60s",
                                              "timeouts": {"queue": "2s"}})
        key = gw.keys["acme"]
        stalled = []  # holds the simulator's only slot until the 5 s first-byte timeout
        t = threading.Thread(target=lambda: stalled.append(
            chat(gw.port, key, M8B, max_tokens=1, headers={"x-sim-fault": "stall"})))
        t.start()
        tgtest.wait_for(lambda: sim.metric(tgtest.SIM_RUNNING) == 1, what="the stalled request")
        posts = bad.posts
        t0 = time.monotonic()
        r = chat(gw.port, key, M8B, max_tokens=2)
        took = time.monotonic() - t0
        _err(r, 503, "server_error", "queue_timeout")
        assert tgtest.retry_after(r) == 1
        assert 1.5 < took < 3.5, took
        assert bad.posts - posts == 1
        t.join()
        assert stalled[0].status == 504
    finally:
        bad.close()


def test_all_endpoints_down(tg):
    sim = tg.sim()
    down = ["http://127.0.0.1:%d" % closed_port(), "http://127.0.0.1:%d" % closed_port()]
    gw = tg.gateway({M8B: [sim.url], M70B: down}, ready=False)
    key = gw.keys["acme"]
    _err(chat(gw.port, key, M70B), 503, "server_error", "no_healthy_endpoint")
    # once probes have run, the answer is the same (and quick)
    tgtest.wait_for(lambda: tgtest.admin(gw, "/readyz").status == 503, timeout=4.0,
                    what="/readyz 503 with a model whose endpoints are all down")
    t0 = time.monotonic()
    _err(chat(gw.port, key, M70B), 503, "server_error", "no_healthy_endpoint")
    assert time.monotonic() - t0 < 1.0
    s = SSEStream(gw.port, chat_body(M70B, stream=True), key=key)
    assert s.status == 503
    s.close()
    # the healthy model is unaffected
    assert chat(gw.port, key, M8B, max_tokens=1).status == 200
    assert tgtest.admin(gw, "/healthz").status == 200


def test_readyz_follows_backend(tg):
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]})
    key = gw.keys["acme"]
    assert tgtest.admin(gw, "/readyz").status == 200
    port = sim.port
    sim.kill()
    tgtest.wait_for(lambda: tgtest.admin(gw, "/readyz").status == 503, timeout=4.0,
                    what="/readyz 503 after the only backend died")
    _err(chat(gw.port, key, M8B), 503, "server_error", "no_healthy_endpoint")
    tg.sim(port=port)
    tgtest.wait_for(lambda: tgtest.admin(gw, "/readyz").status == 200, timeout=4.0,
                    what="/readyz 200 after the backend came back")
    assert chat(gw.port, key, M8B, max_tokens=2).status == 200


def test_probes_follow_a_reloaded_connect_timeout(tg):
    """A health probe is bounded by the upstream_connect timeout plus a
    second. An endpoint whose /health takes 2 s passes under a 5 s connect
    timeout; a reload to 100 ms makes the probes give up after 1.1 s, so it
    is marked down and /readyz says so. (The probes kept the timeout the
    gateway started with.)"""
    fake = tgtest.FakeUpstream(200)
    try:
        fake.get_delay = 2.0
        gw = tg.gateway({M8B: [fake.url]}, workers=1,
                        overrides={"health_check_interval": "100ms",
                                   "timeouts": {"upstream_connect": "5s"}})
        assert tgtest.admin(gw, "/readyz").status == 200
        gw.config["timeouts"]["upstream_connect"] = "100ms"
        tgtest.gateway_reload(gw)
        tgtest.wait_for(lambda: tgtest.admin(gw, "/readyz").status == 503, timeout=10.0,
                        what="/readyz 503 once probes time out at the new bound")
        fake.get_delay = 0.0
        tgtest.wait_for(lambda: tgtest.admin(gw, "/readyz").status == 200, timeout=10.0,
                        what="/readyz 200 once /health answers at once")
    finally:
        fake.close()


def test_backend_killed_mid_stream(tg):
    sim_a = tg.sim()
    sim_b = tg.sim()
    gw = tg.gateway({M8B: [sim_a.url], M70B: [sim_b.url]})
    key = gw.keys["acme"]
    s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=100), key=key,
                  headers={"x-sim-token-ms": "100"})
    assert s.status == 200
    n = 0
    it = s.events()
    for _ in it:
        n += 1
        if n == 3:
            break
    port = sim_a.port
    t_kill = time.monotonic()
    sim_a.kill()
    rest = list(it)
    ended = time.monotonic() - t_kill
    s.close()
    assert not s.done, "a stream cut by a dying backend must not end with [DONE]"
    assert all(e.data != "[DONE]" for e in rest)
    assert 3 + len(rest) < 100
    assert ended < 5.0, "client left hanging %.1fs after the backend died" % ended
    # other models are served at once
    r = chat(gw.port, key, M70B, max_tokens=2)
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 2
    # and the model itself once its backend is back
    tg.sim(port=port)
    tgtest.wait_for(lambda: chat(gw.port, key, M8B, max_tokens=1).status == 200, timeout=5.0,
                    interval=0.2, what="the model served again after its backend restarted")
    assert gw.proc.alive()


def test_load_spread_over_endpoints(tg):
    sim_a = tg.sim()
    sim_b = tg.sim()
    gw = tg.gateway({M8B: [sim_a.url, sim_b.url]})
    key = gw.keys["acme"]
    # concurrent slow requests cannot all go to one endpoint if the other
    # is idle: expect both to serve some
    streams = [SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=5), key=key,
                         headers={"x-sim-token-ms": "100"}) for _ in range(8)]
    for s in streams:
        s.read_all()
        s.close()
        assert s.done
    a = sim_a.metric(tgtest.SIM_REQUESTS)
    b = sim_b.metric(tgtest.SIM_REQUESTS)
    assert a + b >= 8
    assert a >= 1 and b >= 1, (a, b)


@pytest.mark.parametrize("client", ["native", "curl"])
def test_out_of_descriptors_is_not_the_endpoints_fault(tg, client):
    """When the gateway itself has no descriptor left for an upstream
    connection, the request gets 503 gateway_overloaded with Retry-After,
    and the endpoint stays routable: once descriptors are free again the
    next request is served, without waiting for a health probe. (A local
    failure used to count as the endpoint's: it was marked down and every
    request of the model got 503 no_healthy_endpoint until a probe.)"""
    import os
    import resource
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, workers=1,
                    overrides={"upstream_client": client, "health_check_interval": "60s"})
    key = gw.keys["acme"]
    body = chat_body(M8B, max_tokens=1)
    a = tgtest.RawConn(gw.port)
    c = tgtest.RawConn(gw.port)
    try:
        # one pooled upstream connection, then held by a slow request on a
        c.send(tgtest.http_request_bytes("POST", "/v1/chat/completions", body, key=key))
        assert c.read_response("POST").status == 200
        a.send(tgtest.http_request_bytes("POST", "/v1/chat/completions", body, key=key,
                                         headers={"x-sim-ttft-ms": "1500"}))
        tgtest.wait_for(lambda: sim.metric("sim_requests_running") >= 1,
                        what="the slow request at the backend")
        # no descriptor can be opened: the lowest free number is the limit
        pid = gw.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        fds = {int(f) for f in os.listdir("/proc/%d/fd" % pid)}
        lowest_free = min(set(range(max(fds) + 2)) - fds)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            c.send(tgtest.http_request_bytes("POST", "/v1/chat/completions", body, key=key))
            r = c.read_response("POST")
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        _err(r, 503, "server_error", "gateway_overloaded")
        assert tgtest.retry_after(r) == 1
        assert a.read_response("POST").status == 200
        # the endpoint was not blamed: served at once, ready
        c.send(tgtest.http_request_bytes("POST", "/v1/chat/completions", body, key=key))
        assert c.read_response("POST").status == 200
        assert tgtest.admin(gw, "/readyz").status == 200
        # and the upstream error counters say nothing of it
        m = tgtest.parse_metrics(tgtest.admin(gw, "/metrics").body.decode())
        assert tgtest.metric_sum(m, "llm_upstream_errors_total") == 0, m.get("llm_upstream_errors_total")
    finally:
        a.close()
        c.close()


@pytest.mark.parametrize("scheme,client,what", [
    ("http", "curl", "connect_timeout"), ("https", "auto", "connect_timeout"),
    ("http", "curl", "client_leaves"), ("http", "curl", "first_byte_deadline")])
def test_a_libcurl_transfer_ended_while_connecting_leaves_the_gateway_serving(tg, scheme, client, what):
    """libcurl (https:// endpoints, or `upstream_client: curl`) may close a
    connect attempt's socket without the close-socket callback: its connect
    timed out, or the transfer was cancelled (the client left, the
    first-byte deadline passed). The socket's watcher must not outlive it:
    a watcher re-armed on the closed descriptor made libuv abort the whole
    gateway at its next poll."""
    import json
    with tgtest.unconnectable_port() as port:
        sim = tg.sim()
        url = "%s://127.0.0.1:%d" % (scheme, port)
        timeouts = ({"upstream_connect": "500ms"} if what == "connect_timeout"
                    else {"upstream_connect": "5s", "upstream_first_byte": "500ms"})
        gw = tg.gateway({M8B: [url], M70B: [sim.url]}, workers=1, ready=False,
                        overrides={"upstream_client": client, "health_check_interval": "60s",
                                   "timeouts": timeouts})
        key = gw.keys["acme"]
        body = chat_body(M8B, max_tokens=2)
        if what == "client_leaves":
            c = tgtest.RawConn(gw.port)
            c.send(tgtest.http_request_bytes("POST", "/v1/chat/completions",
                                             json.dumps(body).encode(), key=key))
            time.sleep(0.3)
            c.abort()
        elif what == "first_byte_deadline":
            _err(tgtest.request(gw.port, "POST", "/v1/chat/completions", body=body, key=key),
                 504, "server_error", "upstream_timeout")
        else:
            for _ in range(2):
                _err(tgtest.request(gw.port, "POST", "/v1/chat/completions", body=body, key=key),
                     503, "server_error", "no_healthy_endpoint")
        time.sleep(0.3)
        for _ in range(3):
            assert chat(gw.port, key, M70B, max_tokens=2).status == 200
        assert gw.proc.alive()
