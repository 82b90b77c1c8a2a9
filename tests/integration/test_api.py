"""The OpenAI-compatible API through the gateway, as a client sees it: the
bodies and usage numbers the backend produced arrive unchanged, /v1/models
lists exactly what the caller may use, every response carries an
x-request-id, and each request leaves one access-log line."""

import re
import threading
import time

import pytest

import tgtest
from tgtest import chat, request

M8B, M70B, EMBED = tgtest.DEFAULT_MODELS


def test_chat_completion_matches_backend(stack):
    via = chat(stack.port, stack.key, M8B, max_tokens=7, content="What is a gateway?")
    direct = chat(stack.sim.port, None, M8B, max_tokens=7, content="What is a gateway?")
    assert via.status == 200, via
    assert via.header("content-type", "").startswith("application/json")
    doc, ref = via.json(), direct.json()
    assert doc["object"] == "chat.completion"
    assert doc["model"] == M8B
    assert doc["choices"][0]["message"]["role"] == "assistant"
    assert doc["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]
    assert doc["choices"][0]["message"]["content"]
    # completion tokens are exactly what was asked for; prompt tokens are the
    # backend's count for this prompt, relayed unchanged
    assert doc["usage"]["completion_tokens"] == 7
    assert doc["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"] > 0
    assert doc["usage"]["total_tokens"] == doc["usage"]["prompt_tokens"] + 7


def test_a_chat_without_max_tokens_is_sent_the_models_cap(stack):
    # the simulator writes 16 tokens when it is given no limit; the gateway
    # sends the model's cap (4096 here), the limit it reserved
    r = chat(stack.port, stack.key, M8B)
    assert r.status == 200, r
    assert r.json()["usage"]["completion_tokens"] == 4096


def test_legacy_completions(stack):
    body = {"model": M70B, "prompt": "Once upon a time", "max_tokens": 5}
    r = request(stack.port, "POST", "/v1/completions", body=body, key=stack.key)
    ref = request(stack.sim.port, "POST", "/v1/completions", body=body)
    assert r.status == 200, r
    doc = r.json()
    assert doc["object"] == "text_completion"
    assert doc["choices"][0]["text"] == ref.json()["choices"][0]["text"]
    assert doc["usage"]["completion_tokens"] == 5
    assert doc["usage"]["prompt_tokens"] == ref.json()["usage"]["prompt_tokens"]


def test_embeddings(stack):
    body = {"model": EMBED, "input": ["alpha", "beta gamma"]}
    r = request(stack.port, "POST", "/v1/embeddings", body=body, key=stack.key)
    ref = request(stack.sim.port, "POST", "/v1/embeddings", body=body)
    assert r.status == 200, r
    doc = r.json()
    assert doc["object"] == "list"
    assert [d["index"] for d in doc["data"]] == [0, 1]
    assert doc["data"][0]["embedding"] == ref.json()["data"][0]["embedding"]
    assert len(doc["data"][1]["embedding"]) > 0
    assert doc["usage"]["prompt_tokens"] == ref.json()["usage"]["prompt_tokens"] > 0


def test_embeddings_ignore_stream(stack):
    # embeddings never stream: the upstream ignores "stream" and answers with
    # one JSON object, which reaches the client, and its usage is billed
    body = {"model": EMBED, "input": "alpha beta", "stream": True}
    r = request(stack.port, "POST", "/v1/embeddings", body=body, key=stack.key)
    ref = request(stack.sim.port, "POST", "/v1/embeddings", body=body)
    assert r.status == 200, r
    assert r.header("content-type", "").startswith("application/json"), r
    doc = r.json()
    assert doc["data"][0]["embedding"] == ref.json()["data"][0]["embedding"]
    e = stack.gw.access_entry(r.header("x-request-id"))
    assert e["status"] == 200 and e["stream"] is False, e
    assert e["usage_reported"] is True, e
    assert e["prompt_tokens"] == ref.json()["usage"]["prompt_tokens"] > 0, e


def _model_ids(port, key):
    r = request(port, "GET", "/v1/models", key=key)
    assert r.status == 200, r
    doc = r.json()
    assert doc["object"] == "list"
    for m in doc["data"]:
        assert m["object"] == "model"
    ids = [m["id"] for m in doc["data"]]
    assert len(ids) == len(set(ids)), ids
    return set(ids)


def test_models_lists_tenant_models(stack):
    assert _model_ids(stack.port, stack.key) == {M8B, M70B, EMBED}
    assert _model_ids(stack.port, stack.small_key) == {M8B}


def test_models_lists_key_scope(stack):
    scoped = stack.gw.create_key("acme", models=[M70B, EMBED])
    assert _model_ids(stack.port, scoped) == {M70B, EMBED}
    one = stack.gw.create_key("acme", models=[M8B])
    assert _model_ids(stack.port, one) == {M8B}


def test_models_retrieve_one(stack):
    r = request(stack.port, "GET", "/v1/models/" + M8B, key=stack.key)
    assert r.status == 200, r
    assert r.json() == {"id": M8B, "object": "model", "created": 0, "owned_by": "tollgate"}
    assert r.header("x-request-id")
    # percent-decoded, as clients encode a name ('%2D' is '-')
    r = request(stack.port, "GET", "/v1/models/" + M8B.replace("-", "%2D", 1), key=stack.key)
    assert r.status == 200 and r.json()["id"] == M8B, r
    # refused as a completion naming the model is
    r = request(stack.port, "GET", "/v1/models/" + M70B, key=stack.small_key)
    assert (r.status, r.error()["code"]) == (403, "model_not_allowed"), r
    scoped = stack.gw.create_key("acme", models=[M70B])
    r = request(stack.port, "GET", "/v1/models/" + M8B, key=scoped)
    assert (r.status, r.error()["code"]) == (403, "model_not_allowed"), r
    r = request(stack.port, "GET", "/v1/models/no-such-model", key=stack.key)
    assert (r.status, r.error()["code"]) == (404, "model_not_found"), r
    r = request(stack.port, "GET", "/v1/models/" + M8B)
    assert (r.status, r.error()["code"]) == (401, "missing_api_key"), r
    r = request(stack.port, "POST", "/v1/models/" + M8B, key=stack.key, body=b"{}")
    assert (r.status, r.header("allow")) == (405, "GET, HEAD"), r
    # a path that names no model, or does not decode to one, is no route
    for bad in ("/v1/models/", "/v1/models/%zz", "/v1/models/a%00b", "/v1/models/" + "m" * 600):
        r = request(stack.port, "GET", bad, key=stack.key)
        assert (r.status, r.error()["code"]) == (404, "not_found"), (bad, r)


def test_models_needs_a_key(stack):
    r = request(stack.port, "GET", "/v1/models")
    assert r.status == 401
    assert r.error()["code"] == "missing_api_key"


def test_x_api_key_header_and_tenant_id(stack):
    r = chat(stack.port, None, M8B, max_tokens=2, headers={"X-Api-Key": stack.key})
    assert r.status == 200, r
    assert r.json()["usage"]["completion_tokens"] == 2
    r = chat(stack.port, None, M8B, max_tokens=2,
             headers={"X-Api-Key": stack.key, "X-Tenant-Id": "acme"})
    assert r.status == 200, r
    r = chat(stack.port, stack.key, M8B, max_tokens=2, headers={"X-Tenant-Id": "acme"})
    assert r.status == 200, r


def test_every_response_has_a_request_id(stack):
    seen = set()
    responses = [
        chat(stack.port, stack.key, M8B, max_tokens=1),                       # 200
        request(stack.port, "GET", "/v1/models", key=stack.key),              # 200
        chat(stack.port, None, M8B),                                          # 401
        chat(stack.port, stack.small_key, M70B),                              # 403
        chat(stack.port, stack.key, "no-such-model"),                         # 404
        request(stack.port, "GET", "/nowhere", key=stack.key),                # 404
        request(stack.port, "POST", "/v1/chat/completions", body="{", key=stack.key),  # 400
    ]
    for r in responses:
        rid = r.header("x-request-id")
        assert rid and re.match(r"^[\x21-\x7e]{8,128}$", rid), r
        seen.add(rid)
    assert len(seen) == len(responses), "request ids repeat: %s" % seen
    assert [r.status for r in responses] == [200, 200, 401, 403, 404, 404, 400]


def test_access_log_line_per_request(stack):
    r = chat(stack.port, stack.key, M8B, max_tokens=4, content="count me")
    assert r.status == 200, r
    rid = r.header("x-request-id")
    e = stack.gw.access_entry(rid)
    assert e["tenant"] == "acme"
    assert e["key_id"] == tgtest.key_id(stack.key)
    assert e["model"] == M8B
    assert e["endpoint"] == stack.sim.url
    assert e["status"] == 200
    assert e["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert e["completion_tokens"] == 4
    assert isinstance(e["duration_ms"], (int, float)) and 0 <= e["duration_ms"] < 10000

    # a refused request is logged too, with its status and no tokens
    bad = chat(stack.port, stack.small_key, M70B)
    assert bad.status == 403
    e = stack.gw.access_entry(bad.header("x-request-id"))
    assert e["status"] == 403
    assert e["tenant"] == "small"
    assert not e.get("completion_tokens")


def test_access_log_is_one_json_object_per_line(stack):
    for _ in range(3):
        assert chat(stack.port, stack.key, M8B, max_tokens=1).status == 200
    entries = stack.gw.access_log_entries()  # json.loads on every line
    assert len(entries) >= 3
    ids = [e["request_id"] for e in entries]
    assert len(ids) == len(set(ids))


def test_admin_health(stack):
    assert tgtest.admin(stack.gw, "/healthz").status == 200
    assert tgtest.admin(stack.gw, "/readyz").status == 200


@pytest.mark.skipif(not tgtest.faults_built(), reason="needs the sanitizer build (TG_FAULTS)")
def test_healthz_names_a_worker_whose_loop_is_stuck(tg):
    """A worker loop stuck in a callback serves none of its connections,
    nor the ones its listener goes on accepting. /healthz answered 200
    whatever the loops did; it now answers 503 naming the worker whose
    loop has not turned for longer than timeouts.worker_stall, and 200
    again once it turns. The injected fault blocks the loop that takes the
    first API request for 3 s."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, workers=2, start=False,
                    overrides={"timeouts": {"worker_stall": "1s"}})
    gw.env = {"TG_FAULTS": "worker_stall:1"}
    gw.start()
    r = tgtest.admin(gw, "/healthz")
    assert r.status == 200 and r.json() == {"status": "ok"}, r
    got = []
    t0 = time.monotonic()
    t = threading.Thread(target=lambda: got.append(
        request(gw.port, "GET", "/v1/models", key=gw.keys["acme"])))
    t.start()
    seen = []

    def stuck():
        seen.append(tgtest.admin(gw, "/healthz", timeout=2))
        return seen[-1].status == 503
    tgtest.wait_for(stuck, timeout=2.8, interval=0.05, what="/healthz 503")
    took = time.monotonic() - t0
    # the loop's last beat came up to one 100 ms tick before it stalled
    assert took >= 0.85, "503 before the bound: %.3f s" % took
    assert all(x.status == 200 for x in seen[:-1]), seen
    doc = seen[-1].json()
    assert doc["status"] == "stuck", doc
    assert len(doc["stuck_workers"]) == 1, doc
    assert doc["stuck_workers"][0]["worker"] in (0, 1), doc
    assert 1000 < doc["stuck_workers"][0]["silent_ms"] < 3000, doc
    assert seen[-1].header("x-request-id"), seen[-1]
    # /readyz is about dependencies, not loops: unchanged
    assert tgtest.admin(gw, "/readyz").status == 200
    # the loop turns again: the request it held is answered, /healthz is 200
    t.join(5)
    assert got and got[0].status == 200, got
    tgtest.wait_for(lambda: tgtest.admin(gw, "/healthz").status == 200, timeout=1.0,
                    interval=0.05, what="/healthz 200 after the stall")
    assert "worker_stall fails on pass 1" in gw.proc.stderr_text()
