"""Whole (non-streamed) answers too big to keep: past 1 MiB a 200 answer is
relayed as it arrives (chunked), in the gateway's bounded memory, instead of
being kept whole (it used to be kept up to 16 MiB, and a bigger one was a
502 to the client and $0 in the ledger). A batch of embeddings easily
passes 16 MiB: 64 inputs of 32,768 dimensions are 26 MB of JSON.

- the client gets exactly what the upstream sent, and the ledger the
  upstream's usage, read from the answer as it passed;
- a client that stops reading pauses the upstream, and the gateway's memory
  does not follow the answer (nor does the upstream idle timeout run);
- without usage an answer is billed from above: a chat answer one token per
  byte it carried, embeddings the prompt estimate;
- an answer that turns out not to be one JSON object is cut (the client
  sees a truncated response, never its closing brace), counted against the
  endpoint, and billed for what it carried; so is one a client leaves.

Prices: 500 / 1500 nano-USD per prompt / completion token."""

import json
import time

import pytest

import tgtest

M = "llama-3.1-8b"
EMBED = "nomic-embed-text"
P, C = 500, 1500
KEEP_MAX = 1024 * 1024          # RESP_KEEP_MAX


def start_gw(tg, url, **kw):
    e = tgtest.model_entry([url])
    e["kind"] = "embedding"
    tenants = {"acme": tgtest.limited_tenant(models=[M, EMBED], rpm=100000, daily="100.00")}
    return tg.gateway({M: tgtest.model_entry([url]), EMBED: e}, tenants=tenants, **kw)


def embed_body(n, dim):
    return {"model": EMBED, "input": ["text number %d" % i for i in range(n)], "dimensions": dim}


def row_of(gw, rid):
    return tgtest.sqlite_ledger_row(gw.db_path, rid)


def bad_responses(gw):
    """The endpoint's bad answers (it serves both models: one pool's count)."""
    metrics = tgtest.parse_metrics(tgtest.admin(gw, "/metrics").body.decode())
    return sum(v for k, v in metrics.items()
               if k.startswith("llm_upstream_errors_total{") and 'pool="%s"' % M in k)


def test_big_answers_are_relayed_whole_and_billed_from_their_usage(tg):
    sim = tg.sim()
    gw = start_gw(tg, sim.url)
    rows = []
    # just past the bound kept whole, and past the old 16 MiB bound
    for n, dim in ((16, 8192), (64, 32768)):
        body = embed_body(n, dim)
        direct = tgtest.request(sim.port, "POST", "/v1/embeddings", body, timeout=60)
        r = tgtest.request(gw.port, "POST", "/v1/embeddings", body, key=gw.keys["acme"],
                           timeout=60)
        assert r.status == 200, r
        assert len(r.body) > KEEP_MAX and abs(len(r.body) - len(direct.body)) < 64
        assert r.header("transfer-encoding") == "chunked" and r.header("x-request-id")
        assert r.header("x-ratelimit-remaining-requests") is not None
        got, want = r.json(), direct.json()
        assert got["data"] == want["data"] and got["usage"] == want["usage"]
        row = row_of(gw, r.header("x-request-id"))
        assert (row["status"], row["usage_counted"], row["prompt_tokens"],
                row["completion_tokens"], row["cost_nano"]) == \
            (200, 0, want["usage"]["prompt_tokens"], 0, want["usage"]["prompt_tokens"] * P), row
        rows.append(row)
    u = gw.usage("acme", tgtest.utc_day(rows[0]["ts_ms"] / 1000))
    assert u["spend_nano_usd"] == sum(r["cost_nano"] for r in rows), u
    assert bad_responses(gw) == 0


@pytest.mark.parametrize("client", ["native", "curl"])
def test_a_slow_reader_of_a_big_answer_pauses_the_upstream_in_bounded_memory(tg, client):
    """26 MB that the client does not read for 3 s (the upstream idle
    timeout is 1 s): the gateway's memory grows by far less than the
    answer, and the answer then arrives whole; with either upstream
    client."""
    sim = tg.sim()
    gw = start_gw(tg, sim.url, workers=1,
                  overrides={"timeouts": {"upstream_idle": "1s"}, "upstream_client": client})
    body = embed_body(64, 32768)
    rss0 = gw.rss_kb()
    conn = tgtest.RawConn(gw.port, rcvbuf=4096, timeout=60)
    try:
        conn.send(tgtest.http_request_bytes("POST", "/v1/embeddings", body,
                                            key=gw.keys["acme"]))
        time.sleep(1.5)
        rss1 = gw.rss_kb()
        time.sleep(1.5)
        rss2 = gw.rss_kb()
        print("slow reader of a 26 MB answer: RSS %d -> %d -> %d KiB" % (rss0, rss1, rss2))
        # a gateway that kept the answer whole would have grown by >= 25 MiB
        assert rss2 - rss0 < 8192, "RSS grew %d KiB" % (rss2 - rss0)
        r = conn.read_response(method="POST")
    finally:
        conn.close()
    assert r.status == 200 and r.complete, r
    answer = json.loads(r.body)
    assert len(answer["data"]) == 64 and len(answer["data"][63]["embedding"]) == 32768
    row = row_of(gw, r.header("x-request-id"))
    assert (row["status"], row["usage_counted"]) == (200, 0), row
    assert bad_responses(gw) == 0


def test_big_answers_without_usage_are_billed_from_above(tg):
    sim = tg.sim()
    gw = start_gw(tg, sim.url)
    no_usage = {"x-sim-fault": "no-usage"}
    chat = {"model": M, "prompt": "go", "max_tokens": 100000, "n": 2}
    r = tgtest.request(gw.port, "POST", "/v1/completions", chat, headers=no_usage,
                       key=gw.keys["acme"], timeout=60)
    assert r.status == 200 and r.header("transfer-encoding") == "chunked", r
    assert len(r.body) > KEEP_MAX and "usage" not in r.json()
    row = row_of(gw, r.header("x-request-id"))
    est = tgtest.prompt_estimate(chat)
    assert (row["usage_counted"], row["prompt_tokens"], row["completion_tokens"],
            row["cost_nano"]) == (1, est, len(r.body), est * P + len(r.body) * C), row

    emb = embed_body(16, 8192)
    r = tgtest.request(gw.port, "POST", "/v1/embeddings", emb, headers=no_usage,
                       key=gw.keys["acme"], timeout=60)
    assert r.status == 200 and len(r.body) > KEEP_MAX and "usage" not in r.json()
    row = row_of(gw, r.header("x-request-id"))
    est = tgtest.prompt_estimate(emb)
    assert (row["usage_counted"], row["prompt_tokens"], row["completion_tokens"],
            row["cost_nano"]) == (1, est, 0, est * P), row


def test_a_big_answer_that_is_not_one_json_object_is_cut(tg):
    """Relayed bytes cannot become a 502 any more: the client sees the
    response cut (no closing brace, no last chunk), the endpoint a
    bad_response, and the row a 502 billed for the bytes it carried."""
    pad = b"x" * (2 * KEEP_MAX)
    up = tgtest.FakeUpstream(status=200)
    try:
        gw = start_gw(tg, up.url)
        body = tgtest.chat_body(M, max_tokens=5)
        est = tgtest.prompt_estimate(body)
        for answer in (b'{"choices":[{"text":"' + pad,             # never closes
                       b'{"pad":"' + pad + b'"} trailing',         # bytes after the object
                       b'[{"pad":"' + pad + b'"}]'):               # not an object
            before = bad_responses(gw)
            up.body = answer
            conn = tgtest.RawConn(gw.port, timeout=30)
            try:
                conn.send(tgtest.http_request_bytes("POST", "/v1/chat/completions", body,
                                                    key=gw.keys["acme"]))
                r = conn.read_response(method="POST")
            finally:
                conn.close()
            assert r.status == 200 and not r.complete, r
            assert len(r.body) >= 2 * KEEP_MAX and not r.body.rstrip().endswith(b"}")
            row = row_of(gw, r.header("x-request-id"))
            assert (row["status"], row["usage_counted"], row["prompt_tokens"],
                    row["completion_tokens"]) == (502, 1, est, len(answer)), row
            assert bad_responses(gw) == before + 1
            e = gw.access_entry(r.header("x-request-id"), timeout=5.0)
            assert e["status"] == 502 and e["error"] == "bad_upstream_response", e

        # an error answer (not 200) is kept whole, up to the same bound
        up.status, up.body = 400, b'{"error":{"message":"' + pad + b'"}}'
        r = tgtest.chat(gw.port, gw.keys["acme"], M, max_tokens=5)
        assert r.status == 502 and "size limit" in r.error()["message"], r
        up.body = b'{"error":{"message":"too long a prompt"}}'
        r = tgtest.chat(gw.port, gw.keys["acme"], M, max_tokens=5)
        assert r.status == 400 and r.json() == {"error": {"message": "too long a prompt"}}, r
    finally:
        up.close()


def test_a_client_leaving_a_big_answer_is_billed_for_the_prompt(tg):
    """The upstream's usage comes last: a client that leaves after the first
    bytes of an embeddings answer is billed the prompt estimate (499)."""
    sim = tg.sim()
    gw = start_gw(tg, sim.url, workers=1)
    body = embed_body(64, 32768)
    conn = tgtest.RawConn(gw.port, rcvbuf=4096, timeout=30)
    conn.send(tgtest.http_request_bytes("POST", "/v1/embeddings", body, key=gw.keys["acme"]))
    status, _, hdrs = conn.read_head()
    assert status == 200
    rid = dict(hdrs)["x-request-id"]
    next(conn.iter_body(hdrs, "POST", status))
    conn.abort()
    row = tgtest.wait_for(lambda: tgtest.sqlite_ledger_rows(gw.db_path, "WHERE request_id = ?",
                                                            (rid,)),
                          timeout=10, what="the ledger row")[0]
    est = tgtest.prompt_estimate(body)
    assert (row["status"], row["usage_counted"], row["prompt_tokens"], row["completion_tokens"],
            row["cost_nano"]) == (499, 1, est, 0, est * P), row
    assert tgtest.request(gw.port, "POST", "/v1/embeddings", embed_body(2, 8),
                          key=gw.keys["acme"]).status == 200


def test_a_big_whole_answer_is_billed_its_usage(tg):
    """A completion answer past 1 MiB (n and max_tokens large) is relayed as
    it comes and billed its usage alone: the bytes counted while it was
    relayed (in case no usage came) were added to it, a token a byte (ten
    times the price here)."""
    sim = tg.sim()
    gw = tg.gateway({M: [sim.url]}, workers=1)
    body = {"model": M, "prompt": "go", "max_tokens": 100000, "n": 2}
    r = tgtest.request(gw.port, "POST", "/v1/completions", body, key=gw.keys["acme"], timeout=60)
    assert r.status == 200 and len(r.body) > 1024 * 1024, (r.status, len(r.body))
    u = r.json()["usage"]
    row = tgtest.sqlite_ledger_row(gw.db_path, r.header("x-request-id"))
    assert (row["usage_counted"], row["prompt_tokens"], row["completion_tokens"]) == \
        (0, u["prompt_tokens"], u["completion_tokens"]), (row, u)

