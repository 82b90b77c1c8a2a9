"""Tenant rate limits enforced by the gateway itself (memory state backend):
requests per minute (a sliding 60 s log), tokens per minute (reserved at
admission, settled to the upstream's usage), concurrent requests (released on
completion, error and client disconnect), the global requests-per-second
limit across tenants, the x-ratelimit-* headers of successful answers, and a
SIGHUP reload that changes a tenant's limit without forgetting its window.

Every refusal is checked the way a client sees it: status, error.type,
error.code, a message naming the limit, a whole-second Retry-After (and
retry-after-ms, the limiter's wait to the millisecond), and that
the upstream never saw the request. The money limits (budgets) are in
test_budgets.py, the Redis backend in test_state_redis.py."""

import re
import time

import pytest

import tgtest

M = "llama-3.1-8b"          # priced 0.0005 / 0.0015 per 1K, max_tokens 300 below
M_NOCAP = "llama-3.1-70b"   # no max_tokens in its config: 4096
EMBED = "nomic-embed-text"
MODEL_CAP = 300

# what the message of each refusal must mention
NAMES = {
    "requests": r"requests?[ _-]?per[ _-]?minute",
    "tokens": r"tokens?[ _-]?per[ _-]?minute",
    "concurrency": r"concurren",
    "global": r"global",
}

HELLO = "Hello there"       # 11 bytes: estimate 8 + 11 + 8 = 27, sim prompt 9


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
    e = tgtest.model_entry([sim.url])
    e["kind"] = "embedding"
    return {M: m, M_NOCAP: tgtest.model_entry([sim.url]), EMBED: e}


def start_gw(tg, sim, tenants, **overrides):
    return tg.gateway(models_cfg(sim), tenants=tenants, keys=tuple(tenants),
                      overrides=overrides or None)


def assert_refused(r, status, type_, code):
    """Checks one refusal; returns its Retry-After (whole seconds >= 1)."""
    assert r.status == status, r
    err = r.error()
    assert err["type"] == type_, err
    assert err["code"] == code, err
    assert re.search(NAMES.get(code, code), err["message"], re.I), \
        "message does not name the limit: %r" % err["message"]
    assert r.header("x-request-id"), r
    return tgtest.retry_after(r)


def hdr_int(r, name):
    v = r.header(name)
    assert v is not None and re.match(r"^-?[0-9]+$", v), "%s: %r in %r" % (name, v, r)
    return int(v)


def sim_requests(sim):
    return sim.metric(tgtest.SIM_REQUESTS)


def ask(gw, tenant, max_tokens=1, **kw):
    return tgtest.chat(gw.port, gw.keys[tenant], max_tokens=max_tokens, content=HELLO, **kw)


# ---------------------------------------------------------------------------
# success headers

def test_success_headers_count_down(tg, sim):
    tenants = {
        "hdr": tgtest.limited_tenant(rpm=5, tpm=6000),
        "ronly": tgtest.limited_tenant(rpm=5),
        "free": tgtest.limited_tenant(),
    }
    gw = start_gw(tg, sim, tenants)
    remaining = []
    t_first = time.monotonic()
    for _ in range(3):
        r = ask(gw, "hdr", max_tokens=10)
        assert r.status == 200, r
        assert hdr_int(r, "x-ratelimit-limit-requests") == 5
        assert hdr_int(r, "x-ratelimit-limit-tokens") == 6000
        reset = tgtest.parse_duration_s(r.header("x-ratelimit-reset-requests"))
        assert 0 < reset <= 60, r.header("x-ratelimit-reset-requests")
        reset_t = tgtest.parse_duration_s(r.header("x-ratelimit-reset-tokens"))
        assert 0 <= reset_t <= 60, r.header("x-ratelimit-reset-tokens")
        remaining.append((hdr_int(r, "x-ratelimit-remaining-requests"),
                          hdr_int(r, "x-ratelimit-remaining-tokens")))
    refill = (time.monotonic() - t_first) * 6000 / 60 + 1
    assert [x[0] for x in remaining] == [4, 3, 2]
    # the bucket starts full: the first admission took exactly its reservation
    assert remaining[0][1] == 6000 - (27 + 10)
    # later ones: the settled usage (9 + 10) of each earlier request, this
    # one's reservation, and what refilled meanwhile (100 tokens a second)
    assert 6000 - 19 - 37 <= remaining[1][1] <= 6000 - 19 - 37 + refill, remaining
    assert 6000 - 38 - 37 <= remaining[2][1] <= 6000 - 38 - 37 + refill, remaining

    # a stream carries them in its head
    st = tgtest.SSEStream(gw.port, tgtest.chat_body(M, max_tokens=3, stream=True, content=HELLO),
                          key=gw.keys["hdr"])
    assert st.status == 200
    assert st.headers.get("x-ratelimit-remaining-requests") == "1", st.headers
    assert st.headers.get("x-ratelimit-limit-tokens") == "6000", st.headers
    assert st.headers.get("x-ratelimit-reset-tokens") is not None, st.headers
    st.read_all()
    assert st.done

    # only the limits the tenant has
    r = ask(gw, "ronly")
    assert r.status == 200
    h = tgtest.ratelimit_headers(r)
    assert h.get("x-ratelimit-limit-requests") == "5" and \
        h.get("x-ratelimit-remaining-requests") == "4", h
    assert "x-ratelimit-limit-tokens" not in h and "x-ratelimit-remaining-tokens" not in h, h
    r = ask(gw, "free")
    assert r.status == 200
    assert tgtest.ratelimit_headers(r) == {}, r.headers


# ---------------------------------------------------------------------------
# requests per minute

def test_requests_per_minute_refusal(tg, sim):
    gw = start_gw(tg, sim, {"rpm": tgtest.limited_tenant(rpm=3)})
    t0 = time.monotonic()
    for i in range(3):
        r = ask(gw, "rpm")
        assert r.status == 200, (i, r)
    before = sim_requests(sim)
    r = ask(gw, "rpm")
    ra = assert_refused(r, 429, "rate_limit_error", "requests")
    # the first admission is 60 s old at most ~60 s from now
    assert 60 - (time.monotonic() - t0) - 2 <= ra <= 60, ra
    # retry-after-ms, read first by the official clients, is that wait to
    # the millisecond, not rounded up to the second
    ms = tgtest.retry_after_ms(r)
    assert 60000 - (time.monotonic() - t0) * 1000 <= ms <= 60000, ms
    r = tgtest.request(gw.port, "POST", "/v1/completions", key=gw.keys["rpm"],
                       body={"model": M, "prompt": "Once", "max_tokens": 1})
    assert_refused(r, 429, "rate_limit_error", "requests")
    assert sim_requests(sim) == before, "a refused request reached the upstream"
    # the operator sees the refusal in the access log
    entry = gw.access_entry(r.header("x-request-id"))
    assert entry["status"] == 429 and entry["tenant"] == "rpm", entry


def test_requests_per_minute_burst_admits_exactly_the_limit(tg, sim):
    gw = start_gw(tg, sim, {"burst": tgtest.limited_tenant(rpm=5)})
    t0 = time.monotonic()
    rs = tgtest.parallel(lambda: ask(gw, "burst"), [()] * 12, threads=12)
    elapsed = time.monotonic() - t0
    for r in rs:
        assert isinstance(r, tgtest.Resp), r
    ok = [r for r in rs if r.status == 200]
    refused = [r for r in rs if r.status != 200]
    assert len(ok) == 5, [r.status for r in rs]
    # every admission saw a distinct count left: check-and-reserve is atomic
    assert sorted(hdr_int(r, "x-ratelimit-remaining-requests") for r in ok) == [0, 1, 2, 3, 4]
    for r in refused:
        ra = assert_refused(r, 429, "rate_limit_error", "requests")
        assert 60 - elapsed - 2 <= ra <= 60, ra


def test_requests_per_minute_window_slides(tg, sim):
    """The one test that waits out the minute: a sliding log frees each slot
    exactly 60 s after its own admission, never all at a minute boundary."""
    gw = start_gw(tg, sim, {"slide": tgtest.limited_tenant(rpm=4)})
    t0 = time.monotonic()
    assert [ask(gw, "slide").status for _ in range(2)] == [200, 200]
    t1_sent = time.monotonic()
    time.sleep(max(0.0, t0 + 3 - time.monotonic()))
    t3 = time.monotonic()
    assert [ask(gw, "slide").status for _ in range(2)] == [200, 200]
    t3_done = time.monotonic()
    r = ask(gw, "slide")
    ra = assert_refused(r, 429, "rate_limit_error", "requests")
    assert 60 - (time.monotonic() - t0) - 1 <= ra <= 60 - (time.monotonic() - t1_sent) + 1, ra

    # the first two are 60 s old; the two from t0+3 are not: exactly 2 more
    time.sleep(max(0.0, t1_sent + 60.5 - time.monotonic()))
    assert time.monotonic() < t3 + 59.5, "the test itself ran too slowly to observe the slide"
    got = [ask(gw, "slide").status for _ in range(2)]
    assert got == [200, 200], got
    r = ask(gw, "slide")
    ra = assert_refused(r, 429, "rate_limit_error", "requests")
    assert 1 <= ra <= (t3_done + 60) - time.monotonic() + 1.5, ra

    # and the two from t0+3 free up right after their own minute
    time.sleep(max(0.0, t3_done + 60.3 - time.monotonic()))
    got = [ask(gw, "slide").status for _ in range(3)]
    assert got == [200, 200, 429], got


def test_wall_clock_steps_move_no_per_minute_limit(tg, sim, tmp_path):
    """NTP steps the gateway's wall clock. Stepped two minutes forward, it
    used to empty the request log (a tenant with 2 rpm got a third request
    seconds after its first two); stepped an hour back, it froze the token
    bucket for that hour (nothing refilled). The per-minute limits measure
    elapsed time on the monotonic clock, which no step moves."""
    tenants = {"rpm": tgtest.limited_tenant(rpm=2), "tpm": tgtest.limited_tenant(tpm=600)}
    gw = tg.gateway(models_cfg(sim), tenants=tenants, keys=tuple(tenants), start=False)
    clock = tmp_path / "clock"

    def set_clock(when):
        clock.write_text("@%s\n" % when)
        time.sleep(0.2)

    clock.write_text("@2026-03-10 12:00:00\n")
    gw.env = tgtest.stepped_clock(str(clock))
    gw.start()
    assert [ask(gw, "rpm").status for _ in range(2)] == [200, 200]
    set_clock("2026-03-10 12:02:00")
    ra = assert_refused(ask(gw, "rpm"), 429, "rate_limit_error", "requests")
    assert 50 <= ra <= 60, ra

    # 600 tokens a minute, 10 a second: 327 reserved, 309 used
    assert ask(gw, "tpm", max_tokens=300).status == 200
    set_clock("2026-03-10 11:00:00")
    r = ask(gw, "tpm")                      # 28 reserved, 10 used
    assert r.status == 200, r
    before = hdr_int(r, "x-ratelimit-remaining-tokens")
    assert before < 600 - 28 - 30, before   # room below the cap for 3 s
    time.sleep(2.5)
    r = ask(gw, "tpm")
    assert r.status == 200, r
    # 10 settled away, about 25 refilled (a frozen bucket: exactly -10)
    assert hdr_int(r, "x-ratelimit-remaining-tokens") >= before + 10, (before, r)


# ---------------------------------------------------------------------------
# tokens per minute: reservation and settlement

def test_tokens_per_minute_refusal(tg, sim):
    gw = start_gw(tg, sim, {"tpm": tgtest.limited_tenant(tpm=100)})
    t0 = time.monotonic()
    r = ask(gw, "tpm", max_tokens=50)
    assert r.status == 200, r
    assert hdr_int(r, "x-ratelimit-remaining-tokens") == 100 - 77
    before = sim_requests(sim)
    r = ask(gw, "tpm", max_tokens=50)
    ra = assert_refused(r, 429, "rate_limit_error", "tokens")
    # settled to 9 + 50 = 59 used, 41 left; 77 needed: 36 tokens at 100/min
    want = 36 * 60 / 100 - (time.monotonic() - t0)
    assert want - 2 <= ra <= want + 2, (ra, want)
    assert sim_requests(sim) == before
    # a smaller request still fits: a refusal reserved nothing
    r = ask(gw, "tpm", max_tokens=10)
    assert r.status == 200, r


@pytest.mark.parametrize("case", ["chat_max_tokens", "chat_max_completion_tokens",
                                  "chat_parts_and_model_cap", "model_default_cap",
                                  "completions", "embeddings"])
def test_reservation_is_prompt_estimate_plus_max_tokens(tg, sim, case):
    """The first admission of a full bucket leaves exactly limit - reservation."""
    tpm = 100000
    msgs2 = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                          {"type": "text", "text": "again"}]}]
    cases = {
        "chat_max_tokens": ("/v1/chat/completions",
                            {"model": M, "messages": [{"role": "user", "content": HELLO}],
                             "max_tokens": 10}, 10),
        "chat_max_completion_tokens": ("/v1/chat/completions",
                                       {"model": M, "messages": msgs2,
                                        "max_completion_tokens": 7}, 7),
        "chat_parts_and_model_cap": ("/v1/chat/completions",
                                     {"model": M, "messages": msgs2}, MODEL_CAP),
        "model_default_cap": ("/v1/chat/completions",
                              {"model": M_NOCAP, "messages": [{"role": "user", "content": HELLO}]},
                              4096),
        "completions": ("/v1/completions", {"model": M, "prompt": "Once upon", "max_tokens": 5}, 5),
        "embeddings": ("/v1/embeddings", {"model": EMBED, "input": ["ab", "cde"]}, 0),
    }
    path, body, max_tokens = cases[case]
    gw = start_gw(tg, sim, {"res": tgtest.limited_tenant(models=(M, M_NOCAP, EMBED), tpm=tpm)})
    r = tgtest.request(gw.port, "POST", path, body=body, key=gw.keys["res"])
    assert r.status == 200, r
    est = tgtest.prompt_estimate(body)
    assert hdr_int(r, "x-ratelimit-remaining-tokens") == tpm - est - max_tokens, (est, max_tokens)


def test_a_request_that_states_no_limit_is_sent_the_reserved_one(tg):
    """A request without max_tokens reserves the model's cap (a completion:
    the API's default of 16), and the upstream is sent that limit: left to
    itself it writes up to its context's end (here the simulator's default
    of 400 tokens), past the reservation and so past a budget that admitted
    it. A limit the client states goes as it is; a chat's
    max_completion_tokens of 0 is none (vLLM takes `max_completion_tokens
    or max_tokens`), and was sent as it was: vLLM wrote to its context's
    end under a reservation of the cap."""
    sim = tg.sim(default_tokens=400)
    gw = start_gw(tg, sim, {"cap": tgtest.limited_tenant(models=(M,), tpm=10 ** 6)})
    key = gw.keys["cap"]
    msgs = [{"role": "user", "content": HELLO}]

    def used(body, path="/v1/chat/completions"):
        r = tgtest.request(gw.port, "POST", path, body=dict({"model": M}, **body), key=key)
        assert r.status == 200, (body, r)
        return r.json()["usage"]["completion_tokens"]

    assert used({"messages": msgs}) == MODEL_CAP
    assert used({"messages": msgs, "max_tokens": None}) == MODEL_CAP
    assert used({"messages": msgs, "max_tokens": None, "max_completion_tokens": None}) == MODEL_CAP
    assert used({"messages": msgs, "max_completion_tokens": 7}) == 7
    # vLLM reads a chat's max_completion_tokens of 0 as none (`or max_tokens`)
    assert used({"messages": msgs, "max_completion_tokens": 0}) == MODEL_CAP
    assert used({"messages": msgs, "max_completion_tokens": 0, "max_tokens": None}) == MODEL_CAP
    assert used({"messages": msgs, "max_tokens": 12}) == 12
    assert used({"prompt": "Once upon"}, "/v1/completions") == 16
    # a stream whose client asked for no usage: both members are added
    st = tgtest.SSEStream(gw.port, {"model": M, "messages": msgs, "stream": True}, key=key)
    assert st.status == 200
    st.read_all()
    assert st.done and not tgtest.usage_events(st.all_events)
    assert len(tgtest.assembled_text(st.all_events).split()) == MODEL_CAP


def test_settlement_replaces_reservation_with_usage(tg, sim):
    tpm = 600     # refills 10 tokens a second
    gw = start_gw(tg, sim, {"settle": tgtest.limited_tenant(tpm=tpm)})
    key = gw.keys["settle"]
    t_first = time.monotonic()
    # (a) not streamed: reserved 27 + 100, used 9 + 100
    r = ask(gw, "settle", max_tokens=100)
    assert r.status == 200 and r.json()["usage"]["prompt_tokens"] == 9, r
    assert hdr_int(r, "x-ratelimit-remaining-tokens") == tpm - 127
    used = 109
    # (b) streamed, the client did not ask for usage (the gateway does): 9 + 20
    st = tgtest.SSEStream(gw.port, tgtest.chat_body(M, max_tokens=20, stream=True, content=HELLO),
                          key=key)
    assert st.status == 200
    st.read_all()
    assert st.done and not tgtest.usage_events(st.all_events)
    used += 29
    # (c) a stream the client leaves after 5 tokens: no usage ever came, so
    # it counts the prompt estimate + one token per relayed content event
    st = tgtest.SSEStream(gw.port, tgtest.chat_body(M, max_tokens=100, stream=True, content=HELLO),
                          key=key, headers={"x-sim-token-ms": "100"})
    assert st.status == 200
    n = 0
    for ev in st.events():
        if tgtest.content_events([ev]):
            n += 1
            if n == 5:
                break
    st.abort()
    time.sleep(0.4)
    # (d) the check: 27 + 1 reserved
    r = ask(gw, "settle", max_tokens=1)
    t_last = time.monotonic()
    assert r.status == 200, r
    rem = hdr_int(r, "x-ratelimit-remaining-tokens")
    refill = (t_last - t_first) * tpm / 60 + 1
    lo = tpm - used - (27 + 7) - 28      # up to 2 events relayed after our 5th
    hi = tpm - used - (27 + 5) - 28 + refill
    assert lo <= rem <= hi, (rem, lo, hi)


# ---------------------------------------------------------------------------
# concurrency

def slow_stream(gw, key, tokens=40, token_ms=100):
    st = tgtest.SSEStream(gw.port, tgtest.chat_body(M, max_tokens=tokens, stream=True,
                                                     content=HELLO),
                          key=key, headers={"x-sim-token-ms": str(token_ms)}, timeout=30)
    return st


def test_concurrency_refusal_and_release(tg, sim):
    gw = start_gw(tg, sim, {"conc": tgtest.limited_tenant(concurrency=2)})
    key = gw.keys["conc"]
    s1 = slow_stream(gw, key)
    s2 = slow_stream(gw, key)
    assert (s1.status, s2.status) == (200, 200)
    before = sim_requests(sim)
    r = ask(gw, "conc")
    assert_refused(r, 429, "rate_limit_error", "concurrency")
    st = slow_stream(gw, key)
    assert st.status == 429, st.headers
    st.close()
    assert sim_requests(sim) == before

    # a client that disconnects gives its slot back
    s1.abort()
    r = tgtest.wait_for(lambda: (lambda x: x if x.status == 200 else None)(ask(gw, "conc")),
                        timeout=3, what="a slot freed by the disconnect")
    assert r.status == 200
    s3 = slow_stream(gw, key, tokens=10, token_ms=100)
    assert s3.status == 200
    assert ask(gw, "conc").status == 429   # s2 and s3 hold both

    # completion gives it back
    s3.read_all()
    assert s3.done
    r = tgtest.wait_for(lambda: (lambda x: x if x.status == 200 else None)(ask(gw, "conc")),
                        timeout=3, what="the slot of a completed stream")
    s2.abort()


def test_concurrency_released_after_errors(tg, sim):
    """With one slot, every request after a failed one is admitted again."""
    gw = start_gw(tg, sim, {"one": tgtest.limited_tenant(concurrency=1)})
    key = gw.keys["one"]
    faults = [("status:500", False, 500), ("status:429", False, 429), ("disconnect", False, 502),
              ("garbage", False, 502), ("disconnect-after:2", True, 200)]
    for fault, stream, status in faults:
        if stream:
            st = tgtest.SSEStream(gw.port, tgtest.chat_body(M, max_tokens=10, stream=True),
                                  key=key, headers={"x-sim-fault": fault})
            assert st.status == status, (fault, st.headers)
            st.read_all()
            assert not st.done, fault
            st.close()
        else:
            r = ask(gw, "one", headers={"x-sim-fault": fault})
            assert r.status == status, (fault, r)
        r = tgtest.wait_for(lambda: (lambda x: x if x.status == 200 else None)(ask(gw, "one")),
                            timeout=3, what="the slot back after %s" % fault)
        assert r.status == 200


# ---------------------------------------------------------------------------
# global limit

def test_global_rate_limit_across_tenants(tg, sim):
    tenants = {"ga": tgtest.limited_tenant(rpm=1000), "gb": tgtest.limited_tenant()}
    gw = start_gw(tg, sim, tenants, global_rate_limit={"requests_per_second": 4})
    for attempt in range(3):
        time.sleep(1.1)    # an empty second
        t0 = time.monotonic()
        got_a = [ask(gw, "ga").status for _ in range(4)]
        r = ask(gw, "gb")
        if time.monotonic() - t0 >= 0.9:
            continue       # too slow to be inside one second: try again
        assert got_a == [200] * 4, got_a
        ra = assert_refused(r, 429, "rate_limit_error", "global")
        assert ra == 1, ra
        break
    else:
        pytest.fail("could not send 5 requests within one second")

    # a parallel burst from both tenants: exactly 4 within the second
    for attempt in range(3):
        time.sleep(1.1)
        t0 = time.monotonic()
        rs = tgtest.parallel(lambda t: ask(gw, t), [("ga",), ("gb",)] * 6, threads=12)
        if time.monotonic() - t0 >= 0.9:
            continue
        assert [r.status for r in rs].count(200) == 4, [r.status for r in rs]
        for r in rs:
            if r.status != 200:
                assert_refused(r, 429, "rate_limit_error", "global")
        break
    else:
        pytest.fail("could not send the burst within one second")
    time.sleep(1.1)
    assert ask(gw, "gb").status == 200


def test_a_tenant_over_its_own_limit_leaves_the_global_limit_to_others(tg, sim):
    """A request its tenant's limits refuse never reaches the pool, so it
    takes no global slot: a tenant hammering its own limit cannot make the
    safety net refuse the others."""
    tenants = {"noisy": tgtest.limited_tenant(rpm=1), "quiet": tgtest.limited_tenant()}
    gw = start_gw(tg, sim, tenants, global_rate_limit={"requests_per_second": 4})
    tgtest.check_global_limit_left_to_others(lambda t: ask(gw, t), "noisy", "quiet", 4)


# ---------------------------------------------------------------------------
# reload

def test_reload_changes_rpm_and_keeps_the_count(tg, sim):
    gw = start_gw(tg, sim, {"rl": tgtest.limited_tenant(rpm=5)})
    got = [hdr_int(ask(gw, "rl"), "x-ratelimit-remaining-requests") for _ in range(3)]
    assert got == [4, 3, 2]

    gw.config["tenants"]["rl"]["rate_limits"]["requests_per_minute"] = 3
    tgtest.gateway_reload(gw)
    r = ask(gw, "rl")
    ra = assert_refused(r, 429, "rate_limit_error", "requests")
    assert 50 <= ra <= 60

    gw.config["tenants"]["rl"]["rate_limits"]["requests_per_minute"] = 10
    tgtest.gateway_reload(gw)
    r = ask(gw, "rl")
    assert r.status == 200, r
    assert hdr_int(r, "x-ratelimit-limit-requests") == 10
    assert hdr_int(r, "x-ratelimit-remaining-requests") == 10 - 4
