"""Streaming through the gateway: the SSE events a client receives (count,
text, usage chunk only when asked for), that they arrive as the backend
produces them rather than all at the end, that a client who leaves cancels
the backend's work, and that a client who stops reading pauses the backend
instead of growing the gateway's memory."""

import json
import os
import resource
import selectors
import socket
import threading
import time

import pytest

import tgtest
from tgtest import SSEStream, assembled_text, chat, chat_body, content_events, usage_events

M8B, M70B, EMBED = tgtest.DEFAULT_MODELS


def _token_events(events):
    out = []
    for e in content_events(events):
        ch = e.json()["choices"][0]
        if (ch.get("delta") or {}).get("content") or ch.get("text"):
            out.append(e)
    return out


def _stream(stack, **kw):
    headers = kw.pop("headers", None)
    path = kw.pop("path", "/v1/chat/completions")
    body = kw.pop("body", None) or chat_body(kw.pop("model", M8B), stream=True, **kw)
    return SSEStream(stack.port, body, key=stack.key, headers=headers, path=path)


def test_stream_events_text_and_done(stack):
    s = _stream(stack, max_tokens=12)
    assert s.status == 200
    assert s.headers.get("content-type", "").startswith("text/event-stream")
    assert "chunked" in s.headers.get("transfer-encoding", "").lower()
    assert s.headers.get("x-request-id")
    events = s.read_all()
    s.close()
    assert s.complete and s.done
    assert events[-1].data == "[DONE]"
    toks = _token_events(events)
    assert len(toks) == 12
    assert assembled_text(events) == " ".join("tok%d" % i for i in range(12))
    # the final content chunk carries finish_reason "length" (max_tokens reached)
    finishes = [e.json()["choices"][0].get("finish_reason") for e in content_events(events)]
    assert finishes[-1] == "length"
    # the client did not ask for usage: no usage-only chunk is relayed
    assert usage_events(events) == []
    for e in events[:-1]:
        assert "usage" not in e.json() or e.json()["usage"] is None


def test_stream_matches_backend_stream(stack):
    s = _stream(stack, max_tokens=5)
    via = s.read_all()
    s.close()
    d = SSEStream(stack.sim.port, chat_body(M8B, stream=True, max_tokens=5))
    direct = d.read_all()
    d.close()
    assert [e.json()["choices"] for e in via[:-1]] == [e.json()["choices"] for e in direct[:-1]]
    assert len(via) == len(direct)


def test_stream_usage_chunk_kept_when_asked(stack):
    s = _stream(stack, max_tokens=9, include_usage=True)
    events = s.read_all()
    s.close()
    assert s.done
    u = usage_events(events)
    assert len(u) == 1
    doc = u[0].json()
    assert doc["choices"] == []
    assert doc["usage"]["completion_tokens"] == 9
    # the same prompt through the non-streaming path counts the same tokens
    ref = chat(stack.sim.port, None, M8B, max_tokens=9).json()["usage"]
    assert doc["usage"]["prompt_tokens"] == ref["prompt_tokens"]
    assert doc["usage"]["total_tokens"] == ref["prompt_tokens"] + 9
    # it is the last event before [DONE]
    assert events[-2] is u[0] and events[-1].data == "[DONE]"


def test_stream_usage_chunk_stripped_when_declined(stack):
    s = _stream(stack, max_tokens=4, include_usage=False)
    events = s.read_all()
    s.close()
    assert s.done
    assert usage_events(events) == []
    assert len(_token_events(events)) == 4


def test_usage_null_on_every_chunk_is_taken_out_for_a_client_that_did_not_ask(tg):
    """The gateway asks every upstream stream for usage. OpenAI-style
    upstreams then write "usage": null on every chunk; a client that did not
    ask got that member, where OpenAI sends such a client none. It is taken
    out now (the rest of each chunk byte for byte); a client that asked
    gets the chunks as written. Both are billed the usage chunk."""
    up = tgtest.FakeUpstream(status=200)
    up.content_type = "text/event-stream"
    try:
        gw = tg.gateway({M8B: tgtest.model_entry([up.url])})
        head = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"%s",' % M8B
        chunks = [head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                  '"finish_reason":null}]',
                  head + '"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]',
                  # Python's separators, as some servers write them
                  head + '"choices": [{"index": 0, "delta": {"content": " \\"usage\\": null"}, '
                  '"finish_reason": null}]',
                  head + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]']
        null = (',"usage":null', ',"usage":null', ', "usage": null', ',"usage":null')
        up.body = ("".join("data: %s%s}\n\n" % (c, n) for c, n in zip(chunks, null)) +
                   "data: %s\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,"
                   "\"total_tokens\":10}}\n\ndata: [DONE]\n\n" % head).encode()
        for asked in (False, True):
            body = chat_body(M8B, stream=True, include_usage=asked)
            s = SSEStream(gw.port, body, key=gw.keys["acme"])
            events = s.read_all()
            s.close()
            assert s.done and events[-1].data == "[DONE]", events
            got = [e.data for e in events[:-1]]
            if asked:
                assert got[:4] == [c + n + "}" for c, n in zip(chunks, null)], got
                assert usage_events(events)[0].json()["usage"]["completion_tokens"] == 3
            else:
                assert got == [c + "}" for c in chunks], got
                assert all("usage" not in e.json() for e in events[:-1])
            row = tgtest.sqlite_ledger_row(gw.db_path, s.headers["x-request-id"])
            assert (row["usage_counted"], row["prompt_tokens"], row["completion_tokens"]) == \
                (0, 7, 3), row
    finally:
        up.close()


def test_streaming_usage_is_logged(stack):
    # even when the client did not ask for usage, the gateway meters it
    s = _stream(stack, max_tokens=6, headers={"x-sim-token-ms": "60"})
    s.read_all()
    took_ms = (time.monotonic() - s.t0) * 1000
    s.close()
    e = stack.gw.access_entry(s.headers["x-request-id"])
    assert e["status"] == 200
    assert e["model"] == M8B
    assert e["completion_tokens"] == 6
    assert e["prompt_tokens"] == chat(stack.sim.port, None, M8B).json()["usage"]["prompt_tokens"]
    # the duration covers the whole stream (5 gaps of 60 ms), not just the head
    assert 250 <= e["duration_ms"] <= took_ms + 50, (e["duration_ms"], took_ms)


def test_legacy_completions_stream(stack):
    body = {"model": M70B, "prompt": "hi", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    s = _stream(stack, body=body, path="/v1/completions")
    events = s.read_all()
    s.close()
    assert s.done
    assert assembled_text(events) == "tok0 tok1 tok2"
    assert usage_events(events)[0].json()["usage"]["completion_tokens"] == 3


def test_events_relayed_as_produced(stack):
    # 20 tokens, 100 ms apart: the first must reach us long before the last
    # is produced, and the events must be spread over the ~2 s
    s = _stream(stack, max_tokens=20, headers={"x-sim-token-ms": "100", "x-sim-ttft-ms": "0"})
    events = s.read_all()
    s.close()
    toks = _token_events(events)
    assert len(toks) == 20
    first, last = toks[0].t - s.t0, toks[-1].t - s.t0
    assert first < 1.0, "first token after %.2fs" % first
    assert last - first >= 1.8, "tokens bunched: first %.2fs last %.2fs" % (first, last)
    # and not bunched in the middle either: at least 15 distinct arrival
    # moments at least 50 ms apart
    times = [e.t for e in toks]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(1 for g in gaps if g >= 0.05) >= 15, gaps


def test_client_disconnect_cancels_upstream(stack):
    aborted0 = stack.sim.metric(tgtest.SIM_ABORTED)
    s = _stream(stack, max_tokens=200, headers={"x-sim-token-ms": "50"})
    got = []
    for e in s.events():
        got.append(e)
        if len(got) == 3:
            break
    s.abort()
    tgtest.wait_for(lambda: stack.sim.metric(tgtest.SIM_ABORTED) >= aborted0 + 1, timeout=3.0,
                    what="sim aborted counter to rise")
    # the backend's slot is free again, well before the 200 tokens (10 s)
    tgtest.wait_for(lambda: stack.sim.metric(tgtest.SIM_RUNNING) == 0, timeout=2.0,
                    what="the sim to release the cancelled sequence")
    assert time.monotonic() - s.t0 < 5.0
    r = chat(stack.port, stack.key, M8B, max_tokens=3)
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_client_disconnect_logged_with_partial_usage(stack):
    s = _stream(stack, max_tokens=200, headers={"x-sim-token-ms": "30"})
    n = 0
    for _ in s.events():
        n += 1
        if n == 5:
            break
    rid = s.headers["x-request-id"]
    s.close()
    e = stack.gw.access_entry(rid, timeout=5.0)
    assert e["tenant"] == "acme"
    # not the 200 asked for: what was produced before the cancel (the
    # backend may have run a few tokens ahead of what we read)
    assert e.get("completion_tokens") is None or e["completion_tokens"] < 200


def test_slow_client_pauses_upstream_with_bounded_memory(tg):
    sim = tg.sim(token_ms=0, ttft_ms=0)
    gw = tg.gateway({M8B: [sim.url]}, workers=1)
    key = gw.keys["acme"]
    total = 16 * 100000  # n=16 choices × 100000 tokens: ~250 MB of SSE
    rss0 = gw.rss_kb()
    gen0 = sim.metric(tgtest.SIM_GEN_TOKENS)
    body = chat_body(M8B, stream=True, max_tokens=100000, n=16)
    s = SSEStream(gw.port, body, key=key, rcvbuf=4096, read_head=False)
    # do not read anything for 3 s
    time.sleep(1.5)
    gen1 = sim.metric(tgtest.SIM_GEN_TOKENS) - gen0
    rss1 = gw.rss_kb()
    time.sleep(1.5)
    gen2 = sim.metric(tgtest.SIM_GEN_TOKENS) - gen0
    rss2 = gw.rss_kb()
    print("slow client: generated %d then %d of %d tokens; RSS %d -> %d -> %d KiB"
          % (gen1, gen2, total, rss0, rss1, rss2))
    # the backend was paused: nothing (or almost nothing) generated while
    # the client kept not reading, and far below the total
    assert gen2 < total / 10, "backend produced %d of %d tokens" % (gen2, total)
    assert gen2 - gen1 < 2000, "backend kept producing: %d then %d" % (gen1, gen2)
    # the gateway's memory did not follow the backend's output
    # (what the kernel's socket buffers hold is not the gateway's RSS; the
    # observed growth is ~1.5 MiB under ASan, ~0.7 MiB without)
    assert rss2 - rss1 < 2048, "RSS grew %d KiB while the client did not read" % (rss2 - rss1)
    assert rss2 - rss0 < 8192, "RSS grew %d KiB since before the request" % (rss2 - rss0)
    # reading resumes the stream
    s.read_head()
    assert s.status == 200
    n = 0
    for _ in s.events():
        n += 1
        if n == 2000:
            break
    assert n == 2000
    # leaving cancels the backend's work
    aborted0 = sim.metric(tgtest.SIM_ABORTED)
    s.abort()
    tgtest.wait_for(lambda: sim.metric(tgtest.SIM_ABORTED) >= aborted0 + 1, timeout=5.0,
                    what="sim aborted counter")
    assert sim.metric(tgtest.SIM_GEN_TOKENS) - gen0 < total
    r = chat(gw.port, key, M8B, max_tokens=2)
    assert r.status == 200


def test_stream_head_before_first_token_waits_on_the_first_byte_deadline(tg):
    """An upstream sends a stream's head at once and its first event only
    after the time to first token (as vLLM does, queueing and prefill
    included): that wait is bounded by upstream_first_byte, not by the
    shorter upstream_idle, and the access log and the ledger time the first
    token, not the head."""
    sim = tg.sim(token_ms=0, ttft_ms=0)
    gw = tg.gateway({M8B: [sim.url]}, workers=1,
                    overrides={"timeouts": {"upstream_idle": "500ms",
                                            "upstream_first_byte": "10s"}})
    s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=3), key=gw.keys["acme"],
                  headers={"x-sim-ttft-ms": "1200"})
    s.read_all()
    s.close()
    assert s.status == 200 and s.done and s.complete
    rid = s.headers["x-request-id"]
    e = gw.access_entry(rid, timeout=5.0)
    assert e["status"] == 200 and e["completion_tokens"] == 3, e
    assert 1150 <= e["ttfb_ms"] <= e["duration_ms"], e
    rows = tgtest.sqlite_ledger_rows(gw.db_path, "WHERE request_id = ?", (rid,))
    assert len(rows) == 1 and rows[0]["ttft_us"] >= 1150000, rows

    # the first-byte deadline still ends a stream whose first event never comes
    t0 = time.monotonic()
    s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=3), key=gw.keys["acme"],
                  headers={"x-sim-ttft-ms": "60000"}, timeout=30)
    s.read_all()
    s.close()
    assert s.status == 504, s.status
    assert 9.0 <= time.monotonic() - t0 < 15.0


def test_slow_reader_is_not_cut_by_the_upstream_idle_timeout(tg):
    """A client that reads slowly pauses the upstream; the pause is the
    client's doing, so the upstream idle timeout (3 s) does not run during
    it and the upstream is not blamed: the stream ends whole."""
    sim = tg.sim(token_ms=0, ttft_ms=0)
    gw = tg.gateway({M8B: [sim.url]}, workers=1)
    key = gw.keys["acme"]

    def upstream_errors():
        return tgtest.metric_sum(tgtest.parse_metrics(tgtest.admin(gw, "/metrics").body.decode()),
                                 "llm_upstream_errors_total")

    errors0 = upstream_errors()
    s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=60000), key=key,
                  rcvbuf=4096, read_head=False, timeout=30)
    time.sleep(5)            # longer than upstream_idle, shorter than client_send
    s.read_head()
    assert s.status == 200
    events = s.read_all()
    s.close()
    assert s.done, "the stream was cut after %d events" % len(events)
    assert len(_token_events(events)) == 60000
    e = gw.access_entry(s.headers["x-request-id"], timeout=5.0)
    assert e["status"] == 200 and e.get("error") is None, e
    assert upstream_errors() == errors0


def test_upstream_stall_mid_stream_ends_on_idle_timeout(stack):
    # the backend sends 3 tokens then goes silent; upstream_idle is 3 s
    s = _stream(stack, max_tokens=50, headers={"x-sim-fault": "stall-after:3"})
    assert s.status == 200
    events = s.read_all()
    elapsed = time.monotonic() - s.t0
    s.close()
    assert len(_token_events(events)) == 3
    assert not s.done
    assert 2.5 <= elapsed <= 8.0, elapsed
    assert chat(stack.port, stack.key, M8B, max_tokens=1).status == 200


def test_upstream_disconnect_mid_stream_truncates(stack):
    s = _stream(stack, max_tokens=50, headers={"x-sim-fault": "disconnect-after:4"})
    assert s.status == 200
    events = s.read_all()
    s.close()
    assert len(_token_events(events)) == 4
    assert not s.done, "a truncated upstream stream must not end with [DONE]"
    assert chat(stack.port, stack.key, M8B, max_tokens=1).status == 200


def test_many_concurrent_streams(stack):
    streams = [_stream(stack, max_tokens=10, headers={"x-sim-token-ms": "20"}) for _ in range(20)]
    for s in streams:
        events = s.read_all()
        s.close()
        assert s.done
        assert len(_token_events(events)) == 10


def test_stream_error_before_head_is_json(stack):
    # a refusal of a streaming request is a plain JSON error, not SSE
    s = SSEStream(stack.port, chat_body(M70B, stream=True), key=stack.small_key)
    assert s.status == 403
    body = json.loads(s.body_bytes())
    assert body["error"]["code"] == "model_not_allowed"
    s.close()


def _burst(port, key, n, body, timeout=60.0):
    """Opens n connections, sends each a streaming request at once, and
    reads every answer to its end on one thread. Returns the raw bytes of
    each answer (head and chunked body)."""
    req = tgtest.http_request_bytes("POST", "/v1/chat/completions", body, key=key)
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setblocking(False)
        socks.append(s)
    for s in socks:
        sent = 0
        while sent < len(req):
            try:
                sent += s.send(req[sent:])
            except BlockingIOError:
                time.sleep(0.001)
    sel = selectors.DefaultSelector()
    got = {s: bytearray() for s in socks}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    open_n = n
    deadline = time.monotonic() + timeout
    while open_n and time.monotonic() < deadline:
        for k, _ in sel.select(0.5):
            s = k.fileobj
            try:
                d = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                d = b""
            got[s] += d
            if not d or got[s].endswith(b"\r\n0\r\n\r\n"):
                sel.unregister(s)
                open_n -= 1
    sel.close()
    for s in socks:
        s.close()
    return [bytes(got[s]) for s in socks]


def test_streams_keep_no_request_head(tg):
    """A request's head buffer (max_header_bytes) goes back once the call
    has read the headers it needs, not when its stream ends. 300 streams
    held open at the backend, sent with 12 KB of headers each, grow the
    gateway no more than the same 300 sent with a few bytes of headers;
    before, each kept its head, all of it touched, while it lasted."""
    n = 300
    sim = tg.sim(max_num_seqs=2 * n)
    tenants = tgtest.default_tenants(models=[M8B])
    tenants["acme"]["rate_limits"]["concurrent_requests"] = 2 * n
    gw = tg.gateway({M8B: tgtest.model_entry([sim.url], max_inflight=2 * n)},
                    tenants=tenants, workers=1, overrides={"max_header_bytes": 16384})
    key = gw.keys["acme"]
    body = chat_body(M8B, stream=True, max_tokens=2)

    def held(pad):
        """RSS growth (KiB) with n streams waiting at the backend."""
        running0 = int(sim.metric("sim_requests_running"))
        before = tgtest.rss_kb(gw.proc.pid)
        conns = []
        try:
            for _ in range(n):
                c = tgtest.RawConn(gw.port)
                c.send(tgtest.http_request_bytes(
                    "POST", "/v1/chat/completions", body, key=key,
                    headers={"x-sim-ttft-ms": "2500", "x-pad": "p" * pad}))
                conns.append(c)
            tgtest.wait_for(lambda: int(sim.metric("sim_requests_running")) >= running0 + n,
                            timeout=20, what="%d streams at the backend" % n)
            grown = tgtest.rss_kb(gw.proc.pid) - before
            for c in conns:
                r = c.read_response("POST")
                assert r.status == 200 and b"data: [DONE]" in r.body, (r.status, r.body[-200:])
        finally:
            for c in conns:
                c.close()
        return grown

    held(8)  # warms the loop's caches and pools
    small = held(8)
    big = held(12000)
    per_stream = (big - small) / float(n)
    print("RSS growth with %d streams held: %d KiB (8-byte header), %d KiB (12 KB header):"
          " %.1f KiB a stream" % (n, small, big, per_stream))
    assert per_stream < 4.0, "%.1f KiB more a stream with a 12 KB header" % per_stream


def test_a_thousand_streams_at_once(tg):
    """1,000 streams in flight together through one worker: every one is
    answered 200 with all its events and [DONE], the backend really ran
    them side by side, and each has its ledger row with the backend's usage.
    Under the sanitizers this runs the loop's recycles past their bounds and
    the upstream pool at a thousand connections."""
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 200:
        # this process holds the client side of every connection
        if hard != resource.RLIM_INFINITY and hard < n + 200:
            pytest.skip("open-files limit %d" % hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # 300 ms a token: each stream lasts 3.6 s, longer than the burst takes
    # to open its connections on a loaded machine
    sim = tg.sim(max_num_seqs=2 * n, token_ms=300)
    tenants = tgtest.default_tenants(models=[M8B])
    tenants["acme"]["rate_limits"]["concurrent_requests"] = 2 * n
    gw = tg.gateway({M8B: tgtest.model_entry([sim.url], max_inflight=2 * n)},
                    tenants=tenants, workers=1)
    key = gw.keys["acme"]
    db = os.path.join(gw.data_dir, "tollgate.db")
    before = {r["request_id"] for r in tgtest.sqlite_ledger_rows(db)}
    peak = [0]
    stop = [False]

    def watch():
        while not stop[0]:
            try:
                peak[0] = max(peak[0], int(sim.metric("sim_requests_running")))
            except Exception:  # noqa: BLE001 - the sim may be busy
                pass
            time.sleep(0.05)
    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        answers = _burst(gw.port, key, n, chat_body(M8B, stream=True, max_tokens=12))
    finally:
        stop[0] = True
        w.join()
    bad = [a[:200] for a in answers if not a.startswith(b"HTTP/1.1 200")]
    assert not bad, "%d of %d not 200, e.g. %r" % (len(bad), n, bad[:2])
    for a in answers:
        assert a.endswith(b"\r\n0\r\n\r\n"), a[-200:]
        # twelve tokens after the chunk that opens the choice with its role
        assert a.count(b'"role":"assistant","content":""') == 1, a[:600]
        assert a.count(b'"content":') == 13 and b"data: [DONE]" in a, a[-300:]
    assert peak[0] >= 0.9 * n, "at most %d sequences ran at once" % peak[0]
    # the ledger: one row per stream, with the usage the backend reported
    rows = [r for r in tgtest.sqlite_ledger_rows(db) if r["request_id"] not in before]
    assert len(rows) == n, len(rows)
    assert len({r["request_id"] for r in rows}) == n
    assert all(r["status"] == 200 and r["completion_tokens"] == 12 for r in rows), \
        [r for r in rows if r["status"] != 200 or r["completion_tokens"] != 12][:3]
