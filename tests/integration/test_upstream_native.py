"""The native upstream client (`upstream_client: native`): keep-alive
connections to an upstream are reused; an upstream that closes idle
connections (or drops one just as it is reused) costs the client nothing;
chunked and Content-Length answers, streamed or not, reach the client byte
for byte; a client that stops reading pauses the upstream; refused and
black-holed upstreams give 503, a silent one 504; an https endpoint is a
configuration error in this mode.

The upstream here is a small raw-socket HTTP/1.1 server in this file, so the
tests can count connections and shape the bytes on the wire."""

import hashlib
import hmac
import json
import re
import socket
import sqlite3
import threading
import time

import pytest

import tgtest
from tgtest import SSEStream, chat, chat_body, closed_port

M8B = tgtest.DEFAULT_MODELS[0]
M8B_70B = tgtest.DEFAULT_MODELS[:2]
NATIVE = {"upstream_client": "native", "health_check_interval": "60s"}


def _answer_json(max_tokens):
    n = max_tokens or 4
    return {
        "id": "chatcmpl-native", "object": "chat.completion", "created": 1, "model": M8B,
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant",
                                 "content": " ".join("w%d" % i for i in range(n))}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n},
    }


def _sse_events(n, pad=0, eol=b"\n"):
    out = []
    for i in range(n):
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": M8B,
                 "choices": [{"index": 0, "delta": {"content": "w%d " % i + "x" * pad},
                              "finish_reason": "length" if i == n - 1 else None}]}
        out.append(b"data: " + json.dumps(chunk).encode() + eol + eol)
    usage = {"id": "c", "object": "chat.completion.chunk", "model": M8B, "choices": [],
             "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}}
    out.append(b"data: " + json.dumps(usage).encode() + eol + eol)
    out.append(b"data: [DONE]" + eol + eol)
    return out


class Upstream:
    """A threaded HTTP/1.1 server on a free port.

    mode: "keepalive" (default), "close" (closes after each answer without
    saying so), "drop_second" (answers the first request of a connection
    and closes on the second without answering), "stall" (never answers).
    chunked: non-streamed answers go out chunked, in pieces.
    Counts: .conns (connections that carried a POST), .posts, .gets,
    .answered, .dropped; .sent_bytes of streamed bodies. In "close" mode a
    GET (a health probe) closes its connection too."""

    def __init__(self, mode="keepalive", chunked=False, stream_pad=0, stall_after=None,
                 hold=None, backlog=128, eol=b"\n", length_framed=False, tail_delay=0.0,
                 after_done=b""):
        self.mode = mode
        self.after_done = after_done     # bytes a stream sends after its [DONE]
        self.length_framed = length_framed  # streams framed by Content-Length
        self.tail_delay = tail_delay        # ... their usage and [DONE] sent this much later
        self.eol = eol                   # line end of streamed events
        self.hold = hold                 # an Event each POST's answer waits for
        self.chunked = chunked
        self.stream_pad = stream_pad
        self.stall_after = stall_after   # streamed events sent before stalling
        self.lock = threading.Lock()
        self.conns = 0
        self.posts = 0
        self.gets = 0                    # health probes (any GET)
        self.answered = 0
        self.dropped = 0
        self.sent_bytes = 0
        self.peer_closed = 0             # connections the gateway closed on us
        self.first_headers = None        # header names of the first POST
        self.last_prompt_len = 0         # length of the last request's first message
        self.last_body = None            # bytes of the last POST's body
        self.stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def close(self):
        self.stop.set()
        try:
            self.sock.close()
        except OSError:
            pass

    def _accept(self):
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _read_request(c, buf):
        while b"\r\n\r\n" not in buf:
            d = c.recv(65536)
            if not d:
                return None, buf
            buf += d
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        hdrs = {}
        for l in lines[1:]:
            k, v = l.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
        n = int(hdrs.get("content-length", "0"))
        while len(rest) < n:
            d = c.recv(65536)
            if not d:
                return None, b""
            rest += d
        return (method, path, hdrs, rest[:n]), rest[n:]

    def _serve(self, c):
        buf = b""
        n_req = 0
        counted = False
        try:
            while True:
                req, buf = self._read_request(c, buf)
                if req is None:
                    with self.lock:
                        self.peer_closed += 1
                    return
                method, path, hdrs, body = req
                if method == "GET":
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    with self.lock:
                        self.gets += 1
                    if self.mode == "close":
                        return
                    continue
                n_req += 1
                with self.lock:
                    if self.first_headers is None:
                        self.first_headers = sorted(hdrs)
                    self.posts += 1
                    if not counted:
                        self.conns += 1
                        counted = True
                if self.mode == "drop_second" and n_req == 2:
                    with self.lock:
                        self.dropped += 1
                    return
                if self.mode == "stall":
                    self.stop.wait(30)
                    return
                if self.hold is not None:
                    self.hold.wait(60)
                doc = json.loads(body)
                with self.lock:
                    self.last_body = body
                    self.last_prompt_len = (len(doc["messages"][0]["content"]) if "messages" in doc
                                            else len(doc.get("prompt") or doc.get("input") or ""))
                if doc.get("stream"):
                    self._stream(c, doc)
                else:
                    self._plain(c, doc)
                with self.lock:
                    self.answered += 1
                if self.mode == "close":
                    return
        except OSError:
            with self.lock:
                self.peer_closed += 1
        finally:
            c.close()

    def _plain(self, c, doc):
        data = json.dumps(_answer_json(doc.get("max_tokens"))).encode()
        if not self.chunked:
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(data) + data)
            return
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        # uneven pieces, each its own chunk, some in separate segments
        cuts = [0, 1, 9, len(data) // 2, len(data)]
        for a, b in zip(cuts, cuts[1:]):
            c.sendall(b"%x\r\n" % (b - a) + data[a:b] + b"\r\n")
            time.sleep(0.002)
        c.sendall(b"0\r\n\r\n")

    def _stream(self, c, doc):
        events = _sse_events(doc.get("max_tokens") or 4, self.stream_pad, self.eol)
        if self.length_framed:
            head, tail = b"".join(events[:-2]), b"".join(events[-2:])
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                      b"Content-Length: %d\r\n\r\n" % (len(head) + len(tail)) + head)
            time.sleep(self.tail_delay)
            c.sendall(tail)
            with self.lock:
                self.sent_bytes += len(head) + len(tail)
            return
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        # events cut across chunk boundaries in the middle of a line
        blob = b"".join(events) + self.after_done
        if self.stall_after is not None:
            blob = b"".join(events[:self.stall_after])
        step = 4093
        for i in range(0, len(blob), step):
            piece = blob[i:i + step]
            c.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            with self.lock:
                self.sent_bytes += len(piece)
        if self.stall_after is not None:
            # wait for the gateway to give up on us
            c.settimeout(30)
            c.recv(1)
            raise OSError("closed by the gateway")
        c.sendall(b"0\r\n\r\n")


def _salt_key(gw):
    """The key of the tenants' cache_salt in gw's database (made at its
    first start)."""
    db = sqlite3.connect("file:%s?mode=ro" % gw.db_path, uri=True, timeout=10)
    try:
        (key,) = db.execute("SELECT value FROM gateway_secrets WHERE name = 'cache_salt'").fetchone()
    finally:
        db.close()
    assert re.match(r"^[0-9a-f]{64}$", key), key
    return key


def _salt(gw, tenant):
    """The cache_salt the gateway gives a tenant's requests: HMAC-SHA256 of
    the name under the database's key, never a hash of the name alone."""
    salt = hmac.new(_salt_key(gw).encode(), tenant.encode(), hashlib.sha256).hexdigest()[:32]
    assert salt != hashlib.sha256(b"tollgate cache_salt " + tenant.encode()).hexdigest()[:32]
    return salt


def _check_logged(gw, want):
    """The last access-log line of M8B holds (status, prompt, completion) want."""
    entry = tgtest.wait_for(
        lambda: [e for e in gw.access_log_entries() if e.get("model") == M8B],
        what="the access-log line")[-1]
    assert (entry["status"], entry["prompt_tokens"], entry["completion_tokens"]) == want, entry


def _contents(events):
    out = []
    for e in tgtest.content_events(events):
        ch = e.json()["choices"][0]
        out.append((ch.get("delta") or {}).get("content"))
    return out


def test_native_reuses_keepalive_connections(tg):
    up = Upstream()
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1, overrides=NATIVE)
        key = gw.keys["acme"]
        for i in range(20):
            r = chat(gw.port, key, M8B, max_tokens=i + 1)
            assert r.status == 200, r
            assert r.json() == _answer_json(i + 1)
        for i in range(5):
            s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=3), key=key)
            events = s.read_all()
            s.close()
            assert s.done and _contents(events) == ["w0 ", "w1 ", "w2 "]
        assert up.posts == 25
        # the request carries what the gateway sets and nothing a library adds
        # (libcurl would add Accept): the native client is the one in use
        assert up.first_headers == ["content-length", "content-type", "host", "x-request-id"], \
            up.first_headers
        # one worker, one request at a time: one upstream connection for all
        assert up.conns == 1, "%d upstream connections for 25 sequential requests" % up.conns
        # concurrent requests open at most one connection each, then reuse
        rs = tgtest.parallel(lambda _: chat(gw.port, key, M8B, max_tokens=2),
                             [(i,) for i in range(24)], threads=6)
        assert [r.status for r in rs] == [200] * 24
        assert up.posts == 49
        assert up.conns <= 1 + 6, "%d upstream connections" % up.conns
    finally:
        up.close()


def _held_burst(up, hold, posts, send, n):
    """Sends n requests at once with send(i) while up holds every answer
    until it has seen `posts` POSTs in all, so all n are on connections at
    the same time; returns the answers."""
    hold.clear()

    def release():
        try:
            tgtest.wait_for(lambda: up.posts >= posts, timeout=60, what="the burst")
        finally:
            hold.set()

    releaser = threading.Thread(target=release, daemon=True)
    releaser.start()
    rs = tgtest.parallel(send, [(i,) for i in range(n)], threads=n, timeout=120)
    releaser.join()
    return rs


def test_native_keeps_as_many_idle_connections_as_it_had_busy(tg):
    """A burst of 300 concurrent requests to one upstream leaves 300 idle
    connections, and the next burst reuses every one of them: none is
    closed when the burst ends, none opened for the second. (A per-host cap
    of 256 idle connections closed the surplus after every burst and
    opened it again on the next.)"""
    n = 300
    hold = threading.Event()
    up = Upstream(hold=hold, backlog=n)
    try:
        gw = tg.gateway({M8B: tgtest.model_entry([up.url], max_inflight=n + 100)},
                        workers=1, overrides=NATIVE)
        key = gw.keys["acme"]
        for wave in (1, 2):
            rs = _held_burst(up, hold, n * wave, n=n,
                             send=lambda _: chat(gw.port, key, M8B, max_tokens=2, timeout=90))
            assert [r.status for r in rs] == [200] * n
            assert up.posts == n * wave
            # every request of a burst was on its own connection at once
            assert up.conns == n, "wave %d: %d upstream connections" % (wave, up.conns)
        time.sleep(0.3)
        assert up.peer_closed == 0, "%d idle connections closed" % up.peer_closed
    finally:
        hold.set()
        up.close()


def test_native_idle_connections_hold_no_read_buffer(tg):
    """Upstream connections read into their loop's one buffer, so one that
    idles in the pool after answers that filled its reads holds only its
    state. Bursts of 200 concurrent streams of ~32 KiB each: the first, to
    a second upstream, warms every per-request cache; the second opens 200
    connections to the upstream measured; the third reuses them and
    allocates what the second did otherwise. The difference of the last
    two growths is what the 200 pooled connections keep (their 16 KiB
    read buffers, before)."""
    n = 200
    hold = threading.Event()
    ups = [Upstream(hold=hold, backlog=n, stream_pad=4000) for _ in range(2)]
    try:
        gw = tg.gateway({model: tgtest.model_entry([up.url], max_inflight=n + 100)
                         for model, up in zip(M8B_70B, ups)},
                        workers=1, overrides=NATIVE)
        key = gw.keys["acme"]
        expected = "".join("w%d " % i + "x" * 4000 for i in range(8))

        def burst(model, up, posts):
            before = tgtest.rss_kb(gw.proc.pid)
            rs = _held_burst(up, hold, posts, n=n, send=lambda _: chat(
                gw.port, key, model, max_tokens=8, stream=True, timeout=90))
            assert [r.status for r in rs] == [200] * n
            assert up.conns == n, "%d upstream connections" % up.conns
            docs = [json.loads(d) for d in tgtest.sse_data(rs[-1].body) if d != "[DONE]"]
            assert "".join(d["choices"][0]["delta"]["content"]
                           for d in docs if d["choices"]) == expected
            time.sleep(0.3)
            return tgtest.rss_kb(gw.proc.pid) - before

        burst(M8B_70B[1], ups[1], n)
        opened = burst(M8B, ups[0], n)
        reused = burst(M8B, ups[0], 2 * n)
        per_conn = (opened - reused) / float(n)
        print("RSS growth: %d KiB opening %d connections, %d KiB reusing them: "
              "%.1f KiB per pooled connection" % (opened, n, reused, per_conn))
        assert per_conn < 6.0, "%.1f KiB per pooled connection" % per_conn
        assert ups[0].peer_closed == 0
    finally:
        hold.set()
        for up in ups:
            up.close()


def test_native_large_request_body(tg):
    # larger than what a loopback socket takes at once: the rest of the
    # request is queued and written as the upstream reads
    up = Upstream()
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1,
                        overrides=dict(NATIVE, max_body_bytes=32 * 1024 * 1024))
        key = gw.keys["acme"]
        for n in (12 * 1024 * 1024, 100, 9 * 1024 * 1024):
            r = chat(gw.port, key, M8B, max_tokens=2, content="a" * n, timeout=30)
            assert r.status == 200, r
            assert r.json() == _answer_json(2)
            assert up.last_prompt_len == n
        assert up.posts == 3 and up.conns == 1
    finally:
        up.close()


def test_native_upstream_closing_after_each_answer(tg):
    up = Upstream(mode="close")
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1, overrides=NATIVE)
        key = gw.keys["acme"]
        for i in range(30):
            r = chat(gw.port, key, M8B, max_tokens=3)
            assert r.status == 200, (i, r)
            assert r.json()["usage"]["completion_tokens"] == 3
            if i % 2:
                time.sleep(0.05)  # lets the gateway see the close while idle
        assert up.answered == 30
        assert up.posts == 30
        assert up.conns == 30
        # no request failed on the way: every access-log line says 200
        def statuses():
            st = [e.get("status") for e in gw.access_log_entries() if e.get("model") == M8B]
            return st if len(st) >= 30 else None
        st = tgtest.wait_for(statuses, timeout=3, what="30 access-log lines")
        assert st.count(200) == 30, st
    finally:
        up.close()


def test_probe_without_a_descriptor_leaves_the_endpoint_up(tg):
    """A health probe that cannot open a socket because the gateway is out
    of descriptors says nothing of the endpoint: it stays up. The upstream
    closes after every answer, so each probe needs a new socket; while the
    gateway's limit allows none, several probes fail locally, and the
    request sent the moment descriptors are free again is served. (Counted
    as the endpoint's failure, the probes marked it down, and requests got
    503 no_healthy_endpoint until the next probe went through.)"""
    import os
    import resource
    up = Upstream(mode="close")
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1,
                        overrides={"health_check_interval": "200ms"})
        key = gw.keys["acme"]
        assert chat(gw.port, key, M8B, max_tokens=2).status == 200
        conn = tgtest.RawConn(gw.port)  # opened now: no descriptor needed later
        try:
            # no new descriptor at all: the probe's last socket, closed by
            # the upstream, may have a low number that would be free again
            pid = gw.proc.pid
            soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            gets0 = up.gets
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))
            try:
                time.sleep(1.2)  # ~6 probe rounds, each without a socket
            finally:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            assert up.gets - gets0 <= 1, "%d probes reached the upstream" % (up.gets - gets0)
            conn.send(tgtest.http_request_bytes("POST", "/v1/chat/completions",
                                                chat_body(M8B, max_tokens=2), key=key))
            r = conn.read_response("POST")
            assert r.status == 200, (r.status, r.body)
        finally:
            conn.close()
        # probes go through again
        tgtest.wait_for(lambda: up.gets > gets0 + 1, timeout=5.0, what="a probe")
        assert tgtest.admin(gw, "/readyz").status == 200
    finally:
        up.close()


def test_native_retries_request_on_dropped_reused_connection(tg):
    up = Upstream(mode="drop_second")
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1, overrides=NATIVE)
        key = gw.keys["acme"]
        for i in range(10):
            r = chat(gw.port, key, M8B, max_tokens=2)
            assert r.status == 200, (i, r)
            assert r.json() == _answer_json(2)
            s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=2), key=key)
            events = s.read_all()
            s.close()
            assert s.done and _contents(events) == ["w0 ", "w1 "]
        # every reuse of a connection was dropped and sent again on a new one
        assert up.answered == 20
        assert up.dropped >= 10, "the reuse path was not exercised (%d drops)" % up.dropped
        assert up.posts == up.answered + up.dropped
    finally:
        up.close()


def test_stream_asks_upstream_for_usage_keeping_the_body(tg):
    # a streamed request that did not ask for usage goes upstream with
    # stream_options.include_usage set and every other byte as sent: a
    # number past 2^53 keeps its digits, spacing and key order stay
    up = Upstream()
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1, overrides=NATIVE)
        key = gw.keys["acme"]
        plain = (b'{ "model" : "%s", "stream": true, "max_tokens": 3, "seed": 9007199254740993,'
                 b'\n  "messages": [{"role": "user", "content": "hi \\u00e9"}] }\n \t' % M8B.encode())
        with_opts = (b'{"model": "%s", "stream": true, "max_tokens": 3, "seed": 9007199254740993, '
                     b'"stream_options": {"include_usage": false}, '
                     b'"messages": [{"role": "user", "content": "hi"}]}' % M8B.encode())
        asked = (b'{"model": "%s", "stream": true, "max_tokens": 3, '
                 b'"stream_options": {"include_usage": true}, '
                 b'"messages": [{"role": "user", "content": "hi"}]}' % M8B.encode())
        for body in (plain, with_opts, asked):
            s = SSEStream(gw.port, body, key=key,
                          headers={"Content-Type": "application/json"})
            events = s.read_all()
            s.close()
            assert s.status == 200 and s.done, body
            assert _contents(events) == ["w0 ", "w1 ", "w2 "]
            sent = up.last_body
            doc = json.loads(sent)
            assert doc["stream_options"]["include_usage"] is True, sent
            salt = b',"cache_salt":"%s"}' % _salt(gw, "acme").encode()
            if body is asked:
                assert sent == body[:body.rindex(b"}")] + salt, sent
                continue
            # the usage chunk the client did not ask for is not relayed
            assert tgtest.usage_events(events) == [], body
            assert b'"seed": 9007199254740993' in sent or b'"seed":9007199254740993' in sent, sent
            if body is plain:
                cut = body.rindex(b"}")
                assert sent == body[:cut] + b',"stream_options":{"include_usage":true}' + salt, sent
    finally:
        up.close()


def test_cache_salt_is_the_tenants(tg):
    """Every chat, completions and embeddings request goes upstream with its
    tenant's cache_salt (vLLM keys its prefix cache by it, embedding models'
    too): the same for a tenant's requests, another for another tenant, in
    place of any the client sent, so no tenant shares cached prefixes with
    another or learns from a cache hit what it sent. A model set to
    `cache_salt: off` gets the body as sent."""
    up = Upstream()
    try:
        embed = tgtest.DEFAULT_MODELS[2]
        models = {M8B: tgtest.model_entry([up.url]),
                  tgtest.DEFAULT_MODELS[1]: dict(tgtest.model_entry([up.url]), cache_salt="off"),
                  embed: dict(tgtest.model_entry([up.url]), kind="embedding")}
        gw = tg.gateway(models, workers=1, overrides=NATIVE, keys=("acme", "small"))
        seen = {}
        for tenant, extra in (("acme", {}), ("small", {}), ("acme", {"cache_salt": "small-guess"}),
                              ("small", {"cache_salt": _salt(gw, "acme"), "seed": 9007199254740993})):
            body = dict(chat_body(M8B, max_tokens=2), **extra)
            r = tgtest.request(gw.port, "POST", "/v1/chat/completions", body, key=gw.keys[tenant])
            assert r.status == 200, r
            doc = json.loads(up.last_body)
            seen.setdefault(tenant, set()).add(doc["cache_salt"])
            if "seed" in extra:
                assert b"9007199254740993" in up.last_body, up.last_body
            for path, other in (("/v1/completions", {"model": M8B, "prompt": "hi", "max_tokens": 2}),
                                ("/v1/embeddings", {"model": embed, "input": "hi"})):
                if tenant == "small" and path == "/v1/embeddings":
                    continue            # small may not use the embedding model
                body = dict(other, **{k: v for k, v in extra.items() if k == "cache_salt"})
                r = tgtest.request(gw.port, "POST", path, body, key=gw.keys[tenant])
                assert r.status == 200, (path, r)
                seen[tenant].add(json.loads(up.last_body)["cache_salt"])
        assert seen == {"acme": {_salt(gw, "acme")}, "small": {_salt(gw, "small")}}, seen
        assert _salt(gw, "acme") != _salt(gw, "small")
        # the key outlives a restart: a tenant's cache is still its own
        key = _salt_key(gw)
        assert gw.stop() == 0
        gw.start()
        assert _salt_key(gw) == key
        r = tgtest.request(gw.port, "POST", "/v1/chat/completions", chat_body(M8B, max_tokens=2),
                           key=gw.keys["acme"])
        assert r.status == 200 and json.loads(up.last_body)["cache_salt"] == _salt(gw, "acme")
        body = dict(chat_body(tgtest.DEFAULT_MODELS[1], max_tokens=2), cache_salt="mine")
        r = tgtest.request(gw.port, "POST", "/v1/chat/completions", body, key=gw.keys["acme"])
        assert r.status == 200, r
        assert json.loads(up.last_body)["cache_salt"] == "mine"
        del body["cache_salt"]
        raw = json.dumps(body).encode()
        r = tgtest.request(gw.port, "POST", "/v1/chat/completions", raw, key=gw.keys["acme"],
                           headers={"Content-Type": "application/json"})
        assert r.status == 200 and up.last_body == raw, up.last_body
    finally:
        up.close()


def _media(*uuids):
    """Messages whose parts name media by uuid (vLLM's "skip sending the
    media, it is cached" form: the data null, the uuid alone)."""
    return [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}] + [
                {"type": "image_url", "image_url": None, "uuid": u} for u in uuids]}]


def _sent_uuids(up):
    return [p.get("uuid") for p in json.loads(up.last_body)["messages"][1]["content"]
            if p.get("type") == "image_url"]


def test_media_uuids_are_the_tenants(tg):
    """vLLM keys its multimodal caches (the processed item, the encoder's
    output) by a content part's `uuid` when the client gives one, and the
    cache_salt does not enter that key: a part {"image_url": null, "uuid": U}
    is answered from whatever another tenant cached under U, and a tenant
    that sends its own picture under U first has another's requests answered
    on it. Every uuid goes upstream in its tenant's namespace (the tenant's
    cache_salt, a colon, the uuid as sent), on chat and embeddings alike; a
    uuid that is not a string is refused; a model with `cache_salt: off`
    gets the body as sent."""
    up = Upstream()
    try:
        m70, embed = tgtest.DEFAULT_MODELS[1], tgtest.DEFAULT_MODELS[2]
        models = {M8B: tgtest.model_entry([up.url]),
                  m70: dict(tgtest.model_entry([up.url]), cache_salt="off"),
                  embed: dict(tgtest.model_entry([up.url]), kind="embedding")}
        gw = tg.gateway(models, workers=1, overrides=NATIVE, keys=("acme", "small"))
        ns = {t: _salt(gw, t) + ":" for t in ("acme", "small")}

        def post(tenant, body, path="/v1/chat/completions"):
            return tgtest.request(gw.port, "POST", path, body, key=gw.keys[tenant])

        for tenant in ("acme", "small"):
            r = post(tenant, dict(chat_body(M8B, max_tokens=2), messages=_media("invoice-7.png")))
            assert r.status == 200, r
            assert _sent_uuids(up) == [ns[tenant] + "invoice-7.png"], up.last_body
        # another tenant's namespaced name stays in the sender's namespace;
        # null (content hashing) stays null; the other parts are untouched
        r = post("small", dict(chat_body(M8B, max_tokens=2),
                               messages=_media(ns["acme"] + "invoice-7.png", None, "a")))
        assert r.status == 200, r
        assert _sent_uuids(up) == [ns["small"] + ns["acme"] + "invoice-7.png", None,
                                   ns["small"] + "a"], up.last_body
        doc = json.loads(up.last_body)
        assert doc["messages"][0] == {"role": "system", "content": "be brief"}
        assert doc["messages"][1]["content"][0] == {"type": "text", "text": "what is this?"}
        assert doc["cache_salt"] == _salt(gw, "small")
        # embeddings of chat messages read the same caches
        r = post("acme", {"model": embed, "messages": _media("invoice-7.png")}, "/v1/embeddings")
        assert r.status == 200, r
        assert _sent_uuids(up) == [ns["acme"] + "invoice-7.png"], up.last_body
        # vLLM takes any value as its text ("5"): not a tenant's to send bare
        posts = up.posts
        for bad in (5, True, {"u": 1}, ["x"]):
            r = post("acme", dict(chat_body(M8B, max_tokens=2), messages=_media(bad)))
            assert r.status == 400, (bad, r)
            err = r.json()["error"]
            assert err["code"] == "invalid_type" and "uuid" in err["message"], err
        assert up.posts == posts
        # cache_salt: off leaves every byte as the client sent it
        raw = json.dumps(dict(chat_body(m70, max_tokens=2), messages=_media("x", 5))).encode()
        r = tgtest.request(gw.port, "POST", "/v1/chat/completions", raw, key=gw.keys["acme"],
                           headers={"Content-Type": "application/json"})
        assert r.status == 200 and up.last_body == raw, up.last_body
    finally:
        up.close()


def test_native_chunked_and_content_length_answers(tg):
    for chunked in (False, True):
        up = Upstream(chunked=chunked)
        try:
            gw = tg.gateway({M8B: [up.url]}, workers=1, overrides=NATIVE)
            key = gw.keys["acme"]
            r = chat(gw.port, key, M8B, max_tokens=40)
            assert r.status == 200, r
            assert r.json() == _answer_json(40)
            s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=500,
                                             include_usage=True), key=key)
            events = s.read_all()
            s.close()
            assert s.done and s.complete
            assert _contents(events) == ["w%d " % i for i in range(500)]
            usage = [e.json()["usage"] for e in tgtest.usage_events(events)]
            assert usage and usage[-1]["completion_tokens"] == 500
        finally:
            up.close()


def test_native_paused_on_the_last_bytes_of_a_length_framed_stream(tg):
    """A stream framed by Content-Length whose last bytes (usage, [DONE])
    arrive while the client is not reading: the transfer pauses on them,
    before the parser has seen the answer end, and nothing more will come
    from the upstream. Resumed, it still ends: every event, [DONE], 200.
    Heads of 1 to 7 events of ~900 KB, so that on some of them the pause
    falls on the last bytes, whatever this machine's socket buffers hold."""
    up = Upstream(stream_pad=900000, length_framed=True, tail_delay=0.5)
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1, overrides=NATIVE)
        key = gw.keys["acme"]
        for k in range(1, 8):
            s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=k), key=key,
                          rcvbuf=4096, read_head=False, timeout=30)
            time.sleep(2.5)                  # the tail came and found the client full
            s.read_head()
            assert s.status == 200
            events = s.read_all()
            s.close()
            assert s.done and s.complete, "k=%d: the stream did not end (%d events)" % (
                k, len(events))
            assert len(_contents(events)) == k
            e = gw.access_entry(s.headers["x-request-id"], timeout=5.0)
            assert e["status"] == 200 and e.get("error") is None, (k, e)
    finally:
        up.close()


def test_native_slow_client_pauses_upstream(tg):
    up = Upstream(stream_pad=4000)  # ~4 KiB per event
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1, overrides=NATIVE)
        key = gw.keys["acme"]
        n = 12000  # ~48 MiB of events; loopback socket buffers hold ~10 MiB
        rss0 = gw.rss_kb()
        s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=n), key=key,
                      rcvbuf=4096, read_head=False)
        # Until the transfer stops (the socket buffers between the client
        # and the upstream are full), not a fixed time: on a loaded machine
        # the request may not even have reached the upstream after a second.
        sent1, deadline = -1, time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.5)
            before, sent1 = sent1, up.sent_bytes
            if sent1 > 0 and sent1 == before:
                break
        rss1 = gw.rss_kb()
        time.sleep(1.0)
        sent2 = up.sent_bytes
        total = sum(len(e) for e in _sse_events(n, 4000))
        print("slow client: upstream sent %d then %d of %d bytes; RSS %d -> %d KiB"
              % (sent1, sent2, total, rss0, rss1))
        assert sent2 < total / 2, "upstream sent %d of %d bytes" % (sent2, total)
        assert sent2 - sent1 < 256 * 1024, "upstream kept sending: %d then %d" % (sent1, sent2)
        assert rss1 - rss0 < 8192, "RSS grew %d KiB" % (rss1 - rss0)
        s.read_head()
        assert s.status == 200
        events = s.read_all()
        s.close()
        assert s.done
        got = _contents(events)
        assert len(got) == n
        assert all(c.startswith("w%d " % i) for i, c in enumerate(got))
        assert up.sent_bytes == total
        # the connection that was paused and resumed serves the next request
        r = chat(gw.port, key, M8B, max_tokens=3)
        assert r.status == 200 and r.json() == _answer_json(3)
        assert up.conns == 1
    finally:
        up.close()


@pytest.mark.skipif(not tgtest.faults_built(), reason="needs the sanitizer build (TG_FAULTS)")
def test_paused_stream_without_memory_for_its_bytes_is_cut(tg):
    # A client that stops reading pauses the transfer; the bytes of the
    # upstream's last read it has not taken are copied into a block of their
    # own. When that copy cannot be allocated (the injected fault), the
    # stream already relaying is cut, logged 503 gateway_overloaded, its
    # upstream connection closed, and the endpoint stays up.
    up = Upstream(stream_pad=4000)
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1, overrides=NATIVE, start=False)
        gw.env = {"TG_FAULTS": "upstream_hold:1"}
        gw.start()
        key = gw.keys["acme"]
        n = 12000
        s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=n), key=key,
                      rcvbuf=4096, read_head=False)
        tgtest.wait_for(lambda: up.peer_closed >= 1, timeout=5.0,
                        what="the gateway to close the paused upstream connection")
        assert "upstream_hold fails on pass 1" in gw.proc.stderr_text()
        s.read_head()
        assert s.status == 200
        events = s.read_all()
        s.close()
        assert not s.done
        got = _contents(events)
        assert 0 < len(got) < n
        assert all(c.startswith("w%d " % i) for i, c in enumerate(got))
        e = gw.access_entry(s.headers["x-request-id"], timeout=5.0)
        assert e["status"] == 503 and e["error"] == "gateway_overloaded", e
        # not the endpoint's fault: it stays routable, and the next request
        # is served on a new connection
        r = chat(gw.port, key, M8B, max_tokens=3)
        assert r.status == 200 and r.json() == _answer_json(3)
        assert up.conns == 2
    finally:
        up.close()


def test_native_refused_and_blackholed_upstreams(tg):
    dead = "http://127.0.0.1:%d" % closed_port()
    gw = tg.gateway({M8B: [dead]}, workers=1, overrides=NATIVE, ready=False)
    key = gw.keys["acme"]
    r = chat(gw.port, key, M8B, max_tokens=2)
    assert r.status == 503, r
    assert r.error()["code"] == "no_healthy_endpoint"

    # a listener whose backlog is full never completes a connect
    with tgtest.unconnectable_port() as port:
        url = "http://127.0.0.1:%d" % port
        overrides = dict(NATIVE, timeouts={"upstream_connect": "300ms"})
        gw2 = tg.gateway({M8B: [url]}, workers=1, overrides=overrides, ready=False)
        t0 = time.monotonic()
        r = chat(gw2.port, gw2.keys["acme"], M8B, max_tokens=2)
        took = time.monotonic() - t0
        assert r.status == 503, r
        assert r.error()["code"] == "no_healthy_endpoint"
        assert 0.25 <= took < 2.5, "answered after %.2f s" % took


def test_native_stalled_upstream_times_out(tg):
    up = Upstream(mode="stall")
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1,
                        overrides=dict(NATIVE, timeouts={"upstream_first_byte": "1s"}))
        key = gw.keys["acme"]
        t0 = time.monotonic()
        r = chat(gw.port, key, M8B, max_tokens=2)
        took = time.monotonic() - t0
        assert r.status == 504, r
        assert r.error()["code"] == "upstream_timeout"
        assert 0.9 <= took < 3.0, took
    finally:
        up.close()

    # an upstream that stops in the middle of a stream: the client's stream
    # ends without [DONE] and the gateway drops the connection
    up = Upstream(stall_after=5)
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1,
                        overrides=dict(NATIVE, timeouts={"upstream_idle": "1s"}))
        key = gw.keys["acme"]
        s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=50), key=key)
        assert s.status == 200
        events = s.read_all()
        s.close()
        assert not s.done
        assert _contents(events) == ["w%d " % i for i in range(5)]
        tgtest.wait_for(lambda: up.peer_closed >= 1, timeout=5.0,
                        what="the gateway closing the stalled connection")
    finally:
        up.close()


def test_stream_with_lone_cr_line_ends(tg):
    """Events whose lines end with a lone CR (the SSE format allows CR, LF
    and CRLF) are relayed one by one as they come, with their bytes as the
    upstream sent them; the usage chunk is read and billed, and removed when
    the client did not ask for it."""
    up = Upstream(eol=b"\r")
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1, overrides=NATIVE)
        key = gw.keys["acme"]
        s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=4), key=key)
        events = s.read_all()
        s.close()
        assert s.status == 200 and s.done and s.complete
        assert _contents(events) == ["w0 ", "w1 ", "w2 ", "w3 "]
        assert b"usage" not in s.raw
        for ev in _sse_events(4, eol=b"\r")[:4]:
            assert ev in s.raw
        _check_logged(gw, (200, 7, 4))
    finally:
        up.close()

    # each event reaches the client while the upstream waits: here it sends
    # three and stalls, the last byte it sent being the third's final CR
    up = Upstream(eol=b"\r", stall_after=3)
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1,
                        overrides=dict(NATIVE, timeouts={"upstream_idle": "5s"}))
        s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=50),
                      key=gw.keys["acme"])
        # read as bytes: a client's own parser may wait to see whether an
        # LF follows the last CR, the gateway must not
        want = b"".join(_sse_events(50, eol=b"\r")[:3])
        raw = b""
        for _, piece in s._body:
            raw += piece
            if raw == want:
                break
        took = time.monotonic() - s.t0
        s.close()
        assert raw == want
        assert took < 3.0, "three events took %.2f s: held for more" % took
    finally:
        up.close()


def test_nothing_relayed_after_done(tg):
    """[DONE] is the last event the client gets: what a stream sends after
    it (here a content chunk, a usage chunk and a comment) is read for its
    usage, which is what the request is billed, and not relayed."""
    usage = {"id": "c", "object": "chat.completion.chunk", "model": M8B, "choices": [],
             "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}}
    late = (b'data: {"choices":[{"index":0,"delta":{"content":"late"}}]}\n\n'
            b"data: " + json.dumps(usage).encode() + b"\n\n: trailing\n\n")
    up = Upstream(after_done=late)
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1, overrides=NATIVE)
        body = chat_body(M8B, stream=True, max_tokens=3)
        body["stream_options"] = {"include_usage": True}
        s = SSEStream(gw.port, body, key=gw.keys["acme"])
        events = s.read_all()
        s.close()
        assert s.status == 200 and s.done and s.complete
        assert s.raw.endswith(b"data: [DONE]\n\n"), s.raw[-200:]
        assert b"late" not in s.raw and b"trailing" not in s.raw
        assert _contents(events) == ["w0 ", "w1 ", "w2 "]
        _check_logged(gw, (200, 7, 9))
    finally:
        up.close()


def test_native_resolves_host_names(tg):
    name = socket.gethostname()
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        addrs = set()
    if addrs != {"127.0.0.1"}:
        pytest.skip("the host name %r does not resolve to 127.0.0.1 only" % name)
    up = Upstream()
    try:
        # a name the resolver answers, and one it does not
        gw = tg.gateway({M8B: ["http://%s:%d" % (name, up.port)],
                         "llama-3.1-70b": ["http://no-such-host.invalid:%d" % up.port]},
                        workers=1, overrides=NATIVE, ready=False)
        key = gw.keys["acme"]
        for i in range(5):
            r = chat(gw.port, key, M8B, max_tokens=i + 1)
            assert r.status == 200, r
            assert r.json() == _answer_json(i + 1)
        assert up.conns == 1
        r = chat(gw.port, key, "llama-3.1-70b", max_tokens=2)
        assert r.status == 503, r
        assert r.error()["code"] == "no_healthy_endpoint"
    finally:
        up.close()


def test_native_rejects_https_endpoints(tg):
    gw = tg.gateway({M8B: ["https://127.0.0.1:8443"]}, start=False, keys=(),
                    overrides={"upstream_client": "native"})
    cp = gw.tool("check-config", check=False)
    assert cp.returncode == 1
    assert "upstream_client 'native' serves only http:// endpoints" in cp.stdout + cp.stderr
    gw.config["upstream_client"] = "curl"
    gw.write_config()
    assert gw.tool("check-config", check=False).returncode == 0
    gw.config["upstream_client"] = "fast"
    gw.write_config()
    cp = gw.tool("check-config", check=False)
    assert cp.returncode == 1
    assert "expected 'auto', 'curl' or 'native', got 'fast'" in cp.stdout + cp.stderr
