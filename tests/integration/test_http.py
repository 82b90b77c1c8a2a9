"""HTTP/1.1 behaviour of the gateway's listener: keep-alive, pipelining,
chunked request bodies, and hostile or broken input that must never crash
the process or disturb other connections."""

import json
import os
import random
import socket
import time

import tgtest
from tgtest import RawConn, chat, http_request_bytes, request

M8B, M70B, EMBED = tgtest.DEFAULT_MODELS


def _chat_bytes(key, max_tokens, model=M8B, extra_headers=None):
    return http_request_bytes("POST", "/v1/chat/completions",
                              tgtest.chat_body(model, max_tokens=max_tokens),
                              headers=extra_headers, key=key)


def test_keep_alive_several_requests_one_socket(stack):
    c = RawConn(stack.port)
    rids = set()
    for n in (1, 2, 3, 4, 5):
        c.send(_chat_bytes(stack.key, n))
        r = c.read_response()
        assert r is not None, "connection closed after %d requests" % (n - 1)
        assert r.status == 200, r
        assert r.json()["usage"]["completion_tokens"] == n
        rids.add(r.header("x-request-id"))
    c.send(http_request_bytes("GET", "/v1/models", key=stack.key))
    r = c.read_response()
    assert r.status == 200 and len(r.json()["data"]) == 3
    assert len(rids) == 5
    c.close()


def test_pipelined_requests_answered_in_order(stack):
    c = RawConn(stack.port)
    # the first takes longer than the second: order must still hold
    slow = _chat_bytes(stack.key, 6, extra_headers={"x-sim-token-ms": "50"})
    fast = _chat_bytes(stack.key, 2)
    models = http_request_bytes("GET", "/v1/models", key=stack.small_key)
    c.send(slow + fast + models)
    r1, r2, r3 = c.read_response(), c.read_response(), c.read_response()
    assert r1.status == 200 and r1.json()["usage"]["completion_tokens"] == 6, r1
    assert r2.status == 200 and r2.json()["usage"]["completion_tokens"] == 2, r2
    assert r3.status == 200 and [m["id"] for m in r3.json()["data"]] == [M8B], r3
    c.close()


def test_pipelined_error_then_success(stack):
    c = RawConn(stack.port)
    c.send(_chat_bytes(None, 1) + _chat_bytes(stack.key, 3))
    r1, r2 = c.read_response(), c.read_response()
    assert r1.status == 401
    assert r2.status == 200 and r2.json()["usage"]["completion_tokens"] == 3
    c.close()


def test_connection_close_honoured(stack):
    c = RawConn(stack.port)
    c.send(http_request_bytes("GET", "/v1/models", key=stack.key,
                              headers={"Connection": "close"}))
    r = c.read_response()
    assert r.status == 200
    assert c.closed_by_peer(2.0)
    c.close()


def test_http10_request(stack):
    c = RawConn(stack.port)
    c.send("GET /v1/models HTTP/1.0\r\nAuthorization: Bearer %s\r\n\r\n" % stack.key)
    r = c.read_response()
    assert r.status == 200
    assert len(r.json()["data"]) == 3
    assert c.closed_by_peer(2.0)
    c.close()


def test_chunked_request_body(stack):
    body = json.dumps(tgtest.chat_body(M8B, max_tokens=4)).encode()
    c = RawConn(stack.port)
    c.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
           "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" % stack.key)
    for i in range(0, len(body), 10):
        piece = body[i:i + 10]
        c.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
    c.send(b"0\r\n\r\n")
    r = c.read_response()
    assert r.status == 200, r
    assert r.json()["usage"]["completion_tokens"] == 4
    c.close()


def test_request_split_in_tiny_writes(stack):
    data = _chat_bytes(stack.key, 3)
    c = RawConn(stack.port)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(0, len(data), 7):
        c.send(data[i:i + 7])
        time.sleep(0.001)
    r = c.read_response()
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 3
    c.close()


def _still_serving(stack):
    r = chat(stack.port, stack.key, M8B, max_tokens=2)
    assert r.status == 200, r
    assert r.json()["usage"]["completion_tokens"] == 2
    assert stack.gw.proc.alive()


def _send_and_expect_4xx_or_close(port, data):
    c = RawConn(port, timeout=5)
    try:
        c.send(data)
    except OSError:
        c.close()
        return None
    try:
        r = c.read_response()
    except (OSError, ValueError, IndexError):
        r = None
    finally:
        c.close()
    if r is not None:
        assert 400 <= r.status < 500, r
        assert r.header("x-request-id"), r  # errors of the HTTP layer too
        assert r.error()["type"] == "invalid_request_error", r
    return r


def test_invalid_chunked_encoding(stack):
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            "Transfer-Encoding: chunked\r\n\r\n" % stack.key).encode()
    for tail in [b"ZZZ\r\nhello\r\n0\r\n\r\n",        # size not hex
                 b"5\r\nhelloXX0\r\n\r\n",             # missing CRLF after data
                 b"ffffffffffffffffffff\r\n",          # size overflow
                 b"-1\r\n\r\n"]:
        r = _send_and_expect_4xx_or_close(stack.port, head + tail)
        if r is not None:
            assert r.status in (400, 413), r
    _still_serving(stack)


def test_conflicting_framing_rejected(stack):
    data = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % stack.key).encode()
    _send_and_expect_4xx_or_close(stack.port, data)
    data = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            "Content-Length: 7\r\n\r\nhello").encode()
    _send_and_expect_4xx_or_close(stack.port, data)
    _still_serving(stack)


def test_garbage_bytes_never_crash(stack):
    rnd = random.Random(1234)
    samples = [
        b"\x00" * 100,
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nBad Header Without Colon\r\n\r\n",
        b"G\xffT /\xfe HTTP/1.1\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200),  # a TLS hello
    ]
    samples += [bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 3000))) for _ in range(15)]
    for data in samples:
        _send_and_expect_4xx_or_close(stack.port, data)
    _still_serving(stack)


def test_huge_header_line_and_many_connections(stack):
    # an endless header without a newline, on several connections at once,
    # while a well-behaved client is served
    conns = []
    for _ in range(10):
        c = RawConn(stack.port, timeout=5)
        try:
            c.send(b"GET /v1/models HTTP/1.1\r\nX-Long: " + b"a" * 20000)
        except OSError:
            pass
        conns.append(c)
    _still_serving(stack)
    for c in conns:
        try:
            r = c.read_response()
        except OSError:
            r = None
        if r is not None:
            assert r.status == 431, r
        c.close()
    _still_serving(stack)


def test_half_open_connections_do_not_block_others(stack):
    idle = [RawConn(stack.port) for _ in range(50)]
    for c in idle[:25]:
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\n")
    _still_serving(stack)
    for c in idle:
        c.abort()
    _still_serving(stack)


def _head(key, pad_name, pad_value, target):
    """A GET /v1/models head (without its final blank line) grown by one
    padding header to exactly `target` bytes as sent."""
    base = "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % key
    line = "%s:%s%%s\r\n" % (pad_name, pad_value)
    fill = target - len(base) - len(line % "")
    assert fill > 0
    return base + line % ("v" * fill)


def test_header_bound_counts_bytes_as_sent(tg):
    """max_header_bytes bounds the head as the client sent it: the request
    line, names, colons, whitespace and line ends all count, whether the
    head comes in one read or a byte at a time, so padding that the parser
    skips (whitespace before a value) cannot slip past it."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, overrides={"max_header_bytes": 1024})
    key = gw.keys["acme"]

    def answer(head, tiny):
        c = RawConn(gw.port)
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = (head + "\r\n").encode()
        try:
            if tiny:
                for i in range(0, len(data), 97):
                    c.send(data[i:i + 97])
                    time.sleep(0.0005)
            else:
                c.send(data)
        except OSError:
            pass
        r = c.read_response()
        c.close()
        return r.status

    for tiny in (False, True):
        assert answer(_head(key, "X-Pad", " ", 1000), tiny) == 200
        # 1,100 bytes sent, ~1,020 of them stored: over the bound
        assert answer(_head(key, "X-Pad", " ", 1100), tiny) == 431
        # whitespace the parser skips before a value
        assert answer(_head(key, "X-Pad", " " * 900, 1100), tiny) == 431
        assert answer(_head(key, "X-Pad", "\t" * 800, 1000), tiny) == 200
        # many short headers: their separators add up
        many = "GET /v1/models HTTP/1.1\r\nAuthorization: Bearer %s\r\n" % key
        many += "".join("X-%02d: aaa\r\n" % i for i in range(90))
        # over the bound as sent; names and values alone are well under it
        assert len(many) > 1100 and 90 * (4 + 3) + 80 < 900
        assert answer(many, tiny) == 431


def test_idle_connections_hold_little_memory(tg):
    """An idle keep-alive connection holds its connection state and no
    request buffers: 2,000 of them (some after a request, so their head
    went back) grow the gateway by well under the 16 KiB head buffer each
    one used to hold, and every one is still served afterwards."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, workers=1)
    key = gw.keys["acme"]
    assert chat(gw.port, key, M8B, max_tokens=1).status == 200
    before = tgtest.rss_kb(gw.proc.pid)
    conns = []
    try:
        for i in range(2000):
            c = RawConn(gw.port)
            if i % 10 == 0:
                c.send(http_request_bytes("GET", "/v1/models", key=key))
                assert c.read_response().status == 200
            conns.append(c)
        time.sleep(0.5)
        grown = tgtest.rss_kb(gw.proc.pid) - before
        per_conn = grown / 2000.0
        # the sanitizers' allocator adds its own; a head buffer alone is 16 KiB
        assert per_conn < 4.0, "%.1f KiB per idle connection" % per_conn
        for c in conns[::97]:
            c.send(http_request_bytes("GET", "/v1/models", key=key))
            assert c.read_response().status == 200
    finally:
        for c in conns:
            c.close()


def test_pipelining_client_that_never_reads_is_bounded_and_dropped(tg):
    """A client that pipelines requests and never reads its answers: the
    gateway stops parsing and reading once the answers waiting for it reach
    the high-water mark, so its memory stays flat, and the connection is
    dropped once nothing moved for client_send, however many requests the
    client keeps queueing."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, workers=1,
                    overrides={"timeouts": {"client_send": "1s"}})
    key = gw.keys["acme"]
    batch = http_request_bytes("GET", "/v1/models", key=key) * 500
    before = tgtest.rss_kb(gw.proc.pid)
    c = RawConn(gw.port, rcvbuf=4096, timeout=0.5)
    grown = 0
    closed_after = None
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 12:
            try:
                c.sock.send(batch)
            except socket.timeout:
                pass
            except OSError:  # reset or broken pipe: the gateway closed
                closed_after = time.monotonic() - t0
                break
            grown = max(grown, tgtest.rss_kb(gw.proc.pid) - before)
            if grown > 200 * 1024:
                break  # unbounded: stop before it hurts the machine
    finally:
        c.close()
    assert grown < 64 * 1024, "gateway grew by %d KiB" % grown
    # client_send is 1 s: closed well within the loop, not after it
    assert closed_after is not None and closed_after < 10, closed_after
    assert chat(gw.port, key, M8B, max_tokens=1).status == 200


def test_client_leaving_behind_pipelined_input_cancels_its_request(tg):
    """A client pipelines past the 256 KiB the gateway holds behind an
    active request, so the gateway stops reading it, and then closes: its
    EOF is never read, yet the active request (a whole answer the backend
    takes 8 s to make) is cancelled within a second or two, not run to
    the end."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, workers=1)
    key = gw.keys["acme"]
    aborted0 = sim.metric(tgtest.SIM_ABORTED)
    slow = _chat_bytes(key, 400, extra_headers={"x-sim-token-ms": "20"})
    # just past the 256 KiB held: reading stops, and what is left of the
    # input and the FIN behind it fit any receive buffer (more input could
    # leave the FIN behind a closed window, where nothing can see it)
    one = http_request_bytes("GET", "/v1/models", key=key)
    more = one * ((256 + 24) * 1024 // len(one))
    c = RawConn(gw.port)
    c.sock.sendall(slow)
    tgtest.wait_for(lambda: sim.metric(tgtest.SIM_RUNNING) == 1, timeout=5.0,
                    what="the request running at the backend")
    c.sock.sendall(more)
    time.sleep(0.3)
    t0 = time.monotonic()
    c.close()
    tgtest.wait_for(lambda: sim.metric(tgtest.SIM_ABORTED) >= aborted0 + 1, timeout=3.0,
                    what="the backend's request cancelled")
    assert time.monotonic() - t0 < 2.0
    entries = tgtest.wait_for(
        lambda: [e for e in gw.access_log_entries() if e.get("path") == "/v1/chat/completions"],
        timeout=5.0, what="the access log line")
    assert entries[0]["status"] == 499, entries
    assert chat(gw.port, key, M8B, max_tokens=1).status == 200


def test_pipelined_burst_answered_while_client_reads(tg):
    """Many pipelined requests at once, read as they come: every answer
    arrives, in order, though the gateway pauses their parsing each time
    the answers waiting pass the high-water mark."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, workers=1)
    key = gw.keys["acme"]
    n = 3000
    c = RawConn(gw.port)
    c.sock.sendall(b"".join(http_request_bytes("GET", "/v1/models", key=key if i % 3 else None)
                            for i in range(n)))
    for i in range(n):
        r = c.read_response()
        assert r is not None, "closed after %d answers" % i
        assert r.status == (200 if i % 3 else 401), (i, r)
    c.close()


def test_upgrade_offer_ignored_and_connection_kept(stack):
    """A request offering another protocol (curl --http2 offers h2c) is
    answered as HTTP/1.1 and the connection goes on serving requests,
    whether the next one waits for the answer or is pipelined behind it."""
    h2c = http_request_bytes("GET", "/v1/models", key=stack.key,
                             headers={"Connection": "Upgrade, HTTP2-Settings",
                                      "Upgrade": "h2c",
                                      "HTTP2-Settings": "AAMAAABkAAQCAAAAAAIAAAAA"})
    ws = http_request_bytes("GET", "/v1/models", key=stack.key,
                            headers={"Connection": "upgrade", "Upgrade": "websocket"})
    models = http_request_bytes("GET", "/v1/models", key=stack.key)
    c = RawConn(stack.port, timeout=5)
    c.send(h2c)
    r = c.read_response()
    assert r.status == 200 and r.header("upgrade") is None, r
    c.send(models)
    r = c.read_response()
    assert r is not None and r.status == 200, r
    c.send(ws + models)
    for _ in range(2):
        r = c.read_response()
        assert r is not None and r.status == 200, r
    c.close()


def test_connect_refused_with_405(stack):
    """CONNECT asks for a tunnel, which the gateway does not offer: 405 in
    the API's error format, then the connection closes (what follows a
    CONNECT is meant for the tunnel, not as requests)."""
    c = RawConn(stack.port, timeout=5)
    c.send(b"CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n"
           + http_request_bytes("GET", "/v1/models", key=stack.key))
    r = c.read_response()
    assert r.status == 405, r
    assert r.error()["type"] == "invalid_request_error", r
    assert r.error()["code"] == "method_not_allowed", r
    assert r.header("x-request-id"), r
    assert c.closed_by_peer(3.0)
    c.close()
    _still_serving(stack)


def test_stray_crlf_while_serving_leaves_connection_idle(tg):
    """An empty line arriving while a request is served starts no request
    (RFC 9112 2.2): once the answer is out the connection is idle, so a
    request sent after client_request but before client_keepalive is served,
    not met by a 408."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, workers=1,
                    overrides={"timeouts": {"client_request": "1s", "client_keepalive": "10s"}})
    key = gw.keys["acme"]
    c = RawConn(gw.port)
    c.send(_chat_bytes(key, 2, extra_headers={"x-sim-ttft-ms": "500"}))
    time.sleep(0.2)
    c.send(b"\r\n")
    r = c.read_response()
    assert r.status == 200, r
    time.sleep(2.5)
    c.send(http_request_bytes("GET", "/v1/models", key=key))
    r = c.read_response()
    assert r is not None and r.status == 200, r
    c.close()


def _chunked_chat(key, body, trailer):
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" % key).encode()
    return head + b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(body), body, trailer)


def test_chunked_body_with_trailer(stack):
    """Trailers after a chunked body are bounded on their own by
    max_header_bytes (8 KiB here), not together with the body before them."""
    content = "y" * 20000  # the body alone is over max_header_bytes
    body = json.dumps(tgtest.chat_body(M8B, max_tokens=2, content=content)).encode()
    c = RawConn(stack.port, timeout=5)
    c.send(_chunked_chat(stack.key, body, b"X-Checksum: abc\r\n"))
    r = c.read_response()
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 2, r
    # and the connection goes on
    c.send(http_request_bytes("GET", "/v1/models", key=stack.key))
    assert c.read_response().status == 200
    c.close()
    # trailers over the bound themselves are refused
    big = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(100))
    c = RawConn(stack.port, timeout=5)
    c.send(_chunked_chat(stack.key, body, big))
    r = c.read_response()
    assert r.status == 431, r
    c.close()


def test_refusal_behind_unsent_answers_waits_for_them(tg):
    """A malformed request pipelined behind many small ones, from a client
    that reads nothing for longer than the lingering close lasts (2 s): the
    answers queued before the refusal, then the refusal, all reach the
    client once it reads. The lingering window starts when they are out,
    not when the refusal is queued. Which counts leave answers queued in the
    gateway (more than the socket buffers hold, less than its high-water
    mark) depends on this machine's buffers, so several are tried."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, workers=1)
    one = http_request_bytes("GET", "/v1/models", key=gw.keys["acme"])
    for n in range(12000, 14500, 500):
        c = RawConn(gw.port, rcvbuf=4096, timeout=10)
        c.send(one * n + b"GARBAGE / HTTP/1.1\r\n\r\n")
        time.sleep(4)                 # the gateway parses them all meanwhile
        got = []
        while True:
            try:
                r = c.read_response()
            except OSError:
                break
            if r is None:
                break
            got.append(r.status)
        c.close()
        assert got == [200] * n + [400], (n, len(got), got[-3:])


def test_over_limit_body_sent_whole_gets_413(stack):
    """A client that sends an over-limit body in one go, as HTTP libraries
    do, and only then reads, gets the 413: the gateway reads and drops the
    rest of the body after answering instead of resetting the connection
    under it. The dropping is bounded: a client that never stops sending is
    closed within seconds."""
    body = b"x" * (4 * 1024 * 1024)  # max_body_bytes is 64 KiB
    data = http_request_bytes("POST", "/v1/chat/completions", body=body, key=stack.key,
                              headers={"Content-Type": "application/json"})
    for _ in range(3):
        c = RawConn(stack.port, timeout=10)
        try:
            c.send(data)
            r = c.read_response()
        except OSError as e:
            raise AssertionError("connection broken instead of a 413: %r" % e)
        assert r is not None and r.status == 413, r
        assert r.error()["code"] == "body_too_large", r
        assert c.closed_by_peer(5.0)
        c.close()

    c = RawConn(stack.port, timeout=1)
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:
        try:
            c.sock.send(b"z" * 65536)
        except socket.timeout:
            continue
        except OSError:  # reset once the gateway stops lingering
            break
    took = time.monotonic() - t0
    c.close()
    assert took < 10, "still accepting input after %.1f s" % took
    _still_serving(stack)


def _raw_exchange(port, data, timeout=3.0):
    """Sends data on a new connection and reads until the peer closes or
    nothing more comes for a moment; returns (bytes read, closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        out, closed = b"", False
        s.settimeout(0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                b = s.recv(65536)
            except socket.timeout:
                if out:
                    break
                continue
            if not b:
                closed = True
                break
            out += b
        return out, closed
    finally:
        s.close()


def test_a_head_request_gets_no_body(stack):
    """A HEAD is answered with the head a GET would get, Content-Length
    included, and no body: the next pipelined answer starts right after
    the blank line (a body there would be read as that answer's start)."""
    for path in ("/v1/models", "/v1/chat/completions", "/nope"):
        data = http_request_bytes("HEAD", path, key=stack.key) + \
            http_request_bytes("GET", "/v1/models", key=stack.key)
        out, _ = _raw_exchange(stack.port, data)
        head, sep, rest = out.partition(b"\r\n\r\n")
        assert sep and head.startswith(b"HTTP/1.1 "), out[:200]
        assert b"content-length: " in head.lower(), head
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), (path, rest[:120])
    _still_serving(stack)


def test_head_is_served_where_get_is(stack):
    """RFC 9110 9.1 and 9.3.2: a server MUST support HEAD wherever it
    supports GET, answering with the head a GET would get and no body.
    /v1/models and the admin listener's GET routes (a load balancer's
    `HEAD /healthz` among them) answered 405."""
    for port, path, key in ((stack.port, "/v1/models", stack.key),
                            (stack.gw.admin_port, "/healthz", None),
                            (stack.gw.admin_port, "/readyz", None)):
        get = http_request_bytes("GET", path, key=key)
        out, _ = _raw_exchange(port, http_request_bytes("HEAD", path, key=key) + get)
        head, sep, rest = out.partition(b"\r\n\r\n")
        assert sep and head.startswith(b"HTTP/1.1 200 OK\r\n"), (path, out[:300])
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), (path, rest[:120])
        length = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
        body = rest.partition(b"\r\n\r\n")[2]
        assert length == [b"Content-Length: %d" % len(body)], (path, head, body)
    # refused as a GET would be: the head of the 401, no body
    out, _ = _raw_exchange(stack.port, http_request_bytes("HEAD", "/v1/models") +
                           http_request_bytes("GET", "/v1/models", key=stack.key))
    assert out.startswith(b"HTTP/1.1 401 "), out[:200]
    assert out.partition(b"\r\n\r\n")[2].startswith(b"HTTP/1.1 200 OK\r\n"), out[:400]


def test_method_not_allowed_names_the_allowed_ones(stack):
    """RFC 9110 15.5.6: a 405 MUST carry Allow with the target's methods.
    CONNECT's authority-form target names no resource of ours: its Allow
    is empty (RFC 9110 10.2.1)."""
    chat_path = "/v1/chat/completions"
    cases = [
        (stack.port, "OPTIONS", chat_path, "POST"),
        (stack.port, "GET", chat_path, "POST"),
        (stack.port, "PUT", "/v1/embeddings", "POST"),
        (stack.port, "POST", "/v1/models", "GET, HEAD"),
        (stack.port, "DELETE", "/v1/models", "GET, HEAD"),
        (stack.gw.admin_port, "POST", "/healthz", "GET, HEAD"),
        (stack.gw.admin_port, "OPTIONS", "/admin/v1/tenants/acme/usage/2026-01-01", "GET, HEAD"),
    ]
    for port, method, path, allow in cases:
        c = RawConn(port, timeout=5)
        c.send(http_request_bytes(method, path, key=stack.key))
        r = c.read_response()
        c.close()
        assert r.status == 405, (method, path, r)
        assert r.error()["code"] == "method_not_allowed", r
        assert r.header("allow") == allow, (method, path, r.headers)
    c = RawConn(stack.port, timeout=5)
    c.send(b"CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n")
    r = c.read_response()
    c.close()
    assert r.status == 405 and r.header("allow") == "", r.headers


def test_framing_a_front_proxy_could_read_otherwise_is_refused(stack):
    """The parser is strict: chunk data not followed by CRLF, a space in a
    header name, an empty name, a value folded over lines (obs-fold; llhttp
    8 let both through), a tab in the target; Transfer-Encoding in HTTP/1.0 (faulty framing, RFC 9112 6.1) and
    any coding but chunked alone; versions other than HTTP/1.0 and 1.1. Each gets its error and the connection closes, so
    the bytes behind it are never read as a request. So does an HTTP/1.1
    request without exactly one Host (HTTP/1.0 may have none)."""
    body = json.dumps(tgtest.chat_body(M8B, max_tokens=1)).encode()
    auth = ("Authorization: Bearer %s\r\n" % stack.key).encode()
    nxt = http_request_bytes("GET", "/v1/models", key=stack.key)
    cases = [
        (400, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
         b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"XX0\r\n\r\n"),
        (400, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX Api-Key: k\r\n" + auth + b"\r\n"),
        # a space before the colon: a name no lookup would find, the key unseen
        (400, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Api-Key : " + stack.key.encode() +
         b"\r\n\r\n"),
        # obs-fold (RFC 9112 5.2): a proxy reading "Transfer-Encoding:" or
        # "Content-Length:" as empty frames the body otherwise
        (400, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
         b"Transfer-Encoding:\r\n chunked\r\n\r\n" + b"%x\r\n" % len(body) + body +
         b"\r\n0\r\n\r\n"),
        (400, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
         b"Content-Length:\r\n\t%d\r\n\r\n" % len(body) + body),
        (400, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Note: a\r\n b\r\n" + auth + b"\r\n"),
        # no name at all: a line a front proxy may read otherwise, or drop
        (400, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n: x\r\n" + auth + b"\r\n"),
        (400, b"GET /v1/models HTTP/1.1\r\n: x\r\nHost: x\r\n" + auth + b"\r\n"),
        (400, b"GET /v1/models\tx HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"),
        (400, b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n" +
         auth + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body +
         b"\r\n0\r\n\r\n"),
        (501, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
         b"Transfer-Encoding: gzip, chunked\r\n\r\n" + b"%x\r\n" % len(body) + body +
         b"\r\n0\r\n\r\n"),
        (505, b"GET /v1/models HTTP/2.0\r\nHost: x\r\n" + auth + b"\r\n"),
        # RFC 9112 3.2: HTTP/1.1 needs exactly one Host, and two are never read
        (400, b"GET /v1/models HTTP/1.1\r\n" + auth + b"\r\n"),
        (400, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nHost: y\r\n" + auth + b"\r\n"),
        (400, b"GET /v1/models HTTP/1.0\r\nHost: x\r\nhost: y\r\n" + auth + b"\r\n"),
    ]
    for status, data in cases:
        out, closed = _raw_exchange(stack.port, data + nxt)
        assert out.startswith(b"HTTP/1.1 %d " % status), (data[:80], out[:200])
        assert b"HTTP/1.1 200 " not in out and closed, (data[:80], out)
        doc = json.loads(out.partition(b"\r\n\r\n")[2])
        assert doc["error"]["type"] == "invalid_request_error", doc
    # a fold whose line end and blank come in different reads
    c = RawConn(stack.port, timeout=5)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length:")
    time.sleep(0.1)
    c.send(b"\r\n")
    time.sleep(0.1)
    c.send(b" %d\r\n\r\n" % len(body) + body + nxt)
    r = c.read_response()
    assert r.status == 400 and r.error()["message"] == "obsolete line folding is not accepted", r
    assert c.closed_by_peer(3.0)
    c.close()
    # the same requests well framed are served
    ok = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth +
          b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    out, _ = _raw_exchange(stack.port, ok + nxt)
    assert out.startswith(b"HTTP/1.1 200 ") and out.count(b"HTTP/1.1 200 ") == 2, out[:300]
    _still_serving(stack)


def test_an_absolute_form_target_is_served_on_its_path(stack):
    """RFC 9112 3.2.2: a server MUST accept the absolute-form target that
    clients send to a proxy (`POST http://host/v1/chat/completions`). It is
    routed on its path ("/" when it has none), the query split off as for
    the origin-form, and its authority stands for Host, which may name
    another: the chat is answered, logged and billed as the same chat in
    origin-form, /v1/models and the admin listener route alike. Another
    scheme or a malformed authority is 400 and closes; the Host rule holds
    for the absolute-form too (none or two: 400). It used to be a 404."""
    body = tgtest.chat_body(M8B, max_tokens=5, content="absolute form")
    c = RawConn(stack.port)
    answers = []
    for target in ("/v1/chat/completions", "http://api.example:8080/v1/chat/completions"):
        c.send(http_request_bytes("POST", target, body, key=stack.key, host="other.example"))
        r = c.read_response()
        assert r is not None and r.status == 200, (target, r)
        answers.append(r)
    c.close()
    origin, absolute = answers
    assert absolute.json()["usage"] == origin.json()["usage"], answers
    assert absolute.json()["usage"]["completion_tokens"] == 5
    logs, rows = [], []
    for r in answers:
        rid = r.header("x-request-id")
        e = stack.gw.access_entry(rid)
        logs.append({k: e.get(k) for k in ("path", "tenant", "key_id", "model", "endpoint",
                                          "status", "prompt_tokens", "completion_tokens")})
        row = tgtest.sqlite_ledger_row(stack.gw.db_path, rid)
        rows.append({k: row[k] for k in ("tenant", "key_id", "model", "endpoint", "status",
                                         "prompt_tokens", "completion_tokens", "cost_nano")})
    assert logs[0] == logs[1] and logs[0]["path"] == "/v1/chat/completions", logs
    assert rows[0] == rows[1] and rows[0]["cost_nano"] > 0, rows

    want = request(stack.port, "GET", "/v1/models", key=stack.key).json()
    for target in ("http://api.example/v1/models", "HTTPS://[::1]:443/v1/models?x=1",
                   "http://127.0.0.1:%d/v1/models" % stack.port):
        out, _ = _raw_exchange(stack.port, http_request_bytes("GET", target, key=stack.key))
        assert out.startswith(b"HTTP/1.1 200 "), (target, out[:200])
        assert json.loads(out.partition(b"\r\n\r\n")[2]) == want, (target, out)
    # no path is the path "/", which no route has
    out, _ = _raw_exchange(stack.port, http_request_bytes("GET", "http://api.example",
                                                          key=stack.key))
    assert out.startswith(b"HTTP/1.1 404 "), out[:200]
    assert json.loads(out.partition(b"\r\n\r\n")[2])["error"]["message"] == \
        "unknown path '/'", out
    health = request(stack.gw.admin_port, "GET", "http://admin.example/healthz")
    assert health.status == 200, health

    auth = ("Authorization: Bearer %s\r\n" % stack.key).encode()
    nxt = http_request_bytes("GET", "/v1/models", key=stack.key)
    one_host = b"Host: x\r\n"
    cases = [(t, one_host) for t in (
        b"ftp://api.example/v1/models", b"ws://api.example/v1/models",
        b"http://user@api.example/v1/models", b"http://api.example:65536/v1/models",
        b"http://api.example:8080:1/v1/models", b"http://[::1/v1/models")]
    cases += [(b"http://api.example/v1/models", b""),
              (b"http://api.example/v1/models", b"Host: api.example\r\nHost: x\r\n")]
    for target, hosts in cases:
        out, closed = _raw_exchange(stack.port, b"GET " + target + b" HTTP/1.1\r\n" + hosts +
                                    auth + b"\r\n" + nxt)
        assert out.startswith(b"HTTP/1.1 400 "), (target, hosts, out[:200])
        assert b"HTTP/1.1 200 " not in out and closed, (target, out)
        doc = json.loads(out.partition(b"\r\n\r\n")[2])
        assert doc["error"]["type"] == "invalid_request_error", (target, doc)
    _still_serving(stack)


def test_forwarded_headers_reach_the_upstream_as_sent(tg):
    """A forwarded header's value goes as the client sent it, even one that
    ends in ':' (libcurl's "drop this header" form is only a name and a
    colon); the client's own X-Request-Id never reaches the upstream beside
    the gateway's."""
    up = tgtest.FakeUpstream(status=200, body={
        "id": "x", "object": "chat.completion", "created": 1, "model": M8B,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    try:
        gw = tg.gateway({M8B: [up.url]})
        for value in ("http://a:", "plain", "a: b:"):
            r = chat(gw.port, gw.keys["acme"], M8B, max_tokens=1,
                     headers={"X-Sim-Fault": value, "X-Request-Id": "client-chosen"})
            assert r.status == 200, r
            got = [(k.lower(), v) for k, v in up.last_headers]
            assert ("x-sim-fault", value) in got, (value, got)
            rids = [v for k, v in got if k == "x-request-id"]
            assert rids == [r.header("x-request-id")], got
    finally:
        up.close()


def test_empty_lines_do_not_hold_an_idle_connection(tg):
    """Bytes that start no request (empty lines) do not restart the
    keep-alive deadline: a client sending one a second is closed on its
    2 s deadline (it held its connection, and a descriptor, for ever)."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, workers=1,
                    overrides={"timeouts": {"client_keepalive": "2s"}})
    c = RawConn(gw.port)
    t0 = time.monotonic()
    try:
        c.send(http_request_bytes("GET", "/v1/models", key=gw.keys["acme"]))
        assert c.read_response().status == 200
        t0 = time.monotonic()
        while time.monotonic() - t0 < 6 and not c.closed_by_peer(1.0):
            c.sock.send(b"\r\n")
        took = time.monotonic() - t0
    finally:
        c.close()
    assert 1.5 <= took < 3.5, "closed after %.1f s with a 2 s keep-alive" % took


def test_out_of_descriptors_on_accept_pauses_and_comes_back(tg):
    """A connection flood that takes every descriptor the process may open:
    each worker stops accepting for a moment instead of retrying accept()
    for ever (with two workers both spun at 100% CPU in libuv's accept loop
    and never served again), the streams running meanwhile finish, and
    once the flood has gone the gateway serves again."""
    import resource
    import threading
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, workers=2,
                    overrides={"timeouts": {"client_keepalive": "2s", "client_request": "2s"}})
    key = gw.keys["acme"]
    pid = gw.proc.pid
    streams = [tgtest.SSEStream(gw.port, tgtest.chat_body(M8B, stream=True, max_tokens=40),
                                key=key, headers={"x-sim-token-ms": "50"}) for _ in range(10)]
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE,
                     (len(os.listdir("/proc/%d/fd" % pid)) + 40, hard))
    held, stop = [], time.monotonic() + 1.5

    def flood():
        while time.monotonic() < stop:
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", gw.port))
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                time.sleep(0.01)
                continue
            held.append(s)
    try:
        ths = [threading.Thread(target=flood) for _ in range(2)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        for s in held:
            s.close()
        for s in streams:
            s.read_all()
            assert s.status == 200 and s.done
            s.close()
        tgtest.wait_for(lambda: chat(gw.port, key, M8B, max_tokens=1, timeout=3).status == 200,
                        timeout=10, what="the gateway serving again")
        assert "no file descriptor left for a new connection" in gw.proc.stderr_text()
        # both loops idle again: no accept loop spinning
        with open("/proc/%d/stat" % pid) as f:
            t0 = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        time.sleep(1.0)
        with open("/proc/%d/stat" % pid) as f:
            t1 = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        assert t1 - t0 < 30, "the gateway used %d ticks of CPU in an idle second" % (t1 - t0)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def test_expect_100_continue_is_answered_before_the_body(stack):
    """A client that sends `Expect: 100-continue` (curl does, for larger
    bodies) waits for the 100 before it sends its body: the gateway sends
    it as the head arrives, so the request is not held up (curl would wait
    a second and send anyway). Not to HTTP/1.0, which has no 1xx (RFC 9110
    10.1.1); and a body the gateway would refuse by its length is refused
    at once (413), without a 100 inviting it. Pinned here: no test covered
    it."""
    body = json.dumps(tgtest.chat_body(M8B, max_tokens=2, content="x" * 2000)).encode()
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: application/json\r\nExpect: 100-continue\r\n"
            "Content-Length: %d\r\n\r\n" % (stack.key, len(body))).encode()
    c = RawConn(stack.port, timeout=1.0)
    c.send(head)
    assert c.read_head() == (100, "Continue", []), "no 100 Continue within 1 s"
    c.send(body)
    r = c.read_response()
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 2, r
    c.close()

    c = RawConn(stack.port, timeout=0.5)
    c.send(head.replace(b"HTTP/1.1", b"HTTP/1.0"))
    try:
        early = c.sock.recv(100)
    except socket.timeout:
        early = None
    assert early is None, early
    c.sock.settimeout(5)
    c.send(body)
    r = c.read_response()
    assert r.status == 200 and r.reason == "OK" and r.json()["usage"]["completion_tokens"] == 2, r
    c.close()

    c = RawConn(stack.port, timeout=5)
    c.send(head.replace(b"Content-Length: %d" % len(body), b"Content-Length: 10000000"))
    r = c.read_response()
    assert r.status == 413 and r.error()["code"] == "body_too_large", r
    assert c.closed_by_peer(3.0)
    c.close()
