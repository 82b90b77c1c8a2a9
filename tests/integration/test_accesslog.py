"""The access log under load: each loop gathers its lines and writes many at
once (src/obs/accesslog.c), so these tests check what that must not break.
Two loops answer thousands of concurrent requests (200, 401, 403, 404):
every request leaves exactly one whole JSON line holding its own status,
in a regular file and through a pipe whose reader is slow (the pipe fills,
and writes of more than PIPE_BUF bytes could then be split and
interleaved). Lines are written without waiting for a stop: each is in the
log shortly after its response."""

import json
import os
import re
import threading
import time

import tgtest
from tgtest import chat

M8B, M70B, _ = tgtest.DEFAULT_MODELS
REQUESTS = 3000


def mixed_load(gw, keys):
    """REQUESTS requests from 16 threads; returns [(request id, status)]."""
    def one(i):
        if i % 10 == 1:
            r = chat(gw.port, "tg-000000000000-" + "0" * 64, M8B, max_tokens=1)
        elif i % 10 == 2:
            r = chat(gw.port, keys["small"], M70B, max_tokens=1)
        elif i % 10 == 3:
            r = chat(gw.port, keys["acme"], "no-such-model", max_tokens=1)
        else:
            r = chat(gw.port, keys["acme"], M8B, max_tokens=1 + i % 4)
        return r.header("x-request-id"), r.status
    out = tgtest.parallel(one, [(i,) for i in range(REQUESTS)], threads=16, timeout=240)
    bad = [o for o in out if isinstance(o, Exception)]
    assert not bad, bad[:3]
    assert {s for _, s in out} == {200, 401, 403, 404}, {s for _, s in out}
    return out


def check_lines(lines, answered):
    """Every line is one JSON object; each answered request has exactly one,
    with the status its client saw."""
    entries = [json.loads(line) for line in lines]
    seen = {}
    for e in entries:
        seen.setdefault(e["request_id"], []).append(e["status"])
    for rid, status in answered:
        assert seen.get(rid) == [status], (rid, status, seen.get(rid))
    assert len(entries) == len(answered), (len(entries), len(answered))


def test_access_log_file_one_whole_line_per_request_from_two_loops(tg):
    sim = tg.sim(token_ms=0, ttft_ms=0)
    gw = tg.gateway({m: [sim.url] for m in tgtest.DEFAULT_MODELS}, keys=("acme", "small"),
                    workers=2)
    answered = mixed_load(gw, gw.keys)
    t0 = time.monotonic()
    tgtest.wait_for(lambda: len(gw.access_log_entries()) >= REQUESTS, timeout=5,
                    what="%d access-log lines" % REQUESTS)
    assert time.monotonic() - t0 < 2  # written as the requests end, not at a stop
    with open(gw.access_log) as f:
        text = f.read()
    assert text.endswith("\n")
    check_lines(text.splitlines(), answered)
    # ids: 48 random bits of the process (unique across gateways on one
    # ledger), the loop, a sequence
    ids = {rid for rid, _ in answered}
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", rid) for rid in ids), sorted(ids)[:3]
    assert len({rid[4:16] for rid in ids}) == 1
    assert {rid[16:18] for rid in ids} == {"00", "01"}


def test_access_log_through_a_slow_pipe_keeps_lines_whole(tg, tmp_path):
    fifo = str(tmp_path / "access.fifo")
    os.mkfifo(fifo)
    chunks = []

    def reader():
        # a slow consumer: the pipe fills and the gateway's writes wait
        with open(fifo, "rb", buffering=0) as f:
            while True:
                b = f.read(1024)
                if not b:
                    return
                chunks.append(b)
                time.sleep(0.002)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    sim = tg.sim(token_ms=0, ttft_ms=0)
    gw = tg.gateway({m: [sim.url] for m in tgtest.DEFAULT_MODELS}, keys=("acme", "small"),
                    workers=2, overrides={"access_log": fifo})
    answered = mixed_load(gw, gw.keys)
    tgtest.wait_for(lambda: sum(c.count(b"\n") for c in chunks) >= REQUESTS, timeout=10,
                    what="%d lines through the pipe" % REQUESTS)
    assert gw.stop() == 0
    t.join(10)
    assert not t.is_alive()
    text = b"".join(chunks).decode()
    assert text.endswith("\n")
    check_lines(text.splitlines(), answered)


def test_an_access_log_pipe_nobody_reads_holds_no_request(tg, tmp_path):
    """A reader that keeps the pipe open and stops reading (a hung log
    shipper) fills it in a few hundred lines. The loop's write used to wait
    for it for ever: every later request on that loop hung while /healthz
    said 200. Now a flush waits at most a second for a pipe that takes
    nothing, then drops lines (and says so on stderr) until the pipe takes
    bytes again: each request is answered, and once the reader drains the
    pipe the lines of new requests come through whole."""
    fifo = str(tmp_path / "access.fifo")
    os.mkfifo(fifo)
    held = []
    opened = threading.Event()

    def opener():
        held.append(open(fifo, "rb", buffering=0))  # opened, not read
        opened.set()

    threading.Thread(target=opener, daemon=True).start()
    sim = tg.sim(token_ms=0, ttft_ms=0)
    gw = tg.gateway({M8B: [sim.url]}, workers=2, overrides={"access_log": fifo})
    assert opened.wait(10)
    key = gw.keys["acme"]
    t0 = time.monotonic()

    def one(i):
        return chat(gw.port, key, M8B, max_tokens=1, timeout=8).status
    out = tgtest.parallel(one, [(i,) for i in range(600)], threads=8, timeout=60)
    took = time.monotonic() - t0
    bad = [o for o in out if o != 200]
    assert not bad, bad[:3]
    assert took < 30, took
    assert "the access log takes no bytes" in gw.proc.stderr_text()

    chunks = []

    def reader():
        f = held[0]
        while True:
            b = f.read(65536)
            if not b:
                return
            chunks.append(b)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    # the stall's lines are gone; the loops take the pipe again
    after = []
    for _ in range(40):
        r = chat(gw.port, key, M8B, max_tokens=1, timeout=8)
        assert r.status == 200
        after.append(r.header("x-request-id"))
    tgtest.wait_for(lambda: all(rid.encode() in b"".join(chunks) for rid in after), timeout=10,
                    what="the lines of the requests after the stall")
    assert gw.stop() == 0
    t.join(10)
    text = b"".join(chunks).decode()
    assert text.endswith("\n")
    for line in text.splitlines():
        json.loads(line)  # every line whole
    assert re.search(r"takes bytes again; \d+ lines were dropped", gw.proc.stderr_text())


def test_a_start_waiting_for_the_access_log_fifos_reader_says_so(tg, tmp_path):
    """An access log that is a FIFO no process reads yet holds the start
    in its open(2) until a reader comes: stderr says what it waits for
    (before, the gateway sat silent, not serving, as if hung), and once
    the reader opens the FIFO the gateway serves and logs into it."""
    fifo = str(tmp_path / "access.fifo")
    os.mkfifo(fifo)
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, start=False, overrides={"access_log": fifo})
    started = []
    t = threading.Thread(target=lambda: started.append(gw.start()), daemon=True)
    t.start()
    tgtest.wait_for(lambda: gw.proc is not None and
                    "a FIFO that no process reads: waiting for its reader" in
                    gw.proc.stderr_text(), timeout=10, what="the gateway to say it waits")
    assert gw.proc.alive()
    with open(fifo, "rb", buffering=0) as f:
        t.join(20)
        assert started, "the gateway did not start once the FIFO had a reader"
        r = chat(gw.port, gw.keys["acme"], M8B, max_tokens=1)
        assert r.status == 200
        rid = r.header("x-request-id").encode()
        got = b""
        deadline = time.monotonic() + 5
        while rid not in got and time.monotonic() < deadline:
            got += f.read(4096)
        assert rid in got
        assert gw.stop() == 0


def test_a_refused_request_logs_how_long_it_lasted(tg):
    """A request the HTTP layer refuses itself logs the time from its first
    byte to the refusal, as an answered one does: a 408 that waited for
    the rest of its head or body for client_request (1 s) lasted that
    long, not 0 ms; on a keep-alive connection the time is the refused
    request's, not counted from the answered one before it."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]},
                    overrides={"timeouts": {"client_request": "1s", "client_keepalive": "10s"}})
    key = gw.keys["acme"]
    whole = tgtest.http_request_bytes("POST", "/v1/chat/completions",
                                      body=tgtest.chat_body(M8B, max_tokens=1), key=key)
    cases = []
    for part in (whole[:30], whole[:-5]):  # inside the head; inside the body
        c = tgtest.RawConn(gw.port)
        c.send(part)
        t0 = time.monotonic()
        r = c.read_response(method="POST")
        cases.append((r, (time.monotonic() - t0) * 1000))
        c.close()
    c = tgtest.RawConn(gw.port)
    c.send(whole)
    assert c.read_response(method="POST").status == 200
    time.sleep(1.5)  # idle on the kept-alive connection: not the next request's time
    c.send(whole[:30])
    t0 = time.monotonic()
    r = c.read_response(method="POST")
    cases.append((r, (time.monotonic() - t0) * 1000))
    c.close()
    for r, took_ms in cases:
        assert r.status == 408, r
        e = gw.access_entry(r.header("x-request-id"))
        assert e["status"] == 408 and e["error"] == "request_timeout", e
        assert 900 <= e["duration_ms"] <= took_ms + 100, (e["duration_ms"], took_ms)
    # a refusal at once lasted next to nothing
    c = tgtest.RawConn(gw.port)
    c.send(b"GARBAGE\r\n\r\n")
    r = c.read_response()
    c.close()
    assert r.status == 400
    e = gw.access_entry(r.header("x-request-id"))
    assert 0 <= e["duration_ms"] < 500, e


def test_an_unknown_path_is_logged_as_asked(tg):
    """A request for a path the API does not have (404) logs that path, as
    the admin listener logs an unknown /admin one: a scan of the API leaves
    a trace an operator can read. The path is the client's: quotes,
    backslashes and a long one leave the line one JSON object."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]})
    for path in ('/v1/nope', '/v1/"x\\y', '/admin/v1/tenants', '/' + 'a' * 300):
        r = tgtest.request(gw.port, "GET", path, key=gw.keys["acme"])
        assert r.status == 404, (path, r)
        e = gw.access_entry(r.header("x-request-id"))
        assert (e["path"], e["status"], e["error"]) == (path, 404, "not_found"), e
