"""Authentication and model access: which keys are refused, with which
status and error code, and that keys created or revoked with the CLI while
the gateway runs take effect within a second, without a restart."""

import concurrent.futures
import json
import os
import sqlite3
import subprocess
import time

import pytest

import tgtest
from tgtest import chat, request

M8B, M70B, EMBED = tgtest.DEFAULT_MODELS


def _err(r, status, etype, code):
    assert r.status == status, r
    e = r.error()
    assert e["type"] == etype, e
    assert e["code"] == code, e
    assert e["message"], e
    assert r.header("x-request-id")
    return e


def test_missing_key(stack):
    _err(chat(stack.port, None, M8B), 401, "authentication_error", "missing_api_key")
    # an empty bearer is a missing key, not a malformed one... or invalid: both
    # are 401 authentication errors
    r = chat(stack.port, None, M8B, headers={"Authorization": "Bearer "})
    assert r.status == 401 and r.error()["type"] == "authentication_error"


@pytest.mark.parametrize("bad", [
    "tg-000000000000-nosuchsecretnosuchsecret",  # well formed, unknown id
    "tg-zzzz",                                   # malformed
    "sk-something-else",                         # not ours at all
    "x" * 300,                                   # long junk
])
def test_invalid_keys(stack, bad):
    _err(chat(stack.port, bad, M8B), 401, "authentication_error", "invalid_api_key")
    _err(chat(stack.port, None, M8B, headers={"X-Api-Key": bad}),
         401, "authentication_error", "invalid_api_key")


def test_right_id_wrong_secret(stack):
    kid = tgtest.key_id(stack.key)
    secret = stack.key.split("-", 2)[2]
    forged = "tg-%s-%s" % (kid, ("A" if secret[0] != "A" else "B") + secret[1:])
    _err(chat(stack.port, forged, M8B), 401, "authentication_error", "invalid_api_key")


def test_tenant_mismatch(stack):
    _err(chat(stack.port, stack.key, M8B, headers={"X-Tenant-Id": "small"}),
         401, "authentication_error", "tenant_mismatch")
    _err(chat(stack.port, None, M8B, headers={"X-Api-Key": stack.small_key, "X-Tenant-Id": "acme"}),
         401, "authentication_error", "tenant_mismatch")


def _raw(port, headers, method="POST", path="/v1/chat/completions"):
    """One request whose headers may repeat a name (a list of pairs)."""
    c = tgtest.RawConn(port)
    try:
        body = tgtest.chat_body(M8B) if method == "POST" else b""
        c.send(tgtest.http_request_bytes(method, path, body, headers=headers))
        return c.read_response(method)
    finally:
        c.close()


def test_ambiguous_credentials_refused(stack):
    """A request whose credentials could name two callers is refused with
    400 whichever header would have won: Authorization, X-Api-Key or
    X-Tenant-Id more than once, or a Bearer key and an X-Api-Key that
    differ. A Bearer token after a tab, the same key in both headers, and
    X-Api-Key next to another Authorization scheme (a front proxy's Basic)
    are served. The admin API judges them alike."""
    acme, small = stack.key, stack.small_key
    for headers in (
        [("Authorization", "Bearer " + acme), ("X-Tenant-Id", "acme"), ("X-Tenant-Id", "small")],
        [("Authorization", "Bearer " + acme), ("Authorization", "Bearer " + small)],
        [("X-Api-Key", acme), ("X-Api-Key", small)],
        [("X-Api-Key", acme), ("X-Api-Key", acme)],
        [("Authorization", "Bearer " + acme), ("X-Api-Key", small)],
        # an empty key beside a key: either header empty, the same answer
        [("Authorization", "Bearer " + acme), ("X-Api-Key", "")],
        [("Authorization", "Bearer"), ("X-Api-Key", acme)],
    ):
        _err(_raw(stack.port, headers), 400, "invalid_request_error", "ambiguous_credentials")
    for headers in ([("Authorization", "Bearer")], [("X-Api-Key", "")]):
        _err(_raw(stack.port, headers), 401, "authentication_error", "missing_api_key")
    for headers in (
        [("Authorization", "Bearer\t" + acme)],
        [("Authorization", "bearer " + acme), ("X-Api-Key", acme), ("X-Tenant-Id", "acme")],
        [("Authorization", "Basic dXNlcjpwYXNz"), ("X-Api-Key", acme)],
    ):
        r = _raw(stack.port, headers)
        assert r.status == 200, (headers, r)
    _err(_raw(stack.port, [("Authorization", "Basic dXNlcjpwYXNz")]),
         401, "authentication_error", "invalid_api_key")

    path = "/admin/v1/tenants/acme/usage/2026-01-01"
    admin = stack.admin_key
    stack.gw.wait_admin_key(admin, path=path)
    _err(_raw(stack.gw.admin_port, [("Authorization", "Bearer " + admin),
                                    ("X-Api-Key", acme)], "GET", path),
         400, "invalid_request_error", "ambiguous_credentials")
    _err(_raw(stack.gw.admin_port, [("Authorization", "Bearer " + admin),
                                    ("Authorization", "Bearer " + admin)], "GET", path),
         400, "invalid_request_error", "ambiguous_credentials")
    assert _raw(stack.gw.admin_port, [("Authorization", "Basic dXNlcjpwYXNz"),
                                      ("X-Api-Key", admin)], "GET", path).status == 200


def test_model_outside_tenant(stack):
    _err(chat(stack.port, stack.small_key, M70B), 403, "permission_error", "model_not_allowed")
    r = request(stack.port, "POST", "/v1/embeddings", body={"model": EMBED, "input": "x"},
                key=stack.small_key)
    _err(r, 403, "permission_error", "model_not_allowed")


def test_model_outside_key_scope(stack):
    scoped = stack.gw.create_key("acme", models=[M70B])
    assert chat(stack.port, scoped, M70B, max_tokens=1).status == 200
    _err(chat(stack.port, scoped, M8B), 403, "permission_error", "model_not_allowed")


def test_unknown_model_is_404_not_403(stack):
    _err(chat(stack.port, stack.key, "gpt-5-imaginary"), 404, "invalid_request_error",
         "model_not_found")


def _poll_status(port, key, want, timeout):
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        last = chat(port, key, M8B, max_tokens=1)
        if last.status == want:
            return time.monotonic() - t0, last
        time.sleep(0.05)
    return None, last


def test_key_created_while_running_works_within_a_second(stack):
    key = stack.gw.create_key("small", wait=False)
    elapsed, last = _poll_status(stack.port, key, 200, 1.5)
    assert elapsed is not None, "new key still refused after 1.5 s: %r" % last
    assert elapsed <= 1.2


def test_key_revoked_while_running_refused_within_a_second(stack):
    key = stack.gw.create_key("small")
    _, r = _poll_status(stack.port, key, 200, 1.5)
    assert r.status == 200, r
    stack.gw.revoke_key(key)
    elapsed, last = _poll_status(stack.port, key, 401, 1.5)
    assert elapsed is not None, "revoked key still accepted after 1.5 s: %r" % last
    assert elapsed <= 1.2
    assert last.error()["code"] == "invalid_api_key"
    # and other keys are untouched
    assert chat(stack.port, stack.small_key, M8B, max_tokens=1).status == 200


def test_a_request_waiting_for_a_slot_is_refused_once_its_key_is_revoked(tg):
    """A key revoked while one of its requests waits in the model's queue
    (every endpoint at max_inflight): the waiter has not reached a GPU, so
    it is refused with 401 within a second of the revocation, not sent
    upstream when a slot frees; a waiter of another key is still served,
    and the request already running finishes."""
    sim = tg.sim()
    gw = tg.gateway({M8B: tgtest.model_entry([sim.url], max_inflight=1)}, workers=1)
    holder_key = gw.keys["acme"]
    leaked = gw.create_key("acme")
    other = gw.create_key("acme")

    def slow(key, ms):
        t0 = time.monotonic()
        r = chat(gw.port, key, M8B, max_tokens=1, headers={"x-sim-ttft-ms": str(ms)}, timeout=20)
        return r, time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        holder = ex.submit(slow, holder_key, 4000)
        time.sleep(0.5)
        waiter = ex.submit(slow, leaked, 10)
        time.sleep(0.3)
        kept = ex.submit(slow, other, 10)
        time.sleep(0.3)
        assert not waiter.done() and not kept.done()
        t0 = time.monotonic()
        gw.revoke_key(leaked)
        r, _ = waiter.result(timeout=20)
        refused_after = time.monotonic() - t0
        _err(r, 401, "authentication_error", "invalid_api_key")
        assert refused_after <= 1.2, refused_after
        assert not holder.done()
        assert holder.result(timeout=20)[0].status == 200
        assert kept.result(timeout=20)[0].status == 200


def test_expired_key(stack):
    key = stack.gw.create_key("small", expires="1s", wait=False)
    time.sleep(2.2)
    _err(chat(stack.port, key, M8B), 401, "authentication_error", "invalid_api_key")
    rows = {r["id"]: r for r in stack.gw.list_keys()}
    assert rows[tgtest.key_id(key)]["status"] == "expired"


def test_key_scope_outside_tenant_refused_by_cli(stack):
    cp = stack.gw.cli("keys", "create", "--tenant", "small", "--models", M70B, check=False)
    assert cp.returncode != 0
    assert "tg-" not in cp.stdout


def test_keys_list_json(stack):
    key = stack.gw.create_key("small", models=[M8B], name="listed-key")
    stack.gw.revoke_key(key)
    rows = stack.gw.list_keys()
    assert isinstance(rows, list)
    by_id = {}
    for row in rows:
        rid = row.get("id") or row.get("key_id")
        by_id[rid] = row
    kid = tgtest.key_id(key)
    assert kid in by_id, rows
    row = by_id[kid]
    assert row["tenant"] == "small"
    assert row.get("name") == "listed-key"
    assert row.get("models") == [M8B]
    assert row.get("status") == "revoked"
    assert by_id[tgtest.key_id(stack.key)].get("status") == "active"
    # the secret is never listed
    secret = key.split("-", 2)[2]
    assert secret not in stack.gw.cli("keys", "list", "--json").stdout
    assert secret not in stack.gw.cli("keys", "list").stdout
    assert tgtest.key_id(stack.key) in by_id


def test_create_key_for_unknown_tenant_fails(stack):
    cp = stack.gw.cli("keys", "create", "--tenant", "nobody", check=False)
    assert cp.returncode == 1
    assert not cp.stdout.strip().startswith("tg-")
    assert 'tenant "nobody" is not in' in cp.stderr, cp.stderr
    # a --tenant no tenant can be named (empty, control bytes, 10 KB) is a
    # usage error whose message does not hand it back to the terminal
    for bad in ("", "acme\x1b[2J\x1b]0;owned\x07", "acme\nsmall", "a" * 10000):
        cp = stack.gw.cli("keys", "create", "--tenant", bad, check=False)
        assert cp.returncode == 2, (bad[:20], cp.returncode, cp.stderr)
        assert cp.stdout == ""
        assert "\x1b" not in cp.stderr and "\x07" not in cp.stderr
        assert "a" * 100 not in cp.stderr and len(cp.stderr) < 1000, cp.stderr[:200]
        assert "tenant name" in cp.stderr, cp.stderr


def _keys_cli(gw, args, stdout):
    """`tollgate keys ARGS` with its stdout on the file or descriptor given."""
    argv = [tgtest.binary("tollgate"), "keys", args[0], "--config", gw.config_path] + args[1:]
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env=tgtest.cli_env(), timeout=30)


def test_a_key_create_could_not_print_is_not_left_active(stack):
    """`keys create` whose stdout cannot take the key (a full disk, a reader
    that went away) exits 1, and the key it stored is revoked: nobody holds
    its secret, and an active key nobody has is a credential nobody can
    account for."""
    r, w = os.pipe()
    os.close(r)  # a pipe whose reader is gone: EPIPE (or SIGPIPE)
    try:
        outs = [("/dev/full", open("/dev/full", "w")), ("closed pipe", w)]
        for what, out in outs:
            before = {row["id"] for row in stack.gw.list_keys()}
            cp = _keys_cli(stack.gw, ["create", "--tenant", "small", "--name", "undelivered"], out)
            assert cp.returncode == 1, (what, cp.returncode, cp.stderr)
            assert "tg-" not in cp.stderr, (what, cp.stderr)
            new = [row for row in stack.gw.list_keys() if row["id"] not in before]
            assert len(new) == 1 and new[0]["status"] == "revoked", (what, new, cp.stderr)
            assert new[0]["id"] in cp.stderr and "revoked" in cp.stderr, (what, cp.stderr)
    finally:
        outs[0][1].close()
        os.close(w)


def test_revoke_never_echoes_an_argument_that_is_not_an_id(stack):
    """An argument of an id's length that is not one (upper case, control
    bytes, a slice of something pasted) revokes nothing, exits 1 and is not
    written back: it may hold a secret or a terminal's escape sequence."""
    kid = tgtest.key_id(stack.small_key)
    for arg in (kid.upper(), "\x1b]0;owned\x07xx", "secret-bits!"):
        assert len(arg) == 12
        cp = stack.gw.cli("keys", "revoke", arg, check=False)
        assert cp.returncode == 1, (arg, cp)
        assert arg not in cp.stderr and arg not in cp.stdout, (arg, cp.stderr)
        assert "\x1b" not in cp.stderr, (arg, cp.stderr)
    assert {r["id"]: r for r in stack.gw.list_keys()}[kid]["status"] == "active"


def test_admin_requests_refused_before_the_key_leave_an_audit_line(stack):
    """Every /admin/v1 request has its access-log line, those refused before
    any key is looked at too: another method than GET (405) and a path the
    admin API does not have (404). Probing the admin API leaves a trace."""
    admin = stack.admin_key
    stack.gw.wait_admin_key(admin)
    for method, path, status in (
        ("POST", "/admin/v1/tenants/acme/usage/2026-01-01", 405),
        ("DELETE", "/admin/v1/tenants/acme/invoices/2026-01", 405),
        ("GET", "/admin/v1/keys", 404),
        ("GET", "/admin/v1", 404),
    ):
        r = request(stack.gw.admin_port, method, path, key=admin)
        assert r.status == status, (method, path, r)
        e = stack.gw.access_entry(r.header("x-request-id"))
        assert (e["path"], e["status"], e["key_id"]) == (path, status, None), (method, path, e)


def test_keys_list_shows_odd_bytes_in_a_row_as_question_marks(tg):
    """A row the CLI did not write (an operator's SQL) may hold bytes no
    name of ours has: not UTF-8, control characters, a terminal's escape
    sequence. `keys list` shows every row, each such byte as `?`, in its
    table and in valid JSON lines; a bad row neither stops the listing nor
    reaches the terminal as it is."""
    gw = tg.gateway({m: ["http://127.0.0.1:9"] for m in tgtest.DEFAULT_MODELS}, start=False,
                    keys=("acme", "small"))
    odd = tgtest.key_id(gw.keys["acme"])
    db = sqlite3.connect(gw.db_path)
    try:
        db.execute("UPDATE api_keys SET name = CAST(? AS TEXT), models = CAST(? AS TEXT)"
                   " WHERE id = ?", (b"ops\xff\x1b[2J\nx", b"m\x07", odd))
        db.commit()
    finally:
        db.close()
    argv = [tgtest.binary("tollgate"), "keys", "list", "--config", gw.config_path]
    for extra in (["--json"], []):
        cp = subprocess.run(argv + extra, stdin=subprocess.DEVNULL, capture_output=True,
                            env=tgtest.cli_env(), timeout=30)
        assert cp.returncode == 0, (extra, cp)
        assert all(0x20 <= b < 0x7f or b == 0x0a for b in cp.stdout), (extra, cp.stdout)
        lines = cp.stdout.decode().splitlines()
        if extra:
            rows = {r["id"]: r for r in map(json.loads, lines)}
            assert set(rows) == {tgtest.key_id(k) for k in gw.keys.values()}, rows
            assert rows[odd]["name"] == "ops??[2J?x" and rows[odd]["models"] == ["m?"], rows[odd]
        else:
            assert len(lines) == 3, lines
            assert any(odd in ln and "ops??[2J?x" in ln for ln in lines), lines
