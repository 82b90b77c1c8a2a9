"""Whole (non-streamed) answers that come without a usable `usage` object,
as some OpenAI-compatible upstreams and proxies send them: the gateway bills
them from above instead of $0.

- chat and legacy completions without usage (the simulator's
  `x-sim-fault: no-usage`): the ledger row says usage_counted 1, prompt =
  the gateway's prompt estimate, completion = the bytes of the generated
  text the client received (never fewer than the simulator's real tokens,
  read from the same request with usage), cost = those figures x prices to
  the nano-USD; the invoice, the day's usage, the tenant's settled daily
  spend and the token counters all hold them;
- embeddings without usage: the prompt estimate, no completion;
- an answer past the walk's bound (1 MiB): its length in bytes;
- a usage present but unusable (no completion_tokens, a string count)
  counts as none; a complete one is taken as it is.

Prices: 500 / 1500 nano-USD per prompt / completion token."""

import json
import re
import time
from decimal import Decimal

import pytest

import tgtest

M = "llama-3.1-8b"
EMBED = "nomic-embed-text"
P, C = 500, 1500
NO_USAGE = {"x-sim-fault": "no-usage"}
WALK_MAX = 1024 * 1024          # TG_ANSWER_WALK_MAX


def start_gw(tg, url):
    e = tgtest.model_entry([url])
    e["kind"] = "embedding"
    tenants = {"acme": tgtest.limited_tenant(models=[M, EMBED], daily="100.00")}
    return tg.gateway({M: tgtest.model_entry([url]), EMBED: e}, tenants=tenants)


def reasoning_bytes(m):
    """A message's reasoning: `reasoning` (vLLM's name) and
    `reasoning_content` (its old one), one text when both say the same."""
    r, rc = m.get("reasoning"), m.get("reasoning_content")
    n = sum(len(v.encode()) for v in (r, rc) if isinstance(v, str))
    return n - len(r.encode()) if isinstance(r, str) and r == rc else n


def generated_bytes(answer):
    """Bytes of the text a model generated in a whole chat or completions
    answer (what the gateway counts as completion tokens without usage)."""
    def s(v):
        return len(v.encode()) if isinstance(v, str) else 0

    def args(a):
        # arguments as JSON itself (TGI) count their compact text
        return s(a) if a is None or isinstance(a, str) else \
            len(json.dumps(a, separators=(",", ":"), ensure_ascii=False).encode())

    def fn(f):
        return s(f.get("name")) + args(f.get("arguments")) if isinstance(f, dict) else 0

    n = 0
    for ch in answer.get("choices") or []:
        n += s(ch.get("text"))
        m = ch.get("message") or {}
        content = m.get("content")
        if isinstance(content, list):
            n += sum(s(p.get("text")) if isinstance(p, dict) else s(p) for p in content)
        else:
            n += s(content)
        n += s(m.get("refusal")) + reasoning_bytes(m) + fn(m.get("function_call"))
        n += sum(fn(t.get("function")) for t in m.get("tool_calls") or [])
    return n


def chunk(**kw):
    """One SSE event of a chat stream with the given members."""
    ev = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": M}
    ev.update(kw)
    return b"data: " + json.dumps(ev).encode() + b"\n\n"


def stream_upstream(tg):
    """A fixed upstream that answers with an event stream, and a gateway in
    front of it; the upstream's body is set per request."""
    up = tgtest.FakeUpstream(status=200)
    up.content_type = "text/event-stream"
    return up, start_gw(tg, up.url)


def row_of(gw, resp):
    return tgtest.sqlite_ledger_row(gw.db_path, resp.header("x-request-id"))


def post(gw, path, body, headers=None):
    r = tgtest.request(gw.port, "POST", path, body, headers=headers, key=gw.keys["acme"],
                       timeout=30)
    assert r.status == 200, r
    return r


def daily_spend_text(gw):
    text = tgtest.admin(gw, "/metrics").body.decode()
    m = re.search(r'^llm_tenant_daily_spend_usd\{tenant="acme"\} (\S+)$', text, re.M)
    return Decimal(m.group(1)), tgtest.parse_metrics(text)


def check_books(gw, rows):
    """The invoice, the day's usage, the settled daily spend and the token
    counters add up exactly the rows."""
    day = tgtest.utc_day(rows[0]["ts_ms"] / 1000)
    assert all(tgtest.utc_day(r["ts_ms"] / 1000) == day for r in rows), "crossed midnight"
    want = [len(rows), sum(r["prompt_tokens"] for r in rows),
            sum(r["completion_tokens"] for r in rows), sum(r["cost_nano"] for r in rows)]
    u = gw.usage("acme", day)
    assert [u["requests"], u["prompt_tokens"], u["completion_tokens"],
            u["spend_nano_usd"]] == want, (u, want)
    inv = gw.invoice("acme", day[:7])
    assert inv["summary"]["total_requests"] == want[0], inv
    assert tgtest.nano_of_usd(inv["summary"]["total_cost_usd"]) == want[3], inv
    tgtest.check_invoice_nano(inv, rows)
    spend, metrics = tgtest.wait_for(
        lambda: (lambda x: x if tgtest.nano_of_usd(x[0]) == want[3] else None)(
            daily_spend_text(gw)),
        timeout=5, what="the settled daily spend")
    assert tgtest.metric_sum(metrics, "llm_tenant_prompt_tokens_total") == want[1]
    assert tgtest.metric_sum(metrics, "llm_tenant_completion_tokens_total") == want[2]


def bill_each(gw, up, body, answer_of, cases):
    """For each (usage, (usage_counted, prompt, completion)) of cases, the
    fixed upstream answers answer_of(usage) to a chat request of body: the
    ledger row holds those figures and their exact cost, and the books add
    up the rows. Returns the responses."""
    rows, answers = [], []
    for usage, want in cases:
        up.body = answer_of(usage)
        r = post(gw, "/v1/chat/completions", body)
        row = row_of(gw, r)
        assert (row["usage_counted"], row["prompt_tokens"], row["completion_tokens"]) == \
            want, (usage, row)
        assert row["cost_nano"] == want[1] * P + want[2] * C, row
        rows.append(row)
        answers.append(r)
    check_books(gw, rows)
    return answers


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions",
     tgtest.chat_body(M, max_tokens=7, n=2,
                      messages=[{"role": "system", "content": "Réponds brièvement."},
                                {"role": "user", "content": "Hello there"}])),
    ("/v1/completions", {"model": M, "prompt": ["Once upon", "a time"], "max_tokens": 5}),
])
def test_whole_answer_without_usage_is_billed_from_above(tg, path, body):
    gw = start_gw(tg, tg.sim().url)
    with_usage = post(gw, path, body)
    real = with_usage.json()["usage"]
    counted = post(gw, path, body, headers=NO_USAGE)
    answer = counted.json()
    assert "usage" not in answer

    # the same request with usage: billed as the upstream reported it
    a = row_of(gw, with_usage)
    assert (a["usage_counted"], a["prompt_tokens"], a["completion_tokens"]) == \
        (0, real["prompt_tokens"], real["completion_tokens"]), a
    # without: from above, never less than what the upstream really made
    b = row_of(gw, counted)
    est, text = tgtest.prompt_estimate(body), generated_bytes(answer)
    assert (b["status"], b["usage_counted"], b["prompt_tokens"], b["completion_tokens"]) == \
        (200, 1, est, text), b
    assert est >= real["prompt_tokens"] and text >= real["completion_tokens"], (b, real)
    assert b["cost_nano"] == est * P + text * C, b
    check_books(gw, [a, b])


def test_media_parts_count_the_models_media_tokens(tg):
    """An image or audio part's tokens depend on the model, not on the bytes
    of its URL: each counts the model's `media_tokens` (default 2,048) in
    the prompt estimate, so a request with pictures reserves and, without
    usage, is billed from above instead of as if the pictures were free
    (they counted 0)."""
    url = tg.sim().url
    vision = "llava-next"
    e = tgtest.model_entry([url])
    e["media_tokens"] = 3000
    tenants = {"acme": tgtest.limited_tenant(models=[M, vision], daily="100.00")}
    gw = tg.gateway({M: tgtest.model_entry([url]), vision: e}, tenants=tenants)
    parts = [{"type": "text", "text": "What is in these pictures?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}},
             {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
             {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]
    rows = []
    for model, media in ((M, 2048), (vision, 3000)):
        body = {"model": model, "max_tokens": 5,
                "messages": [{"role": "user", "content": parts}]}
        est = tgtest.prompt_estimate(body, media_tokens=media)
        assert est == 8 + 8 + len(parts[0]["text"]) + 3 * media
        row = row_of(gw, post(gw, "/v1/chat/completions", body, headers=NO_USAGE))
        assert (row["usage_counted"], row["prompt_tokens"]) == (1, est), row
        rows.append(row)
    check_books(gw, rows)


def test_embeddings_without_usage_bill_the_prompt_estimate(tg):
    gw = start_gw(tg, tg.sim().url)
    body = {"model": EMBED, "input": ["hello", "other text", "ünïcödé"]}
    with_usage = post(gw, "/v1/embeddings", body)
    counted = post(gw, "/v1/embeddings", body, headers=NO_USAGE)
    assert "usage" not in counted.json()
    a, b = row_of(gw, with_usage), row_of(gw, counted)
    assert (a["usage_counted"], a["prompt_tokens"], a["completion_tokens"]) == \
        (0, with_usage.json()["usage"]["prompt_tokens"], 0), a
    est = tgtest.prompt_estimate(body)
    assert (b["usage_counted"], b["prompt_tokens"], b["completion_tokens"], b["cost_nano"]) == \
        (1, est, 0, est * P), b
    assert est >= a["prompt_tokens"]
    check_books(gw, [a, b])


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": M, "prompt": [""] * 16, "max_tokens": 1}),
    ("/v1/completions", {"model": M, "prompt": ["a"] * 8 + [[1, 2]] * 8, "max_tokens": 1}),
    ("/v1/embeddings", {"model": EMBED, "input": [""] * 64}),
])
def test_a_list_of_prompts_bills_each_ones_special_tokens(tg, path, body):
    """Each string of a list of prompts or inputs is tokenized on its own,
    with the model's special tokens (a BOS; an embedding model's CLS and
    SEP), which its bytes do not bound: sixteen empty prompts are sixteen
    tokens upstream (the simulator's BOS), and were estimated at 8, the
    request's own. Without usage that was billed; with it, reserved. Each
    such string adds 8, as a message does; a list of token ids goes to the
    model as it is and adds nothing."""
    gw = start_gw(tg, tg.sim().url)
    real = post(gw, path, body).json()["usage"]["prompt_tokens"]
    row = row_of(gw, post(gw, path, body, headers=NO_USAGE))
    strings = sum(isinstance(p, str) for p in body.get("prompt", body.get("input")))
    est = tgtest.prompt_estimate(body)
    assert est == 8 + sum(len(p) for p in body.get("prompt", body.get("input"))) + 8 * strings
    assert (row["usage_counted"], row["prompt_tokens"]) == (1, est), row
    assert row["prompt_tokens"] >= real, (row, real)


def test_an_answer_past_the_walk_bound_bills_its_length(tg):
    """Two choices of 100,000 tokens are about 1.7 MB: not parsed on the loop
    thread, billed at one token per byte of the answer."""
    gw = start_gw(tg, tg.sim().url)
    body = {"model": M, "prompt": "go", "max_tokens": 100000, "n": 2}
    r = post(gw, "/v1/completions", body, headers=NO_USAGE)
    assert len(r.body) > WALK_MAX
    row = row_of(gw, r)
    assert (row["usage_counted"], row["prompt_tokens"], row["completion_tokens"]) == \
        (1, tgtest.prompt_estimate(body), len(r.body)), row
    assert row["completion_tokens"] > generated_bytes(r.json()) > 200000
    check_books(gw, [row])


def test_tool_call_arguments_written_as_json_are_billed(tg):
    """TGI writes a whole answer's tool-call arguments as a JSON object, not
    as the string of one. Without usage such a call was billed its name
    alone: the arguments count their compact JSON text now, as the same
    arguments in a string do."""
    args = {"location": "Brooklyn, NY", "unit": "celsius", "days": [1, 2.5], "alerts": True}
    text = json.dumps(args, separators=(",", ":"))
    up = tgtest.FakeUpstream(status=200)
    try:
        gw = start_gw(tg, up.url)
        body = tgtest.chat_body(M, max_tokens=200)
        est = tgtest.prompt_estimate(body)
        answers = bill_each(gw, up, body, lambda a: json.dumps({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": M,
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [{
                    "id": "0", "type": "function",
                    "function": {"description": None, "name": "get_weather",
                                 "arguments": a}}]}}]}).encode(),
            ((args, (1, est, len("get_weather") + len(text))),
             (text, (1, est, len("get_weather") + len(text)))))
        assert [generated_bytes(r.json()) for r in answers] == [11 + len(text)] * 2
    finally:
        up.close()


def test_a_usage_without_both_counts_is_counted_as_none(tg):
    """An upstream whose usage lacks completion_tokens, or carries a count as
    text, is billed as if it sent none; one with both counts as it says.
    The answer also holds a tool call, a refusal and multi-byte text."""
    answer = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": M,
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Voilà — “quoted” ✓", "refusal": "non",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}]}}],
    }
    up = tgtest.FakeUpstream(status=200)
    try:
        gw = start_gw(tg, up.url)
        body = tgtest.chat_body(M, max_tokens=50)
        est, text = tgtest.prompt_estimate(body), generated_bytes(answer)
        assert text == len("Voilà — “quoted” ✓non".encode()) + len("get_weather") + 19
        bill_each(gw, up, body, lambda usage: json.dumps(dict(answer, usage=usage)).encode(),
                  (({"prompt_tokens": 12}, (1, est, text)),
                   ({"prompt_tokens": "12", "completion_tokens": 3}, (1, est, text)),
                   ({"prompt_tokens": 12, "completion_tokens": -3}, (1, est, text)),
                   ({"prompt_tokens": 12, "completion_tokens": 3}, (0, 12, 3))))
    finally:
        up.close()


def test_reasoning_under_vllms_current_name_is_billed(tg):
    """vLLM names a reasoning model's chain of thought `reasoning` (it was
    `reasoning_content`, the name OpenRouter and others never used; vLLM
    sent both for a while). A whole answer without usage is billed its
    bytes: `reasoning` counted nothing, so an answer of a thousand bytes of
    reasoning and a word of content was billed the word. The same text
    under both names is one text, counted once."""
    think = "Let me think: the user greets me, so I greet back. " * 20
    msg = {"role": "assistant", "content": "Hello!"}
    up = tgtest.FakeUpstream(status=200)
    try:
        gw = start_gw(tg, up.url)
        body = tgtest.chat_body(M, max_tokens=2000)
        est, n = tgtest.prompt_estimate(body), len("Hello!") + len(think)
        bill_each(gw, up, body, lambda m: json.dumps({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": M,
            "choices": [{"index": 0, "finish_reason": "stop", "message": m}]}).encode(),
            ((dict(msg, reasoning=think), (1, est, n)),
             (dict(msg, reasoning=think, reasoning_content=think), (1, est, n)),
             (dict(msg, reasoning_content=think), (1, est, n)),
             (dict(msg, reasoning=think, reasoning_content="other"), (1, est, n + 5))))
    finally:
        up.close()


def test_a_stream_usage_without_both_counts_is_counted_as_none(tg):
    """A stream whose usage chunk lacks completion_tokens used to be billed
    the upstream's prompt and 0 completion tokens: it is counted instead,
    like a stream without usage (the prompt estimate, one token per content
    event), and the usage chunk the client did not ask for is still not
    relayed."""
    up, gw = stream_upstream(tg)
    try:
        body = tgtest.chat_body(M, max_tokens=50, stream=True)
        est = tgtest.prompt_estimate(body)
        content = [chunk(choices=[{"index": 0, "delta": {"content": w}}])
                   for w in ("Hello", " there", "!")]
        answers = bill_each(
            gw, up, body,
            lambda usage: b"".join(content) + chunk(choices=[], usage=usage) + b"data: [DONE]\n\n",
            (({"prompt_tokens": 12}, (1, est, 3)),
             ({"prompt_tokens": 12, "completion_tokens": 3}, (0, 12, 3))))
        for r in answers:
            assert b'"usage"' not in r.body and r.body.count(b"data: ") == 4, r.body
    finally:
        up.close()


def test_the_answers_own_usage_is_billed_not_a_nested_one(tg):
    """The usage billed is the answer's own member: not a "usage" nested in
    a later member or in a choice, and not a string "usage" after it. An
    answer whose only usage is nested is counted, as one without usage; a
    usage figure past a billion tokens is none (counted instead), one at
    the bound is taken."""
    head = ('{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"%s",'
            '"choices":[{"index":0,"finish_reason":"stop",'
            '"message":{"role":"assistant","content":"Hello there!"}%%s}]' % M)
    own = '"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}'
    small = '"usage":{"prompt_tokens":1,"completion_tokens":1}'
    bodies = [
        (head % "") + "," + own + ',"meta":{' + small + "}}",
        (head % "") + "," + own + ',"x":"usage"}',
        (head % "") + "," + own + ',"x":["usage",{' + small + "}]}",
        (head % ("," + small)) + "}",
        (head % "") + ',"usage":{"prompt_tokens":12,"completion_tokens":1000000001}}',
        (head % "") + ',"usage":{"prompt_tokens":9000000000000000,"completion_tokens":5}}',
        (head % "") + ',"usage":{"prompt_tokens":1000000000,"completion_tokens":3}}',
    ]
    for b in bodies:
        json.loads(b)  # each is one JSON object
    up = tgtest.FakeUpstream(status=200)
    try:
        gw = start_gw(tg, up.url)
        body = tgtest.chat_body(M, max_tokens=50)
        est, text = tgtest.prompt_estimate(body), len("Hello there!")
        bill_each(gw, up, body, lambda b: b.encode(),
                  ((bodies[0], (0, 10, 20)),
                   (bodies[1], (0, 10, 20)),
                   (bodies[2], (0, 10, 20)),
                   (bodies[3], (1, est, text)),
                   (bodies[4], (1, est, text)),
                   (bodies[5], (1, est, text)),
                   (bodies[6], (0, 1000000000, 3))))
    finally:
        up.close()


def test_content_relayed_after_a_streams_usage_is_billed_too(tg):
    """A usage is the total so far: content events an upstream sends after
    it are billed on top (a token each), once; a usage in every chunk
    (vLLM's continuous usage stats) is taken as it is. An empty choices
    list with whitespace inside is no content event, nor is an event
    without choices (vLLM's error event)."""
    def content(w, **kw):
        return chunk(choices=[{"index": 0, "delta": {"content": w}}], **kw)

    done = b"data: [DONE]\n\n"
    late = (content("Hi") + chunk(choices=[], usage={"prompt_tokens": 12, "completion_tokens": 1})
            + content(" there") + content("!") + done)
    every = (content("Hi", usage={"prompt_tokens": 12, "completion_tokens": 1})
             + content(" there", usage={"prompt_tokens": 12, "completion_tokens": 2})
             + content("!", usage={"prompt_tokens": 12, "completion_tokens": 3})
             + chunk(choices=[], usage={"prompt_tokens": 12, "completion_tokens": 3}) + done)
    empty = (content("Hi") + b'data: {"id":"x","choices":[ ]}\n\n'
             + b'data: {"id":"x","choices" : [\t]}\n\n' + done)
    # vLLM's failure inside its generator: a 200 stream of one error event;
    # an event without choices is no content (it was billed the prompt
    # estimate and a token, for a request the upstream refused)
    error = (b'data: {"error":{"message":"prompt too long","type":"BadRequestError",'
             b'"param":null,"code":400}}\n\n' + done)
    error_after = content("Hi") + error
    up, gw = stream_upstream(tg)
    try:
        body = tgtest.chat_body(M, max_tokens=50, stream=True)
        est = tgtest.prompt_estimate(body)
        bill_each(gw, up, body, lambda b: b,
                  ((late, (0, 12, 3)), (every, (0, 12, 3)), (empty, (1, est, 1)),
                   (error, (0, 0, 0)), (error_after, (1, est, 1))))
    finally:
        up.close()


def cut_stream_row(gw, body, events):
    """Streams body through gw from a fixed upstream whose stream ends with
    neither usage nor [DONE]; checks the client got `events` events, and
    returns the stream's ledger row."""
    s = tgtest.SSEStream(gw.port, body, key=gw.keys["acme"])
    assert s.status == 200, s.headers
    rid = s.headers["x-request-id"]
    s.read_all()
    s.close()
    assert not s.done and len(s.all_events) == events, s.all_events
    row, = tgtest.wait_for(
        lambda: tgtest.sqlite_ledger_rows(gw.db_path, "WHERE request_id = ?", (rid,)),
        timeout=10, what="the row of the cut stream")
    return row


def test_a_role_chunk_with_empty_members_is_no_token(tg):
    """A stream cut without usage is billed a token a content event, and
    the chunk that opens a choice with its role and nothing generated is
    none, whatever empty form its other members take: null, "", and an
    empty "tool_calls" list, which was billed as a token."""
    def delta(**d):
        return chunk(choices=[{"index": 0, "delta": d, "finish_reason": None}])

    up, gw = stream_upstream(tg)
    try:
        body = tgtest.chat_body(M, max_tokens=50, stream=True)
        est = tgtest.prompt_estimate(body)
        rows = []
        for role in (delta(role="assistant", tool_calls=[]),
                     delta(role="assistant", content="", tool_calls=[], reasoning_content=None,
                           function_call={})):
            up.body = role + delta(content="Hi") + delta(content=" there")   # cut
            row = cut_stream_row(gw, body, 3)
            assert (row["status"], row["usage_counted"], row["prompt_tokens"],
                    row["completion_tokens"]) == (502, 1, est, 2), row
            assert row["cost_nano"] == est * P + 2 * C, row
            rows.append(row)
        check_books(gw, rows)
    finally:
        up.close()


def test_a_chunk_the_strict_parser_refuses_is_counted_with_usage_null_on_it(tg):
    """OpenAI-style upstreams put "usage": null on every chunk when asked
    for usage (the gateway always asks), so every chunk is read as JSON. A
    content chunk the strict parser refuses (a NUL the model wrote, sent as
    \\u0000) is still content: a stream cut before its usage was billed
    one token short for each, as chunks without "usage" never were."""
    def content(w):
        return chunk(choices=[{"index": 0, "delta": {"content": w}}], usage=None)

    up, gw = stream_upstream(tg)
    try:
        body = tgtest.chat_body(M, max_tokens=50, stream=True)
        est = tgtest.prompt_estimate(body)
        up.body = content("Hi") + content("\x00") + content("!")   # cut: no usage, no [DONE]
        row = cut_stream_row(gw, body, 3)
        assert (row["status"], row["usage_counted"], row["prompt_tokens"],
                row["completion_tokens"]) == (502, 1, est, 3), row
        assert row["cost_nano"] == est * P + 3 * C, row
        check_books(gw, [row])
    finally:
        up.close()


def test_a_client_that_leaves_before_any_answer_pays_the_prompt(tg):
    """A request the upstream is working on, whose client leaves before a
    byte of the answer was relayed (a whole answer still being made, a
    stream before its first token): the upstream may have computed the
    prompt, so the record bills the prompt estimate (status 499, counted,
    no completion) and the tenant's spend holds it. Before, such a request
    cost nothing, so a long prompt and a quick goodbye used the GPU free."""
    sim = tg.sim()
    gw = start_gw(tg, sim.url)
    bodies = [tgtest.chat_body(M, max_tokens=50, content="a long prompt " * 50),
              tgtest.chat_body(M, max_tokens=50, stream=True, content="a long prompt " * 50)]
    slow = {"x-sim-ttft-ms": "3000", "x-sim-token-ms": "100"}
    rows = []
    for n, body in enumerate(bodies):
        c = tgtest.RawConn(gw.port)
        c.send(tgtest.http_request_bytes("POST", "/v1/chat/completions", body,
                                         headers=slow, key=gw.keys["acme"]))
        tgtest.wait_for(lambda: sim.metric(tgtest.SIM_RUNNING) == 1, timeout=5,
                        what="the request at the backend")
        time.sleep(0.2)
        c.close()
        entries = tgtest.wait_for(
            lambda: [e for e in gw.access_log_entries()
                     if e.get("path") == "/v1/chat/completions"][n:], timeout=5,
            what="the access-log line")
        assert entries[0]["status"] == 499, entries
        tgtest.wait_for(lambda: sim.metric(tgtest.SIM_RUNNING) == 0, timeout=5,
                        what="the backend's request cancelled")
        row = tgtest.sqlite_ledger_row(gw.db_path, entries[0]["request_id"])
        est = tgtest.prompt_estimate(body)
        assert (row["status"], row["usage_counted"], row["prompt_tokens"],
                row["completion_tokens"], row["cost_nano"]) == (499, 1, est, 0, est * P), row
        rows.append(row)
    check_books(gw, rows)


@pytest.mark.parametrize("n", [1, 2])
def test_a_cut_stream_is_billed_its_tokens_not_its_role_chunks(tg, n):
    """vLLM opens each choice of a chat stream with a chunk that announces
    the role and carries no content (so does the simulator). A stream that
    ends without usage is billed one token a content event relayed: the
    role chunks are none. Before, every such stream was billed a token a
    choice more than it relayed: an upstream that hung up after 3 tokens,
    and a client that left after 2 while the upstream held the rest."""
    sim = tg.sim()
    gw = start_gw(tg, sim.url)
    rows = []
    for fault, tokens, leaves in (("disconnect-after:3", 3, False), ("stall-after:2", 2, True)):
        body = tgtest.chat_body(M, max_tokens=50, stream=True, n=n, include_usage=True)
        s = tgtest.SSEStream(gw.port, body, key=gw.keys["acme"], headers={"x-sim-fault": fault})
        assert s.status == 200, s.headers
        rid, roles, content = s.headers.get("x-request-id"), 0, 0
        try:
            for ev in s.events():
                ch = ev.json()["choices"]
                delta = ch[0]["delta"]
                roles += delta == {"role": "assistant", "content": ""}
                content += bool(delta.get("content"))
                if leaves and content == tokens * n:
                    break                    # all the upstream will send: the client leaves
        finally:
            s.close()
        assert (roles, content, s.done) == (n, tokens * n, False)
        row, = tgtest.wait_for(
            lambda: tgtest.sqlite_ledger_rows(gw.db_path, "WHERE request_id = ?", (rid,)),
            timeout=10, what="the row of the cut stream")
        est = tgtest.prompt_estimate(body)
        assert (row["status"], row["usage_counted"], row["prompt_tokens"],
                row["completion_tokens"]) == (499 if leaves else 502, 1, est, tokens * n), row
        assert row["cost_nano"] == est * P + tokens * n * C, row
        rows.append(row)
    check_books(gw, rows)
