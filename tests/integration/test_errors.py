"""Error statuses a client can provoke or receive: bad requests (400, 404,
413, 431, 408) answered by the gateway itself, and upstream answers (4xx,
500, garbage) relayed or translated. Every body is the OpenAI error
envelope."""

import json
import time

import pytest

import tgtest
from tgtest import RawConn, chat, http_request_bytes, request

M8B, M70B, EMBED = tgtest.DEFAULT_MODELS


def _err(r, status, etype, code):
    assert r is not None, "connection closed without a response"
    assert r.status == status, r
    e = r.error()
    assert e["type"] == etype, e
    assert e["code"] == code, e
    assert e["message"], e
    assert r.header("x-request-id"), r
    return e


def test_unknown_path(stack):
    for method, path in [("GET", "/v2/chat"), ("POST", "/v1/chat/completion"), ("GET", "/")]:
        r = request(stack.port, method, path, key=stack.key)
        _err(r, 404, "invalid_request_error", "not_found")


def test_invalid_json(stack):
    for body in ["{", "not json", '{"model": "llama-3.1-8b",}', "[1,2]", ""]:
        r = request(stack.port, "POST", "/v1/chat/completions", body=body, key=stack.key,
                    headers={"Content-Type": "application/json"})
        assert r.status == 400, (body, r)
        assert r.error()["type"] == "invalid_request_error"
        assert r.error()["code"] in ("invalid_json", "missing_model"), (body, r.error())
    _err(request(stack.port, "POST", "/v1/chat/completions", body="{", key=stack.key),
         400, "invalid_request_error", "invalid_json")


def test_ambiguous_bodies_refused(stack):
    # bodies a lenient parser would read differently from the upstream's:
    # each is refused, so the gateway never authorises one model and the
    # upstream serves another
    bodies = [
        b'{"model": "llama-3.1-8b", "model": "llama-3.1-70b", "messages": []}',
        b'{"model": "llama-3.1-8b", "stream": false, "stream": true, "messages": []}',
        b'{"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "a", "content": "b"}]}',
        b'{"model": "llama-3.1-8b\\u0000x", "messages": []}',
        b'{"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "\xc0\x80"}]}',
        b'{"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        b'{"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "a\x01b"}]}',
        b'{"model": "llama-3.1-8b", "messages": []} {}',
    ]
    for body in bodies:
        r = request(stack.port, "POST", "/v1/chat/completions", body=body, key=stack.key,
                    headers={"Content-Type": "application/json"})
        e = _err(r, 400, "invalid_request_error", "invalid_json")
        assert "not valid JSON" in e["message"], (body, e)
    # a key differing only in case is another key: no model named
    r = request(stack.port, "POST", "/v1/chat/completions", key=stack.key,
                body=b'{"Model": "llama-3.1-8b", "messages": []}')
    _err(r, 400, "invalid_request_error", "missing_model")
    # what must still pass: non-ASCII text, escapes, an escaped backslash
    # before "u0000", whitespace around the object
    ok = ('\n {"model": "llama-3.1-8b", "max_tokens": 2, "messages": [{"role": "user", '
          '"content": "caf\u00e9 € 😀 \\\\u0000"}]} \n').encode()
    r = request(stack.port, "POST", "/v1/chat/completions", body=ok, key=stack.key,
                headers={"Content-Type": "application/json"})
    assert r.status == 200, r


def test_mistyped_policy_fields_refused(tg):
    # The upstream's parser coerces "true", 1 or "4" where the gateway would
    # not: "stream": "true" would stream an answer the gateway reads as a
    # whole one (its usage unread, so unbilled) and "n": "4" or
    # "max_completion_tokens": "4096" would write more than was reserved.
    # Such bodies are refused before any upstream sees them.
    fake = tgtest.FakeUpstream(200, {
        "id": "x", "object": "chat.completion", "model": M8B,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
    try:
        gw = tg.gateway({M8B: [fake.url]}, overrides={"health_check_interval": "60s"})
        key = gw.keys["acme"]
        msgs = [{"role": "user", "content": "hi"}]
        for field, value in [("stream", "true"), ("stream", 1), ("stream", "yes"),
                             ("n", "4"), ("n", 2.5), ("n", 1e16),
                             ("max_tokens", "4096"),
                             ("max_completion_tokens", "4096"),
                             ("max_completion_tokens", [4096])]:
            body = {"model": M8B, "messages": msgs, "max_tokens": 4, field: value}
            r = request(gw.port, "POST", "/v1/chat/completions", body=body, key=key)
            e = _err(r, 400, "invalid_request_error", "invalid_type")
            assert "'%s'" % field in e["message"], (field, e)
        # "continuous_usage_stats": "true" is read as true upstream (a usage
        # on every chunk, which the gateway refuses when it is a boolean)
        for opts, field in [([], "stream_options"), ("x", "stream_options"),
                            ({"continuous_usage_stats": "true"},
                             "stream_options.continuous_usage_stats"),
                            ({"continuous_usage_stats": 1},
                             "stream_options.continuous_usage_stats"),
                            ({"include_usage": "true"}, "stream_options.include_usage"),
                            ({"include_usage": 1}, "stream_options.include_usage")]:
            body = {"model": M8B, "messages": msgs, "max_tokens": 4, "stream": True,
                    "stream_options": opts}
            r = request(gw.port, "POST", "/v1/chat/completions", body=body, key=key)
            e = _err(r, 400, "invalid_request_error", "invalid_type")
            assert "'%s'" % field in e["message"], (opts, e)
        r = request(gw.port, "POST", "/v1/completions", key=key,
                    body={"model": M8B, "prompt": "hi", "max_tokens": 4, "stream": "true"})
        _err(r, 400, "invalid_request_error", "invalid_type")
        assert fake.posts == 0, fake.posts
        # the types the gateway reads, null included, go through
        for extra in [{"stream": False}, {"stream": None}, {"n": 2}, {"n": None},
                      {"max_tokens": 16.0}, {"max_tokens": None},
                      {"max_completion_tokens": 8}]:
            body = dict({"model": M8B, "messages": msgs}, **extra)
            r = request(gw.port, "POST", "/v1/chat/completions", body=body, key=key)
            assert r.status == 200, (extra, r)
        assert fake.posts == 7
    finally:
        fake.close()


def test_client_priority_refused(stack):
    # vLLM's priority scheduling serves a lower "priority" first among all
    # the requests it has waiting: a client's own value would jump every
    # other tenant's requests there, past the gateway's fair queue
    before = stack.sim.metric(tgtest.SIM_REQUESTS)
    for prio in [-100, 5, "-1", 0.5, "high"]:
        r = chat(stack.port, stack.key, M8B, max_tokens=1, priority=prio)
        e = _err(r, 400, "invalid_request_error", "unsupported_parameter")
        assert "'priority'" in e["message"], e
    assert stack.sim.metric(tgtest.SIM_REQUESTS) == before
    # the default value, or none, changes nothing and goes through
    for prio in [0, None]:
        r = chat(stack.port, stack.key, M8B, max_tokens=1, priority=prio)
        assert r.status == 200, (prio, r)


def test_client_kv_transfer_params_vllm_xargs_and_chat_template_refused(stack):
    # kv_transfer_params names the KV blocks and hosts of a disaggregated
    # prefill deployment every tenant shares; vllm_xargs hands arguments to
    # the upstream's plugins; a chat template of the client's own renders a
    # prompt of any size from a few bytes, past what the limits reserve:
    # none is a tenant's to set, in any form
    before = stack.sim.metric(tgtest.SIM_REQUESTS)
    for field, value in (("kv_transfer_params", {"remote_block_ids": [1, 2]}),
                         ("kv_transfer_params", None), ("vllm_xargs", {"a": 1}),
                         ("chat_template", "{% for i in range(99999) %}x{% endfor %}")):
        r = chat(stack.port, stack.key, M8B, max_tokens=1, **{field: value})
        e = _err(r, 400, "invalid_request_error", "unsupported_parameter")
        assert "'%s'" % field in e["message"], e
        r = request(stack.port, "POST", "/v1/completions", key=stack.key,
                    body={"model": M8B, "prompt": "x", "max_tokens": 1, field: value})
        _err(r, 400, "invalid_request_error", "unsupported_parameter")
    # vLLM's usage on every chunk (each choice's own with n > 1) could not be
    # billed exactly when a stream is cut, and reached a client that
    # declined usage: refused; false is vLLM's default, passed
    r = chat(stack.port, stack.key, M8B, max_tokens=1, stream=True,
             stream_options={"include_usage": False, "continuous_usage_stats": True})
    e = _err(r, 400, "invalid_request_error", "unsupported_parameter")
    assert "continuous_usage_stats" in e["message"], e
    assert stack.sim.metric(tgtest.SIM_REQUESTS) == before
    r = chat(stack.port, stack.key, M8B, max_tokens=1, stream=True,
             stream_options={"continuous_usage_stats": False})
    assert r.status == 200, r


def test_a_model_is_used_on_the_paths_of_its_kind(stack):
    # a chat model on /v1/embeddings, or an embedding model on a generating
    # path, would go out without the tenant's cache_salt or without a
    # completion reservation: refused before the upstream
    before = stack.sim.metric(tgtest.SIM_REQUESTS)
    r = request(stack.port, "POST", "/v1/embeddings", body={"model": M8B, "input": "x"},
                key=stack.key)
    e = _err(r, 400, "invalid_request_error", "model_not_supported")
    assert "/v1/chat/completions" in e["message"], e
    emb = tgtest.DEFAULT_MODELS[2]
    for path, body in (("/v1/chat/completions", tgtest.chat_body(emb, max_tokens=1)),
                       ("/v1/completions", {"model": emb, "prompt": "x", "max_tokens": 10 ** 5})):
        r = request(stack.port, "POST", path, body=body, key=stack.key)
        e = _err(r, 400, "invalid_request_error", "model_not_supported")
        assert "/v1/embeddings" in e["message"], e
    assert stack.sim.metric(tgtest.SIM_REQUESTS) == before


def test_missing_or_non_string_model(stack):
    for body in [{"messages": []}, {"model": 7, "messages": []}, {"model": None},
                 {"model": ["llama-3.1-8b"]}]:
        r = request(stack.port, "POST", "/v1/chat/completions", body=body, key=stack.key)
        _err(r, 400, "invalid_request_error", "missing_model")


def test_error_bodies_stay_json_when_a_message_is_cut_inside_a_character(stack):
    # the message quotes at most 200 bytes of the model's name: 100 three-byte
    # characters are cut inside the 67th, and the body is still UTF-8 JSON
    name = "\u20ac" * 100
    r = request(stack.port, "POST", "/v1/chat/completions", key=stack.key,
                body={"model": name, "messages": [{"role": "user", "content": "x"}]})
    assert r.status == 404, r
    doc = json.loads(r.body.decode("utf-8"))   # strict: invalid UTF-8 raises
    assert doc["error"]["code"] == "model_not_found", doc
    assert doc["error"]["message"].startswith("the model '" + "\u20ac" * 66 + "\ufffd"), doc


def test_unknown_model(stack):
    _err(chat(stack.port, stack.key, "llama-9"), 404, "invalid_request_error", "model_not_found")
    r = request(stack.port, "POST", "/v1/embeddings", body={"model": "nope", "input": "x"},
                key=stack.key)
    _err(r, 404, "invalid_request_error", "model_not_found")


def test_auth_checked_before_body(stack):
    # an unauthenticated client learns nothing about models or JSON validity
    r = request(stack.port, "POST", "/v1/chat/completions", body="{", key=None)
    _err(r, 401, "authentication_error", "missing_api_key")


def test_body_too_large(stack):
    big = json.dumps(tgtest.chat_body(M8B, content="x" * 70000))
    r = request(stack.port, "POST", "/v1/chat/completions", body=big, key=stack.key,
                headers={"Content-Type": "application/json"})
    _err(r, 413, "invalid_request_error", "body_too_large")
    # just under the limit is fine
    ok = json.dumps(tgtest.chat_body(M8B, max_tokens=1, content="y" * 60000))
    r = request(stack.port, "POST", "/v1/chat/completions", body=ok, key=stack.key,
                headers={"Content-Type": "application/json"})
    assert r.status == 200, r


def test_body_too_large_chunked(stack):
    c = RawConn(stack.port)
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" % stack.key)
    c.send(head)
    piece = b"x" * 8192
    try:
        for _ in range(10):  # 80 KiB > 64 KiB
            c.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
        c.send(b"0\r\n\r\n")
    except OSError:
        pass  # the gateway may answer and close before we finish sending
    r = c.read_response()
    c.close()
    _err(r, 413, "invalid_request_error", "body_too_large")


def test_headers_too_large(stack):
    r = request(stack.port, "GET", "/v1/models", key=stack.key,
                headers={"X-Padding": "p" * 9000})
    _err(r, 431, "invalid_request_error", "headers_too_large")
    # many small headers add up the same way
    c = RawConn(stack.port)
    lines = "".join("X-H%d: %s\r\n" % (i, "v" * 90) for i in range(100))
    try:
        c.send("GET /v1/models HTTP/1.1\r\nHost: x\r\n" + lines + "\r\n")
    except OSError:
        pass
    _err(c.read_response(), 431, "invalid_request_error", "headers_too_large")
    c.close()


def test_request_timeout_partial_headers(stack):
    c = RawConn(stack.port)
    t0 = time.monotonic()
    c.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
    r = c.read_response()
    elapsed = time.monotonic() - t0
    _err(r, 408, "invalid_request_error", "request_timeout")
    assert 1.5 <= elapsed <= 4.5, elapsed  # client_request: 2s
    assert c.closed_by_peer(2.0)
    c.close()


def test_request_timeout_partial_body(stack):
    c = RawConn(stack.port)
    t0 = time.monotonic()
    c.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
           "Content-Length: 100\r\n\r\n{\"model\":" % stack.key)
    time.sleep(1.0)
    c.send(" \"llama")  # trickling bytes does not extend the deadline
    r = c.read_response()
    elapsed = time.monotonic() - t0
    _err(r, 408, "invalid_request_error", "request_timeout")
    assert 1.5 <= elapsed <= 4.5, elapsed
    assert c.closed_by_peer(2.0)
    c.close()
    assert chat(stack.port, stack.key, M8B, max_tokens=1).status == 200


def test_idle_keepalive_connection_closed_without_response(stack):
    # client_keepalive is 5 s; an idle connection that never sent a byte is
    # closed (408 on it or a plain close are both fine) but not before ~2 s
    c = RawConn(stack.port)
    c.send(http_request_bytes("GET", "/v1/models", key=stack.key))
    r = c.read_response()
    assert r.status == 200
    t0 = time.monotonic()
    assert c.closed_by_peer(8.0), "idle keep-alive connection never closed"
    assert time.monotonic() - t0 >= 1.5
    c.close()


def test_deadlines_follow_the_connection_state(stack):
    # a busy keep-alive connection outlives client_request (2 s): each
    # request's deadline replaces the last one. Idle again, it is closed
    # client_keepalive (5 s) after its last answer, not before; and a
    # request started on a connection idle for a while still gets 408 two
    # seconds after it began, not at the idle deadline
    c = RawConn(stack.port)
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        c.send(http_request_bytes("GET", "/v1/models", key=stack.key))
        assert c.read_response().status == 200
        time.sleep(0.3)
    t_last = time.monotonic()
    assert not c.closed_by_peer(3.5), "closed before client_keepalive"
    assert c.closed_by_peer(4.0), "idle connection never closed"
    assert 4.5 <= time.monotonic() - t_last <= 7.5
    c.close()

    c = RawConn(stack.port)
    c.send(http_request_bytes("GET", "/v1/models", key=stack.key))
    assert c.read_response().status == 200
    time.sleep(1.0)
    t0 = time.monotonic()
    c.send("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
    _err(c.read_response(), 408, "invalid_request_error", "request_timeout")
    assert 1.5 <= time.monotonic() - t0 <= 3.0
    c.close()


# ---- upstream answers -----------------------------------------------------

def test_upstream_client_errors_relayed_unchanged(stack):
    for status in (400, 404, 422, 429, 500):
        h = {"x-sim-fault": "status:%d" % status}
        via = chat(stack.port, stack.key, M8B, headers=h)
        direct = chat(stack.sim.port, None, M8B, headers=h)
        assert direct.status == status, direct
        assert via.status == status, via
        assert via.json()["error"] == direct.json()["error"], (via, direct)
        # vLLM's code is the status as a number: relayed as such
        assert type(via.json()["error"]["code"]) is int and via.json()["error"]["code"] == status
        assert via.header("x-request-id")


def _answer_body(usage=(7, 3)):
    return {"id": "x", "object": "chat.completion", "created": 1, "model": M8B,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                      "total_tokens": usage[0] + usage[1]}}


def _sse_body(usage=(7, 3), pretty=False):
    def ev(doc):
        if pretty:  # one data line a line of the JSON, as the format allows
            return "".join("data: %s\n" % line for line in json.dumps(doc, indent=1).split("\n")) + "\n"
        return "data: %s\n\n" % json.dumps(doc)
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": M8B}
    out = [ev(dict(chunk, choices=[{"index": 0, "delta": {"content": t}, "finish_reason": None}]))
           for t in ("a", "b", "c")]
    out.append(ev(dict(chunk, choices=[], usage={
        "prompt_tokens": usage[0], "completion_tokens": usage[1],
        "total_tokens": usage[0] + usage[1]})))
    out.append("data: [DONE]\n\n")
    return "".join(out).encode()


def test_events_over_several_data_lines_are_read_whole(tg):
    """An upstream that pretty-prints its chunks sends each over several
    data lines, which the SSE format joins: its usage is billed (it was
    not read, and the stream was billed from its events) and its usage
    chunk, which the client did not ask for, is removed."""
    up = tgtest.FakeUpstream(status=200)
    up.content_type = "text/event-stream"
    up.body = _sse_body(usage=(7, 40), pretty=True)
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1)
        s = tgtest.SSEStream(gw.port, tgtest.chat_body(M8B, stream=True, max_tokens=50),
                             key=gw.keys["acme"])
        assert s.status == 200
        s.read_all()
        assert s.done and tgtest.assembled_text(s.all_events) == "abc"
        assert tgtest.usage_events(s.all_events) == []
        e = gw.access_entry(s.headers["x-request-id"])
        s.close()
        assert (e["prompt_tokens"], e["completion_tokens"], e["usage_reported"]) == (7, 40, True), e
    finally:
        up.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_success_other_than_200_is_relayed_and_billed(tg, stream):
    """An upstream (or something before it) that answers 203 or 201 gave a
    whole answer: the client gets it as a 200 (a stream relayed event by
    event, the usage chunk it did not ask for removed) and the record has
    the upstream's usage. It was relayed as an error and billed nothing."""
    up = tgtest.FakeUpstream(status=203, body=_answer_body())
    if stream:
        up.content_type = "text/event-stream"
        up.body = _sse_body()
    try:
        gw = tg.gateway({M8B: [up.url]}, workers=1)
        key = gw.keys["acme"]
        if stream:
            s = tgtest.SSEStream(gw.port, tgtest.chat_body(M8B, stream=True, max_tokens=3), key=key)
            assert s.status == 200 and s.headers["content-type"] == "text/event-stream", s.headers
            s.read_all()
            assert s.done and tgtest.assembled_text(s.all_events) == "abc"
            assert tgtest.usage_events(s.all_events) == []
            rid = s.headers["x-request-id"]
            s.close()
        else:
            r = chat(gw.port, key, M8B, max_tokens=3)
            assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 3, r
            rid = r.header("x-request-id")
        e = gw.access_entry(rid)
        assert (e["status"], e["prompt_tokens"], e["completion_tokens"]) == (200, 7, 3), e
    finally:
        up.close()


def test_upstream_errors_that_are_not_json_are_wrapped(tg):
    """Every error the client gets is OpenAI-style JSON: an upstream error
    whose body is not a JSON object (the HTML page of a proxy in front of a
    stopped vLLM, an empty 404) keeps its status with a JSON body saying so;
    a redirect is no answer (502). A JSON error body is relayed as it is."""
    html = (b"<html><head><title>502 Bad Gateway</title></head><body><center>"
            b"<h1>502 Bad Gateway</h1></center></body></html>\r\n")
    cases = [(502, html, "text/html", 502, "server_error", "upstream_status"),
             (404, b"", "text/plain", 404, "invalid_request_error", "upstream_status"),
             (500, b"[1, 2]", "application/json", 500, "server_error", "upstream_status"),
             (302, b"", "text/plain", 502, "server_error", "bad_upstream_response")]
    for status, body, ctype, want, etype, code in cases:
        ups = [tgtest.FakeUpstream(status=status) for _ in range(2)]
        for u in ups:
            u.body, u.content_type = body, ctype
        try:
            gw = tg.gateway({M8B: [u.url for u in ups]}, workers=1,
                            overrides={"health_check_interval": "60s"})
            r = chat(gw.port, gw.keys["acme"], M8B, max_tokens=3)
            assert r.header("content-type") == "application/json"
            _err(r, want, etype, code)
            if status == 502:  # retried on the other endpoint first
                assert sum(u.posts for u in ups) == 2
            gw.stop()
        finally:
            for u in ups:
                u.close()


def test_upstream_garbage_is_502(stack):
    r = chat(stack.port, stack.key, M8B, headers={"x-sim-fault": "garbage"})
    _err(r, 502, "server_error", "bad_upstream_response")
    assert chat(stack.port, stack.key, M8B, max_tokens=1).status == 200


def test_upstream_garbage_streaming(stack):
    s = tgtest.SSEStream(stack.port, tgtest.chat_body(M8B, stream=True), key=stack.key,
                         headers={"x-sim-fault": "garbage"})
    if s.status == 200:
        # the head was already relayed: the stream must end without [DONE]
        s.read_all()
        assert not s.done
    else:
        assert s.status == 502
        body = json.loads(s.body_bytes())
        assert body["error"]["code"] == "bad_upstream_response"
    s.close()


def test_forwarded_headers_reach_backend(stack):
    # x-sim-token-ms is in forward_headers: the backend spaces 4 tokens
    # 200 ms apart (3 gaps), so the answer takes at least 0.6 s
    t0 = time.monotonic()
    r = chat(stack.port, stack.key, M8B, max_tokens=4, headers={"x-sim-token-ms": "200"})
    assert r.status == 200
    assert r.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - t0 >= 0.55
