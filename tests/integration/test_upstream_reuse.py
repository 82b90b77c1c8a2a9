"""Pooled upstream connections and the framing of upstream answers, with
both upstream clients (libcurl serves https:// endpoints and
`upstream_client: curl`; the native client http:// ones by default): a
connection holding bytes past the end of the answer it carried never
carries another request (those bytes would be read as that request's
answer, perhaps another tenant's); a request sent on a pooled connection
the upstream closed or reset just then is sent again on a new one, once,
without the client noticing; a 1xx, 204 or 304 ends at its head; an
answer that breaks before a final status is a 502 with its ledger row.

The upstream is a raw-socket HTTP/1.1 server in this file, so the tests can
shape the bytes on the wire and count connections and requests."""

import json
import socket
import struct
import threading
import time

import pytest

import tgtest

M8B = tgtest.DEFAULT_MODELS[0]
CLIENTS = ["native", "curl"]


def _answer(content, completion_tokens, prompt_tokens=7):
    return json.dumps({
        "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": M8B,
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}}).encode()


def _head(body, status=b"200 OK", ctype=b"application/json"):
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype +
            b"\r\nContent-Length: %d\r\n\r\n" % len(body))


def _sse(n):
    out = []
    for i in range(n):
        ch = {"id": "c", "object": "chat.completion.chunk", "model": M8B,
              "choices": [{"index": 0, "delta": {"content": "w%d " % i},
                           "finish_reason": "length" if i == n - 1 else None}]}
        out.append(b"data: " + json.dumps(ch).encode() + b"\n\n")
    u = {"id": "c", "object": "chat.completion.chunk", "model": M8B, "choices": [],
         "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}}
    out.append(b"data: " + json.dumps(u).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


class ScriptedUpstream(tgtest.TcpServer):
    """Each POST is answered by script(conn, doc, n, conn_no), which writes
    what it likes and returns "keep" or "close"; GETs (health probes) get
    200. Counts POSTs read, and the connections that carried one (numbered
    from 1 in the order of their first POST) with their POSTs."""

    def __init__(self, script):
        self.script = script
        self.lock = threading.Lock()
        self.posts = 0
        self.conns = 0
        self.per_conn = {}
        self.closed_by_peer = set()  # connections the gateway closed or reset
        super().__init__(backlog=128)

    @staticmethod
    def _read_request(c, buf):
        while b"\r\n\r\n" not in buf:
            d = c.recv(65536)
            if not d:
                return None, None, buf
            buf += d
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        n = 0
        for line in lines[1:]:
            k, v = line.split(":", 1)
            if k.strip().lower() == "content-length":
                n = int(v)
        while len(rest) < n:
            d = c.recv(65536)
            if not d:
                return None, None, b""
            rest += d
        return lines[0].split(" ")[0], rest[:n], rest[n:]

    def handle(self, c):
        no = None
        buf = b""
        try:
            while True:
                method, body, buf = self._read_request(c, buf)
                if method is None:
                    self._closed(no)
                    return
                if method == "GET":
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                with self.lock:
                    if no is None:
                        self.conns += 1
                        no = self.conns
                        self.per_conn[no] = 0
                    n = self.posts
                    self.posts += 1
                    self.per_conn[no] += 1
                if self.script(c, json.loads(body), n, no) == "close":
                    return
        except OSError:
            # a reset: the gateway closed with bytes unread
            self._closed(no)
        finally:
            c.close()

    def _closed(self, no):
        if no is not None:
            with self.lock:
                self.closed_by_peer.add(no)


def _gateway(tg, up, client):
    return tg.gateway({M8B: tgtest.model_entry([up.url], max_inflight=1)}, workers=1,
                      keys=("acme", "small"),
                      overrides={"upstream_client": client, "health_check_interval": "60s"})


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("shape", ["longer_than_its_length", "no_content_with_a_body"])
def test_bytes_past_an_answer_never_answer_the_next_request(tg, client, shape):
    """acme's answer is followed, in a later read, by bytes past its end
    that form a whole answer (a body longer than its Content-Length, or the
    declared body of a 204, which is not read). The connection must not be
    used again: each of small's requests gets its own answer and is billed
    its own usage, never the smuggled one. (libcurl put such a connection
    back in its pool, and small's first request read acme's bytes as its
    answer, each later one the answer of the request before it.)"""
    smuggled = _answer("SMUGGLED: acme's private text", 50)

    def script(c, doc, n, no):
        tag = doc["messages"][0]["content"]
        if n == 0:
            own = _answer("answer for " + tag, 1)
            if shape == "longer_than_its_length":
                c.sendall(_head(own))
                time.sleep(0.05)  # the body in a read of its own
                c.sendall(own + _head(smuggled) + smuggled)
            else:
                c.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n"
                          % len(_head(smuggled) + smuggled))
                time.sleep(0.05)
                c.sendall(_head(smuggled) + smuggled)
            return "keep"
        k = int(tag.rsplit("-", 1)[1])
        c.sendall(_head(_answer("answer for " + tag, k + 2)) + _answer("answer for " + tag, k + 2))
        return "keep"

    up = ScriptedUpstream(script)
    try:
        gw = _gateway(tg, up, client)
        r0 = tgtest.chat(gw.port, gw.keys["acme"], M8B, max_tokens=4, content="acme-secret")
        if shape == "longer_than_its_length":
            assert r0.status == 200, r0
            assert r0.json()["choices"][0]["message"]["content"] == "answer for acme-secret"
        got = []
        for k in range(3):
            r = tgtest.chat(gw.port, gw.keys["small"], M8B, max_tokens=60,
                            content="small-%d" % k)
            assert r.status == 200, (k, r.status, r.body[:200])
            got.append(r.json()["choices"][0]["message"]["content"])
            row = tgtest.wait_for(lambda: tgtest.sqlite_ledger_rows(
                gw.db_path, "WHERE request_id = ?", (r.header("x-request-id"),)),
                what="small's ledger row")[0]
            assert (row["tenant"], row["prompt_tokens"], row["completion_tokens"]) == \
                ("small", 7, k + 2), row
        assert got == ["answer for small-%d" % k for k in range(3)], got
        assert up.posts == 4
        # no request went out on the connection that held the stray bytes,
        # and the gateway closed it
        assert up.per_conn[1] == 1, up.per_conn
        tgtest.wait_for(lambda: 1 in up.closed_by_peer, timeout=5,
                        what="the gateway to close the spoilt connection")
    finally:
        up.close()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("how", ["as_reused", "soon_after_answer", "reset_after_answer"])
def test_pooled_connection_closed_under_a_request_is_sent_again(tg, client, stream, how):
    """The upstream closes each connection after one answer without saying
    so: as the next request arrives on it (never read: the idle-timeout
    race), 30 ms after its answer whether or not a request came, or with a
    reset right behind its answer. A close with a request unread is a
    reset. Nothing was relayed and the upstream never read the request, so
    the gateway sends it again on a new connection: every request gets 200
    and its whole answer, and the upstream answered each once. (libcurl
    sent a request again after a clean close of a reused connection but not
    after a reset, and the client got 502; an answer with a reset right
    behind it was a 502 too, even on a new connection: the gateway told
    libcurl only of the socket's error, and it failed the transfer without
    reading the answer the kernel held.)"""
    def script(c, doc, n, no):
        body = _sse(4) if doc.get("stream") else _answer("w0 w1 w2 w3", 4)
        c.sendall(_head(body, ctype=b"text/event-stream" if doc.get("stream")
                        else b"application/json") + body)
        if how == "soon_after_answer":
            time.sleep(0.03)
            return "close"
        if how == "reset_after_answer":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return "close"
        c.settimeout(10)
        try:
            c.recv(1, socket.MSG_PEEK)  # the next request is here: never read it
        except OSError:
            pass
        return "close"

    up = ScriptedUpstream(script)
    try:
        gw = _gateway(tg, up, client)
        key = gw.keys["acme"]
        rids = []
        for k in range(6):
            if stream:
                s = tgtest.SSEStream(gw.port, tgtest.chat_body(M8B, stream=True, max_tokens=4),
                                     key=key, timeout=10)
                s.read_all()
                s.close()
                assert (s.status, s.done) == (200, True), (k, s.status)
            else:
                r = tgtest.chat(gw.port, key, M8B, max_tokens=4, timeout=10)
                assert r.status == 200, (k, r.status, r.body[:200])
                assert r.json()["choices"][0]["message"]["content"] == "w0 w1 w2 w3"
                rids.append(r.header("x-request-id"))
            time.sleep(0.01 if k % 2 else 0.0)
        assert up.posts == 6, up.posts
        assert up.conns == 6, up.conns
        for rid in rids:
            row = tgtest.wait_for(lambda: tgtest.sqlite_ledger_rows(
                gw.db_path, "WHERE request_id = ?", (rid,)), what="ledger row")
            assert len(row) == 1 and row[0]["completion_tokens"] == 4, row
    finally:
        up.close()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("cut", ["after_its_head", "inside_its_first_event"])
def test_a_stream_broken_before_its_first_event_is_retried(tg, client, cut):
    """An upstream that sends a stream's 200 head, perhaps part of its first
    event, then dies (a replica going down as it starts) has relayed nothing
    of the answer: the client's 200 goes with the first whole event, so the
    request is retried on the other endpoint and the client gets the whole
    stream. It got a 200 stream cut before any event."""
    partial = b"" if cut == "after_its_head" else b"8\r\ndata: {\"\r\n"

    def bad(c, doc, n, no):
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n" + partial)
        time.sleep(0.05)
        return "close"

    def good(c, doc, n, no):
        ev = _sse(4)
        c.sendall(_head(ev, ctype=b"text/event-stream") + ev)
        return "keep"

    up1, up2 = ScriptedUpstream(bad), ScriptedUpstream(good)
    try:
        gw = tg.gateway({M8B: tgtest.model_entry([up1.url, up2.url])}, workers=1,
                        overrides={"upstream_client": client, "health_check_interval": "60s"})
        ids = []
        for _ in range(4):  # the first attempts go to either endpoint
            s = tgtest.SSEStream(gw.port, tgtest.chat_body(M8B, stream=True, max_tokens=4),
                                 key=gw.keys["acme"])
            assert s.status == 200
            s.read_all()
            s.close()
            assert s.done and tgtest.assembled_text(s.all_events) == "w0 w1 w2 w3 ", s.all_events
            ids.append(s.headers["x-request-id"])
        assert up1.posts >= 1 and up2.posts == 4, (up1.posts, up2.posts)
        for rid in ids:
            e = gw.access_entry(rid)
            assert (e["status"], e["completion_tokens"]) == (200, 4), e
    finally:
        up1.close()
        up2.close()


def _one_answer(tg, client, answer):
    """One chat through a gateway whose upstream answers it with the bytes
    answer and closes. Returns the client's response and the
    (status, prompt, completion) of the request's ledger row and of its
    access-log line, which must both exist."""
    def script(c, doc, n, no):
        c.sendall(answer)
        time.sleep(0.05)
        return "close"

    up = ScriptedUpstream(script)
    try:
        gw = _gateway(tg, up, client)
        r = tgtest.chat(gw.port, gw.keys["acme"], M8B, max_tokens=4)
        rid = r.header("x-request-id")
        row = tgtest.wait_for(lambda: tgtest.sqlite_ledger_rows(
            gw.db_path, "WHERE request_id = ?", (rid,)), what="the ledger row of %s" % rid)
        assert len(row) == 1 and up.posts == 1, (row, up.posts)
        e = gw.access_entry(rid)
        return r, ((row[0]["status"], row[0]["prompt_tokens"], row[0]["completion_tokens"]),
                   (e["status"], e["prompt_tokens"], e["completion_tokens"]))
    finally:
        up.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_an_answer_cut_inside_its_head_gets_its_record(tg, client):
    """The upstream read the request, sent the start of an answer's head
    and closed (a replica dying as it answers): the client gets 502
    bad_upstream_response, and the request, which reached an upstream, has
    its ledger row and access-log line. libcurl ends such an exchange
    without an error and without a status: it was taken as no request at
    all and left no ledger row."""
    r, record = _one_answer(tg, client, b"HTTP/1.1 200 OK\r\nContent-Type: appl")
    assert r.status == 502 and r.error()["code"] == "bad_upstream_response", r
    assert record == ((502, 0, 0), (502, 0, 0))


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("shape", ["interim_with_a_length", "no_content_with_a_body",
                                   "switching_protocols"])
def test_answers_that_end_at_their_head(tg, client, shape):
    """A 1xx, 204 or 304 ends at its blank line whatever its fields declare
    (RFC 9112 6.3). A 103 that declares a Content-Length is followed by the
    real answer, which the client gets (200, billed); a 204 declaring a
    body, here a chat completion, answers nothing: 502, never those bytes
    as the answer; a 101 to a request that offered no other protocol is
    502. Each has its ledger row and access-log line. The native client
    read a 1xx's or 204's declared body (the 103's out of the real answer:
    502; the 204's as the answer: 200 with its usage billed) and took a
    bare 101 for an interim answer (200)."""
    own = _answer("w0 w1", 2)
    answers = {
        "interim_with_a_length":
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\nContent-Length: 10\r\n\r\n" +
            _head(own) + own,
        "no_content_with_a_body":
            b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n" % len(own) + own,
        "switching_protocols": b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + _head(own) + own,
    }

    r, record = _one_answer(tg, client, answers[shape])
    if shape == "interim_with_a_length":
        assert r.status == 200 and r.json()["choices"][0]["message"]["content"] == "w0 w1", r
        want = (200, 7, 2)
    else:
        assert r.status == 502 and r.error()["code"] == "bad_upstream_response", r
        want = (502, 0, 0)
    assert record == (want, want)


@pytest.mark.parametrize("client", CLIENTS)
def test_an_answer_head_over_the_bound_is_502_with_its_record(tg, client):
    """An answer whose head is larger than the client reads (the native
    client's 64 KiB, libcurl's 100 KiB a line), here a 200 KiB field before
    a good body: 502 bad_upstream_response, and the request has its ledger
    row and access-log line. Pinned here: no test covered it."""
    own = _answer("w0 w1", 2)
    answer = _head(own).replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"p" * 200 * 1024 + b"\r\n\r\n")
    r, record = _one_answer(tg, client, answer + own)
    assert r.status == 502 and r.error()["code"] == "bad_upstream_response", r
    assert record == ((502, 0, 0), (502, 0, 0))
