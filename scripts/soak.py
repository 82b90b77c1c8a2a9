#!/usr/bin/env python3
"""The load and the checks of scripts/soak.sh (which see). Standard library
only: asyncio clients on raw HTTP/1.1 keep-alive connections."""

import argparse
import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import time

# kind: (share of the requests, statuses a client of that kind may see).
# Every kind that reaches an upstream may also be refused by the tight
# tenant's limits (429) or a key's or tenant's model scope (403), or shed
# from a full queue (503). "left": the client hung up mid-stream.
ADMITTED = {403, 429, 503}
KINDS = {
    "chat": (.40, {200}),
    "stream": (.18, {200}),
    "stream_left": (.10, {"left"}),
    "embed": (.05, {200}),
    "upstream_500": (.03, {500}),
    "upstream_hangup": (.03, {502}),
    "upstream_hangup_mid_stream": (.03, {"truncated"}),
    "upstream_broken_body": (.02, {502, "truncated"}),
    "upstream_stall_left": (.02, {"left"}),
    "bad_json": (.04, {400}),
    "bad_key": (.03, {401}),
    "unknown_model": (.03, {404}),
    "pipelined_3": (.04, {200}),
}
REFUSED = ("bad_json", "bad_key", "unknown_model")


def pick(rnd):
    x = rnd.random()
    for kind, (share, _) in KINDS.items():
        if x < share:
            return kind
        x -= share
    return "chat"


def chat_body(model, stream):
    return json.dumps({"model": model, "max_tokens": random.choice([4, 16, 64]),
                       "stream": stream,
                       "messages": [{"role": "user",
                                     "content": "x" * random.randint(1, 400)}]}).encode()


def request(path, body, key, headers=()):
    head = ["POST %s HTTP/1.1" % path, "Host: soak", "Content-Type: application/json",
            "Content-Length: %d" % len(body)]
    if key:
        head.append("Authorization: Bearer " + key)
    head += list(headers)
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def read_response(r):
    head = await r.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await r.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await r.readuntil(b"\r\n")
                return status
            await r.readexactly(size + 2)
    length = 0
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await r.readexactly(length)
    return status


class Load:
    def __init__(self, args):
        self.a = args
        self.seen = {}          # (kind, status) -> count
        self.unexpected = {}

    def count(self, kind, status):
        self.seen[(kind, status)] = self.seen.get((kind, status), 0) + 1
        ok = KINDS[kind][1] | (set() if kind in REFUSED else ADMITTED)
        if status not in ok:
            self.unexpected[(kind, status)] = self.unexpected.get((kind, status), 0) + 1

    async def one(self, conn, rnd):
        """One request (three when pipelined) on conn; returns conn, or None
        when the connection is done with."""
        a = self.a
        kind = pick(rnd)
        r, w = conn
        key = rnd.choice([a.big_key, a.big_key, a.scoped_key, a.tight_key])
        model = rnd.choice(["llama-3.1-8b", "llama-3.1-70b"])
        stream = kind in ("stream", "stream_left", "upstream_hangup_mid_stream",
                          "upstream_stall_left") or \
            (kind == "upstream_broken_body" and rnd.random() < .5)
        fault = {"upstream_500": "status:500", "upstream_hangup": "disconnect",
                 "upstream_hangup_mid_stream": "disconnect-after:3",
                 "upstream_broken_body": "garbage",
                 "upstream_stall_left": "stall-after:2"}.get(kind)
        headers = ["x-sim-fault: " + fault] if fault else []
        if kind == "embed":
            msg = request("/v1/embeddings", json.dumps({"model": "nomic-embed-text",
                                                         "input": "soak"}).encode(), key)
        elif kind == "bad_json":
            msg = request("/v1/chat/completions", b'{"model": "llama-3.1-8b", "messages": [',
                          key)
        elif kind == "bad_key":
            msg = request("/v1/chat/completions", chat_body(model, False), "tg_" + "0" * 40)
        elif kind == "unknown_model":
            msg = request("/v1/chat/completions", chat_body("no-such-model", False), key)
        elif kind == "pipelined_3":
            msg = b"".join(request("/v1/chat/completions", chat_body(model, False), key)
                           for _ in range(3))
        else:
            msg = request("/v1/chat/completions", chat_body(model, stream), key, headers)
        w.write(msg)
        await w.drain()
        if kind in ("stream_left", "upstream_stall_left"):
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            status = int(head.split(b" ", 2)[1])
            if status == 200:
                await asyncio.wait_for(r.readuntil(b"data:"), 10)
                status = "left"
            self.count(kind, status)
            w.close()
            return None
        try:
            for _ in range(3 if kind == "pipelined_3" else 1):
                self.count(kind, await asyncio.wait_for(read_response(r), 20))
        except asyncio.IncompleteReadError:
            self.count(kind, "truncated")
            w.close()
            return None
        return conn

    async def client(self, end, seed):
        rnd = random.Random(seed)
        conn = None
        while time.monotonic() < end:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", self.a.port)
            try:
                conn = await self.one(conn, rnd)
            except (asyncio.TimeoutError, ConnectionError) as e:
                self.count("chat", type(e).__name__)
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    def rss_kib(self):
        with open("/proc/%d/status" % self.a.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def fds(self):
        return len(os.listdir("/proc/%d/fd" % self.a.pid))

    def client_sockets(self):
        """The gateway's connected sockets whose local port is the API's:
        its client connections (the listeners are not counted)."""
        inodes = set()
        for fd in os.listdir("/proc/%d/fd" % self.a.pid):
            try:
                link = os.readlink("/proc/%d/fd/%s" % (self.a.pid, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        n = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    next(f)
                    for line in f:
                        p = line.split()
                        if p[9] in inodes and p[3] != "0A" and \
                                int(p[1].rsplit(":", 1)[1], 16) == self.a.port:
                            n += 1
            except OSError:
                pass
        return n

    async def monitor(self, t0, end, samples):
        while True:
            samples.append((time.monotonic() - t0, self.rss_kib(), self.fds()))
            print("t=%4.0fs  rss %6d KiB  fds %4d  client connections %4d  responses %d" %
                  (samples[-1] + (self.client_sockets(), sum(self.seen.values()))), flush=True)
            if time.monotonic() >= end:
                return
            await asyncio.sleep(min(10, max(0.1, end - time.monotonic())))

    async def run(self):
        t0 = time.monotonic()
        end = t0 + self.a.seconds
        samples = []
        fds0 = self.fds()
        await asyncio.gather(self.monitor(t0, end, samples),
                             *[self.client(end, 1000 + i) for i in range(self.a.clients)])
        await asyncio.sleep(2)     # the gateway closes what the clients left
        rss1, fds1, open1 = self.rss_kib(), self.fds(), self.client_sockets()
        for (kind, status), n in sorted(self.seen.items(), key=str):
            print("%-28s %-10s %8d" % (kind, status, n))
        base = next((s for s in samples if s[0] >= 10), samples[0])
        print("rss: %d KiB at %.0fs, %d KiB at the end (%+.1f%%); fds: %d before, %d after "
              "(pooled upstream connections stay open); client connections left open: %d"
              % (base[1], base[0], rss1, 100.0 * (rss1 - base[1]) / base[1], fds0, fds1, open1))
        status = 0
        if self.unexpected:
            print("unexpected statuses: %r" % self.unexpected, file=sys.stderr)
            status = 1
        if open1:
            print("%d client connections still open 2 s after every client closed" % open1,
                  file=sys.stderr)
            status = 1
        return status


def check_ledger(db_path, log_path):
    """db_path: the SQLite file, or a postgres:// URL (read with psql)."""
    log = {}
    with open(log_path) as f:
        for line in f:
            e = json.loads(line)
            log[e["request_id"]] = e
    query = "SELECT request_id, status, prompt_tokens, completion_tokens FROM ledger"
    if db_path.startswith("postgres"):
        out = subprocess.run(["psql", db_path, "-X", "-A", "-t", "-F", " ", "-c", query],
                             check=True, capture_output=True, text=True).stdout
        rows = [(p[0], int(p[1]), int(p[2]), int(p[3]))
                for p in (line.split() for line in out.splitlines() if line)]
    else:
        db = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True)
        rows = db.execute(query).fetchall()
        db.close()
    reached = {rid for rid, e in log.items() if e.get("endpoint")}
    ids = [r[0] for r in rows]
    bad = []
    if len(ids) != len(set(ids)):
        bad.append("%d request ids stored twice" % (len(ids) - len(set(ids))))
    if set(ids) != reached:
        bad.append("%d access-log requests with an endpoint have no row, %d rows no such line"
                   % (len(reached - set(ids)), len(set(ids) - reached)))
    differ = [r for r in rows if r[0] in log and
              (log[r[0]]["status"], log[r[0]]["prompt_tokens"],
               log[r[0]]["completion_tokens"]) != tuple(r[1:])]
    if differ:
        bad.append("%d rows differ from their access-log line, e.g. %r" % (len(differ),
                                                                           differ[:2]))
    print("ledger: %d rows, %d access-log lines (%d with an endpoint)%s"
          % (len(rows), len(log), len(reached), "" if bad else ": one row each, as logged"))
    for b in bad:
        print("ledger: " + b, file=sys.stderr)
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int)
    p.add_argument("--pid", type=int)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--big-key")
    p.add_argument("--scoped-key")
    p.add_argument("--tight-key")
    p.add_argument("--check-ledger", metavar="DB")
    p.add_argument("--access-log")
    a = p.parse_args()
    if a.check_ledger:
        return check_ledger(a.check_ledger, a.access_log)
    return asyncio.run(Load(a).run())


if __name__ == "__main__":
    sys.exit(main())
