"""The gateway process as an operator sees it: check-config verdicts, a
graceful SIGTERM (no new connections, in-flight streams finish, exit 0), and
a clean exit with nothing in flight."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time

import pytest

import tgtest
from tgtest import SSEStream, chat, chat_body

M8B, M70B, EMBED = tgtest.DEFAULT_MODELS


def _refused(port):
    s = socket.socket()
    s.settimeout(1.0)
    try:
        s.connect(("127.0.0.1", port))
    except (ConnectionRefusedError, socket.timeout, OSError):
        return True
    finally:
        s.close()
    return False


def _sigterm_during_a_stream(tg, max_tokens, n_first):
    """A gateway sent SIGTERM while a stream of max_tokens (250 ms each) is
    running, its first n_first events read: (sim, gw, stream, its events
    iterator, the events read)."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]})
    s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=max_tokens, include_usage=True),
                  key=gw.keys["acme"], headers={"x-sim-token-ms": "250"})
    assert s.status == 200
    it = s.events()
    first = [next(it) for _ in range(n_first)]
    gw.proc.signal(15)
    return sim, gw, s, it, first


def test_sigterm_drains_inflight_stream(tg):
    _, gw, s, it, first = _sigterm_during_a_stream(tg, 20, 2)
    # new connections are refused soon after the signal, long before the
    # stream ends, and a successor can take the port at once
    tgtest.wait_for(lambda: _refused(gw.port), timeout=2.0, what="listener closed after SIGTERM")
    successor = socket.socket()
    successor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        successor.bind(("127.0.0.1", gw.port))
        successor.listen(1)
    finally:
        successor.close()
    assert gw.proc.alive(), "the stream (5 s) is still being drained"
    # the stream in flight completes in full
    rest = list(it)
    s.close()
    events = first + rest
    assert s.done and s.complete
    assert len(tgtest.usage_events(events)) == 1
    assert tgtest.usage_events(events)[0].json()["usage"]["completion_tokens"] == 20
    assert tgtest.assembled_text(events).split() == ["tok%d" % i for i in range(20)]
    rc = gw.proc.wait(10.0)
    assert rc == 0, "exit code %s\n%s" % (rc, gw.proc.tail())
    assert "serving on" in gw.proc.stderr_text()


def test_sigterm_lets_a_slow_client_read_its_whole_answer(tg):
    """A whole answer its client reads slowly is part of the drain: about
    10 MB (relayed as it comes, the upstream paused while the client does
    not read) when SIGTERM arrives; the client reads every byte, and the
    gateway exits once it has."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]})
    key = gw.keys["acme"]
    # about 10 MB of answer, far more than the sockets' buffers hold
    body = json.dumps(chat_body(M8B, max_tokens=100000, n=12)).encode()
    c = tgtest.RawConn(gw.port, rcvbuf=4096)
    c.send(tgtest.http_request_bytes("POST", "/v1/chat/completions", body=body, key=key,
                                     headers={"content-type": "application/json"}))
    # the simulator has made the answer; the client has read nothing
    tgtest.wait_for(lambda: sim.metric(tgtest.SIM_COMPLETED) >= 1, what="the answer made")
    time.sleep(0.5)
    assert gw.access_log_entries() == [], "the call ended before its client read it"
    gw.proc.signal(15)
    time.sleep(0.5)
    assert gw.proc.alive(), "the gateway left with an answer unread:\n%s" % gw.proc.tail()
    r = c.read_response(method="POST")
    c.close()
    assert r.status == 200 and r.complete
    assert len(r.json()["choices"]) == 12
    rc = gw.proc.wait(10.0)
    assert rc == 0, "exit code %s\n%s" % (rc, gw.proc.tail())
    assert [e["status"] for e in gw.access_log_entries()] == [200]


def test_sigterm_drain_timeout_bounds_shutdown(tg):
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, overrides={"timeouts": {"drain": "1s"}})
    key = gw.keys["acme"]
    # a stream that would take 100 s
    s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=1000), key=key,
                  headers={"x-sim-token-ms": "100"})
    assert s.status == 200
    it = s.events()
    next(it)
    t0 = time.monotonic()
    gw.proc.signal(15)
    rc = gw.proc.wait(8.0)
    took = time.monotonic() - t0
    list(it)
    s.close()
    assert rc == 0, "exit code %s\n%s" % (rc, gw.proc.tail())
    assert took < 5.0, "shutdown took %.1fs with drain: 1s" % took
    assert not s.done
    # the gateway cut it, not the client: logged and recorded as such, with
    # the tokens relayed before the cut
    rid = s.headers["x-request-id"]
    e = gw.access_entry(rid)
    assert (e["status"], e["error"]) == (503, "gateway_stopped"), e
    rows = tgtest.sqlite_ledger_rows(gw.db_path, "WHERE request_id = ?", (rid,))
    assert len(rows) == 1 and rows[0]["status"] == 503, rows
    assert 1 <= rows[0]["completion_tokens"] < 1000, rows
    assert "drain timeout, closing remaining connections" in gw.proc.stderr_text()


@pytest.mark.parametrize("where", ["queued", "first_byte"])
def test_a_request_cut_before_its_answer_began_is_told_503(tg, where):
    """At the drain timeout a request whose answer never began (waiting in
    the queue behind a stream, or for the upstream's first byte) gets the
    503 `gateway_stopped` with Retry-After its log line and record say,
    not a bare close the client cannot tell from a crash."""
    sim = tg.sim()
    gw = tg.gateway({M8B: tgtest.model_entry([sim.url], max_inflight=1 if where == "queued" else 4)},
                    workers=1, overrides={"timeouts": {"drain": "1s"}})
    key = gw.keys["acme"]
    s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=1000), key=key,
                  headers={"x-sim-token-ms": "100"})
    it = s.events()
    next(it)
    waiting = tgtest.RawConn(gw.port, timeout=8)
    waiting.send(tgtest.http_request_bytes(
        "POST", "/v1/chat/completions", chat_body(M8B, max_tokens=2), key=key,
        headers={"x-sim-ttft-ms": "20000"} if where == "first_byte" else None))
    time.sleep(0.5)
    gw.proc.signal(15)
    r = waiting.read_response("POST")
    assert gw.proc.wait(8.0) == 0, gw.proc.tail()
    list(it)
    s.close()
    waiting.close()
    assert r.status == 503 and tgtest.retry_after(r) == 1, r
    e = r.error()
    assert (e["type"], e["code"]) == ("server_error", "gateway_stopped"), e
    logged = gw.access_entry(r.header("x-request-id"))
    assert (logged["status"], logged["error"]) == (503, "gateway_stopped"), logged


def test_a_request_sent_on_a_stream_kept_alive_before_the_drain_is_answered(tg):
    """A stream's head said keep-alive before SIGTERM; its client sends its
    next request on that connection during the drain. It is served, its
    answer saying close, then the connection closes: not closed under the
    request with no answer at all."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, workers=1)
    key = gw.keys["acme"]
    c = tgtest.RawConn(gw.port, timeout=10)
    c.send(tgtest.http_request_bytes(
        "POST", "/v1/chat/completions", json.dumps(chat_body(M8B, stream=True, max_tokens=10)).encode(),
        key=key, headers={"content-type": "application/json", "x-sim-token-ms": "200"}))
    status, _, hdrs = c.read_head()
    assert status == 200 and dict(hdrs)["connection"] == "keep-alive", hdrs
    gw.proc.signal(15)
    tgtest.wait_for(lambda: "draining" in gw.proc.stderr_text(), what="the drain")
    c.send(tgtest.http_request_bytes(
        "POST", "/v1/chat/completions", json.dumps(chat_body(M8B, max_tokens=2)).encode(), key=key,
        headers={"content-type": "application/json"}))
    events = b"".join(piece for _, piece in c.iter_body(hdrs, "POST"))
    assert c.complete and events.rstrip().endswith(b"data: [DONE]"), events[-200:]
    r = c.read_response("POST")
    c.close()
    assert r is not None, "the second request got no answer"
    assert r.status == 200 and r.header("connection") == "close", r
    assert r.json()["usage"]["completion_tokens"] == 2
    assert gw.proc.wait(10.0) == 0, gw.proc.tail()
    assert sorted(e["status"] for e in gw.access_log_entries()) == [200, 200]


def test_second_signal_cuts_what_is_left(tg):
    """A second SIGTERM during a long drain stops at once, says so, and the
    stream it cuts is logged as the gateway's cut (503 gateway_stopped)."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, overrides={"timeouts": {"drain": "60s"}})
    s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=1000), key=gw.keys["acme"],
                  headers={"x-sim-token-ms": "100"})
    it = s.events()
    next(it)
    gw.proc.signal(15)
    tgtest.wait_for(lambda: "draining" in gw.proc.stderr_text(), what="the drain")
    time.sleep(0.3)
    t0 = time.monotonic()
    gw.proc.signal(15)
    rc = gw.proc.wait(8.0)
    assert rc == 0 and time.monotonic() - t0 < 5.0, gw.proc.tail()
    list(it)
    s.close()
    assert not s.done
    assert "second signal, closing remaining connections" in gw.proc.stderr_text()
    e = gw.access_entry(s.headers["x-request-id"])
    assert (e["status"], e["error"]) == (503, "gateway_stopped"), e


def test_config_changes_on_disk_reload(tg):
    """A change of the config file reloads it without a signal: a file
    rewritten in place, and a Kubernetes ConfigMap volume's update, which
    swaps the `..data` symlink the file's own symlink goes through (no
    .yaml name changes there)."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, start=False)
    cm = os.path.join(gw.workdir, "configmap")
    os.makedirs(cm)

    def publish(version):
        d = os.path.join(cm, "..v%d" % version)
        os.makedirs(d)
        with open(os.path.join(d, "tollgate.yaml"), "w") as f:
            f.write(tgtest.to_yaml(gw.config))
        os.symlink("..v%d" % version, os.path.join(cm, "..data_tmp"))
        os.rename(os.path.join(cm, "..data_tmp"), os.path.join(cm, "..data"))

    def reloads():
        return gw.proc.stderr_text().count("config reloaded")

    publish(1)
    os.symlink("..data/tollgate.yaml", os.path.join(cm, "tollgate.yaml"))
    plain = gw.config_path
    gw.config_path = os.path.join(cm, "tollgate.yaml")
    gw.start()
    n = reloads()
    gw.config["tenants"]["acme"]["rate_limits"] = {"requests_per_minute": 1}
    publish(2)
    tgtest.wait_for(lambda: reloads() > n, timeout=5, what="a reload after the ConfigMap swap")
    assert chat(gw.port, gw.keys["acme"], M8B, max_tokens=1).status == 200
    assert chat(gw.port, gw.keys["acme"], M8B, max_tokens=1).status == 429
    gw.stop()

    # a file rewritten in place
    gw.config_path = plain
    gw.write_config()
    gw.start()
    n = reloads()
    gw.config["tenants"]["acme"]["rate_limits"] = {"requests_per_minute": 1000}
    gw.write_config()
    tgtest.wait_for(lambda: reloads() > n, timeout=5, what="a reload after the file changed")


def test_a_change_of_a_tenants_file_in_another_directory_reloads(tg):
    """The tenants come from a tenants_file outside the config's directory
    (the seed's quotas.yaml next to the config's: `../seed/quotas.yaml`).
    Rewriting that file reloads as a change of the config does: only the
    config's own directory was watched, and new limits waited for a SIGHUP.
    Another file of that directory leaves the gateway alone."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, start=False)
    seed = os.path.join(gw.workdir, "seed")
    os.makedirs(seed)
    quotas = os.path.join(seed, "quotas.yaml")

    def write_tenants():
        with open(quotas, "w") as f:
            f.write(tgtest.to_yaml({"tenants": gw.config["tenants"]}))

    write_tenants()
    gw.config.pop("tenants")
    gw.config["tenants_file"] = "../seed/quotas.yaml"
    os.makedirs(os.path.join(gw.workdir, "etc"))
    gw.config_path = os.path.join(gw.workdir, "etc", "tollgate.yaml")
    gw.write_config()
    gw.start()

    def reloads():
        return gw.proc.stderr_text().count("config reloaded")

    n = reloads()
    with open(os.path.join(seed, "notes.yaml"), "w") as f:
        f.write("unrelated: true\n")
    time.sleep(0.6)
    assert reloads() == n, gw.proc.tail()
    tenants = tgtest.to_yaml({"tenants": {"acme": {"models_allowed": [M8B],
                                                   "rate_limits": {"requests_per_minute": 1}}}})
    with open(quotas, "w") as f:
        f.write(tenants)
    tgtest.wait_for(lambda: reloads() > n, timeout=5, what="a reload after the tenants file changed")
    assert chat(gw.port, gw.keys["acme"], M8B, max_tokens=1).status == 200
    assert chat(gw.port, gw.keys["acme"], M8B, max_tokens=1).status == 429


def _reloads(gw, what="config reloaded"):
    return gw.proc.stderr_text().count(what)


def test_a_refused_reload_watches_the_tenants_file_it_names(tg):
    """The operator points tenants_file at a file in another directory, and
    that file has a mistake: the reload is refused and the running config
    stays. Fixing the file then reloads by itself. (The new file's directory
    was watched only after a reload that succeeded, so the fix waited for a
    SIGHUP.)"""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, start=False)
    os.makedirs(os.path.join(gw.workdir, "etc"))
    gw.config_path = os.path.join(gw.workdir, "etc", "tollgate.yaml")
    gw.write_config()
    gw.start()
    other = os.path.join(gw.workdir, "tenants")
    os.makedirs(other)
    quotas = os.path.join(other, "quotas.yaml")
    with open(quotas, "w") as f:
        f.write(tgtest.to_yaml({"tenants": {"acme": {"models_allowed": ["no-such-model"]}}}))
    failed = _reloads(gw, "reload failed")
    gw.config.pop("tenants")
    gw.config["tenants_file"] = quotas
    gw.write_config()
    tgtest.wait_for(lambda: _reloads(gw, "reload failed") > failed, timeout=5,
                    what="the reload refused for the tenants file's mistake")
    assert "unknown model 'no-such-model'" in gw.proc.stderr_text(), gw.proc.tail()
    n = _reloads(gw)
    with open(quotas, "w") as f:
        f.write(tgtest.to_yaml({"tenants": {"acme": {
            "models_allowed": [M8B], "rate_limits": {"requests_per_minute": 1}}}}))
    tgtest.wait_for(lambda: _reloads(gw) > n, timeout=5,
                    what="a reload after the named tenants file was fixed")
    assert chat(gw.port, gw.keys["acme"], M8B, max_tokens=1).status == 200
    assert chat(gw.port, gw.keys["acme"], M8B, max_tokens=1).status == 429


class _ConfigMapVolume:
    """A directory laid out as kubelet lays out a ConfigMap volume: each file
    a symlink `name -> ..data/name`, `..data` a symlink to a timestamped
    directory holding the files. publish() writes a new timestamped
    directory, points a `..data_tmp` link at it, renames that over `..data`
    (the atomic swap) and removes the old directory, as kubelet's
    AtomicWriter does."""

    def __init__(self, path):
        self.path = path
        self.current = None
        self.n = 0
        os.makedirs(path)

    def publish(self, files):
        self.n += 1
        ts = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + "%09d" % self.n
        os.makedirs(os.path.join(self.path, ts))
        for name, text in files.items():
            with open(os.path.join(self.path, ts, name), "w") as f:
                f.write(text)
        tmp = os.path.join(self.path, "..data_tmp")
        os.symlink(ts, tmp)
        os.rename(tmp, os.path.join(self.path, "..data"))
        for name in files:
            link = os.path.join(self.path, name)
            if not os.path.islink(link):
                os.symlink(os.path.join("..data", name), link)
        if self.current is not None:
            shutil.rmtree(os.path.join(self.path, self.current))
        self.current = ts


def test_configmap_swaps_behind_symlinks_into_other_directories_reload(tg):
    """The config and the tenants_file are symlinks into two ConfigMap
    volumes mounted elsewhere (`etc/tollgate.yaml -> ../config/tollgate.yaml`,
    `etc/quotas.yaml -> ../tenants/quotas.yaml`, each of those
    `-> ..data/...`). An update of either volume (its `..data` swapped, the
    old directory removed) reloads, again after the first one. (Only
    `etc/` was watched: no name there changes on an update, so new tenants
    waited for a SIGHUP.)"""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, start=False)
    etc = os.path.join(gw.workdir, "etc")
    os.makedirs(etc)
    config = _ConfigMapVolume(os.path.join(gw.workdir, "config"))
    tenants = _ConfigMapVolume(os.path.join(gw.workdir, "tenants"))

    def publish_tenants(rpm):
        acme = {"models_allowed": [M8B], "rate_limits": {"requests_per_minute": rpm}}
        tenants.publish({"quotas.yaml": tgtest.to_yaml({"tenants": {"acme": acme}})})

    publish_tenants(1000)
    gw.config.pop("tenants")
    gw.config["tenants_file"] = "quotas.yaml"  # beside the config: etc/quotas.yaml
    config.publish({"tollgate.yaml": tgtest.to_yaml(gw.config)})
    os.symlink("../config/tollgate.yaml", os.path.join(etc, "tollgate.yaml"))
    os.symlink("../tenants/quotas.yaml", os.path.join(etc, "quotas.yaml"))
    gw.config_path = os.path.join(etc, "tollgate.yaml")
    gw.start()
    key = gw.keys["acme"]

    for rpm in (1, 1000):
        n = _reloads(gw)
        publish_tenants(rpm)
        tgtest.wait_for(lambda: _reloads(gw) > n, timeout=5,
                        what="a reload after the tenants volume's update")
        codes = [chat(gw.port, key, M8B, max_tokens=1).status for _ in range(2)]
        assert codes == ([200, 429] if rpm == 1 else [200, 200]), (rpm, codes)

    for model in ("a-model", "b-model"):
        n = _reloads(gw)
        gw.config["models"][model] = gw.config["models"][M8B]
        config.publish({"tollgate.yaml": tgtest.to_yaml(gw.config)})
        tgtest.wait_for(lambda: _reloads(gw) > n, timeout=5,
                        what="a reload after the config volume's update")
        r = tgtest.request(gw.port, "GET", "/v1/models/" + model, key=key)
        assert r.status in (200, 403), r  # the model exists now (acme may not use it)


def test_a_stream_admitted_before_a_reload_is_billed_at_its_rates(tg):
    """A reload that changes a model's prices while a stream runs: the
    stream is billed at the rates it was admitted under (its reservation
    was priced at them), the next request at the new ones."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]})
    s = SSEStream(gw.port, chat_body(M8B, stream=True, max_tokens=6, include_usage=True),
                  key=gw.keys["acme"], headers={"x-sim-token-ms": "300"})
    assert s.status == 200
    it = s.events()
    next(it)
    gw.config["models"][M8B]["pricing"] = {"prompt_per_1k_usd": "1", "completion_per_1k_usd": "2"}
    tgtest.gateway_reload(gw)
    list(it)
    e = gw.access_entry(s.headers["x-request-id"])
    r = chat(gw.port, gw.keys["acme"], M8B, max_tokens=6)
    assert r.status == 200
    e2 = gw.access_entry(r.headers["x-request-id"])
    day = time.strftime("%Y-%m-%d", time.gmtime())
    tgtest.wait_for(lambda: gw.usage("acme", day)["requests"] == 2, what="both ledger rows")
    old = e["prompt_tokens"] * 500 + e["completion_tokens"] * 1500   # 0.0005 / 0.0015
    new = e2["prompt_tokens"] * 1000000 + e2["completion_tokens"] * 2000000
    assert e["completion_tokens"] == 6 and e2["completion_tokens"] == 6, (e, e2)
    assert gw.usage("acme", day)["spend_nano_usd"] == old + new


def test_editor_files_beside_the_config_do_not_reload(tg):
    """An editor's swap, backup and autosave files beside the config
    (`.tollgate.yaml.swp`, `tollgate.yaml~`, `#tollgate.yaml#`) are no
    `.yaml` files: writing them does not reload the unchanged config, as
    writing the config itself does."""
    gw = tg.gateway({M8B: ["http://127.0.0.1:9"]}, ready=False)

    def reloads():
        return gw.proc.stderr_text().count("config reloaded")

    n = reloads()
    for name in (".tollgate.yaml.swp", "tollgate.yaml~", "#tollgate.yaml#", "tollgate.yml.bak"):
        with open(os.path.join(gw.workdir, name), "w") as f:
            f.write("x")
    time.sleep(0.8)
    assert reloads() == n, gw.proc.tail()
    gw.write_config()
    tgtest.wait_for(lambda: reloads() > n, timeout=5, what="a reload after the config changed")


def test_sigterm_idle_exits_zero_quickly(tg):
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]})
    key = gw.keys["acme"]
    assert chat(gw.port, key, M8B, max_tokens=1).status == 200
    # an idle keep-alive connection must not hold the shutdown
    c = tgtest.RawConn(gw.port)
    c.send(tgtest.http_request_bytes("GET", "/v1/models", key=key))
    assert c.read_response().status == 200
    t0 = time.monotonic()
    rc = gw.stop()
    assert rc == 0, gw.proc.tail()
    assert time.monotonic() - t0 < 3.0
    assert c.closed_by_peer(1.0)
    c.close()


def _thread_names(pid):
    names = []
    for t in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/comm" % (pid, t)) as f:
            names.append(f.read().strip())
    return sorted(names)


def test_threads_are_named_and_fds_raised(tg):
    """Each thread says what it is (top -H, ps -L, perf), and the gateway
    raised its soft open-files limit to the hard one at start."""
    sim = tg.sim()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 512)
    if hard != resource.RLIM_INFINITY and hard <= low:
        pytest.skip("the hard open-files limit is %d" % hard)
    # started with a low soft limit, as Debian's default of 1,024 is
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        gw = tg.gateway({M8B: [sim.url]}, workers=2)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert chat(gw.port, gw.keys["acme"], M8B, max_tokens=1).status == 200
    tgtest.wait_for(lambda: "tg-ledger" in _thread_names(gw.proc.pid),
                    what="the ledger's writer thread")
    names = _thread_names(gw.proc.pid)
    for want in ("tg-worker-0", "tg-worker-1", "tg-admin", "tg-ledger", "tg-keywatch"):
        assert want in names, names
    with open("/proc/%d/limits" % gw.proc.pid) as f:
        line = [l for l in f if l.startswith("Max open files")][0].split()
    want_hard = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    assert line[3] == line[4] == want_hard, line


def test_serve_refuses_a_port_another_gateway_listens_on(tg):
    """The workers share their port through SO_REUSEPORT, which the kernel
    would also share with a second gateway of the same user: started on a
    running gateway's port, a second one exits 1 and says why, and the
    first keeps every connection."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]})
    other = tg.gateway({M8B: [sim.url]}, start=False)
    other.config["listen"] = "127.0.0.1:%d" % gw.port
    other.write_config()
    proc = tgtest.Proc("tollgate-same-port", [tgtest.binary("tollgate"), "serve", "--config",
                                              other.config_path], other.workdir)
    rc = proc.wait(15.0)
    if rc is None:
        proc.signal(15)
        proc.wait(15.0)
    assert rc == 1, proc.tail()
    assert "cannot listen on 127.0.0.1:%d: address already in use" % gw.port in \
        proc.stderr_text(), proc.tail()
    assert "serving on" not in proc.stderr_text()
    for _ in range(20):
        assert chat(gw.port, gw.keys["acme"], M8B, max_tokens=1).status == 200
    tgtest.wait_for(lambda: len(gw.access_log_entries()) == 20, what="20 lines of the first gateway")


def _serve_named(gw, name):
    """`tollgate serve` for gw's config, started without waiting for it."""
    return tgtest.Proc(name, [tgtest.binary("tollgate"), "serve", "--config", gw.config_path],
                       gw.workdir)


def _serving_or_gone(proc, timeout=15.0):
    tgtest.wait_for(lambda: not proc.alive() or "serving on" in proc.stderr_text(),
                    timeout=timeout, what="%s to serve or exit" % proc.name)
    return proc.wait(5.0) if "serving on" not in proc.stderr_text() else None


def _fd_flags(pid, path):
    """The open flags of pid's descriptor on path (None when it has none)."""
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) != path:
                continue
            with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                for line in f:
                    if line.startswith("flags:"):
                        return int(line.split()[1], 8)
        except OSError:
            continue
    return None


def test_a_second_gateway_on_the_same_data_dir_is_refused(tg):
    """Two gateways on one data_dir (two configs that keep the default
    ./data beside each other, PostgreSQL replicas on one host) would both
    write its ledger spool over each other's records. The second exits 1 at
    start naming the data_dir and the first one's pid, and the first keeps
    serving and recording. The commands that only use the database work
    beside the running gateway. The first holds the data_dir's lock file
    (0600) through a close-on-exec descriptor, so no child could keep it;
    a kill -9 lets the second start at once."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]})
    key = gw.keys["acme"]
    other = tg.gateway({M8B: [sim.url]}, start=False, keys=(),
                       overrides={"data_dir": gw.data_dir})
    proc = _serve_named(other, "tollgate-same-data-dir")
    rc = _serving_or_gone(proc)
    err = proc.stderr_text()
    assert rc == 1, "the second gateway %s\n%s" % (
        "serves" if rc is None else "exited %s" % rc, proc.tail())
    assert "data_dir %s is in use by another gateway (pid %d)" % (gw.data_dir, gw.pid) in err, \
        err
    assert "serving on" not in err
    lock = os.path.join(gw.data_dir, "tollgate.lock")
    assert oct(os.stat(lock).st_mode & 0o777) == oct(0o600)
    flags = _fd_flags(gw.pid, lock)
    assert flags is not None and flags & os.O_CLOEXEC, flags

    # the database's commands beside the running gateway
    key2 = gw.create_key("acme")                 # waits for the gateway to accept it
    assert any(k["id"] == tgtest.key_id(key2) for k in gw.list_keys())
    gw.revoke_key(key2)
    tgtest.wait_for(lambda: tgtest.request(gw.port, "GET", "/v1/models", key=key2,
                                           timeout=3).status == 401,
                    what="the revoked key refused")
    for _ in range(5):
        assert chat(gw.port, key, M8B, max_tokens=1).status == 200
    tgtest.wait_for(lambda: len(tgtest.sqlite_ledger_rows(gw.db_path)) == 5,
                    what="5 ledger rows")
    month, day = tgtest.utc_month(), tgtest.utc_day()
    inv = gw.invoice("acme", month)
    assert inv["summary"]["total_requests"] == 5, inv
    assert gw.usage("acme", day)["requests"] == 5
    assert gw.tool("migrate").returncode == 0
    assert gw.tool("check-config").returncode == 0

    # the lock goes with the process, however it ends
    gw.kill()
    gw.proc.wait(5.0)
    gw.checked_exit = True
    other.start()
    assert chat(other.port, key, M8B, max_tokens=1).status == 200
    tgtest.wait_for(lambda: len(tgtest.sqlite_ledger_rows(gw.db_path)) == 6,
                    what="the second gateway's row")


def test_a_successor_on_the_same_data_dir_waits_for_the_drain(tg):
    """A rolling restart on one host: started on its predecessor's port and
    data_dir while the predecessor drains a stream, the successor says it
    waits for the data_dir, serves once the predecessor has stopped (its
    stream complete, its record kept), and records its own requests."""
    sim, gw, s, it, first = _sigterm_during_a_stream(tg, 12, 1)
    key = gw.keys["acme"]
    tgtest.wait_for(lambda: _refused(gw.port), timeout=2.0, what="listener closed after SIGTERM")
    succ = tg.gateway({M8B: [sim.url]}, start=False, keys=(),
                      overrides={"data_dir": gw.data_dir, "listen": "127.0.0.1:%d" % gw.port})
    succ.port = gw.port
    t0 = time.monotonic()
    succ.start(timeout=30.0)
    err = succ.proc.stderr_text()
    assert "data_dir %s is held by the gateway with pid %d, which is draining; waiting" % (
        gw.data_dir, gw.pid) in err, err
    assert "data_dir %s is free after" % gw.data_dir in err, err
    assert time.monotonic() - t0 > 1.0, "the stream (3 s) was still being drained"
    rc = gw.proc.wait(5.0)
    assert rc == 0, "exit code %s\n%s" % (rc, gw.proc.tail())
    gw.checked_exit = True
    events = first + list(it)
    s.close()
    assert s.done and s.complete
    assert tgtest.usage_events(events)[0].json()["usage"]["completion_tokens"] == 12
    assert chat(succ.port, key, M8B, max_tokens=1).status == 200
    tgtest.wait_for(lambda: len(tgtest.sqlite_ledger_rows(gw.db_path)) == 2,
                    what="the stream's row and the successor's")


def _serve(gw, *config_args):
    """Starts `tollgate serve` of gw with the given config arguments (gw's
    fixture stops it)."""
    gw.proc = tgtest.Proc("tollgate-%d" % gw.port,
                          [tgtest.binary("tollgate"), "serve"] + list(config_args), gw.workdir)
    return gw.proc


def _ignores(pid, sig):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_serve_takes_config_equals_file(tg):
    """--config=FILE, as check-config and keys take it: serve said usage, exit 2."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, start=False)
    proc = _serve(gw, "--config=" + gw.config_path)
    tgtest.wait_for(tgtest.alive_check(proc)(lambda: "serving on" in proc.stderr_text()),
                    timeout=20, what="serving on")
    tgtest.wait_for(lambda: chat(gw.port, gw.keys["acme"], M8B, max_tokens=1).status == 200,
                    what="an answer")


def _cli(args, gw):
    return subprocess.run([tgtest.binary("tollgate")] + args, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=20, env=tgtest.cli_env(),
                          cwd=gw.workdir)


def test_every_command_answers_help_and_refuses_what_it_does_not_take(tg):
    """serve, check-config, invoice, usage and migrate read their options
    alike: --help (or -h) prints the usage on stdout and exits 0 (serve,
    invoice and usage said usage on stderr, exit 2); an option a command
    does not take, one given twice or one without its value is named on
    stderr with the usage, exit 2. serve started with an option it ignored
    (`--workers 8`) and with the last of two configs; check-config and
    migrate checked the last of two."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, start=False)
    cfg = gw.config_path
    what = {"serve": [], "check-config": [], "migrate": [],
            "invoice": ["--tenant", "acme", "--month", "2026-12"],
            "usage": ["--tenant", "acme", "--day", "2026-12-01"]}
    for cmd, rest in what.items():
        for h in ("--help", "-h"):
            cp = _cli([cmd, "--config", cfg, h] + rest, gw)
            assert cp.returncode == 0 and cp.stderr == "", (cmd, h, cp)
            assert cp.stdout.startswith("usage: tollgate " + cmd), (cmd, h, cp.stdout)
        for bad, why in (([cmd, "--config", cfg, "--workers", "8"] + rest,
                          "unknown option '--workers'"),
                         ([cmd, "--config", cfg, "--config", cfg] + rest,
                          "--config given twice"),
                         ([cmd, "--config=" + cfg, "-c", cfg] + rest, "--config given twice"),
                         ([cmd] + rest + ["--config"], "--config needs a value"),
                         ([cmd, cfg] + rest, "unexpected argument '%s'" % cfg)):
            cp = _cli(bad, gw)
            assert cp.returncode == 2 and cp.stdout == "", (bad, cp)
            assert "tollgate %s: %s" % (cmd, why) in cp.stderr, (bad, cp.stderr)
            assert "usage: tollgate " + cmd in cp.stderr, (bad, cp.stderr)
            assert "serving on" not in cp.stderr, (bad, cp.stderr)


def test_keys_takes_its_config_as_every_command_does(tg):
    """`keys` read --config FILE and --config=FILE but refused `-c FILE`
    (exit 2, "unknown option -c"), which every other command takes and the
    README promises for every command. create, list and revoke now take it,
    with the same refusals as --config's."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, start=False)
    cfg = gw.config_path
    cp = _cli(["keys", "create", "-c", cfg, "--tenant", "acme"], gw)
    assert cp.returncode == 0, cp
    key = cp.stdout.strip()
    cp = _cli(["keys", "list", "-c", cfg, "--json"], gw)
    assert cp.returncode == 0 and '"id":"%s"' % key[3:15] in cp.stdout, cp
    cp = _cli(["keys", "revoke", "-c", cfg, key[3:15]], gw)
    assert cp.returncode == 0, cp
    for bad, why in ((["keys", "list", "--config=" + cfg, "-c", cfg], "--config given twice"),
                     (["keys", "list", "-c"], "--config needs a value")):
        cp = _cli(bad, gw)
        assert cp.returncode == 2 and cp.stdout == "", (bad, cp)
        assert "tollgate keys: " + why in cp.stderr, (bad, cp.stderr)


def test_sighup_during_the_start_gives_one_reload(tg, tmp_path):
    """A SIGHUP sent while the gateway starts (a reloader firing as the pod
    comes up) ended it: its handler was not there yet. It now waits for the
    handler and gives a reload. The access log is a FIFO, so the start holds
    in its open until the test reads it; SIGPIPE ignored says serve is there,
    past the config's load."""
    fifo = str(tmp_path / "access.fifo")
    os.mkfifo(fifo)
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, start=False, overrides={"access_log": fifo})
    proc = _serve(gw, "--config", gw.config_path)
    live = tgtest.alive_check(proc)
    tgtest.wait_for(live(lambda: _ignores(proc.pid, signal.SIGPIPE)), timeout=20,
                    what="serve opening its access log")
    for _ in range(3):
        proc.signal(signal.SIGHUP)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        tgtest.wait_for(live(lambda: _reloads(gw) == 1), timeout=10, what="a reload")
        assert "serving on" in proc.stderr_text()
        assert chat(gw.port, gw.keys["acme"], M8B, max_tokens=1).status == 200
        assert gw.stop() == 0
    finally:
        os.close(reader)


def test_sighups_while_stopping_are_ignored(tg):
    """SIGHUPs that keep coming while the gateway stops: it finishes its stop
    and exits 0. Once its signal handles were closed a SIGHUP ended it before
    the final save, and with `ledger: off` the tenants' spend is that save
    only: the restarted gateway had forgotten some."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]}, overrides={"ledger": "off"})

    def spend():
        m = tgtest.parse_metrics(tgtest.admin(gw, "/metrics").body.decode())
        return m.get('llm_tenant_daily_spend_usd{tenant="acme"}', 0.0)

    for _ in range(3):
        assert chat(gw.port, gw.keys["acme"], M8B, max_tokens=20).status == 200
    before = spend()
    assert before > 0
    gw.proc.signal(signal.SIGTERM)
    while gw.proc.alive():
        try:
            os.kill(gw.proc.pid, signal.SIGHUP)
        except ProcessLookupError:
            break
        time.sleep(0.002)
    assert gw.proc.wait(10) == 0, gw.proc.tail()
    assert "tollgate: stopped" in gw.proc.stderr_text()
    assert _reloads(gw) == 0  # none once stopping
    gw.start()
    assert spend() == before


def test_a_burst_of_sighups_gives_one_reload(tg):
    """Each SIGHUP ran a whole reload on the main loop: a burst queued as
    many, and a SIGTERM behind them waited (seconds with a big tenants
    file). SIGHUPs now settle on the watcher's debounce: one reload, counted
    once."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]})
    for _ in range(10):
        gw.proc.signal(signal.SIGHUP)
        time.sleep(0.005)
    tgtest.wait_for(tgtest.alive_check(gw.proc)(lambda: _reloads(gw) >= 1), what="a reload")
    time.sleep(0.3)  # a second reload would follow at once
    assert _reloads(gw) == 1, gw.proc.tail()
    m = tgtest.parse_metrics(tgtest.admin(gw, "/metrics").body.decode())
    assert m["llm_config_reloads_total"] == 1


def test_a_fifo_tenants_file_fails_the_reload_at_once(tg):
    """A tenants_file that is a FIFO without a writer held the reload in
    open(2) for ever, and the main loop with it (SIGTERM unheard). Only
    regular files are read: the reload fails and says why, the gateway
    serves on."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]})
    fifo = os.path.join(gw.workdir, "tenants.pipe")
    os.mkfifo(fifo)
    gw.config.pop("tenants")
    gw.config["tenants_file"] = fifo
    gw.write_config()
    gw.proc.signal(signal.SIGHUP)
    tgtest.wait_for(lambda: "reload failed" in gw.proc.stderr_text(), what="the reload's failure")
    assert "tenants_file: cannot read '%s': not a regular file (a FIFO)" % fifo in \
        gw.proc.stderr_text(), gw.proc.tail()
    assert chat(gw.port, gw.keys["acme"], M8B, max_tokens=1).status == 200
    assert gw.stop() == 0


def test_check_config_valid(tg):
    gw = tg.gateway({M8B: ["http://127.0.0.1:9"]}, start=False)
    cp = gw.cli("check-config", check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_check_config_reports_each_error_with_line(tg):
    gw = tg.gateway({M8B: ["http://127.0.0.1:9"]}, start=False)
    with open(gw.config_path) as f:
        text = f.read()
    # two independent mistakes: a bad listen address and an unknown model
    # in a tenant's models_allowed
    text = text.replace("listen: 127.0.0.1:%d" % gw.port, "listen: not-an-address", 1)
    lines = text.splitlines()
    bad_listen_line = next(i for i, l in enumerate(lines, 1) if l.startswith("listen:"))
    text = text.replace("max_body_bytes: 65536", "max_body_bytes: lots")
    bad_body_line = next(i for i, l in enumerate(text.splitlines(), 1)
                         if l.startswith("max_body_bytes"))
    with open(gw.config_path, "w") as f:
        f.write(text)
    cp = gw.cli("check-config", check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0
    assert "%s:%d" % (gw.config_path, bad_listen_line) in out or \
        "%s:%d" % (os.path.basename(gw.config_path), bad_listen_line) in out, out
    assert ":%d" % bad_body_line in out, out


def test_serve_refuses_invalid_config(tg):
    gw = tg.gateway({M8B: ["http://127.0.0.1:9"]}, start=False)
    with open(gw.config_path, "a") as f:
        f.write("workers: [oops\n")
    proc = tgtest.Proc("tollgate-bad", [tgtest.binary("tollgate"), "serve", "--config",
                                        gw.config_path], gw.workdir)
    rc = proc.wait(15.0)
    assert rc not in (None, 0), proc.tail()
    assert gw.config_path in proc.stderr_text() or "tollgate.yaml" in proc.stderr_text()


def test_reload_keeps_what_needs_a_restart_and_says_so(tg):
    """A reload that moves data_dir and raises max_body_bytes: the gateway
    goes on writing and reading the ledger where it did (the admin API counts
    the requests before and after the reload), the old body bound holds, and
    the reload names both keys as waiting for a restart."""
    sim = tg.sim()
    gw = tg.gateway({M8B: [sim.url]})
    key = gw.keys["acme"]
    admin_key = gw.create_admin_key()
    gw.wait_admin_key(admin_key)
    assert chat(gw.port, key, M8B, max_tokens=5).status == 200
    day = time.strftime("%Y-%m-%d", time.gmtime())
    path = "/admin/v1/tenants/acme/usage/%s" % day

    def requests_counted():
        r = tgtest.admin(gw, path, key=admin_key)
        assert r.status == 200, r.body
        return r.json()["requests"]

    tgtest.wait_for(lambda: requests_counted() == 1, what="the first request's row")
    gw.config["data_dir"] = os.path.join(gw.workdir, "data-moved")
    gw.config["max_body_bytes"] = 4 * 65536
    tgtest.gateway_reload(gw)
    said = [l for l in gw.proc.stderr_text().splitlines() if "a restart is needed" in l]
    assert len(said) == 1, gw.proc.tail()
    assert "data_dir" in said[0] and "max_body_bytes" in said[0], said
    # the new limits apply, the restart-only keys do not
    assert chat(gw.port, key, M8B, max_tokens=5).status == 200
    tgtest.wait_for(lambda: requests_counted() == 2, what="both requests in the running ledger")
    big = chat_body(M8B, max_tokens=1, content="x" * (2 * 65536))
    r = tgtest.request(gw.port, "POST", "/v1/chat/completions", body=big, key=key)
    assert r.status == 413, r
