"""tollgate-sim, the OpenAI-compatible backend simulator, driven over real
sockets: response shapes and exact usage numbers, streaming and its timing,
the continuous-batching capacity, every injected fault, client cancellation,
back-pressure, and a clean exit (status 0, no sanitizer report) on SIGTERM.

Self-contained: it starts the binary from $TG_BUILD_DIR (default
/work/main/build) on a free loopback port and stops it itself."""

import base64
import http.client
import json
import math
import os
import random
import select
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

BUILD_DIR = os.environ.get("TG_BUILD_DIR", "/work/main/build")
SIM = os.path.join(BUILD_DIR, "tollgate-sim")

pytestmark = pytest.mark.skipif(not os.access(SIM, os.X_OK), reason="tollgate-sim not built")


# ---- helpers ---------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sim:
    """A running tollgate-sim; stop() asserts it exits 0 and silently."""

    def __init__(self, *args):
        self.port = free_port()
        env = dict(os.environ)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1")
        self.proc = subprocess.Popen(
            [SIM, "--listen", "127.0.0.1:%d" % self.port, *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self.stderr = b""
        deadline = time.monotonic() + 10
        while b"listening on" not in self.stderr:
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, self.stderr.decode(errors="replace")
            ready, _, _ = select.select([self.proc.stderr], [], [], left)
            if ready:
                chunk = os.read(self.proc.stderr.fileno(), 4096)
                assert chunk, self.stderr.decode(errors="replace")
                self.stderr += chunk
        assert ("tollgate-sim listening on 127.0.0.1:%d" % self.port).encode() in self.stderr

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError("tollgate-sim did not exit on SIGTERM")
        self.stderr += err
        text = self.stderr.decode(errors="replace")
        assert self.proc.returncode == 0, text
        assert "Sanitizer" not in text and "runtime error" not in text, text

    def conn(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=10):
        c = self.conn(timeout)
        try:
            data = json.dumps(body) if isinstance(body, (dict, list)) else body
            h = {"Content-Type": "application/json"}
            h.update(headers or {})
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
        finally:
            c.close()

    def post(self, path, body, headers=None, timeout=10):
        status, hdrs, data = self.request("POST", path, body, headers, timeout)
        return status, hdrs, data

    def metrics(self):
        status, _, data = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for line in data.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = int(value)
        return out

    def wait_metrics(self, timeout=5, **want):
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if all(m["sim_" + k] == v for k, v in want.items()):
                return m
            if time.monotonic() > deadline:
                raise AssertionError("metrics %r never reached %r" % (m, want))
            time.sleep(0.02)


def start_stream(sim, path, body, headers=None, rcvbuf=None):
    """Sends a streaming request on a raw socket; returns the socket with
    the response head consumed and a reader of SSE events."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", sim.port))
    data = json.dumps(body).encode()
    head = "POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
        path, len(data))
    for k, v in (headers or {}).items():
        head += "%s: %s\r\n" % (k, v)
    s.sendall(head.encode() + b"\r\n" + data)
    return s


class ChunkedReader:
    """Reads a chunked HTTP response from a socket, event by event, noting
    when each SSE event arrived. Offsets instead of slicing keep a long
    stream linear."""

    def __init__(self, sock, timeout=10):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.raw = bytearray()
        self.rpos = 0
        self.body = bytearray()
        self.bpos = 0
        self.ended = False     # the terminating 0-size chunk arrived
        self.closed = False    # the server closed the connection
        self.status = None
        self.headers = {}
        self._read_head()

    def _more(self):
        data = self.sock.recv(262144)
        if not data:
            self.closed = True
            return False
        if self.rpos > 1 << 20:
            del self.raw[:self.rpos]
            self.rpos = 0
        self.raw += data
        return True

    def _read_head(self):
        while self.raw.find(b"\r\n\r\n") < 0:
            if not self._more():
                raise ConnectionError("closed before the response head")
        end = self.raw.find(b"\r\n\r\n")
        lines = bytes(self.raw[:end]).decode().split("\r\n")
        self.rpos = end + 4
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            k, v = line.split(":", 1)
            self.headers[k.strip().lower()] = v.strip()

    def _decode(self):
        while not self.ended:
            eol = self.raw.find(b"\r\n", self.rpos)
            if eol < 0:
                return
            size = int(bytes(self.raw[self.rpos:eol]), 16)
            if len(self.raw) < eol + 2 + size + 2:
                return
            if size == 0:
                self.ended = True
            self.body += self.raw[eol + 2:eol + 2 + size]
            self.rpos = eol + 2 + size + 2

    def event(self):
        """The next SSE data payload (str), or None at the end of the stream."""
        while True:
            self._decode()
            end = self.body.find(b"\n\n", self.bpos)
            if end >= 0:
                ev = bytes(self.body[self.bpos:end])
                self.bpos = end + 2
                if self.bpos > 1 << 20:
                    del self.body[:self.bpos]
                    self.bpos = 0
                assert ev.startswith(b"data: "), ev
                return ev[6:].decode()
            if self.ended or self.closed:
                return None
            self._more()

    def events(self):
        out = []
        while True:
            ev = self.event()
            if ev is None:
                return out
            out.append((time.monotonic(), ev))


def stream(sim, path, body, headers=None):
    s = start_stream(sim, path, body, headers)
    try:
        rd = ChunkedReader(s)
        assert rd.status == 200
        assert rd.headers["content-type"] == "text/event-stream"
        evs = rd.events()
        assert rd.ended, "stream did not end with the terminating chunk"
        return evs
    finally:
        s.close()


def chat(content, **kw):
    body = {"model": "m1", "messages": [{"role": "user", "content": content}]}
    body.update(kw)
    return body


# the type vLLM's OpenAI server gives an error: its handlers' class names,
# else the status's reason phrase (its handler of HTTP exceptions)
VLLM_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "Method Not Allowed",
              429: "Too Many Requests", 500: "InternalServerError", 502: "Bad Gateway",
              503: "Service Unavailable"}


def assert_error(status, data, want_status, vllm=True):
    """An error body of want_status; with vllm, in vLLM's shape: its type
    for the status, param null and the status as a number in code."""
    assert status == want_status
    err = json.loads(data)["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert "code" in err
    if vllm:
        assert (err["type"], err["param"], err["code"]) == \
            (VLLM_TYPES[want_status], None, want_status), err
        assert type(err["code"]) is int, err


@pytest.fixture(scope="module")
def sim():
    s = Sim("--models", "m1,m2,m3", "--embedding-dim", "6")
    yield s
    s.stop()


# ---- shapes and usage ------------------------------------------------------

def test_chat_completion_shape_and_exact_usage(sim):
    # "hello world!" is 12 bytes: ceil(12/4) + 4 per message, + 2
    status, hdrs, data = sim.post("/v1/chat/completions", chat("hello world!", max_tokens=5))
    assert status == 200
    assert hdrs["content-type"] == "application/json"
    r = json.loads(data)
    assert r["object"] == "chat.completion"
    assert r["id"].startswith("chatcmpl-")
    assert r["model"] == "m1"
    assert isinstance(r["created"], int) and abs(r["created"] - time.time()) < 60
    assert len(r["choices"]) == 1
    ch = r["choices"][0]
    assert ch["index"] == 0
    assert ch["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4"}
    assert ch["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def test_chat_prompt_estimate_sums_messages_and_parts(sim):
    body = {"model": "x/y \"quoted\"", "messages": [
        {"role": "system", "content": "a" * 17},                     # 5 + 4
        {"role": "user", "content": [{"type": "text", "text": "abcd"},
                                     {"type": "text", "text": "efgh"}]},  # 2 + 4
        {"role": "assistant", "content": None},                      # 0 + 4
    ], "max_completion_tokens": 2}
    status, _, data = sim.post("/v1/chat/completions", body)
    assert status == 200
    r = json.loads(data)
    assert r["model"] == "x/y \"quoted\""
    assert r["usage"] == {"prompt_tokens": 21, "completion_tokens": 2, "total_tokens": 23}


def test_default_tokens_finish_stop_and_ids_unique(sim):
    ids = set()
    for _ in range(3):
        status, _, data = sim.post("/v1/chat/completions", chat("hi"))
        r = json.loads(data)
        ids.add(r["id"])
        assert status == 200
        assert r["usage"]["completion_tokens"] == 16
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["choices"][0]["message"]["content"].split() == ["tok%d" % i for i in range(16)]
    assert len(ids) == 3


def test_answer_tokens_end_an_answer_before_its_limit():
    """--answer-tokens: an answer ends there ("stop") when its limit allows
    more, as a model's does at its end of sequence; a smaller limit still
    cuts it ("length")."""
    s = Sim("--answer-tokens", "5")
    try:
        for body, n, finish in [(chat("hi", max_tokens=4096), 5, "stop"),
                                (chat("hi", max_tokens=3), 3, "length"),
                                (chat("hi"), 5, "stop")]:
            status, _, data = s.post("/v1/chat/completions", body)
            r = json.loads(data)
            assert status == 200, data
            assert r["usage"]["completion_tokens"] == n, (body, r)
            assert r["choices"][0]["finish_reason"] == finish, (body, r)
    finally:
        s.stop()


def test_max_tokens_past_the_bound_is_a_400_like_vllms(sim):
    """A limit past the 100000 tokens a choice may have is refused as vLLM
    refuses one past its context (it was served 100000 tokens and "stop",
    hiding a gateway that sent a limit no real server takes); the bound
    itself is served in full."""
    for path, body in (("/v1/completions", {"prompt": "", "max_tokens": 10 ** 9}),
                       ("/v1/completions", {"prompt": "", "max_tokens": 100001}),
                       ("/v1/chat/completions", chat("x", max_completion_tokens=100001.0)),
                       ("/v1/chat/completions", chat("x", max_completion_tokens=0,
                                                     max_tokens=2 ** 62))):
        status, _, data = sim.post(path, dict(body, model="m"))
        assert_error(status, data, 400)
        asked = body.get("max_completion_tokens") or body["max_tokens"]
        assert json.loads(data)["error"]["message"] == (
            "'max_tokens' or 'max_completion_tokens' is too large: %d. This model generates "
            "at most 100000 tokens per choice (%d > 100000)." % (asked, asked)), data
    status, _, data = sim.post("/v1/completions", {"model": "m", "prompt": "", "max_tokens": 100000})
    r = json.loads(data)
    assert status == 200
    assert r["usage"]["completion_tokens"] == 100000
    assert r["choices"][0]["finish_reason"] == "length"


def test_completions_shape_and_usage(sim):
    status, _, data = sim.post("/v1/completions", {"model": "m2", "prompt": "abcdefghi", "max_tokens": 3})
    assert status == 200
    r = json.loads(data)
    assert r["object"] == "text_completion"
    assert r["id"].startswith("cmpl-")
    assert r["model"] == "m2"
    assert r["choices"] == [{"index": 0, "text": "tok0 tok1 tok2", "logprobs": None,
                             "finish_reason": "length"}]
    # ceil(9/4) + 1
    assert r["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_completions_list_of_prompts(sim):
    status, _, data = sim.post("/v1/completions", {"model": "m", "prompt": ["abcd", "abcde"], "max_tokens": 2})
    r = json.loads(data)
    assert status == 200
    assert [c["index"] for c in r["choices"]] == [0, 1]
    # (1 + 1) + (2 + 1) prompt tokens, 2 tokens per choice
    assert r["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


def test_embeddings_shape_determinism_and_usage(sim):
    status, _, data = sim.post("/v1/embeddings", {"model": "emb", "input": ["hello", "hello", "other text"]})
    assert status == 200
    r = json.loads(data)
    assert r["object"] == "list"
    assert r["model"] == "emb"
    assert [d["index"] for d in r["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in r["data"])
    vecs = [d["embedding"] for d in r["data"]]
    assert all(len(v) == 6 for v in vecs)
    assert vecs[0] == vecs[1] and vecs[0] != vecs[2]
    assert abs(math.sqrt(sum(x * x for x in vecs[0])) - 1.0) < 1e-5
    # ceil(5/4) + ceil(5/4) + ceil(10/4)
    assert r["usage"] == {"prompt_tokens": 7, "total_tokens": 7}

    status, _, data = sim.post("/v1/embeddings", {"model": "emb", "input": "hello"})
    single = json.loads(data)
    assert single["data"][0]["embedding"] == vecs[0]
    assert single["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


def test_embeddings_base64_matches_floats(sim):
    _, _, data = sim.post("/v1/embeddings", {"model": "e", "input": "abc"})
    floats = json.loads(data)["data"][0]["embedding"]
    _, _, data = sim.post("/v1/embeddings", {"model": "e", "input": "abc", "encoding_format": "base64"})
    raw = base64.b64decode(json.loads(data)["data"][0]["embedding"])
    decoded = struct.unpack("<6f", raw)
    assert all(abs(a - b) < 1e-6 for a, b in zip(decoded, floats))


def test_models_health_and_unknown_paths(sim):
    status, _, data = sim.request("GET", "/v1/models")
    assert status == 200
    r = json.loads(data)
    assert r["object"] == "list"
    assert [m["id"] for m in r["data"]] == ["m1", "m2", "m3"]
    assert all(m["object"] == "model" for m in r["data"])
    status, _, data = sim.request("GET", "/health")
    assert (status, data) == (200, b"ok")
    for path in ("/v1/nothing", "/v1/modelsx", "/v1/models/", "/healthz"):
        status, _, data = sim.request("GET", path)
        assert_error(status, data, 404)
    # a known path asked with another method: 405 naming the one it takes
    for method, path, allow in (("GET", "/v1/chat/completions", "POST"),
                                ("PUT", "/v1/embeddings", "POST"),
                                ("POST", "/v1/models", "GET"), ("DELETE", "/v1/models/m1", "GET"),
                                ("POST", "/health", "GET"), ("POST", "/metrics", "GET")):
        status, hdrs, data = sim.request(method, path, "{}")
        assert_error(status, data, 405)
        assert hdrs["allow"] == allow


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", "{not json"),
    ("/v1/chat/completions", "[1, 2]"),
    ("/v1/chat/completions", json.dumps({"model": "m"})),
    ("/v1/chat/completions", json.dumps(chat("x", max_tokens=0))),
    ("/v1/chat/completions", json.dumps(chat("x", max_tokens="7"))),
    ("/v1/chat/completions", json.dumps(chat("x", stream_options={"include_usage": True}))),
    ("/v1/completions", json.dumps({"model": "m"})),
    ("/v1/embeddings", json.dumps({"model": "m", "input": 5})),
    # bad input of every kind: numbers out of range or of the wrong type,
    # shapes a server refuses, bodies that are not JSON at all
    ("/v1/chat/completions", ""),
    ("/v1/chat/completions", "[" * 100000),
    ("/v1/chat/completions", b'{"model": "m", "messages": "\xff"}'),
    ("/v1/chat/completions", json.dumps(chat("x", max_tokens=-1))),
    ("/v1/chat/completions", json.dumps(chat("x", max_tokens=1e300))),
    ("/v1/chat/completions", json.dumps(chat("x", max_tokens=2 ** 70))),
    ("/v1/chat/completions", json.dumps(chat("x", max_tokens=2.5))),
    ("/v1/chat/completions", json.dumps(chat("x", max_tokens=True))),
    ("/v1/chat/completions", json.dumps(chat("x", max_completion_tokens=-5))),
    ("/v1/chat/completions", json.dumps(chat("x", n=0))),
    ("/v1/chat/completions", json.dumps(chat("x", n=17))),
    ("/v1/chat/completions", json.dumps(chat("x", n=10 ** 30))),
    ("/v1/chat/completions", json.dumps(chat("x", n="2"))),
    ("/v1/chat/completions", json.dumps(chat("x", stream="yes"))),
    ("/v1/chat/completions", json.dumps(chat("x", stream=True, stream_options=[]))),
    ("/v1/chat/completions", json.dumps(chat("x", priority=1.5))),
    ("/v1/chat/completions", json.dumps(chat("x", model=5))),
    ("/v1/chat/completions", json.dumps(chat("x", model=""))),
    ("/v1/chat/completions", json.dumps(chat("x", model="m" * 257))),
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": []})),
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": [{"content": "x"}]})),
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": [{"role": "user", "content": 5}]})),
    ("/v1/completions", json.dumps({"model": "m", "prompt": []})),
    ("/v1/completions", json.dumps({"model": "m", "prompt": [[]]})),
    ("/v1/completions", json.dumps({"model": "m", "prompt": ["a", 1]})),
    ("/v1/completions", json.dumps({"model": "m", "prompt": ["a"] * 17})),
    ("/v1/completions", json.dumps({"model": "m", "prompt": ["a"] * 4, "n": 5})),
    ("/v1/embeddings", json.dumps({"model": "m", "input": []})),
    ("/v1/embeddings", json.dumps({"model": "m", "input": ["x"] * 2049})),
    ("/v1/embeddings", json.dumps({"model": "m", "input": "x", "dimensions": 0})),
    ("/v1/embeddings", json.dumps({"model": "m", "input": "x", "dimensions": 65537})),
    ("/v1/embeddings", json.dumps({"model": "m", "input": "x", "encoding_format": 5})),
])
def test_bad_requests_get_openai_400(sim, path, body):
    before = sim.metrics()
    status, _, data = sim.post(path, body)
    assert_error(status, data, 400)
    # refused before admission: no slot taken, nothing counted but the request
    m = sim.metrics()
    assert m["sim_requests_total"] == before["sim_requests_total"] + 1
    for k in ("running", "waiting"):
        assert m["sim_requests_" + k] == 0
    for k in ("sim_requests_completed_total", "sim_requests_aborted_total",
              "sim_requests_faulted_total", "sim_prompt_tokens_total"):
        assert m[k] == before[k], k


def test_unknown_model_is_echoed_or_404_with_strict_models(sim):
    status, _, data = sim.post("/v1/chat/completions", chat("x", model="elsewhere", max_tokens=1))
    assert status == 200 and json.loads(data)["model"] == "elsewhere"
    s = Sim("--models", "m1,m2", "--strict-models")
    try:
        for path, body in (("/v1/chat/completions", chat("x", model="zz")),
                           ("/v1/completions", {"model": "zz", "prompt": "x", "stream": True}),
                           ("/v1/embeddings", {"model": "zz", "input": "x"})):
            status, _, data = s.post(path, body)
            assert_error(status, data, 404)
            assert json.loads(data)["error"]["message"] == "The model 'zz' does not exist."
        # the body's own faults come first, as in vLLM
        status, _, data = s.post("/v1/chat/completions", chat("x", model="zz", n=0))
        assert_error(status, data, 400)
        for body in (chat("x", model="m2", max_tokens=1), {"messages": [{"role": "user"}]}):
            status, _, data = s.post("/v1/chat/completions", body)
            assert status == 200, data
        m = s.metrics()
        assert (m["sim_requests_total"], m["sim_requests_completed_total"],
                m["sim_prompt_tokens_total"]) == (6, 2, 7 + 6)
    finally:
        s.stop()


def test_max_completion_tokens_zero_falls_back_to_max_tokens(sim):
    # vLLM reads `max_completion_tokens or max_tokens`: 0 and 0.0 alike
    for zero in (0, 0.0):
        status, _, data = sim.post("/v1/chat/completions",
                                   chat("x", max_completion_tokens=zero, max_tokens=3))
        assert status == 200, data
        assert json.loads(data)["usage"]["completion_tokens"] == 3


def test_embeddings_past_the_answer_bound_are_refused_at_once(sim):
    """2048 inputs of 65536 dimensions would be gigabytes of JSON: a 400 at
    once, not a loop busy building it (it used to answer 1.7 GB, the
    buffer's bound lost)."""
    t0 = time.monotonic()
    status, _, data = sim.post("/v1/embeddings", {"model": "e", "input": ["x"] * 2048,
                                                  "dimensions": 65536})
    assert_error(status, data, 400)
    assert "2048 inputs of 65536 dimensions" in json.loads(data)["error"]["message"]
    assert time.monotonic() - t0 < 2
    # base64 is under half the size of JSON floats: a bigger batch fits
    status, _, data = sim.post("/v1/embeddings", {"model": "e", "input": ["x"] * 16,
                                                  "dimensions": 65536,
                                                  "encoding_format": "base64"})
    assert status == 200
    assert [len(base64.b64decode(d["embedding"])) for d in json.loads(data)["data"]] == \
        [65536 * 4] * 16


# ---- streaming -------------------------------------------------------------

def test_chat_stream_one_event_per_token_without_usage(sim):
    evs = [e for _, e in stream(sim, "/v1/chat/completions", chat("hi", max_tokens=4, stream=True))]
    assert evs[-1] == "[DONE]"
    chunks = [json.loads(e) for e in evs[:-1]]
    assert len(chunks) == 6  # vLLM's role chunk, 4 tokens, then the finish chunk
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "tok0 tok1 tok2 tok3"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]


def test_chat_stream_usage_chunk_with_include_usage(sim):
    body = chat("hello world!", max_tokens=3, stream=True, stream_options={"include_usage": True})
    evs = [e for _, e in stream(sim, "/v1/chat/completions", body)]
    assert evs[-1] == "[DONE]"
    usage = json.loads(evs[-2])
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert usage["object"] == "chat.completion.chunk"
    assert json.loads(evs[-3])["choices"][0]["finish_reason"] == "length"
    assert len(evs) == 1 + 3 + 1 + 1 + 1


def test_completions_stream(sim):
    body = {"model": "m", "prompt": "abcd", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    evs = [e for _, e in stream(sim, "/v1/completions", body)]
    chunks = [json.loads(e) for e in evs[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "tok0 tok1 tok2"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_stream_events_spread_over_time(sim):
    t0 = time.monotonic()
    evs = stream(sim, "/v1/chat/completions", chat("x", max_tokens=6, stream=True),
                 headers={"x-sim-ttft-ms": "100", "x-sim-token-ms": "80"})
    first, last = evs[0][0] - t0, evs[-1][0] - t0
    assert len(evs) == 1 + 6 + 2  # the role chunk goes with the first token
    assert first >= 0.09
    # five more tokens at 80 ms each after the first
    assert last - first >= 0.38
    assert first < last - 0.3


def test_non_stream_waits_for_all_tokens():
    s = Sim("--ttft-ms", "400", "--token-ms", "20")
    try:
        t0 = time.monotonic()
        status, _, data = s.post("/v1/chat/completions", chat("x", max_tokens=11))
        took = time.monotonic() - t0
        assert status == 200
        assert json.loads(data)["usage"]["completion_tokens"] == 11
        assert took >= 0.4 + 10 * 0.02 - 0.01
        # a header override wins over the command line
        t0 = time.monotonic()
        s.post("/v1/chat/completions", chat("x", max_tokens=2),
               headers={"x-sim-ttft-ms": "0", "x-sim-token-ms": "0"})
        assert time.monotonic() - t0 < 0.3
    finally:
        s.stop()


# ---- capacity --------------------------------------------------------------

def test_capacity_runs_max_num_seqs_and_queues_the_rest():
    s = Sim("--max-num-seqs", "2", "--workers", "2")
    done = []

    def one(i):
        t0 = time.monotonic()
        status, _, data = s.post("/v1/chat/completions", chat("x", max_tokens=1),
                                 headers={"x-sim-ttft-ms": "600"})
        done.append((i, status, time.monotonic() - t0))

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        m = s.wait_metrics(requests_running=2, requests_waiting=2)
        assert m["sim_requests_total"] == 4
        assert m["vllm:num_requests_running{model_name=\"sim-model\"}"] == 2
        for t in threads:
            t.join(10)
        assert sorted(st for _, st, _ in done) == [200] * 4
        took = sorted(t for _, _, t in done)
        # two finish after one ttft, the two that waited after two
        assert took[2] >= 1.15 and took[2] - took[1] >= 0.4
        s.wait_metrics(requests_running=0, requests_waiting=0, requests_completed_total=4)
    finally:
        s.stop()


# ---- faults ----------------------------------------------------------------

@pytest.mark.parametrize("code", [429, 500, 503])
def test_fault_status(sim, code):
    status, hdrs, data = sim.post("/v1/chat/completions", chat("x"), headers={"x-sim-fault": "status:%d" % code})
    assert_error(status, data, code)
    if code in (429, 503):
        assert hdrs["retry-after"] == "1"


def test_fault_status_ignores_the_body(sim):
    status, _, data = sim.post("/v1/completions", "{broken", headers={"x-sim-fault": "status:502"})
    assert_error(status, data, 502)


@pytest.mark.parametrize("header,value", [
    ("x-sim-fault", "explode"), ("x-sim-fault", "STALL"), ("x-sim-fault", "status:399"),
    ("x-sim-fault", "status:600"), ("x-sim-fault", "status:"), ("x-sim-fault", "status:5xx"),
    ("x-sim-fault", "stall-after:"), ("x-sim-fault", "stall-after:-1"),
    ("x-sim-fault", "disconnect-after:100001"), ("x-sim-fault", "garbage:1"),
    ("x-sim-ttft-ms", "-1"), ("x-sim-ttft-ms", "1e3"), ("x-sim-ttft-ms", "3600001"),
    ("x-sim-token-ms", ""), ("x-sim-token-ms", "5 ms"),
])
def test_bad_sim_header_is_400_naming_header_and_value(sim, header, value):
    before = sim.metrics()
    status, _, data = sim.post("/v1/chat/completions", chat("x"), headers={header: value})
    assert_error(status, data, 400)
    message = json.loads(data)["error"]["message"]
    assert message.startswith(header + ": '%s'" % value), message
    m = sim.metrics()
    assert m["sim_requests_faulted_total"] == before["sim_requests_faulted_total"]
    assert m["sim_requests_running"] == 0


def test_fault_stall_never_answers_and_abort_frees_slot(sim):
    before = sim.metrics()
    s = start_stream(sim, "/v1/chat/completions", chat("x"), headers={"x-sim-fault": "stall"})
    s.settimeout(0.4)
    with pytest.raises(socket.timeout):
        s.recv(1)
    sim.wait_metrics(requests_running=1)
    s.close()
    m = sim.wait_metrics(requests_running=0,
                         requests_aborted_total=before["sim_requests_aborted_total"] + 1)
    assert m["sim_requests_waiting"] == 0


def test_fault_stall_after_streams_n_tokens(sim):
    s = start_stream(sim, "/v1/chat/completions", chat("x", max_tokens=10, stream=True),
                     headers={"x-sim-fault": "stall-after:2"})
    try:
        rd = ChunkedReader(s)
        assert rd.status == 200
        assert json.loads(rd.event())["choices"][0]["delta"] == {"role": "assistant",
                                                                 "content": ""}
        assert json.loads(rd.event())["choices"][0]["delta"]["content"] == "tok0"
        assert json.loads(rd.event())["choices"][0]["delta"]["content"] == " tok1"
        s.settimeout(0.4)
        with pytest.raises(socket.timeout):
            rd.event()
    finally:
        s.close()
    sim.wait_metrics(requests_running=0)


@pytest.mark.parametrize("fault,produced", [("stall", 0), ("stall-after:3", 3)])
def test_fault_stall_not_streaming_counts_only_tokens_before_the_stall(sim, fault, produced):
    # the same fault streamed produces 0 (stall) or 3 (stall-after:3) token
    # events; answered whole, a cancel must report the same figure, not the
    # 40 tokens a sequence without the fault would have generated by now
    before = sim.metrics()
    s = start_stream(sim, "/v1/chat/completions", chat("x", max_tokens=20, n=2),
                     headers={"x-sim-fault": fault})
    sim.wait_metrics(requests_running=1)
    time.sleep(0.1)
    s.close()
    m = sim.wait_metrics(requests_running=0,
                         requests_aborted_total=before["sim_requests_aborted_total"] + 1)
    assert (m["sim_generation_tokens_total"] - before["sim_generation_tokens_total"]
            == produced * 2)


def test_fault_disconnect_closes_without_answer(sim):
    c = sim.conn()
    try:
        c.request("POST", "/v1/chat/completions", body=json.dumps(chat("x")),
                  headers={"x-sim-fault": "disconnect"})
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            c.getresponse()
    finally:
        c.close()


def test_fault_disconnect_after_truncates_stream(sim):
    s = start_stream(sim, "/v1/chat/completions", chat("x", max_tokens=10, stream=True),
                     headers={"x-sim-fault": "disconnect-after:3"})
    try:
        rd = ChunkedReader(s)
        evs = [e for _, e in rd.events()]
        assert len(evs) == 1 + 3  # the role chunk and three tokens
        assert "[DONE]" not in evs
        assert rd.closed and not rd.ended
    finally:
        s.close()


def test_fault_garbage(sim):
    status, _, data = sim.post("/v1/chat/completions", chat("x"), headers={"x-sim-fault": "garbage"})
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(data)
    s = start_stream(sim, "/v1/chat/completions", chat("x", stream=True), headers={"x-sim-fault": "garbage"})
    try:
        rd = ChunkedReader(s)
        evs = [e for _, e in rd.events()]
        assert rd.status == 200 and rd.ended
        assert evs == ["{not json"]
    finally:
        s.close()


def test_fault_no_usage_answers_in_full_without_usage(sim):
    """The whole answer, streamed or not, as without the fault, minus its usage:
    the shape of upstreams that never report usage. It is a complete answer, so
    it counts as completed (not faulted) with all its tokens generated."""
    no_usage = {"x-sim-fault": "no-usage"}
    cases = [("/v1/chat/completions", chat("hello world!", max_tokens=5, n=2)),
             ("/v1/completions", {"model": "m2", "prompt": ["abcd", "efgh"], "max_tokens": 3}),
             ("/v1/embeddings", {"model": "emb", "input": ["hello", "other text"]})]
    before = sim.metrics()
    for path, body in cases:
        status, _, data = sim.post(path, body)
        full = json.loads(data)
        status2, _, data2 = sim.post(path, body, headers=no_usage)
        bare = json.loads(data2)
        assert status == status2 == 200
        assert "usage" in full and "usage" not in bare
        for r in (full, bare):
            del r["id"], r["created"]
        del full["usage"]
        assert bare == full
    body = chat("hi", max_tokens=3, stream=True, stream_options={"include_usage": True})
    evs = [e for _, e in stream(sim, "/v1/chat/completions", body, headers=no_usage)]
    assert evs[-1] == "[DONE]"
    chunks = [json.loads(e) for e in evs[:-1]]
    assert len(chunks) == 5 and all("usage" not in c and c["choices"] for c in chunks)
    m = sim.wait_metrics(requests_completed_total=before["sim_requests_completed_total"] + 7)
    assert m["sim_requests_faulted_total"] == before["sim_requests_faulted_total"]
    # (10 + 6 + 0) with usage and as many without, and the stream's 3
    assert m["sim_generation_tokens_total"] == before["sim_generation_tokens_total"] + 35


# ---- cancellation and back-pressure -----------------------------------------

def test_client_disconnect_cancels_and_frees_slot_for_waiter():
    s = Sim("--max-num-seqs", "1", "--token-ms", "50")
    try:
        first = start_stream(s, "/v1/chat/completions", chat("x", max_tokens=1000, stream=True))
        rd = ChunkedReader(first)
        rd.event()
        waiter = start_stream(s, "/v1/chat/completions", chat("y", max_tokens=2, stream=True))
        s.wait_metrics(requests_running=1, requests_waiting=1)
        first.close()
        s.wait_metrics(requests_aborted_total=1)
        evs = [e for _, e in ChunkedReader(waiter).events()]
        assert evs[-1] == "[DONE]" and len(evs) == 1 + 2 + 1 + 1
        waiter.close()
        m = s.wait_metrics(requests_running=0, requests_waiting=0)
        # the cancelled sequence stopped producing tokens at once
        assert m["sim_generation_tokens_total"] < 100

        # a waiter that leaves is dropped from the queue
        holder = start_stream(s, "/v1/chat/completions", chat("x", stream=True),
                              headers={"x-sim-fault": "stall"})
        s.wait_metrics(requests_running=1)
        gone = start_stream(s, "/v1/chat/completions", chat("x", stream=True))
        s.wait_metrics(requests_waiting=1)
        gone.close()
        s.wait_metrics(requests_waiting=0, requests_running=1, requests_aborted_total=2)
        holder.close()
        s.wait_metrics(requests_running=0, requests_aborted_total=3)
    finally:
        s.stop()


def test_waiters_leave_in_priority_then_arrival_order():
    # one slot; each waiter needs 150 ms once admitted, so the time its
    # first event arrives tells its place in the queue
    s = Sim("--max-num-seqs", "1", "--ttft-ms", "150")
    socks = []
    arrived = {}

    def read(name, k):
        rd = ChunkedReader(k)
        rd.event()
        arrived[name] = time.monotonic()
        rd.events()

    try:
        holder = start_stream(s, "/v1/chat/completions", chat("x", stream=True),
                              headers={"x-sim-fault": "stall"})
        socks.append(holder)
        s.wait_metrics(requests_running=1)
        threads = []
        for n, (name, prio) in enumerate((("late", 5), ("first", 0), ("second", 0), ("urgent", -1))):
            k = start_stream(s, "/v1/chat/completions",
                             chat(name, max_tokens=1, stream=True, priority=prio))
            socks.append(k)
            s.wait_metrics(requests_waiting=n + 1)
            threads.append(threading.Thread(target=read, args=(name, k)))
        for t in threads:
            t.start()
        holder.close()
        for t in threads:
            t.join(10)
        assert sorted(arrived, key=arrived.get) == ["urgent", "first", "second", "late"]
        s.wait_metrics(requests_completed_total=4, requests_running=0, requests_waiting=0)
    finally:
        for k in socks:
            k.close()
        s.stop()


def test_priority_and_cache_salt_validation(sim):
    status, _, data = sim.post("/v1/chat/completions", chat("x", priority="high"))
    assert_error(status, data, 400)
    status, _, data = sim.post("/v1/chat/completions", chat("x", cache_salt=""))
    assert_error(status, data, 400)
    status, _, data = sim.post("/v1/chat/completions", chat("x", priority=-3, cache_salt="tenant-a",
                                                            max_tokens=1))
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 1


def test_model_by_id(sim):
    status, _, data = sim.request("GET", "/v1/models/m2")
    assert status == 200 and json.loads(data)["id"] == "m2"
    status, _, data = sim.request("GET", "/v1/models/zz")
    assert_error(status, data, 404)


def test_slow_reader_holds_tokens_back(sim):
    before = sim.metrics()["sim_generation_tokens_total"]
    s = start_stream(sim, "/v1/completions",
                     {"model": "m", "prompt": "x", "max_tokens": 100000, "stream": True},
                     rcvbuf=16384)
    try:
        time.sleep(0.5)
        produced = sim.metrics()["sim_generation_tokens_total"] - before
        # about 150 bytes an event: far from all 100000 fit in the buffers
        assert produced < 60000
        rd = ChunkedReader(s, timeout=30)
        n = sum(1 for _, e in rd.events() if e != "[DONE]")
        assert rd.ended
        assert n == 100000 + 1
    finally:
        s.close()


def test_sigterm_with_requests_in_flight_exits_cleanly():
    s = Sim("--max-num-seqs", "1", "--workers", "3", "--token-ms", "20")
    socks = [start_stream(s, "/v1/chat/completions", chat("x", max_tokens=500, stream=True))
             for _ in range(3)]
    try:
        s.wait_metrics(requests_running=1, requests_waiting=2)
    finally:
        s.stop()  # asserts exit status 0 and no sanitizer report
        for k in socks:
            k.close()


# ---- usage against what was streamed ----------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", chat("hello world, again", max_tokens=7, n=3)),
    ("/v1/completions", {"model": "m", "prompt": ["abcdefg", [1, 2, 3]], "max_tokens": 4, "n": 2}),
])
def test_stream_usage_counts_the_content_events_sent(sim, path, body):
    """completion_tokens is the number of content events streamed (vLLM's
    role chunk carries none), prompt_tokens the same as the same body
    answered whole, on every run."""
    whole = [json.loads(sim.post(path, body)[2])["usage"] for _ in range(2)]
    assert whole[0] == whole[1]
    sbody = dict(body, stream=True, stream_options={"include_usage": True})
    evs = [e for _, e in stream(sim, path, sbody)]
    assert evs[-1] == "[DONE]"
    chunks = [json.loads(e) for e in evs[:-1]]
    usage = chunks[-1]["usage"]
    per_choice = {}
    for c in chunks[:-1]:
        for ch in c["choices"]:
            text = ch["delta"].get("content") if "delta" in ch else ch["text"]
            if text:
                per_choice[ch["index"]] = per_choice.get(ch["index"], 0) + 1
    assert usage["completion_tokens"] == sum(per_choice.values())
    assert usage == whole[0]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# ---- pipelining, slow and leaving clients -----------------------------------

def raw_request(path, body, headers=None, method="POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = "%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % (method, path, len(data))
    for k, v in (headers or {}).items():
        head += "%s: %s\r\n" % (k, v)
    return head.encode() + b"\r\n" + data


def read_responses(sock):
    """Statuses of every response on sock until the server closes it."""
    sock.settimeout(10)
    data = bytearray()
    while True:
        d = sock.recv(65536)
        if not d:
            break
        data += d
    statuses = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\r\n\r\n", pos)
        head = bytes(data[pos:end]).decode()
        statuses.append(int(head.split()[1]))
        pos = end + 4
        hdrs = head.lower()
        if "content-length:" in hdrs:
            pos += int(hdrs.split("content-length:")[1].split()[0])
        else:  # chunked
            while True:
                eol = data.index(b"\r\n", pos)
                size = int(bytes(data[pos:eol]), 16)
                pos = eol + 2 + size + 2
                if size == 0:
                    break
    return statuses


def test_pipelined_requests_are_answered_in_order():
    s = Sim("--max-num-seqs", "1")
    try:
        k = socket.create_connection(("127.0.0.1", s.port))
        k.sendall(raw_request("/v1/chat/completions", chat("a", max_tokens=2))
                  + raw_request("/v1/chat/completions", chat("b", max_tokens=3, stream=True),
                                {"x-sim-token-ms": "20"})
                  + raw_request("/v1/chat/completions", b"{bad")
                  + raw_request("/v1/embeddings", {"input": "x"}, {"x-sim-ttft-ms": "30"})
                  + raw_request("/v1/chat/completions", chat("c"), {"x-sim-fault": "status:429"})
                  + raw_request("/v1/completions", {"prompt": "x"}, {"x-sim-fault": "bogus"})
                  + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_responses(k) == [200, 200, 400, 200, 429, 400, 200]
        k.close()

        # a stall holds the connection; the request behind it is never
        # started, and the client leaving frees the stall's slot
        k = socket.create_connection(("127.0.0.1", s.port))
        k.sendall(raw_request("/v1/chat/completions", chat("a"), {"x-sim-fault": "stall"})
                  + raw_request("/v1/chat/completions", chat("b")))
        s.wait_metrics(requests_running=1, requests_total=7)
        k.close()
        s.wait_metrics(requests_running=0, requests_aborted_total=1, requests_total=7)
    finally:
        s.stop()


def test_oversize_body_is_413_with_an_openai_error(sim):
    k = socket.create_connection(("127.0.0.1", sim.port))
    try:
        k.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: %d\r\n\r\n" % (16 * 1024 * 1024 + 1))
        k.settimeout(10)
        data = b""
        while b"}}" not in data:
            d = k.recv(4096)
            assert d, data
            data += d
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ")
        assert_error(413, body, 413, vllm=False)   # the HTTP layer's own refusal
    finally:
        k.close()
    status, _, _ = sim.post("/v1/chat/completions", chat("x", max_tokens=1))
    assert status == 200


def test_slow_and_leaving_clients_never_wedge_the_sim():
    s = Sim("--max-num-seqs", "2")
    socks = []
    try:
        # half a body, then nothing: the server's business, no slot taken
        k = socket.create_connection(("127.0.0.1", s.port))
        k.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        socks.append(k)
        # a 14 MB answer nobody reads, and a stream nobody reads
        for body in ({"prompt": "x", "max_tokens": 100000, "n": 16},
                     {"prompt": "x", "max_tokens": 100000, "stream": True}):
            k = socket.socket()
            k.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            k.connect(("127.0.0.1", s.port))
            k.sendall(raw_request("/v1/completions", body))
            socks.append(k)
        s.wait_metrics(requests_running=1, requests_completed_total=1)
        # meanwhile others are answered at once
        t0 = time.monotonic()
        status, _, data = s.post("/v1/chat/completions", chat("x", max_tokens=1))
        assert status == 200 and time.monotonic() - t0 < 1
        for k in socks:
            k.close()
        s.wait_metrics(requests_running=0, requests_aborted_total=1)
    finally:
        for k in socks:
            k.close()
        s.stop()


def test_every_way_out_gives_the_slot_back():
    """Many clients at once against two slots, with every fault, streamed
    or not, some leaving while they wait, some mid-answer, some reading to
    the end: afterwards both slots are free (two stalls run at once and a
    third waits), and the process exits clean under the sanitizers."""
    s = Sim("--max-num-seqs", "2", "--workers", "2", "--ttft-ms", "5", "--token-ms", "2")
    faults = [None, None, None, "stall", "stall-after:2", "disconnect-after:3", "status:503",
              "garbage", "disconnect", "no-usage", "stall-after:0", "disconnect-after:0"]
    errors = []

    def client(seed):
        r = random.Random(seed)
        fault, streamed = r.choice(faults), r.random() < 0.5
        kind = r.randrange(3)
        if kind == 0:
            path, body = "/v1/chat/completions", chat("x" * r.randrange(50), stream=streamed,
                                                      max_tokens=r.randint(1, 20), n=r.randint(1, 3))
        elif kind == 1:
            path, body = "/v1/completions", {"prompt": ["ab"] * r.randint(1, 3), "stream": streamed,
                                             "max_tokens": r.randint(1, 20)}
        else:
            path, body = "/v1/embeddings", {"input": ["ab"] * r.randint(1, 3)}
        headers = {"x-sim-fault": fault} if fault else {}
        try:
            k = start_stream(s, path, body, headers)
            try:
                if r.random() < 0.4:
                    time.sleep(r.random() * 0.2)   # leaves waiting or mid-answer
                    return
                k.settimeout(0.2 if fault and fault.startswith("stall") else 5)
                try:
                    while k.recv(65536):
                        pass
                except socket.timeout:
                    pass
            finally:
                k.close()
        except OSError as e:
            errors.append(repr(e))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        m = s.wait_metrics(timeout=15, requests_running=0, requests_waiting=0)
        assert m["sim_requests_total"] == 100
        holders = [start_stream(s, "/v1/chat/completions", chat("x"), {"x-sim-fault": "stall"})
                   for _ in range(2)]
        s.wait_metrics(requests_running=2, requests_waiting=0)
        third = start_stream(s, "/v1/chat/completions", chat("x", max_tokens=1))
        s.wait_metrics(requests_running=2, requests_waiting=1)
        holders[0].close()
        assert ChunkedReader(third).status == 200
        third.close()
        holders[1].close()
        s.wait_metrics(requests_running=0, requests_waiting=0)
    finally:
        s.stop()


# ---- command line ------------------------------------------------------------

@pytest.mark.parametrize("args,says", [
    (["--listen", "localhost:8000"], "--listen"),
    (["--listen", "127.0.0.1"], "--listen"),
    (["--listen", "127.0.0.1:"], "--listen"),
    (["--listen", ":8000"], "--listen"),
    (["--listen", "127.0.0.1:65536"], "--listen"),
    (["--listen", "[::1:8000"], "--listen"),
    (["--listen", "1.2.3.4.5:80"], "--listen"),
    (["--workers", "0"], "--workers"),
    (["--workers", "-1"], "--workers"),
    (["--workers=257"], "--workers"),
    (["--ttft-ms", "-5"], "--ttft-ms"),
    (["--token-ms=-1"], "--token-ms"),
    (["--token-ms", "1.5"], "--token-ms"),
    (["--ttft-ms", "3600001"], "--ttft-ms"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--default-tokens", "0"], "--default-tokens"),
    (["--answer-tokens", "-1"], "--answer-tokens"),
    (["--embedding-dim", "65537"], "--embedding-dim"),
    (["--models", "a,,b"], "--models"),
    (["--bogus", "1"], "--bogus"),
    (["--workers"], "--workers"),
    (["--strict-models=1"], "--strict-models"),
])
def test_bad_command_line_exits_2_saying_what(args, says):
    p = subprocess.run([SIM, *args], capture_output=True, timeout=10)
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert says in err and "Sanitizer" not in err, err
    assert b"listening" not in p.stderr


def test_listen_ipv6_and_a_port_already_taken():
    # an IPv6 address prints in brackets, so the port reads apart
    p = subprocess.Popen([SIM, "--listen", "[::1]:0"], stderr=subprocess.PIPE)
    try:
        line = p.stderr.readline().decode()
        assert line.startswith("tollgate-sim listening on [::1]:"), line
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=20)
    assert p.returncode == 0
    # several workers share their port (SO_REUSEPORT): a second process
    # must not silently join the first's
    s = Sim("--workers", "2")
    try:
        for workers in ("1", "2"):
            p = subprocess.run([SIM, "--listen", "127.0.0.1:%d" % s.port, "--workers", workers],
                               capture_output=True, timeout=10)
            assert p.returncode == 1, p.stderr
            assert b"address already in use" in p.stderr, p.stderr
    finally:
        s.stop()
