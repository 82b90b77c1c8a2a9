"""The usage ledger in PostgreSQL (`database: postgres://...`): a real
PostgreSQL server (tests/lib/pgtest.sh, through tgtest.Postgres) started
once for the module on a free loopback port; each test has its own
database on it.

- 10,000 mixed requests from three tenants (the same mix as
  test_ledger.py, abandoned streams included): one row per request with what the client saw; each tenant's
  invoice and daily usage, from the CLI and from the admin route, equal the
  client-observed usage x prices to the nano-USD;
- PostgreSQL stopped in the middle of the load and started again: every
  request still succeeds while it is down (the records go to
  <data_dir>/ledger.spool, which grows), and once it is back the spool is
  replayed and removed: rows == completed requests, none twice;
- kill -9 of the gateway in the middle of the load, then a restart: every
  response the client saw complete has exactly one row;
- budgets are rebuilt from the PostgreSQL ledger after a kill -9."""

import contextlib
import os
import re
import select
import socket
import sqlite3
import subprocess
import time

import pytest

import test_ledger as base
import tgtest

PRICES = base.PRICES


@pytest.fixture(scope="module")
def pg():
    why = tgtest.Postgres.available()
    assert why is None, why
    server = tgtest.Postgres().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = tgtest.Sim(workdir=str(tmp_path_factory.mktemp("sim")), workers=2,
                   models=tuple(base.PRICES_USD))
    s.start()
    try:
        yield s
    finally:
        s.stop(timeout=5)
        s.kill()


_N = [0]


def pg_gateway(tg, sim, pg, tenants=None):
    """A gateway whose keys and ledger live in a fresh database on pg;
    returns (gateway, database name). Not started."""
    _N[0] += 1
    name = "ledger_%d_%d" % (os.getpid(), _N[0])
    url = pg.create_database(name)
    gw = base.start_gw(tg, sim, tenants=tenants, start=False, database=url)
    return gw, name


def test_invoices_equal_client_usage_postgres(tg, sim, pg):
    gw, db = pg_gateway(tg, sim, pg)
    gw.start()
    tenants = base.load_tenants(gw)
    outcomes = tgtest.LedgerLoad(gw.port, tenants, count=10000, threads=8, seed=55,
                                 abandon=6).run()
    bad = base.failed(outcomes)
    assert not bad, "%d requests failed, e.g. %r" % (len(bad), bad[:3])
    kinds = {}
    for o in outcomes:
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    assert kinds["abandon"] == 6 and min(kinds.values()) >= 6, kinds
    assert kinds["chat"] > 3000 and kinds["stream_usage"] > 2000 and kinds["stream"] > 800, kinds
    rows = tgtest.pg_ledger_rows(pg, db)
    assert len(rows) == 10006, len(rows)
    tgtest.check_ledger_rows(outcomes, rows, PRICES, endpoint=sim.url)
    tgtest.check_invoices(gw, outcomes, PRICES, tenants)
    # nothing went to the SQLite file or a spool
    assert not os.path.exists(gw.spool_path)
    if os.path.exists(gw.db_path):
        d = sqlite3.connect(gw.db_path)
        try:
            has = d.execute("SELECT 1 FROM sqlite_master WHERE name = 'ledger'").fetchone()
            assert has is None or d.execute("SELECT COUNT(*) FROM ledger").fetchone() == (0,)
        finally:
            d.close()

    # the admin route reads the same database
    admin_key = gw.create_admin_key()
    month, day = tgtest.utc_month(), tgtest.utc_day()
    p = "/admin/v1/tenants/alpha/invoices/%s" % month
    gw.wait_admin_key(admin_key)
    r = tgtest.admin(gw, p, key=admin_key)
    assert r.status == 200, r
    assert base.strip_generated(tgtest.money_json(r.body)) == \
        base.strip_generated(gw.invoice("alpha", month))
    r = tgtest.admin(gw, "/admin/v1/tenants/gamma/usage/%s" % day, key=admin_key)
    assert r.status == 200 and tgtest.money_json(r.body) == gw.usage("gamma", day), r


def test_kill9_mid_load_every_completed_response_has_one_row_postgres(tg, sim, pg):
    gw, db = pg_gateway(tg, sim, pg)
    gw.start()
    tenants = base.load_tenants(gw)
    load, done = base.kill9_under_load(gw, tenants, seed=77)
    gw.start()                               # same database, same config

    def rows_of(rid):
        if rid is None:
            return tgtest.pg_ledger_rows(pg, db)
        assert re.match(r"^[A-Za-z0-9_-]+$", rid), rid
        return tgtest.pg_ledger_rows(pg, db, "WHERE request_id = '%s'" % rid)
    base.check_rows_after_kill9(gw, tenants, load, done, rows_of)
    assert not os.path.exists(gw.spool_path)


def test_postgres_stopped_mid_load_spools_then_replays(tg, sim, pg):
    gw, db = pg_gateway(tg, sim, pg)
    gw.start()
    tenants = base.load_tenants(gw)
    load = tgtest.LedgerLoad(gw.port, tenants, count=100000, threads=6, seed=66,
                             timeout=15).start()
    spool_sizes = []
    try:
        tgtest.wait_for(lambda: load.completed() >= 300, timeout=60,
                        what="300 requests before the outage")
        pg.stop()
        n_down = load.completed()
        # requests go on succeeding; their records go to the spool, which grows
        tgtest.wait_for(lambda: load.completed() >= n_down + 300, timeout=60,
                        what="300 requests completed while PostgreSQL is down")
        spool_sizes.append(os.path.getsize(gw.spool_path))
        n_mid = load.completed()
        tgtest.wait_for(lambda: load.completed() >= n_mid + 200, timeout=60,
                        what="200 more requests while PostgreSQL is down")
        spool_sizes.append(os.path.getsize(gw.spool_path))
        pg.start()
        n_up = load.completed()
        tgtest.wait_for(lambda: load.completed() >= n_up + 300, timeout=60,
                        what="300 requests after PostgreSQL returned")
    finally:
        load.stop()
        if not pg.running:
            pg.start()
    outcomes = load.wait()
    bad = base.failed(outcomes)
    assert not bad, "%d requests failed, e.g. %r" % (len(bad), bad[:3])
    assert 0 < spool_sizes[0] < spool_sizes[1], spool_sizes
    # the spool is replayed into the database and removed
    tgtest.wait_for(lambda: not os.path.exists(gw.spool_path), timeout=30,
                    what="the spool to be replayed and removed")
    rows = tgtest.pg_ledger_rows(pg, db)
    assert len(rows) == len(outcomes), (len(rows), len(outcomes))
    tgtest.check_ledger_rows(outcomes, rows, PRICES, endpoint=sim.url)
    tgtest.check_invoices(gw, outcomes, PRICES, tenants)
    err = gw.proc.stderr_text()
    assert "spooling to %s" % gw.spool_path in err, err[-2000:]
    assert "spool replayed" in err, err[-2000:]


def test_a_frozen_server_costs_an_answer_seconds_and_holds_no_stop(tg, sim, pg):
    """A server that is frozen (SIGSTOP here; a hung disk or a paused VM
    alike) keeps its connections standing: its kernel acknowledges every
    byte and keepalive, so neither TCP timeouts nor its own
    statement_timeout end a wait. The writer gives a batch the statement
    timeout (5 s) and a second more, then spools it; the key watcher's wait
    ends when the gateway stops. Before, the answer waited for as long as
    the server was frozen and so did a stop."""
    gw, db = pg_gateway(tg, sim, pg)
    gw.start()
    key = gw.create_key("alpha")
    assert base.ask(gw, key).status == 200
    pg.pause()
    try:
        time.sleep(0.5)                  # the key watcher is waiting on it now
        t0 = time.monotonic()
        r = tgtest.chat(gw.port, key, model=base.M, max_tokens=3, timeout=30)
        took = time.monotonic() - t0
        assert r.status == 200, r
        assert 5 <= took < 9, "the answer took %.1f s" % took
        assert os.path.getsize(gw.spool_path) > 0
        t0 = time.monotonic()
        # 75: stopped with the spooled record not yet in the database
        assert gw.stop(timeout=20) == 75
        took = time.monotonic() - t0
        assert took < 3, "the stop took %.1f s" % took
    finally:
        pg.resume()
    err = gw.proc.stderr_text()
    assert "no answer from the server within 6000 ms" in err, err[-2000:]
    # back: the spooled record is replayed at the next start, once
    gw.start()
    tgtest.wait_for(lambda: not os.path.exists(gw.spool_path), timeout=30,
                    what="the spool to be replayed and removed")
    rows = tgtest.pg_ledger_rows(pg, db)
    assert len(rows) == 2 and r.header("x-request-id") in [x["request_id"] for x in rows], rows
    gw.stop()


def test_a_retention_purge_on_a_frozen_server_fails_and_holds_no_stop(tg, sim, pg):
    """The retention purge (first 30 s after start, then hourly) runs on a
    connection of its own in libuv's thread pool. Two gateways, the server
    frozen before either purge starts:
    - with `connect_timeout=2` in its URL, the first gateway's purge gives
      up: `ledger_retention_purge_failed` on stderr and
      llm_ledger_purge_failures_total 1 (a failed purge said nothing before);
    - with `connect_timeout=60`, the second's purge waits on its connect,
      and a stop waited for it as long; the first SIGTERM now ends the
      purge's waits at once (under 10 s; 58 s without)."""
    gws = []
    for n, timeout in ((1, 2), (2, 60)):
        name = "purge_frozen_%d_%d" % (os.getpid(), n)
        url = pg.create_database(name) + "?connect_timeout=%d" % timeout
        gws.append(base.start_gw(tg, sim, start=False, database=url))
    quick, slow = gws
    t0 = time.monotonic()
    for gw in gws:
        gw.start()
    t_ready = time.monotonic()
    for gw in gws:
        assert base.ask(gw, gw.create_key("alpha")).status == 200
    assert t_ready - t0 < 20, "the gateways took %.1f s to start" % (t_ready - t0)
    time.sleep(max(0.0, t0 + 25 - time.monotonic()))
    pg.pause()                          # frozen before either purge's first run
    try:
        time.sleep(max(0.0, t_ready + 31 - time.monotonic()))  # both purges started
        failed = tgtest.wait_for(
            lambda: tgtest.gateway_events(quick, "ledger_retention_purge_failed"),
            timeout=10, interval=0.2, what="the first gateway's purge to give up")
        assert len(failed) == 1 and "stopping" not in failed[0]["detail"], \
            quick.proc.stderr_text()[-3000:]
        m = tgtest.parse_metrics(tgtest.admin(quick, "/metrics").body.decode())
        assert (m["llm_ledger_purges_total"], m["llm_ledger_purge_failures_total"]) == (0, 1), m
        assert not tgtest.gateway_events(slow, "ledger_retention_purge_failed")
        t = time.monotonic()
        assert slow.stop(timeout=90) == 0
        took = time.monotonic() - t
        assert quick.stop(timeout=30) == 0
    finally:
        pg.resume()
    assert took < 10, "the stop took %.1f s" % took
    events = tgtest.gateway_events(slow, "ledger_retention_purge_failed")
    assert len(events) == 1 and "the gateway is stopping" in events[0]["detail"], \
        slow.proc.stderr_text()[-3000:]


def spool_one_answer(gw, pg, before_restart=None):
    """gw answers once with the server up and once while it is stopped (that
    record goes to the spool); then before_restart() runs and the server
    starts again."""
    key = gw.create_key("alpha")
    assert base.ask(gw, key).status == 200
    pg.stop()
    try:
        assert base.ask(gw, key).status == 200
        assert os.path.getsize(gw.spool_path) > 0
    finally:
        if before_restart is not None:
            before_restart()
        pg.start()


def test_spool_replays_through_the_second_host_when_the_first_does_not_answer(tg, sim, pg):
    """`database: postgres://…@pg-a,pg-b/…` after a failover: pg-a (a
    socket that takes connections and never answers, as a host gone silent)
    stays first in the list. Without blocking, libpq waits on a host that
    does not answer for as long as it is asked to and never goes on to the
    next, so the writer's probe, which starts over every connect timeout,
    never reached pg-b: the spool was never replayed. Each probe now tries
    one host, the next one after a timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)                   # the kernel accepts; nobody answers
    try:
        name = "multihost_%d" % os.getpid()
        pg.create_database(name)
        url = "postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/%s" % (
            silent.getsockname()[1], pg.port, name)
        gw = base.start_gw(tg, sim, start=False, database=url)
        gw.start(timeout=40)             # each blocking connect waits 3 s on pg-a
        spool_one_answer(gw, pg)
        tgtest.wait_for(lambda: not os.path.exists(gw.spool_path), timeout=20,
                        what="the spool to be replayed through pg-b")
        assert pg.sql("SELECT COUNT(*) FROM ledger", db=name) == [("2",)]
        assert gw.stop() == 0
    finally:
        silent.close()


class SlowHandshake(tgtest.TcpServer):
    """A TCP relay to PostgreSQL that, while `delay` is set, holds each new
    connection that long before relaying it: a server whose handshake takes
    longer than the gateway's own connect timeout (3 s), as TLS to a
    distant database can."""

    def __init__(self, port):
        self.target = port
        self.delay = 0.0
        self.held = 0
        super().__init__()

    def handle(self, c):
        u = None
        try:
            if self.delay:
                self.held += 1
                time.sleep(self.delay)
            u = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            u.settimeout(None)
            while True:
                ready, _, _ = select.select([c, u], [], [])
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (u if s is c else c).sendall(data)
        except OSError:
            pass
        finally:
            c.close()
            if u is not None:
                u.close()


def test_spool_replays_when_the_handshake_needs_the_urls_longer_connect_timeout(tg, sim, pg):
    """`database: postgres://…?connect_timeout=10` in front of a server
    whose handshake takes 4 s. The writer's probe gave up on a connection
    after its own 3 s whatever the URL said and started another, which
    took 4 s again: the spool was never replayed. It now keeps the URL's
    connect timeout."""
    relay = SlowHandshake(pg.port)
    try:
        name = "slow_handshake_%d" % os.getpid()
        pg.create_database(name)
        url = "postgres://postgres@127.0.0.1:%d/%s?connect_timeout=10" % (relay.port, name)
        gw = base.start_gw(tg, sim, start=False, database=url)
        gw.start()

        def slow():
            relay.delay = 4.0
        spool_one_answer(gw, pg, before_restart=slow)
        tgtest.wait_for(lambda: not os.path.exists(gw.spool_path), timeout=30,
                        what="the spool to be replayed through a 4 s handshake")
        assert relay.held > 0
        assert pg.sql("SELECT COUNT(*) FROM ledger", db=name) == [("2",)]
        relay.delay = 0.0
        assert gw.stop() == 0
    finally:
        relay.close()


def test_records_the_database_refuses_go_aside_and_hold_nothing_back(tg, sim, pg):
    """An operator adds a CHECK constraint that refuses one tenant's rows,
    later a trigger that raises an exception for them. Every answer is
    still 200; every other record is in the table, once; each refused one
    is in ledger-rejected.spool, counted on /metrics and named on stderr
    (at most ten lines a minute, the rest counted in one); nothing is
    spooled. Before, the first refused batch sent every later record to
    the spool, which grew for ever. Appended to the spool while the
    gateway is stopped, the refused records are stored once the database
    takes them."""
    gw, db = pg_gateway(tg, sim, pg)
    gw.start()
    alpha, beta = gw.create_key("alpha"), gw.create_key("beta")
    rejected_path = os.path.join(gw.data_dir, "ledger-rejected.spool")

    def ask_all(keys):
        rs = tgtest.parallel(lambda k: base.ask(gw, k, max_tokens=3), [(k,) for k in keys])
        bad = [r for r in rs if isinstance(r, Exception) or r.status != 200]
        assert not bad, bad[:3]
        return [(k, r.header("x-request-id")) for k, r in zip(keys, rs)]

    def rejected_ids():
        with open(rejected_path) as f:
            return [line.split(" ")[2] for line in f]

    asked = ask_all([alpha, beta])
    pg.sql("ALTER TABLE ledger ADD CONSTRAINT no_beta CHECK (tenant <> 'beta') NOT VALID",
           db=db)
    asked += ask_all([alpha, alpha, alpha, beta] * 15)
    pg.sql("ALTER TABLE ledger DROP CONSTRAINT no_beta", db=db)
    pg.sql("CREATE FUNCTION refuse_beta() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
           "IF NEW.tenant = 'beta' THEN RAISE EXCEPTION 'tenant beta is closed'; END IF; "
           "RETURN NEW; END $$", db=db)
    pg.sql("CREATE TRIGGER refuse_beta BEFORE INSERT ON ledger FOR EACH ROW "
           "EXECUTE FUNCTION refuse_beta()", db=db)
    asked += ask_all([alpha, beta] * 3)
    refused = [rid for k, rid in asked[2:] if k == beta]
    assert len(refused) == 18

    rows = tgtest.by_request_id(tgtest.pg_ledger_rows(pg, db))
    assert set(rows) == {rid for _, rid in asked} - set(refused), sorted(rows)
    assert sorted(rejected_ids()) == sorted(refused)
    assert not os.path.exists(gw.spool_path)
    m = tgtest.parse_metrics(tgtest.admin(gw, "/metrics").body.decode())
    assert m['llm_ledger_records_total{outcome="rejected"}'] == 18, m
    assert m['llm_ledger_records_total{outcome="spooled"}'] == 0, m
    assert m['llm_ledger_records_total{outcome="lost"}'] == 0, m

    # the triggers dropped, the gateway stopped: appended to the spool, the
    # refused records are stored at the next start
    pg.sql("DROP TRIGGER refuse_beta ON ledger", db=db)
    assert gw.stop() == 0
    err = gw.proc.stderr_text()
    named = re.findall(r"refuses the record of request (\S+), tenant beta \((.*)\);", err)
    told = sum(int(n) for n in re.findall(r"refused (\d+) more records, not named", err))
    assert len(named) <= 10 and len(named) + told == 18, err[-3000:]
    assert {rid for rid, _ in named} <= set(refused)
    assert any("no_beta" in why for _, why in named), named
    with open(rejected_path) as src, open(gw.spool_path, "a") as dst:
        dst.write(src.read())
    os.unlink(rejected_path)
    gw.start()
    tgtest.wait_for(lambda: not os.path.exists(gw.spool_path), timeout=20,
                    what="the re-imported records to be replayed")
    rows = tgtest.by_request_id(tgtest.pg_ledger_rows(pg, db))
    assert set(rows) == {rid for _, rid in asked}
    assert not os.path.exists(rejected_path)
    gw.stop()


def test_budgets_rebuilt_from_the_postgres_ledger(tg, sim, pg):
    M = base.M
    tenants = {"day": tgtest.limited_tenant(models=[M], daily=base.usd(200000))}
    gw, db = pg_gateway(tg, sim, pg, tenants=tenants)
    key = gw.create_key("day")
    gw.start()
    assert base.ask(gw, key).status == 200
    assert base.ask(gw, key).status == 200
    base.assert_refused(base.ask(gw, key), "daily_budget")
    gw.kill()
    gw.checked_exit = True
    # only the ledger keeps the spend: the saved figures are erased
    if os.path.exists(gw.db_path):
        d = sqlite3.connect(gw.db_path)
        try:
            with d:
                if d.execute("SELECT 1 FROM sqlite_master WHERE name = 'tenant_spend'").fetchone():
                    d.execute("DELETE FROM tenant_spend")
        finally:
            d.close()
    pg.sql("DELETE FROM tenant_spend", db=db)
    assert pg.sql("SELECT SUM(cost_nano) FROM ledger", db=db) == [("159000",)]
    gw.checked_exit = False
    gw.start()
    base.assert_refused(base.ask(gw, key), "daily_budget")
    base.assert_refused(base.ask(gw, key, max_tokens=19), "daily_budget")
    assert base.ask(gw, key, max_tokens=18).status == 200
    base.assert_refused(base.ask(gw, key, max_tokens=1), "daily_budget")


def _spooling_gateway(tg, sim, pg, n, settings=()):
    """A gateway on pg that answered one request, then n more once its
    database turned read-only (with settings too): (gateway, database, key,
    request ids), the last n records in the spool."""
    gw, db = pg_gateway(tg, sim, pg)
    gw.start()
    key = gw.create_key("alpha")
    rids = [base.ask(gw, key, max_tokens=3).header("x-request-id")]
    for setting in tuple(settings) + ("default_transaction_read_only = on",):
        pg.sql("ALTER DATABASE %s SET %s" % (db, setting))
    # the gateway's sessions start again under the database's settings
    pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '%s'"
           " AND application_name = 'tollgate'" % db)
    for _ in range(n):
        r = base.ask(gw, key, max_tokens=3)
        assert r.status == 200, r
        rids.append(r.header("x-request-id"))
    tgtest.wait_for(lambda: os.path.exists(gw.spool_path), timeout=10,
                    what="records to spool")
    return gw, db, key, rids


def test_spool_replays_once_the_database_takes_writes_again(tg, sim, pg):
    """The writer's session turns read-only (here the database's
    default_transaction_read_only, as on a standby the connection stayed on
    after a failover): each batch is refused (read_only_sql_transaction)
    and spools, the answers stay 200. Once writes are allowed again, the
    spool replays within seconds, every record once. Before, the writer
    kept its read-only session, which its probe found live, and the spool
    never replayed. The database's own statement_timeout and lock_timeout
    of 1 ms do not reach the gateway, whose session sets its own."""
    gw, db, key, rids = _spooling_gateway(
        tg, sim, pg, 20, ("statement_timeout = '1ms'", "lock_timeout = '1ms'"))
    err = gw.proc.stderr_text()
    assert "read-only transaction" in err, err[-2000:]
    pg.sql("ALTER DATABASE %s RESET default_transaction_read_only" % db)
    tgtest.wait_for(lambda: not os.path.exists(gw.spool_path), timeout=15,
                    what="the spool to be replayed and removed")
    pg.sql("ALTER DATABASE %s RESET ALL" % db)     # for the test's own reads
    rows = tgtest.by_request_id(tgtest.pg_ledger_rows(pg, db))
    assert sorted(rows) == sorted(rids)
    m = tgtest.parse_metrics(tgtest.admin(gw, "/metrics").body.decode())
    assert m["llm_ledger_spool_bytes"] == 0, m
    assert m['llm_ledger_records_total{outcome="lost"}'] == 0, m
    assert m['llm_ledger_records_total{outcome="replayed"}'] == \
        m['llm_ledger_records_total{outcome="spooled"}'] > 0, m
    rids.append(base.ask(gw, key, max_tokens=3).header("x-request-id"))
    tgtest.wait_for(lambda: len(tgtest.pg_ledger_rows(pg, db)) == len(rids), timeout=10,
                    what="a new record to go straight to the database")
    assert not os.path.exists(gw.spool_path)
    gw.stop()


def test_a_stop_with_records_in_the_spool_says_so_and_the_next_start_replays_them(tg, sim, pg):
    """The database refuses writes (read-only) when the gateway is stopped:
    the last answers' records are in the spool, and the exit says so (75,
    EX_TEMPFAIL, and a line naming the spool) instead of the 0 of a stop
    with every record stored. The next start replays them: every request
    has its one row."""
    gw, db, key, rids = _spooling_gateway(tg, sim, pg, 3)
    gw.proc.signal(15)
    rc = gw.proc.wait(20.0)
    gw.checked_exit = True
    err = gw.proc.stderr_text()
    assert rc == 75, "exit code %s\n%s" % (rc, err[-2000:])
    assert "bytes of records in %s, not yet in the database" % gw.spool_path in err, err[-2000:]
    assert os.path.getsize(gw.spool_path) > 0
    pg.sql("ALTER DATABASE %s RESET default_transaction_read_only" % db)
    gw.start()
    assert not os.path.exists(gw.spool_path)
    rows = tgtest.by_request_id(tgtest.pg_ledger_rows(pg, db))
    assert sorted(rows) == sorted(rids)
    gw.stop()


def test_two_gateways_start_together_on_an_empty_database(tg, sim, pg):
    """Two replicas started at the same moment against an empty database
    whose transactions default to REPEATABLE READ: both migrate safely
    (one applies the schema, the other waits and finds it), both read the
    one cache_salt key, both serve, and a key created through either works
    on both."""
    _N[0] += 1
    name = "ledger_%d_%d" % (os.getpid(), _N[0])
    url = pg.create_database(name)
    pg.sql("ALTER DATABASE %s SET default_transaction_isolation = 'repeatable read'" % name)
    gws = [base.start_gw(tg, sim, start=False, database=url) for _ in range(2)]
    errors = tgtest.parallel(lambda g: g.start(), [(g,) for g in gws])
    assert not [e for e in errors if isinstance(e, Exception)], errors
    assert pg.sql("SELECT COUNT(*), MAX(version) FROM schema_migrations", db=name) == \
        [("7", "7")]
    assert pg.sql("SELECT COUNT(*) FROM gateway_secrets", db=name) == [("1",)]
    key = gws[0].create_key("alpha")
    for g in gws:
        tgtest.wait_for(lambda: base.ask(g, key, max_tokens=3).status == 200, timeout=5,
                        what="the new key to work on every replica")
    for g in gws:
        assert g.stop() == 0


def _collation(pg, db, table, column):
    return pg.sql("SELECT COALESCE(collation_name, '-') FROM information_schema.columns"
                  " WHERE table_name = '%s' AND column_name = '%s'" % (table, column), db=db)


MIGRATE_LOCK = 0x746f6c6c67617465    # TG_DB_PG_MIGRATE_LOCK (src/meter/db_pg.h)


def test_ledger_reconnects_while_a_migration_holds_the_lock(tg, sim, pg):
    """A `tollgate migrate` in progress holds the migration lock for as long
    as it takes. A gateway whose connections drop meanwhile (a server
    restart, a network blip) finds its schema current and goes on: its
    answers do not wait for the lock."""
    gw, db = pg_gateway(tg, sim, pg)
    gw.start()
    key = gw.create_key("alpha")
    assert base.ask(gw, key).status == 200
    holder = subprocess.Popen(
        [pg.PSQL, "-X", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
         "-d", db, "-c", "BEGIN; SELECT pg_advisory_xact_lock(%d); SELECT pg_sleep(60); COMMIT;"
         % MIGRATE_LOCK],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tgtest.wait_for(lambda: pg.sql(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted",
            db=db) == [("1",)], timeout=10, what="psql to hold the migration lock")
        # every connection of the gateway drops
        pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '%s'"
               " AND pid <> pg_backend_pid() AND query NOT LIKE '%%pg_sleep%%'" % db, db=db)
        t0 = time.monotonic()
        r = tgtest.chat(gw.port, key, model=base.M, max_tokens=3, timeout=60)
        took = time.monotonic() - t0
        assert r.status == 200, r
        assert took < 10, "the answer waited %.1f s for the migration lock" % took
        rid = r.header("x-request-id")
        tgtest.wait_for(lambda: pg.sql("SELECT COUNT(*) FROM ledger WHERE request_id = '%s'"
                                       % rid, db=db) == [("1",)],
                        timeout=10, what="the answer's row in PostgreSQL")
    finally:
        holder.kill()
        holder.wait()
    gw.stop()


def test_migrate_command_postgres_with_and_without_a_time_limit(tg, sim, pg):
    """`tollgate migrate` applies what a starting gateway would, with no
    statement timeout unless --timeout gives one (a start allows 300 s, too
    little for migration 6's index rebuild on a very large ledger)."""
    gw, db = pg_gateway(tg, sim, pg)
    cp = gw.tool("migrate")
    m = re.fullmatch(r"postgres schema migrated from version 0 to (\d+)\n", cp.stdout)
    assert m, cp.stdout
    version = int(m.group(1))
    assert version >= 6
    assert pg.sql("SELECT MAX(version) FROM schema_migrations", db=db) == [(str(version),)]
    assert _collation(pg, db, "ledger", "tenant") == [("C",)]
    assert gw.tool("migrate").stdout == "postgres schema at version %d: nothing to do\n" % version

    # The database as version 5 left it: migration 6 (the byte-order keys)
    # is to run again, and must wait for the ledger's lock.
    pg.sql("ALTER TABLE ledger ALTER COLUMN tenant TYPE TEXT COLLATE \"default\","
           " ALTER COLUMN request_id TYPE TEXT COLLATE \"default\"", db=db)
    pg.sql("DELETE FROM schema_migrations WHERE version >= 6", db=db)
    assert _collation(pg, db, "ledger", "tenant") == [("-",)]
    holder = subprocess.Popen(
        [pg.PSQL, "-X", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
         "-d", db, "-c", "BEGIN; LOCK TABLE ledger IN ACCESS SHARE MODE;"
         " SELECT pg_sleep(30); COMMIT;"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tgtest.wait_for(lambda: pg.sql(
            "SELECT COUNT(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE c.relname = 'ledger' AND l.granted AND l.pid <> pg_backend_pid()",
            db=db) == [("1",)], timeout=10, what="psql to hold the ledger's lock")
        t0 = time.monotonic()
        cp = gw.tool("migrate", "--timeout", "1", check=False)
        took = time.monotonic() - t0
        assert cp.returncode == 1 and cp.stdout == "", cp
        assert "migration 6 failed" in cp.stderr and "statement timeout" in cp.stderr, cp.stderr
        assert took < 20, took
        # nothing of the failed migration stayed
        assert pg.sql("SELECT MAX(version) FROM schema_migrations", db=db) == [("5",)]
        assert _collation(pg, db, "ledger", "tenant") == [("-",)]
        # without a limit it waits for the lock, then completes
        waiting = subprocess.Popen(gw.tool_argv("migrate"), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=tgtest.cli_env(), cwd=gw.workdir)
        time.sleep(2)
        assert waiting.poll() is None, waiting.communicate()
        pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
               " WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()", db=db)
        out, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 0, err
        assert out == "postgres schema migrated from version 5 to %d\n" % version, (out, err)
    finally:
        holder.kill()
        holder.wait()
    assert _collation(pg, db, "ledger", "tenant") == [("C",)]
    assert _collation(pg, db, "ledger", "request_id") == [("C",)]
    # a gateway starts on it and records in PostgreSQL
    gw.start()
    key = gw.create_key("alpha")
    assert base.ask(gw, key).status == 200
    gw.stop()
    assert pg.sql("SELECT COUNT(*) FROM ledger", db=db) == [("1",)]


@contextlib.contextmanager
def ledger_locked(pg, db):
    """An operator's session holding the ledger table of database db locked
    (ACCESS EXCLUSIVE) for the block's time: every query of it waits."""
    holder = subprocess.Popen([pg.PSQL, "-X", "-q", "-h", "127.0.0.1", "-p", str(pg.port),
                               "-U", "postgres", "-d", db],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        holder.stdin.write("BEGIN; LOCK TABLE ledger IN ACCESS EXCLUSIVE MODE;\n")
        holder.stdin.flush()
        time.sleep(1)
        yield
    finally:
        holder.stdin.write("ROLLBACK;\n\\q\n")
        holder.stdin.flush()
        holder.wait(10)


def test_slow_admin_queries_leave_the_thread_pool_to_requests(tg, sim, pg):
    """Admin invoice and usage queries run on libuv's thread pool, which the
    native upstream client's name lookups share: at most two run at a time
    (the others wait their turn in order), so four slow ones (here: the
    ledger table locked by an operator's session) neither take the whole
    pool nor delay a request to an endpoint named by host name. Every
    waiting query is still answered."""
    import socket
    import threading
    url = pg.create_database("tp_starve")
    port = sim.url.rsplit(":", 1)[1]
    name = socket.gethostname()
    named = name if socket.gethostbyname(name) == "127.0.0.1" else "127.0.0.1"
    models = {
        "llama-3.1-8b": tgtest.model_entry(["http://127.0.0.1:%s" % port]),
        "mistral-7b": tgtest.model_entry(["http://%s:%s" % (named, port)]),
    }
    tenants = {"beta": base.ledger_tenant(["llama-3.1-8b", "mistral-7b"])}
    gw = tg.gateway(models, tenants=tenants, keys=(), start=False, workers=1,
                    overrides={"database": url + "?options=-c%20lock_timeout%3D3000"
                                                       "%20-c%20statement_timeout%3D10000",
                               # no writer meeting the lock: the request waits for nothing
                               "ledger": "off"})
    key = gw.create_key("beta")
    gw.start()
    admin_key = gw.create_admin_key()
    gw.wait_admin_key(admin_key)
    statuses = []
    with ledger_locked(pg, "tp_starve"):
        def ask_invoice():
            r = tgtest.admin(gw, "/admin/v1/tenants/beta/invoices/2026-12", key=admin_key,
                             timeout=30)
            statuses.append(r.status)
        ths = [threading.Thread(target=ask_invoice) for _ in range(4)]
        for th in ths:
            th.start()
        time.sleep(1)
        waiting = pg.sql("SELECT left(query, 40) FROM pg_stat_activity WHERE datname = "
                         "'tp_starve' AND wait_event_type = 'Lock'")
        assert len(waiting) == 2, waiting
        t0 = time.time()
        r = tgtest.chat(gw.port, key, model="mistral-7b", max_tokens=2, timeout=30)
        took = time.time() - t0
        assert r.status == 200, r
        assert took < 1.0, "a request to %s took %.1f s behind the admin queries" % (named, took)
        for th in ths:
            th.join(30)
    # each query met the lock's timeout: the ledger could not be read, said so
    assert statuses == [500] * 4, statuses
    audit = [e["status"] for e in gw.access_log_entries()
             if e.get("path") == "/admin/v1/tenants/beta/invoices/2026-12"]
    assert audit == [500] * 4, audit


def test_an_admin_query_running_at_sigterm_is_answered(tg, sim, pg):
    """SIGTERM drains the admin API like the API: a ledger query still
    running when it comes is answered before the gateway stops (it was cut:
    the admin loop stopped as soon as the API's workers had)."""
    import signal
    import threading
    url = pg.create_database("admin_drain")
    gw = tg.gateway({"llama-3.1-8b": [sim.url]}, keys=(), start=False, workers=1,
                    overrides={"database": url, "ledger": "off"})
    gw.start()
    admin_key = gw.create_admin_key()
    gw.wait_admin_key(admin_key)
    out = {}
    with ledger_locked(pg, "admin_drain"):
        def ask():
            out["r"] = tgtest.admin(gw, "/admin/v1/tenants/acme/invoices/2026-12",
                                    key=admin_key, timeout=30)
        th = threading.Thread(target=ask)
        th.start()
        tgtest.wait_for(lambda: pg.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                       "'admin_drain' AND wait_event_type = 'Lock'") == [("1",)],
                        what="the admin query waiting for the lock")
        gw.proc.signal(signal.SIGTERM)
        time.sleep(1)
    th.join(30)
    assert out["r"].status == 200, out["r"]
    assert out["r"].json()["tenant_id"] == "acme"
    assert gw.proc.wait(30) == 0
    gw.checked_exit = True
