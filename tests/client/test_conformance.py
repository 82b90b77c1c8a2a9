"""Runs conformance.mjs (the official `openai` npm client) against a real
gateway in front of the simulator, both started by tests/lib/tgtest.py."""

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))

import tgtest  # noqa: E402


def test_openai_node_client(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (scripts/install-deps.sh installs nodejs)")
    if not os.path.isdir(os.path.join(HERE, "node_modules", "openai")):
        pytest.fail("tests/client/node_modules/openai missing: run scripts/install-deps.sh")
    m8b, m70b, embed = tgtest.DEFAULT_MODELS
    sim = sim2 = gw = fake = None
    try:
        sim = tgtest.Sim(workdir=str(tmp_path)).start()
        sim2 = tgtest.Sim(workdir=str(tmp_path)).start()  # the busy model's only server
        tenants = tgtest.default_tenants()
        # the gateway's own 429: one request a minute
        tenants["limited"] = tgtest.limited_tenant(models=(m8b,), rpm=1)
        # 402: a daily budget below any request's reservation
        tenants["broke"] = tgtest.limited_tenant(models=(m8b,), daily="0.000001")
        # one request a minute and a budget that one 40-token answer nearly spends:
        # its second request is refused by both, until the day ends
        tenants["capped"] = tgtest.limited_tenant(models=(m8b,), rpm=1, daily="0.0001")
        # 429 concurrency: one request at a time
        tenants["single"] = tgtest.limited_tenant(models=(m8b,), concurrency=1)
        # 503s: a model no server answers for, one whose single slot a request holds
        tenants["ops"] = tgtest.limited_tenant(models=(m8b, "dead-model", "busy-model",
                                                       "error-event-model", "org/slashed-model"))
        # a stream whose upstream reports an error mid-stream, as vLLM does:
        # one token, the error event, [DONE]
        fake = tgtest.FakeUpstream(status=200)
        fake.content_type = "text/event-stream"
        chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                 "model": "error-event-model",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "tok0"},
                              "finish_reason": None}]}
        fake.body = ("data: %s\n\ndata: %s\n\ndata: [DONE]\n\n" % (
            json.dumps(chunk), json.dumps({"error": {
                "message": "the engine failed mid-generation", "type": "InternalServerError",
                "param": None, "code": 500}}))).encode()
        models = {m: [sim.url] for m in tgtest.DEFAULT_MODELS}
        models["dead-model"] = ["http://127.0.0.1:%d" % tgtest.closed_port()]
        models["busy-model"] = tgtest.model_entry([sim2.url], max_inflight=1)
        models["error-event-model"] = [fake.url]
        models["org/slashed-model"] = [sim.url]  # the client sends its '/' as %2F
        gw = tgtest.Gateway(models, tenants=tenants, workdir=str(tmp_path),
                            overrides={"queue_max": 0,
                                       "timeouts": {"upstream_first_byte": "1s"}})
        # not ready while dead-model has no healthy endpoint, which is the point
        gw.start(ready=False)
        env = dict(os.environ)
        env.update({
            "TG_BASE_URL": gw.base + "/v1",
            "TG_KEY": gw.create_key("acme"),
            "TG_SMALL_KEY": gw.create_key("small"),
            "TG_LIMITED_KEY": gw.create_key("limited"),
            "TG_BROKE_KEY": gw.create_key("broke"),
            "TG_CAPPED_KEY": gw.create_key("capped"),
            "TG_OPS_KEY": gw.create_key("ops"),
            "TG_SINGLE_KEY": gw.create_key("single"),
            "TG_SIM_URL": sim.url,
            "TG_MODEL": m8b, "TG_DENIED_MODEL": m70b, "TG_EMBED_MODEL": embed,
        })
        cp = subprocess.run([node, os.path.join(HERE, "conformance.mjs")], cwd=HERE, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        sys.stdout.write(cp.stdout)
        sys.stderr.write(cp.stderr)
        assert cp.returncode == 0, "conformance.mjs failed:\n%s\n%s\n%s" % (
            cp.stdout, cp.stderr, tgtest.tails([gw.proc, sim.proc]))
        assert "0 failed" in cp.stdout
        rc = gw.stop()
        assert rc == 0, "gateway exit code %s\n%s" % (rc, gw.proc.tail())
    finally:
        for x in (gw, sim, sim2):
            if x is not None:
                x.kill()
        if fake is not None:
            fake.close()
