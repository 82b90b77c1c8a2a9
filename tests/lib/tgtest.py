"""Shared harness for Tollgate's integration and client tests (stdlib only).

It starts the real binaries (`tollgate-sim`, `tollgate serve`) on free loopback
ports, writes the gateway's YAML config from a Python dict, creates keys with
the CLI, and talks HTTP to them: through http.client for ordinary requests and
through raw sockets where a test needs control of the bytes (pipelining, slow
readers, half-sent requests, streams read event by event with arrival times).

Every process started here is recorded; `kill_all()` ends whichever is still
running (the pytest fixtures and an atexit hook call it), so a failing test
never leaves a server behind. Each process writes its stderr to a file in its
temporary directory; `tails()` returns the end of each for failure reports.

PostgreSQL servers (`Postgres`, through tests/lib/pgtest.sh) are stopped and
removed by `kill_all()` too. For the usage ledger: exact money parsing
(`money_json`), a mixed-load driver that records what each client saw
(`LedgerLoad`, `Outcome`) and the checks of ledger rows and invoices against
it (`check_ledger_rows`, `check_invoices`).

Binaries come from $TG_BUILD_DIR (default: <repo>/build-asan).
"""

import atexit
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Sanitizer settings for the processes we start: leaks make the exit code
# non-zero, which the tests assert against.
SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=23",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "LSAN_OPTIONS": "exitcode=23",
}

DEFAULT_MODELS = ("llama-3.1-8b", "llama-3.1-70b", "nomic-embed-text")


# --------------------------------------------------------------------------
# small utilities

def build_dir():
    """The directory holding the binaries under test."""
    return os.path.abspath(os.environ.get("TG_BUILD_DIR") or os.path.join(REPO, "build-asan"))


def faults_built():
    """Whether the binaries under test have failure injection (TG_FAULTS,
    src/core/fault.h): the sanitizer build has it."""
    try:
        with open(os.path.join(build_dir(), "CMakeCache.txt")) as f:
            return "TG_SANITIZE:BOOL=ON" in f.read()
    except OSError:
        return False


def cli_env():
    """The environment our binaries run in (the sanitizers' options)."""
    env = dict(os.environ)
    env.update(SAN_ENV)
    return env


def binary(name):
    path = os.path.join(build_dir(), name)
    if not os.access(path, os.X_OK):
        raise RuntimeError("binary not found: %s (set TG_BUILD_DIR or build first)" % path)
    return path


# Ports when suites run side by side (`make test` runs the suites under
# `ctest -j`, the integration suite in pytest-xdist workers): each run
# (TG_PORT_SHARD) and each of its workers (PYTEST_XDIST_WORKER, gwN) takes
# its ports from a block of its own below the kernel's ephemeral range
# (32768-60999 on Debian), so no two, and no outgoing connection's local
# port, pick the same one between the pick and the bind. Without
# TG_PORT_SHARD the kernel picks.
PORT_BLOCK_FIRST = 20000
PORT_BLOCK_SIZE = 1500
PORT_BLOCKS = 8
_port_next = [0]


def _port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return s.getsockname()[1]
    except OSError:
        return None
    finally:
        s.close()


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    shard = os.environ.get("TG_PORT_SHARD")
    if not shard:
        return _port_free(0)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    if not shard.isdigit() or not re.fullmatch(r"gw[0-9]+", worker):
        raise RuntimeError("TG_PORT_SHARD must be a number, not %r" % shard)
    block = int(shard) + int(worker[2:])
    if block >= PORT_BLOCKS:
        raise RuntimeError("port block %d past the last (%d)" % (block, PORT_BLOCKS - 1))
    first = PORT_BLOCK_FIRST + block * PORT_BLOCK_SIZE
    for _ in range(PORT_BLOCK_SIZE):
        port = first + _port_next[0] % PORT_BLOCK_SIZE
        _port_next[0] += 1
        if _port_free(port):
            return port
    raise RuntimeError("no free port in %d-%d" % (first, first + PORT_BLOCK_SIZE - 1))


def closed_port():
    """A port that refuses connections (bound once, then released)."""
    return free_port()


@contextlib.contextmanager
def unconnectable_port():
    """A port on which a connect never completes (a listener whose backlog
    is full), for the block's time."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    try:
        for _ in range(3):
            f = socket.socket()
            fillers.append(f)
            f.setblocking(False)
            try:
                f.connect(hole.getsockname())
            except BlockingIOError:
                pass
        yield hole.getsockname()[1]
    finally:
        for f in fillers:
            f.close()
        hole.close()


class ProcessDied(AssertionError):
    """A process the harness waited on exited; polling stops at once."""


def wait_for(pred, timeout=5.0, interval=0.05, what="condition"):
    """Polls pred() until it returns a truthy value; returns that value.
    Raises AssertionError naming `what` after `timeout` seconds; a
    ProcessDied raised by pred ends the wait at once."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except ProcessDied:
            raise
        except Exception as e:  # noqa: BLE001 - polled predicates may fail while starting
            last_exc = e
        if time.monotonic() >= deadline:
            msg = "timed out after %.1fs waiting for %s" % (timeout, what)
            if last_exc is not None:
                msg += " (last error: %r)" % (last_exc,)
            raise AssertionError(msg)
        time.sleep(interval)


def rss_kb(pid):
    """Resident set size of pid in KiB, from /proc/PID/status VmRSS."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


def tail(path, n=60):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------
# YAML emitter: enough for our config (dicts, lists, strings, numbers, bools)

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.\-/]+$")
_PLAIN_STR = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_.:/\-]*$")
# strings a YAML reader would resolve to a number, bool or null: quote them
_LOOKS_TYPED = re.compile(r"^([-+]?[0-9._]+([eE][-+]?[0-9]+)?|true|false|yes|no|on|off|null|~)$",
                          re.IGNORECASE)


def _yaml_scalar(v):
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        if _PLAIN_STR.match(v) and not _LOOKS_TYPED.match(v):
            return v
        # JSON's double-quoted strings are valid YAML double-quoted scalars.
        return json.dumps(v)
    raise TypeError("cannot emit %r as YAML" % (v,))


def _yaml_key(k):
    k = str(k)
    return k if _PLAIN_KEY.match(k) else json.dumps(k)


def to_yaml(obj, indent=0):
    """Returns obj (dict/list/scalars) as block-style YAML text."""
    pad = " " * indent
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict) and v:
                out.append("%s%s:\n%s" % (pad, _yaml_key(k), to_yaml(v, indent + 2)))
            elif isinstance(v, list) and v:
                out.append("%s%s:\n%s" % (pad, _yaml_key(k), to_yaml(v, indent + 2)))
            elif isinstance(v, dict):
                out.append("%s%s: {}\n" % (pad, _yaml_key(k)))
            elif isinstance(v, list):
                out.append("%s%s: []\n" % (pad, _yaml_key(k)))
            else:
                out.append("%s%s: %s\n" % (pad, _yaml_key(k), _yaml_scalar(v)))
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, (dict, list)) and v:
                inner = to_yaml(v, indent + 2)
                # put the first line after the dash
                out.append("%s- %s" % (pad, inner[indent + 2:]))
            elif isinstance(v, dict):
                out.append("%s- {}\n" % pad)
            elif isinstance(v, list):
                out.append("%s- []\n" % pad)
            else:
                out.append("%s- %s\n" % (pad, _yaml_scalar(v)))
    else:
        out.append("%s%s\n" % (pad, _yaml_scalar(obj)))
    return "".join(out)


# --------------------------------------------------------------------------
# process bookkeeping

_ALL = []          # every Proc ever started in this interpreter
_ALL_LOCK = threading.Lock()


class Proc:
    """One started child process with its stderr (and stdout) in files."""

    def __init__(self, name, argv, workdir, env=None):
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.stderr_path = os.path.join(workdir, "%s.stderr" % name)
        self.stdout_path = os.path.join(workdir, "%s.stdout" % name)
        full_env = cli_env()
        if env:
            full_env.update(env)
        self._err = open(self.stderr_path, "ab")
        self._out = open(self.stdout_path, "ab")
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                      stderr=self._err, env=full_env, cwd=workdir,
                                      start_new_session=True)
        self.pid = self.popen.pid
        self.returncode = None
        with _ALL_LOCK:
            _ALL.append(self)

    def alive(self):
        return self.popen.poll() is None

    def stderr_text(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def signal(self, sig):
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout):
        """Waits up to timeout seconds; returns the exit code (negative = signal)
        or None when still running."""
        try:
            self.returncode = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._close_files()
        return self.returncode

    def stop(self, timeout=15.0):
        """SIGTERM, wait up to timeout, then SIGKILL. Returns the exit code of
        the SIGTERM'd process (negative when it had to be killed)."""
        if not self.alive():
            return self.wait(0.1)
        self.popen.send_signal(signal.SIGTERM)
        rc = self.wait(timeout)
        if rc is None:
            self.kill()
            rc = self.wait(5.0)
            return rc if rc is not None else -9
        return rc

    def kill(self):
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                self.popen.kill()
        self.wait(5.0)

    def _close_files(self):
        for f in (self._err, self._out):
            try:
                f.close()
            except OSError:
                pass

    def tail(self, n=60):
        return tail(self.stderr_path, n)


def all_procs():
    with _ALL_LOCK:
        return list(_ALL)


def kill_all():
    """Kills every process this harness started that is still running, and
    stops (and removes) every PostgreSQL server a `Postgres` started."""
    for p in all_procs():
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    for pg in list(_PG_SERVERS):
        try:
            pg.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def tails(procs=None, n=40):
    """Text with the stderr tail of each process (all started ones by default)."""
    parts = []
    for p in procs if procs is not None else all_procs():
        parts.append("----- %s (pid %d, rc %s) stderr tail: %s\n%s" % (
            p.name, p.pid, p.popen.poll(), p.stderr_path, p.tail(n)))
    return "\n".join(parts)


_TMPDIRS = []   # made by make_tmpdir(); removed at exit unless $TG_KEEP_TMP


def _at_exit():
    kill_all()
    if not os.environ.get("TG_KEEP_TMP"):
        for d in _TMPDIRS:
            shutil.rmtree(d, ignore_errors=True)


def _on_sigterm(signum, frame):
    # children run in their own sessions: a signal to our group misses them
    _at_exit()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


atexit.register(_at_exit)
if threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _on_sigterm)


def _wait_line(proc, pattern, timeout):
    rx = re.compile(pattern)

    def seen():
        m = rx.search(proc.stderr_text())
        if m is None and not proc.alive():
            raise ProcessDied("%s exited with %s before ready:\n%s" % (
                proc.name, proc.popen.poll(), proc.tail()))
        return m

    try:
        return wait_for(seen, timeout=timeout, what="%s to print /%s/" % (proc.name, pattern))
    except ProcessDied:
        raise
    except AssertionError as e:
        raise AssertionError("%s\n%s" % (e, proc.tail())) from None


def alive_check(proc):
    """A wait_for predicate wrapper that stops the wait if proc died."""
    def wrap(pred):
        def run():
            if not proc.alive():
                raise ProcessDied("%s exited with %s:\n%s" % (proc.name, proc.popen.poll(),
                                                               proc.tail()))
            return pred()
        return run
    return wrap


def make_tmpdir(prefix="tg-it-"):
    """A fresh temp dir, removed at exit (kept when $TG_KEEP_TMP is set)."""
    d = tempfile.mkdtemp(prefix=prefix)
    _TMPDIRS.append(d)
    return d


# --------------------------------------------------------------------------
# the simulator

class Sim:
    """tollgate-sim on a free loopback port."""

    def __init__(self, workdir=None, port=None, workers=1, ttft_ms=0, token_ms=0,
                 max_num_seqs=None, default_tokens=None, models=DEFAULT_MODELS,
                 extra_args=(), name=None):
        self.workdir = workdir or make_tmpdir("tg-sim-")
        self.port = port or free_port()
        self.name = name or "sim-%d" % self.port
        self.args = ["--listen", "127.0.0.1:%d" % self.port, "--workers", str(workers),
                     "--ttft-ms", str(ttft_ms), "--token-ms", str(token_ms)]
        if max_num_seqs is not None:
            self.args += ["--max-num-seqs", str(max_num_seqs)]
        if default_tokens is not None:
            self.args += ["--default-tokens", str(default_tokens)]
        if models:
            self.args += ["--models", ",".join(models)]
        self.args += list(extra_args)
        self.proc = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self, timeout=15.0):
        self.proc = Proc(self.name, [binary("tollgate-sim")] + self.args, self.workdir)
        _wait_line(self.proc, r"tollgate-sim listening on", timeout)
        wait_for(alive_check(self.proc)(
            lambda: request(self.port, "GET", "/health", timeout=2).status == 200),
            timeout=timeout, what="%s /health" % self.name)
        return self

    def metrics_text(self):
        r = request(self.port, "GET", "/metrics", timeout=5)
        assert r.status == 200, r
        return r.body.decode()

    def metrics(self):
        return parse_metrics(self.metrics_text())

    def metric(self, name, default=0.0):
        """Sum of every sample of `name` (any labels) in the sim's /metrics."""
        return metric_sum(self.metrics(), name, default)

    def stop(self, timeout=15.0):
        return self.proc.stop(timeout) if self.proc else 0

    def kill(self):
        if self.proc:
            self.proc.kill()

    @property
    def pid(self):
        return self.proc.pid


def parse_metrics(text):
    """Prometheus text format → {"name{labels}": value} (labels kept verbatim)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)", line)
        if not m:
            continue
        try:
            out[m.group(1)] = float(m.group(2))
        except ValueError:
            pass
    return out


def metric_sum(metrics, name, default=0.0):
    found = False
    total = 0.0
    for k, v in metrics.items():
        base = k.split("{", 1)[0]
        if base == name:
            found = True
            total += v
    return total if found else default


# --------------------------------------------------------------------------
# the gateway

def default_tenants(models=DEFAULT_MODELS):
    """Two tenants with limits far above anything a test sends, so only the
    behaviour under test decides the outcome. `acme` may use every model,
    `small` only the first."""
    def tenant(allowed, tier, prio):
        return {
            "tier": tier,
            "models_allowed": list(allowed),
            "rate_limits": {"requests_per_minute": 100000, "tokens_per_minute": 100000000,
                            "concurrent_requests": 1000},
            "budget": {"daily_limit_usd": 100000.0, "monthly_limit_usd": 1000000.0,
                       "alert_threshold_percent": 80},
            "priority": prio,
        }
    return {
        "acme": tenant(models, "enterprise", "high"),
        "small": tenant(models[:1], "free", "low"),
    }


def model_entry(urls, max_inflight=64, prompt="0.0005", completion="0.0015"):
    return {
        "endpoints": [{"url": u, "max_inflight": max_inflight} for u in urls],
        "pricing": {"prompt_per_1k_usd": prompt, "completion_per_1k_usd": completion},
    }


class Gateway:
    """`tollgate serve` with a config built from Python values.

    models: {name: [endpoint urls]} or {name: full model dict}; tenants: the
    tenants map (default_tenants() when None); overrides: top-level keys that
    replace the defaults (timeouts are merged key by key)."""

    def __init__(self, models, tenants=None, workdir=None, workers=2, overrides=None):
        self.workdir = workdir or make_tmpdir("tg-gw-")
        self.port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.port:
            self.admin_port = free_port()
        self.data_dir = os.path.join(self.workdir, "data")
        self.access_log = os.path.join(self.workdir, "access.log")
        os.makedirs(self.data_dir, exist_ok=True)
        mcfg = {}
        for name, v in models.items():
            mcfg[name] = model_entry(v) if isinstance(v, (list, tuple)) else v
            if isinstance(v, (list, tuple)) and "embed" in name:
                mcfg[name]["kind"] = "embedding"  # as examples/ configures them
        cfg = {
            "listen": "127.0.0.1:%d" % self.port,
            "admin_listen": "127.0.0.1:%d" % self.admin_port,
            "workers": workers,
            "data_dir": self.data_dir,
            "access_log": self.access_log,
            "max_body_bytes": 65536,
            "max_header_bytes": 8192,
            "health_check_interval": "1s",
            "forward_headers": ["x-sim-fault", "x-sim-ttft-ms", "x-sim-token-ms"],
            "timeouts": {
                "client_request": "2s", "client_keepalive": "5s", "upstream_connect": "1s",
                "upstream_first_byte": "5s", "upstream_idle": "3s", "drain": "10s",
            },
            "tenants": tenants if tenants is not None else default_tenants(tuple(models)),
            "models": mcfg,
        }
        if os.environ.get("TG_UPSTREAM_CLIENT"):
            # runs the whole suite against the chosen upstream client
            cfg["upstream_client"] = os.environ["TG_UPSTREAM_CLIENT"]
        for k, v in (overrides or {}).items():
            if k == "timeouts" and isinstance(v, dict):
                cfg["timeouts"].update(v)
            elif v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        self.config = cfg
        self.config_path = os.path.join(self.workdir, "tollgate.yaml")
        self.write_config()
        self.proc = None
        self.env = None  # extra environment of the gateway process
        self.checked_exit = False  # set by tests that assert the exit themselves

    def write_config(self):
        with open(self.config_path, "w") as f:
            f.write(to_yaml(self.config))

    @property
    def base(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def pid(self):
        return self.proc.pid

    def start(self, timeout=20.0, ready=True):
        self.proc = Proc("tollgate-%d" % self.port,
                         [binary("tollgate"), "serve", "--config", self.config_path],
                         self.workdir, env=self.env)
        _wait_line(self.proc, r"tollgate: serving on", timeout)
        live = alive_check(self.proc)
        wait_for(live(lambda: admin(self, "/healthz", timeout=2).status == 200),
                 timeout=timeout, what="gateway /healthz")
        if ready:
            wait_for(live(lambda: admin(self, "/readyz", timeout=2).status == 200),
                     timeout=timeout, what="gateway /readyz 200")
        return self

    def cli(self, *args, check=True, timeout=30):
        """Runs `tollgate <args> --config FILE`; returns CompletedProcess."""
        return self._run_cli(list(args[:2]) + ["--config", self.config_path] + list(args[2:]),
                             check, timeout)

    def create_key(self, tenant, models=None, expires=None, name=None, wait=True):
        """Creates a key with the CLI; returns the key text (tg-<id>-<secret>).
        With wait (and the gateway running) returns once the gateway accepts
        the key (GET /v1/models no longer 401), at most 3 s later."""
        args = ["keys", "create", "--tenant", tenant]
        if models:
            args += ["--models", ",".join(models)]
        if expires:
            args += ["--expires", expires]
        if name:
            args += ["--name", name]
        cp = self.cli(*args)
        key = cp.stdout.strip()
        assert re.match(r"^tg-[0-9a-f]{12}-\S+$", key), "unexpected key output %r" % cp.stdout
        if wait and self.proc is not None and self.proc.alive():
            wait_for(lambda: request(self.port, "GET", "/v1/models", key=key,
                                     timeout=3).status != 401,
                     timeout=3.0, what="the gateway to accept a new key")
        return key

    def tool_argv(self, command, *args):
        """The argv of `tollgate COMMAND --config FILE ARGS...`, for a caller
        that runs it itself (in the background; with env=cli_env())."""
        return [binary("tollgate"), command, "--config", self.config_path] + list(args)

    def tool(self, command, *args, check=True, timeout=60):
        """Runs `tollgate COMMAND --config FILE ARGS...` (the form of the
        one-word commands: invoice, usage, check-config); returns the
        CompletedProcess (raises on a non-zero exit when check)."""
        return self._run_cli([command, "--config", self.config_path] + list(args),
                             check, timeout)

    def _run_cli(self, argv_tail, check, timeout):
        argv = [binary("tollgate")] + argv_tail
        cp = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout, env=cli_env(), cwd=self.workdir)
        if check and cp.returncode != 0:
            raise AssertionError("%s exited %d\nstdout: %s\nstderr: %s" % (
                " ".join(argv), cp.returncode, cp.stdout, cp.stderr))
        return cp

    def invoice(self, tenant, month, fmt=None):
        """`tollgate invoice` for tenant and month (YYYY-MM): the parsed JSON
        (numbers as Decimal, see money_json) or, with fmt="csv", the text."""
        args = ["--tenant", tenant, "--month", month]
        if fmt:
            args += ["--format", fmt]
        out = self.tool("invoice", *args).stdout
        return out if fmt == "csv" else money_json(out)

    def usage(self, tenant, day):
        """`tollgate usage` for tenant and day (YYYY-MM-DD), parsed (Decimal)."""
        return money_json(self.tool("usage", "--tenant", tenant, "--day", day).stdout)

    def create_admin_key(self, name=None):
        """`tollgate keys create --admin`; returns the key text."""
        args = ["keys", "create", "--admin"]
        if name:
            args += ["--name", name]
        cp = self.cli(*args)
        key = cp.stdout.strip()
        assert re.match(r"^tg-[0-9a-f]{12}-\S+$", key), "unexpected key output %r" % cp.stdout
        return key

    def wait_admin_key(self, key, path="/admin/v1/tenants/x/usage/2026-01-01", timeout=10.0):
        """Waits until the running gateway's admin API accepts key (a new
        key is picked up by its key watcher); the assertion lists every
        answer seen when it does not."""
        seen = []

        def ok():
            try:
                r = admin(self, path, key=key, timeout=3)
            except OSError as e:
                seen.append(repr(e))
                return False
            seen.append(r.status)
            return r.status != 401
        try:
            wait_for(alive_check(self.proc)(ok), timeout=timeout, interval=0.1,
                     what="the gateway to accept the admin key")
        except AssertionError as e:
            raise AssertionError("%s; answers: %s" % (e, seen[-20:])) from None

    @property
    def db_path(self):
        """The SQLite database of `database: sqlite` (keys, ledger)."""
        return os.path.join(self.data_dir, "tollgate.db")

    @property
    def spool_path(self):
        """The ledger's spool file (exists only while records wait in it)."""
        return os.path.join(self.data_dir, "ledger.spool")

    def revoke_key(self, key_or_id):
        return self.cli("keys", "revoke", key_id(key_or_id))

    def list_keys(self):
        """Rows of `keys list --json` (JSON lines, or one JSON array)."""
        cp = self.cli("keys", "list", "--json")
        text = cp.stdout.strip()
        if text.startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def access_log_entries(self):
        """The access log's records so far. Only whole lines count: the
        gateway appends many lines a write, and a read may meet one half
        written (as `tail -f` would)."""
        try:
            with open(self.access_log) as f:
                text = f.read()
        except OSError:
            return []
        text = text[:text.rfind("\n") + 1]
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def access_entry(self, request_id, timeout=3.0):
        """The access-log record of request_id, waiting for it to be written."""
        def find():
            for e in self.access_log_entries():
                if e.get("request_id") == request_id:
                    return e
            return None
        return wait_for(find, timeout=timeout, what="access log entry %s" % request_id)

    def rss_kb(self):
        return rss_kb(self.proc.pid)

    def stop(self, timeout=20.0):
        """SIGTERM and wait; returns the exit code (0 expected)."""
        return self.proc.stop(timeout) if self.proc else 0

    def kill(self):
        if self.proc:
            self.proc.kill()


def key_id(key):
    """The 12-hex-character id inside tg-<id>-<secret> (or the id itself)."""
    m = re.match(r"^tg-([0-9a-f]{12})-", key)
    return m.group(1) if m else key


# --------------------------------------------------------------------------
# HTTP helpers (http.client)

class Resp:
    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.header_list = headers           # [(name lower, value)]
        self.headers = {}
        for k, v in headers:
            self.headers.setdefault(k, v)
        self.body = body

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def json(self):
        return json.loads(self.body)

    def error(self):
        """The body's "error" object, checking the envelope's shape."""
        doc = self.json()
        assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), doc
        err = doc["error"]
        for field in ("message", "type", "code"):
            assert isinstance(err.get(field), str), "error.%s missing in %r" % (field, doc)
        return err

    def __repr__(self):
        return "<Resp %s %s %r>" % (self.status, self.headers, self.body[:300])


def auth_headers(key):
    return {"Authorization": "Bearer %s" % key} if key else {}


def request(port, method, path, body=None, headers=None, key=None, timeout=10.0):
    """One request on a fresh connection. body: dict/list → JSON, str/bytes raw."""
    h = {}
    h.update(auth_headers(key))
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    elif isinstance(body, str):
        body = body.encode()
    h.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, r.reason, [(k.lower(), v) for k, v in r.getheaders()], data)
    finally:
        conn.close()


def admin(gw, path, timeout=5.0, key=None):
    """GET path on the gateway's admin listener (with a Bearer key when given)."""
    return request(gw.admin_port, "GET", path, key=key, timeout=timeout)


def chat_body(model="llama-3.1-8b", max_tokens=None, stream=False, content="Hello there",
              include_usage=None, **extra):
    b = {"model": model, "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        b["max_tokens"] = max_tokens
    if stream:
        b["stream"] = True
    if include_usage is not None:
        b["stream_options"] = {"include_usage": include_usage}
    b.update(extra)
    return b


def chat(port, key, model="llama-3.1-8b", max_tokens=None, headers=None, timeout=15.0, **kw):
    return request(port, "POST", "/v1/chat/completions",
                   body=chat_body(model, max_tokens, **kw), headers=headers, key=key,
                   timeout=timeout)


# --------------------------------------------------------------------------
# raw sockets: pipelining, slow readers, partial requests, timed streams

class RawConn:
    """A client socket with an HTTP/1.1 response parser that hands the body
    out incrementally (chunked or Content-Length or until close)."""

    def __init__(self, port, rcvbuf=None, timeout=10.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # before connect, so the window is small from the handshake on
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buf = bytearray()  # received, not consumed from self.pos on
        self.pos = 0
        self.eof = False

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self):
        """Closes with RST (SO_LINGER 0), like a client that vanished."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        self.close()

    def _fill(self, timeout=None):
        """Reads more bytes into buf; returns False at EOF (or reset)."""
        if self.eof:
            return False
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        if self.pos > 65536 and self.pos * 2 > len(self.buf):
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data
        return True

    def _avail(self):
        return len(self.buf) - self.pos

    def _take(self, n):
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += len(out)
        return out

    def _read_until(self, sep, limit=1 << 20):
        scanned = 0  # bytes after self.pos known not to start a match
        while True:
            i = self.buf.find(sep, self.pos + scanned)
            if i >= 0:
                return self._take(i + len(sep) - self.pos)
            scanned = max(0, self._avail() - len(sep) + 1)
            if self._avail() > limit or not self._fill():  # _fill may move pos
                return None

    def _read_exact(self, n):
        while self._avail() < n:
            if not self._fill():
                return None
        return self._take(n)

    def read_head(self):
        """Parses status line and headers. Returns (status, reason, [(k, v)])
        or None when the connection closed first."""
        head = self._read_until(b"\r\n\r\n")
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        hdrs = []
        for line in lines[1:]:
            if not line:
                continue
            k, _, v = line.partition(":")
            hdrs.append((k.strip().lower(), v.strip()))
        self._head = (status, reason, hdrs)
        return self._head

    def iter_body(self, hdrs, method="GET", status=200):
        """Yields (monotonic time, bytes) pieces of the decoded body. Sets
        self.complete to True when the body ended as framed (last chunk or
        Content-Length reached), False when the connection closed early."""
        self.complete = False
        h = dict(hdrs)
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            self.complete = True
            return
        te = h.get("transfer-encoding", "").lower()
        if "chunked" in te:
            while True:
                line = self._read_until(b"\r\n")
                if line is None:
                    return
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    # trailers until an empty line
                    while True:
                        t = self._read_until(b"\r\n")
                        if t is None or t == b"\r\n":
                            break
                    self.complete = True
                    return
                data = self._read_exact(size)
                if data is None:
                    return
                if self._read_exact(2) is None:
                    return
                yield time.monotonic(), data
        elif "content-length" in h:
            left = int(h["content-length"])
            while left > 0:
                if not self._avail() and not self._fill():
                    return
                piece = self._take(left)
                left -= len(piece)
                yield time.monotonic(), piece
            self.complete = True
        else:
            while True:
                if self._avail():
                    piece = self._take(self._avail())
                    yield time.monotonic(), piece
                if not self._fill():
                    self.complete = True
                    return

    def read_response(self, method="GET"):
        """A whole response as Resp (None when the connection closed first)."""
        head = self.read_head()
        if head is None:
            return None
        status, reason, hdrs = head
        body = b"".join(p for _, p in self.iter_body(hdrs, method, status))
        r = Resp(status, reason, hdrs, body)
        r.complete = self.complete
        return r

    def closed_by_peer(self, timeout=3.0):
        """True when the peer closes the connection within timeout (any
        leftover bytes are discarded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self._fill(timeout=max(0.01, deadline - time.monotonic())):
                    return True
            except socket.timeout:
                return False
            self.buf = bytearray()
            self.pos = 0
        return False


def http_request_bytes(method, path, body=b"", headers=None, key=None, host="127.0.0.1"):
    """Serialises one HTTP/1.1 request (Content-Length framing). headers: a
    dict, or a list of (name, value) pairs, which may repeat a name."""
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        if not any(k.lower() == "content-type" for k, _ in pairs):
            pairs.append(("Content-Type", "application/json"))
    elif isinstance(body, str):
        body = body.encode()
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s" % host]
    for k, v in list(auth_headers(key).items()) + pairs:
        lines.append("%s: %s" % (k, v))
    if body or method in ("POST", "PUT"):
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Event:
    def __init__(self, t, data):
        self.t = t            # time.monotonic() when the event was complete
        self.data = data      # the data: field (str)

    def json(self):
        return json.loads(self.data)

    def __repr__(self):
        return "<Event %.3f %s>" % (self.t, self.data[:120])


class SSEStream:
    """A streaming request read event by event over a raw socket.

    After construction, .status/.headers hold the response head and .t0 the
    time the request was sent. events() yields Event objects as they
    arrive; once exhausted, .complete tells whether the HTTP body ended as
    framed and .done whether a `data: [DONE]` event was seen."""

    def __init__(self, port, body, key=None, headers=None, path="/v1/chat/completions",
                 rcvbuf=None, timeout=15.0, read_head=True):
        self.conn = RawConn(port, rcvbuf=rcvbuf, timeout=timeout)
        self.t0 = time.monotonic()
        self.conn.send(http_request_bytes("POST", path, body, headers=headers, key=key))
        self.status = None
        self.headers = {}
        self.done = False
        self.complete = False
        self._raw = []
        self.all_events = []
        if read_head:
            self.read_head()

    def read_head(self):
        head = self.conn.read_head()
        assert head is not None, "connection closed before the response head"
        self.status, self.reason, self.header_list = head
        self.headers = dict(self.header_list)
        self._body = self.conn.iter_body(self.header_list, "POST", self.status)
        return head

    def events(self):
        pending = b""
        for t, piece in self._body:
            self._raw.append(piece)
            pending += piece
            # lines end with LF, CRLF or a lone CR; a CR last may be the
            # first half of a CRLF, so it waits for the next piece
            held = b"\r" if pending.endswith(b"\r") else b""
            if held:
                pending = pending[:-1]
            pending = pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if b"\n\n" not in pending:
                pending += held
                continue
            blocks = pending.split(b"\n\n")
            pending = blocks.pop() + held
            for block in blocks:
                data_lines = []
                for line in block.decode("utf-8", "replace").split("\n"):
                    if line.startswith("data:"):
                        v = line[5:]
                        data_lines.append(v[1:] if v.startswith(" ") else v)
                if not data_lines:
                    continue
                ev = Event(t, "\n".join(data_lines))
                if ev.data == "[DONE]":
                    self.done = True
                self.all_events.append(ev)
                yield ev
        self.complete = self.conn.complete

    def read_all(self):
        return list(self.events())

    def body_bytes(self):
        """Reads what is left and returns the decoded body (for error replies)."""
        for _ in self.events():
            pass
        return self.raw

    @property
    def raw(self):
        """The decoded body bytes read so far."""
        return b"".join(self._raw)

    def close(self):
        self.conn.close()

    def abort(self):
        self.conn.abort()


def content_events(events):
    """The chunk events with a non-empty choices list (what carries text)."""
    out = []
    for e in events:
        if e.data == "[DONE]":
            continue
        doc = e.json()
        if doc.get("choices"):
            out.append(e)
    return out


def role_only(event):
    """1 for a chunk whose every choice only announces its role, with no
    content (vLLM's first chunk of each chat choice): no token."""
    chs = event.json().get("choices") or []
    return bool(chs) and all(
        isinstance(ch.get("delta"), dict) and "role" in ch["delta"] and
        all(k == "role" or (k == "content" and v in (None, "")) for k, v in ch["delta"].items())
        for ch in chs)


def billed_events(events):
    """The events a stream without usage is billed a token each for: those
    with choices, the role chunks left out."""
    return [e for e in content_events(events) if not role_only(e)]


def assembled_text(events):
    parts = []
    for e in content_events(events):
        ch = e.json()["choices"][0]
        delta = ch.get("delta") or {}
        if delta.get("content"):
            parts.append(delta["content"])
        elif ch.get("text"):
            parts.append(ch["text"])
    return "".join(parts)


def usage_events(events):
    """Events whose JSON carries a usage object and no choices."""
    out = []
    for e in events:
        if e.data == "[DONE]":
            continue
        doc = e.json()
        if not doc.get("choices") and doc.get("usage"):
            out.append(e)
    return out


def rmtree(path):
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------
# a scripted upstream for cases the simulator cannot express per endpoint

class TcpServer:
    """A loopback listener on a free port that runs handle(conn) on a thread
    of its own for each connection it accepts, until close(). Subclasses
    set their own attributes before calling __init__."""

    def __init__(self, backlog=64):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(c,), daemon=True).start()

    def handle(self, conn):
        raise NotImplementedError

    def close(self):
        self.sock.close()


class FakeUpstream:
    """A tiny HTTP server on a free port answering every POST with a fixed
    status and JSON body (and the (name, value) pairs of `headers`, which
    may repeat a name; after a 100 Continue with the pairs of `interim`
    when that is set), and every GET with 200 (so health probes pass),
    `get_delay` seconds after the request. Counts the POSTs it received."""

    def __init__(self, status=503, body=None):
        import http.server

        self.status = status
        self.content_type = "application/json"  # "text/event-stream" for a stream
        self.body = json.dumps(body if body is not None else {
            "error": {"message": "fake upstream says %d" % status, "type": "server_error",
                      "code": "fake"}}).encode()
        self.headers = []  # (name, value) header lines added to each POST's answer
        self.interim = None  # header lines of a 100 Continue sent before it, when set
        self.posts = 0
        self.gets = 0
        self.get_delay = 0.0  # seconds before a GET is answered
        self.last_headers = []  # (name, value) of the last POST, as received
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, status, body, ctype="application/json", extra=()):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                for k, v in extra:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                outer.gets += 1
                if outer.get_delay:
                    time.sleep(outer.get_delay)
                try:
                    self._send(200, b'{"status":"ok","object":"list","data":[]}')
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a probe that gave up waiting

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                outer.posts += 1
                outer.last_headers = list(self.headers.items())
                if outer.interim is not None:
                    self.send_response_only(100)
                    for k, v in outer.interim:
                        self.send_header(k, v)
                    self.end_headers()
                self._send(outer.status, outer.body, outer.content_type, list(outer.headers))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# Names of the simulator's /metrics counters the tests read.
SIM_ABORTED = "sim_requests_aborted_total"
SIM_GEN_TOKENS = "sim_generation_tokens_total"
SIM_RUNNING = "sim_requests_running"
SIM_WAITING = "sim_requests_waiting"
SIM_REQUESTS = "sim_requests_total"
SIM_COMPLETED = "sim_requests_completed_total"
SIM_FAULTED = "sim_requests_faulted_total"


# --------------------------------------------------------------------------
# Redis, for the shared policy state (state: redis://...)

class RedisError(Exception):
    """An error reply (-ERR ...) from Redis."""


class Redis:
    """/usr/bin/redis-server on a free loopback port with persistence off
    (`--save '' --appendonly no`, files in its own temp dir). stop() and
    start() again keep the same port, so a gateway configured with url()
    sees the same server go away and come back. cmd() speaks RESP over a
    fresh socket per call, enough to inspect keys from a test."""

    SERVER = "/usr/bin/redis-server"

    def __init__(self, workdir=None, port=None, name=None):
        self.workdir = workdir or make_tmpdir("tg-redis-")
        self.port = port or free_port()
        self.name = name or "redis-%d" % self.port
        self.proc = None
        self.starts = 0

    def url(self, db=0):
        return "redis://127.0.0.1:%d/%d" % (self.port, db)

    def start(self, timeout=10.0):
        if not os.access(self.SERVER, os.X_OK):
            raise RuntimeError("%s not found (scripts/install-deps.sh installs redis-server)"
                               % self.SERVER)
        argv = [self.SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.workdir,
                "--daemonize", "no", "--logfile", "",
                # verbose: a client Redis drops for a protocol error, and
                # each connection, show in the log a failing test prints
                "--loglevel", "verbose"]
        self.starts += 1
        self.proc = Proc("%s-%d" % (self.name, self.starts), argv, self.workdir)
        wait_for(alive_check(self.proc)(self.ping), timeout=timeout,
                 what="%s to answer PING" % self.name)
        return self

    def ping(self):
        try:
            return self.cmd("PING", timeout=0.5) == "PONG"
        except (OSError, RedisError):
            return False

    def stop(self, timeout=10.0):
        """SIGTERM (nothing is saved) and wait; returns the exit code."""
        rc = self.proc.stop(timeout) if self.proc else 0
        # the port must refuse connections before a test relies on it
        wait_for(lambda: not self.ping(), timeout=timeout, what="%s to stop" % self.name)
        return rc

    def restart(self, timeout=10.0):
        """Starts a new server on the same port (empty: nothing was saved)."""
        if self.proc is not None and self.proc.alive():
            self.stop()
        return self.start(timeout)

    def kill(self):
        if self.proc:
            self.proc.kill()

    def alive(self):
        return self.proc is not None and self.proc.alive()

    def log_tail(self, n=40):
        """The end of each start's log (stdout) with its exit code."""
        out = []
        for i in range(1, self.starts + 1):
            name = "%s-%d" % (self.name, i)
            path = os.path.join(self.workdir, "%s.stdout" % name)
            rc = self.proc.popen.poll() if i == self.starts and self.proc else "-"
            out.append("----- %s (rc %s): %s\n%s" % (name, rc, path, tail(path, n)))
        return "\n".join(out)

    # ---- RESP client ------------------------------------------------------

    def cmd(self, *args, timeout=2.0):
        """Sends one command; returns the reply: str for simple and bulk
        strings, int, None for a null, list for arrays. Raises RedisError
        for an error reply, OSError when nothing listens."""
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            s.sendall(b"".join(out))
            f = s.makefile("rb")
            try:
                return self._reply(f)
            finally:
                f.close()
        finally:
            s.close()

    def _reply(self, f):
        line = f.readline()
        if not line.endswith(b"\r\n"):
            raise OSError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n + 2)
            return data[:-2].decode("utf-8", "replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply(f) for _ in range(n)]
        raise OSError("unexpected redis reply %r" % line)

    def keys(self, pattern="*"):
        return sorted(self.cmd("KEYS", pattern) or [])


# --------------------------------------------------------------------------
# tenant limits and budgets

RATELIMIT_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                     "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
                     "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def limited_tenant(models=DEFAULT_MODELS[:1], rpm=None, tpm=None, concurrency=None,
                   daily=None, monthly=None, alert=None, tier="standard", priority="medium"):
    """A tenant in the seed's format with only the given limits (None = the
    key is left out = unlimited). Budgets are decimal USD text ("0.0001")
    so they reach the config exactly."""
    t = {"tier": tier, "models_allowed": list(models), "priority": priority}
    rl = {}
    for k, v in (("requests_per_minute", rpm), ("tokens_per_minute", tpm),
                 ("concurrent_requests", concurrency)):
        if v is not None:
            rl[k] = v
    if rl:
        t["rate_limits"] = rl
    b = {}
    for k, v in (("daily_limit_usd", daily), ("monthly_limit_usd", monthly),
                 ("alert_threshold_percent", alert)):
        if v is not None:
            b[k] = v
    if b:
        t["budget"] = b
    return t


def usd_nano(text):
    """Exact nano-USD of a decimal USD text ("0.0005" -> 500000)."""
    from decimal import Decimal
    v = Decimal(str(text)) * 1000000000
    assert v == v.to_integral_value(), "%s USD is not a whole number of nano-USD" % text
    return int(v)


def nano_per_token(per_1k_usd):
    """Nano-USD per token of a price per 1K tokens ("0.0015" -> 1500)."""
    from decimal import Decimal
    v = Decimal(str(per_1k_usd)) * 1000000
    assert v == v.to_integral_value(), "price %s is not whole nano-USD per token" % per_1k_usd
    return int(v)


def _not_rendered():
    """The request members the gateway's prompt estimate leaves out (no
    upstream renders them into the prompt): the names of `not_rendered` in
    src/api/proxy.c, read from there so the two never differ."""
    with open(os.path.join(REPO, "src", "api", "proxy.c")) as f:
        text = f.read()
    m = re.search(r"static int not_rendered\(const char \*k\) \{\s*"
                  r"static const char \*const names\[\] = \{(.*?)\};", text, re.S)
    assert m, "not_rendered() not found in src/api/proxy.c"
    names = frozenset(re.findall(r'"([a-z_]+)"', m.group(1)))
    assert {"model", "messages", "max_tokens", "cache_salt"} <= names, names
    return names


NOT_RENDERED = _not_rendered()


def json_text_bytes(v):
    """The gateway's bound of the prompt text a JSON value renders to: its
    strings' and keys' bytes, a number's digits (24 with a fraction), 5 for
    true, false and null."""
    if isinstance(v, str):
        return len(v.encode())
    if isinstance(v, bool) or v is None:
        return 5
    if isinstance(v, (int, float)):
        if v != int(v) or abs(v) >= 1e15:
            return 24
        return len(str(abs(int(v)))) + (1 if v < 0 else 0)
    if isinstance(v, dict):
        return sum(len(k.encode()) + json_text_bytes(x) for k, x in v.items())
    if isinstance(v, list):
        return sum(json_text_bytes(x) for x in v)
    return 0


def prompt_estimate(body, media_tokens=2048):
    """The gateway's prompt-token estimate for a request body: bytes of the
    message contents (strings, or the parts' text; the model's media_tokens
    for a part of another type, such as image_url) + 8 per message + 8, plus
    the bytes of `prompt` / `input` for completions and embeddings (+ 8 per
    string of a list of them), plus the
    text (json_text_bytes, with its key) of every other member of a message
    but its role, and of the request but those no upstream renders
    (NOT_RENDERED): tools, documents, tool calls..."""
    def text_bytes(v):
        if v is None:
            return 0
        if isinstance(v, str):
            return len(v.encode())
        if isinstance(v, list):
            n = 0
            for p in v:
                if isinstance(p, str):
                    n += len(p.encode())
                elif isinstance(p, list):
                    n += len(p)          # a list of token ids
                elif isinstance(p, (int, float)) and not isinstance(p, bool):
                    n += 1
                elif isinstance(p, dict) and isinstance(p.get("type"), str) and \
                        p["type"] not in ("text", "refusal"):
                    n += media_tokens
                elif isinstance(p, dict) and isinstance(p.get("text"), str):
                    n += len(p["text"].encode())
            return n
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return 1
        if isinstance(v, dict):
            t = v.get("type")
            if isinstance(t, str) and t not in ("text", "refusal"):
                return media_tokens
            return text_bytes(v.get("text"))
        return 0
    n = 8
    for m in body.get("messages") or []:
        n += text_bytes(m.get("content")) + 8
        if isinstance(m, dict):
            n += sum(len(k.encode()) + json_text_bytes(x) for k, x in m.items()
                     if k not in ("role", "content"))
    for field in ("prompt", "input"):
        if field in body:
            n += text_bytes(body[field])
            if isinstance(body[field], list):   # a list's strings: their special tokens
                n += 8 * sum(isinstance(p, str) for p in body[field])
    n += sum(len(k.encode()) + json_text_bytes(x) for k, x in body.items()
             if k not in NOT_RENDERED)
    return n


def sim_prompt_tokens(body):
    """The simulator's prompt_tokens for a chat body (docs/sim.md)."""
    n = 2
    for m in body.get("messages") or []:
        c = m.get("content")
        b = len(c.encode()) if isinstance(c, str) else 0
        n += (b + 3) // 4 + 4
    return max(n, 1)


def entry_cost_nano(entry, prices):
    """Cost of one access-log record at prices {model: (prompt, completion)}
    in nano-USD per token: usage x prices, exact integers."""
    p, c = prices[entry["model"]]
    return entry["prompt_tokens"] * p + entry["completion_tokens"] * c


def ratelimit_headers(resp):
    """{header: value} of the x-ratelimit-* headers present (values as text)."""
    get = resp.header if hasattr(resp, "header") else resp.get
    return {h: get(h) for h in RATELIMIT_HEADERS if get(h) is not None}


_DUR = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration_s(text):
    """Seconds of a reset header: plain seconds ("12", "0.5") or a duration
    like "1s", "6m0s", "250ms", "1m30.5s"."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for m in _DUR.finditer(text):
        if m.start() != pos:
            break
        pos = m.end()
        total += float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if pos != len(text) or not text:
        raise ValueError("not a duration: %r" % text)
    return total


def check_global_limit_left_to_others(ask, noisy, quiet, rps):
    """With a global limit of rps requests a second and tenant `noisy`
    allowed 1 request a minute: noisy asks 3 * rps times within one second,
    its own limit refusing all but (at most) the first, then `quiet` asks
    until refused. quiet gets every global slot noisy did not use, and only
    then the global refusal. ask(tenant) sends one request."""
    for _ in range(4):
        time.sleep(1.1)                       # an empty second
        t0 = time.monotonic()
        loud = [ask(noisy) for _ in range(3 * rps)]
        calm = [ask(quiet) for _ in range(rps + 1)]
        if time.monotonic() - t0 >= 0.9:
            continue                          # not within one second: again
        used = [r.status for r in loud].count(200)
        assert used <= 1, [r.status for r in loud]
        for r in loud:
            if r.status != 200:
                assert r.status == 429 and r.error()["code"] == "requests", r
        assert [r.status for r in calm] == [200] * (rps - used) + [429] * (used + 1), \
            [r.status for r in calm]
        assert calm[-1].error()["code"] == "global", calm[-1]
        return
    raise AssertionError("could not send the requests within one second")


def retry_after(resp):
    """The Retry-After header as an int, asserting it is whole seconds >= 1
    and that retry-after-ms (read first by the official clients) is there
    too and rounds up to it."""
    v = resp.header("retry-after")
    assert v is not None, "no Retry-After on %r" % resp
    assert re.match(r"^[0-9]+$", v), "Retry-After %r is not whole seconds" % v
    n = int(v)
    assert n >= 1, "Retry-After %d < 1" % n
    ms = retry_after_ms(resp)
    assert ms >= 1 and (ms + 999) // 1000 == n, \
        "retry-after-ms %d does not round up to Retry-After %d" % (ms, n)
    return n


def retry_after_ms(resp):
    """The retry-after-ms header as an int, asserting there is exactly one,
    whole milliseconds."""
    vs = [v for k, v in resp.header_list if k == "retry-after-ms"]
    assert len(vs) == 1, "retry-after-ms %r on %r" % (vs, resp)
    assert re.match(r"^[0-9]+$", vs[0]), "retry-after-ms %r is not whole ms" % vs[0]
    return int(vs[0])


def seconds_to_utc_day_end(now=None):
    now = time.time() if now is None else now
    return 86400 - (now % 86400)


def seconds_to_utc_month_end(now=None):
    import calendar
    now = time.time() if now is None else now
    t = time.gmtime(now)
    y, m = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((y, m, 1, 0, 0, 0)) - now


def json_events(text, event=None):
    """JSON objects among the lines of text that carry an "event" field
    (equal to `event` when given)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "event" in doc and (event is None or doc["event"] == event):
            out.append(doc)
    return out


def gateway_events(gw, event=None):
    """Structured event lines the gateway wrote to its stderr so far."""
    return json_events(gw.proc.stderr_text() if gw.proc else "", event)


def gateway_reload(gw, timeout=5.0):
    """Rewrites gw's config file from gw.config, sends SIGHUP and waits for
    "tollgate: config reloaded". Raises when the reload failed."""
    gw.write_config()
    before = gw.proc.stderr_text()
    n_ok = before.count("config reloaded")
    n_bad = before.count("reload failed")
    gw.proc.signal(signal.SIGHUP)

    def done():
        text = gw.proc.stderr_text()
        if text.count("reload failed") > n_bad:
            raise ProcessDied("reload failed:\n%s" % gw.proc.tail())
        return text.count("config reloaded") > n_ok
    wait_for(alive_check(gw.proc)(done), timeout=timeout, what="config reloaded")


def parallel(fn, args_list, threads=8, timeout=60.0):
    """Runs fn(*args) for each args in args_list on `threads` threads and
    returns the results in the same order (an exception is returned in
    place of a result). Bounded: raises when the whole batch takes longer
    than timeout."""
    results = [None] * len(args_list)
    lock = threading.Lock()
    nxt = [0]

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(args_list):
                return
            try:
                results[i] = fn(*args_list[i])
            except Exception as e:  # noqa: BLE001 - reported to the caller
                results[i] = e
    ts = [threading.Thread(target=worker, daemon=True) for _ in range(min(threads, len(args_list)))]
    for t in ts:
        t.start()
    deadline = time.monotonic() + timeout
    for t in ts:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise AssertionError("parallel requests still running after %.0fs" % timeout)
    return results


# --------------------------------------------------------------------------
# PostgreSQL, for `database: postgres://...` (keys and the usage ledger)

_PG_SERVERS = []   # every Postgres started and not closed yet (kill_all closes them)


class Postgres:
    """A throw-away PostgreSQL server (the newest /usr/lib/postgresql/*/bin)
    run by tests/lib/pgtest.sh: a fresh cluster in its own temp directory,
    run as the postgres user when we are root, on a free loopback port,
    trust authentication, one database `tollgate_test`.

    We keep pgtest.sh's stdin open for as long as the server is needed; it
    stops the server and removes its directory when that pipe closes, so even
    a test process killed with SIGKILL leaves nothing behind. stop() and
    start() again keep the port and the data, so a gateway configured with
    url() sees its database go away and come back. sql() runs a statement
    through psql and returns the rows."""

    SCRIPT = os.path.join(REPO, "tests", "lib", "pgtest.sh")
    PSQL = "/usr/bin/psql"

    def __init__(self, name="postgres"):
        self.name = name
        self.popen = None
        self.port = None
        self.dir = None
        self._url = None
        self._lines = None
        self.running = False
        self.log_path = None

    @staticmethod
    def available():
        """Why PostgreSQL cannot run here (a string), or None when it can."""
        import glob
        if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and not os.environ.get("PG_BIN"):
            return "no PostgreSQL server binaries (scripts/install-deps.sh installs postgresql)"
        if not os.access(Postgres.PSQL, os.X_OK):
            return "no %s" % Postgres.PSQL
        return None

    def url(self):
        """The database URL for the gateway's `database:` setting."""
        return self._url

    def _read_reply(self, timeout, what):
        import queue
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("timed out after %.0fs waiting for pgtest.sh to %s" %
                                 (timeout, what)) from None
        if line is None:
            raise AssertionError("pgtest.sh exited while asked to %s:\n%s" %
                                 (what, tail(self.log_path)))
        if line.startswith("error"):
            raise AssertionError("pgtest.sh could not %s: %s" % (what, line))
        return line

    def _command(self, cmd, reply, timeout):
        self.popen.stdin.write((cmd + "\n").encode())
        self.popen.stdin.flush()
        line = self._read_reply(timeout, cmd)
        if line != reply:
            raise AssertionError("pgtest.sh answered %r to %r" % (line, cmd))

    def start(self, timeout=60.0):
        """First call: creates the cluster and starts the server. Later calls
        (after stop()): starts it again on the same port with the same data."""
        if self.popen is not None:
            if not self.running:
                self._command("start", "started", timeout)
                self.running = True
            return self
        import queue
        why = self.available()
        if why:
            raise RuntimeError(why)
        wd = make_tmpdir("tg-pgtest-")
        self.log_path = os.path.join(wd, "pgtest.stderr")
        err = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(["bash", self.SCRIPT, "serve"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=err,
                                          start_new_session=True)
        finally:
            err.close()
        self._lines = queue.Queue()
        _PG_SERVERS.append(self)

        def reader(out, q):
            for raw in out:
                q.put(raw.decode("utf-8", "replace").rstrip("\n"))
            q.put(None)
        threading.Thread(target=reader, args=(self.popen.stdout, self._lines),
                         daemon=True).start()
        try:
            while True:
                line = self._read_reply(timeout, "start a server")
                k, _, v = line.partition(" ")
                if k == "url":
                    # the gateway's documented form; libpq reads either scheme
                    self._url = v.replace("postgresql://", "postgres://", 1)
                elif k == "dir":
                    self.dir = v
                elif k == "port":
                    self.port = int(v)
                elif k == "ready":
                    break
        except BaseException:
            self.close()
            raise
        self.running = True
        return self

    def stop(self, timeout=60.0):
        """Stops the server (fast shutdown: open sessions are cut). The port
        refuses connections when this returns."""
        if self.popen is not None and self.running:
            self._command("stop", "stopped", timeout)
            self.running = False

    def _pids(self):
        with open(os.path.join(self.dir, "data", "postmaster.pid")) as f:
            postmaster = int(f.readline())
        kids = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True,
                              text=True).stdout.split()
        return [postmaster] + [int(k) for k in kids]

    def pause(self):
        """SIGSTOPs the server and every backend: a frozen server, whose
        kernel still accepts connections and acknowledges every byte, so no
        TCP timeout fires. resume() sends SIGCONT (call it in a finally)."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self):
        for pid in self._pids():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def close(self, timeout=60.0):
        """Stops the server for good and removes its directory."""
        if self.popen is None:
            return
        try:
            self.popen.stdin.write(b"quit\n")
            self.popen.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            # its EXIT trap still stops the server on SIGTERM
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.popen = None
        self.running = False
        if self in _PG_SERVERS:
            _PG_SERVERS.remove(self)

    def create_database(self, name):
        """Creates an empty database on this server; returns its URL (one
        database per test keeps their ledgers apart on one server)."""
        assert re.match(r"^[a-z_][a-z0-9_]*$", name), name
        self.sql("CREATE DATABASE %s" % name)
        return self._url.rsplit("/", 1)[0] + "/" + name

    def sql(self, statement, timeout=30, db="tollgate_test"):
        """Runs one SQL statement with psql in database db; returns the rows
        as tuples of text (NULL as None)."""
        env = dict(os.environ)
        env.pop("PGPASSWORD", None)
        cp = subprocess.run([self.PSQL, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                             "-F", "\x1f", "-P", "null=\x1e", "-h", "127.0.0.1",
                             "-p", str(self.port), "-U", "postgres", "-d", db,
                             "-c", statement],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout, env=env)
        if cp.returncode != 0:
            raise AssertionError("psql %r exited %d: %s" % (statement, cp.returncode,
                                                            cp.stderr.strip()))
        rows = []
        for line in cp.stdout.splitlines():
            if line == "":
                continue
            rows.append(tuple(None if f == "\x1e" else f for f in line.split("\x1f")))
        return rows


# --------------------------------------------------------------------------
# the usage ledger: exact money, mixed load, what the client saw

def money_json(text):
    """Parses JSON with every non-integer number as decimal.Decimal, so the
    ledger's USD figures (9 decimals) are compared exactly, never as floats."""
    from decimal import Decimal
    return json.loads(text, parse_float=Decimal)


USD9 = re.compile(r'"(?:total_cost_usd|cost_usd|spend_usd)":(-?[0-9]+\.[0-9]{9})[,}]')


def usd9_fields(text):
    """Every USD figure in an invoice or usage text; asserts each has exactly
    nine decimals (the gateway prints nano-USD exactly)."""
    found = USD9.findall(text)
    n = len(re.findall(r'"(?:total_cost_usd|cost_usd|spend_usd)":', text))
    assert len(found) == n, "a USD figure without exactly 9 decimals in %s" % text[:400]
    return found


def nano_of_usd(v):
    """Exact nano-USD of a Decimal (or decimal text) USD figure."""
    from decimal import Decimal
    n = Decimal(str(v)) * 1000000000
    assert n == n.to_integral_value(), "%s USD is not whole nano-USD" % v
    return int(n)


def utc_month(t=None):
    return time.strftime("%Y-%m", time.gmtime(time.time() if t is None else t))


def utc_day(t=None):
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if t is None else t))


class Outcome:
    """One request of a LedgerLoad as the client saw it.

    kind: "chat" / "completion" (not streamed), "stream_usage" (streamed,
    include_usage asked), "stream" (streamed, no usage asked: tokens from
    the text and the simulator's prompt formula), "abandon" (the client
    read `events` content events, role chunks left out, then reset the
    connection).
    complete: a non-streamed 200 whose body arrived whole, or a stream that
    delivered `data: [DONE]`. prompt/completion: the usage the client
    observed (for "abandon": what the gateway must count, the prompt
    estimate and one token per relayed content event)."""

    __slots__ = ("tenant", "key", "model", "kind", "body", "rid", "status", "complete",
                 "prompt", "completion", "events", "error", "t_start", "t_end")

    def __init__(self, tenant, key, model, kind, body):
        self.tenant, self.key, self.model, self.kind, self.body = tenant, key, model, kind, body
        self.rid = None
        self.status = None
        self.complete = False
        self.prompt = self.completion = None
        self.events = 0
        self.error = None
        self.t_start = self.t_end = None

    def cost_nano(self, prices):
        """Usage x prices {model: (prompt nano/token, completion nano/token)}."""
        p, c = prices[self.model]
        return self.prompt * p + self.completion * c

    def __repr__(self):
        return "<Outcome %s %s %s %s rid=%s status=%s complete=%s usage=%s/%s err=%r>" % (
            self.kind, self.tenant, self.model, self.body.get("max_tokens"), self.rid,
            self.status, self.complete, self.prompt, self.completion, self.error)


_WORDS = ("ledger", "tenant", "invoice", "token", "budget", "stream", "gateway", "nano",
          "usage", "replica", "billing", "spool", "é", "数据", "commit")


def sse_data(body):
    """The data: payloads of an SSE body (bytes), in order."""
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [ln[5:].lstrip(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
        if lines:
            out.append(b"\n".join(lines).decode("utf-8", "replace"))
    return out


class LedgerLoad:
    """Mixed traffic for the ledger tests: `threads` client threads, each
    with its own keep-alive connection, send a seeded random mix of chat
    completions (not streamed, streamed with and without include_usage) and
    legacy completions, over several tenants (each with one or more keys)
    and models, with varied prompts and max_tokens; `abandon` extra streams
    (on their own threads, slowed by x-sim-token-ms) are left by the client
    after a few content events.

    tenants: {tenant: {"keys": [key...], "models": [model...]}}. run() sends
    `count` requests (or runs until stop() / `duration` seconds) and returns
    the Outcomes, in no particular order. Transport errors are recorded in
    the Outcome (error, complete False), never raised: a test that kills the
    gateway reads them."""

    def __init__(self, port, tenants, count=None, threads=8, seed=1, abandon=0,
                 abandon_token_ms=500, stream_share=0.45, completion_share=0.1,
                 duration=None, timeout=30.0):
        import random
        self.port = port
        self.tenants = tenants
        self.count = count
        self.threads = threads
        self.rng = random.Random(seed)
        self.abandon = abandon
        self.abandon_token_ms = abandon_token_ms
        self.stream_share = stream_share
        self.completion_share = completion_share
        self.duration = duration
        self.timeout = timeout
        self.outcomes = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._issued = 0
        self.done_count = 0        # requests that completed (see Outcome.complete)

    # ---- the plan ----------------------------------------------------------

    def _content(self, rng):
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 40)))

    def _next(self):
        """The next request of the plan (drawn under the lock), or None."""
        with self._lock:
            if self._stop.is_set() or (self.count is not None and self._issued >= self.count):
                return None
            self._issued += 1
            rng = self.rng
            tenant = rng.choice(sorted(self.tenants))
            t = self.tenants[tenant]
            key = rng.choice(t["keys"])
            model = rng.choice(t["models"])
            x = rng.random()
            if x < self.completion_share:
                kind = "completion"
            elif x < self.completion_share + self.stream_share:
                kind = "stream_usage" if rng.random() < 0.7 else "stream"
            else:
                kind = "chat"
            if kind == "completion":
                body = {"model": model, "prompt": self._content(rng)}
            else:
                body = {"model": model, "messages": [{"role": "user", "content": self._content(rng)}]}
                if rng.random() < 0.3:
                    body["messages"].insert(0, {"role": "system", "content": self._content(rng)})
            if rng.random() < 0.9:
                body["max_tokens"] = rng.randint(1, 48)
            if kind in ("stream", "stream_usage"):
                body["stream"] = True
                if kind == "stream_usage":
                    body["stream_options"] = {"include_usage": True}
            o = Outcome(tenant, key, model, kind, body)
            self.outcomes.append(o)
            return o

    # ---- one request -------------------------------------------------------

    def _send(self, conn, o):
        path = "/v1/completions" if o.kind == "completion" else "/v1/chat/completions"
        data = json.dumps(o.body).encode()
        o.t_start = time.time()
        conn.request("POST", path, body=data,
                     headers={"Authorization": "Bearer %s" % o.key,
                              "Content-Type": "application/json"})
        r = conn.getresponse()
        o.status = r.status
        o.rid = r.getheader("x-request-id")
        try:
            body = r.read()
            whole = True
        except http.client.IncompleteRead as e:
            body = e.partial
            whole = False
        o.t_end = time.time()
        if r.status != 200:
            o.error = "status %d: %r" % (r.status, body[:200])
            return
        if o.kind in ("chat", "completion"):
            if not whole:
                o.error = "body cut short"
                return
            u = json.loads(body)["usage"]
            o.prompt, o.completion = u["prompt_tokens"], u["completion_tokens"]
            o.complete = True
            return
        events = sse_data(body)
        o.complete = "[DONE]" in events
        if not o.complete:
            o.error = "stream without [DONE] (%d events)" % len(events)
            return
        tokens = 0
        usage = None
        for ev in events:
            if ev == "[DONE]":
                continue
            doc = json.loads(ev)
            if doc.get("usage") and not doc.get("choices"):
                usage = doc["usage"]
            for ch in doc.get("choices") or []:
                tokens += len(((ch.get("delta") or {}).get("content") or "").split())
        if o.kind == "stream_usage":
            assert usage is not None, "no usage event in a stream that asked for one"
            o.prompt, o.completion = usage["prompt_tokens"], usage["completion_tokens"]
        else:
            assert usage is None, "a usage event the client did not ask for"
            o.prompt, o.completion = sim_prompt_tokens(o.body), tokens

    def _worker(self):
        conn = None
        while True:
            o = self._next()
            if o is None:
                break
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self._send(conn, o)
            except Exception as e:  # noqa: BLE001 - recorded for the test
                o.error = "%s: %s" % (type(e).__name__, e)
                o.complete = False
                try:
                    conn.close()
                except OSError:
                    pass
                conn = None
                if isinstance(e, (ConnectionRefusedError, ConnectionResetError)):
                    time.sleep(0.02)   # the gateway is gone: do not spin
            if o.complete:
                with self._lock:
                    self.done_count += 1
        if conn is not None:
            conn.close()

    def _abandoner(self, n):
        for _ in range(n):
            if self._stop.is_set():
                return
            with self._lock:
                rng = self.rng
                tenant = rng.choice(sorted(self.tenants))
                t = self.tenants[tenant]
                key = rng.choice(t["keys"])
                model = rng.choice(t["models"])
                body = {"model": model, "stream": True, "max_tokens": 40,
                        "messages": [{"role": "user", "content": self._content(rng)}]}
                if rng.random() < 0.5:
                    body["stream_options"] = {"include_usage": True}
                want = rng.randint(1, 4)
                o = Outcome(tenant, key, model, "abandon", body)
                self.outcomes.append(o)
            o.t_start = time.time()
            try:
                st = SSEStream(self.port, body, key=key, timeout=self.timeout,
                               headers={"x-sim-token-ms": str(self.abandon_token_ms)})
                o.status = st.status
                o.rid = st.headers.get("x-request-id")
                for ev in st.events():
                    if billed_events([ev]):
                        o.events += 1
                        if o.events == want:
                            break
                st.abort()
            except Exception as e:  # noqa: BLE001 - recorded for the test
                o.error = "%s: %s" % (type(e).__name__, e)
            o.t_end = time.time()
            # what the gateway must record for a stream it saw no usage for
            o.prompt = prompt_estimate(body)
            o.completion = o.events

    def stop(self):
        """Asks every thread to finish after its current request."""
        self._stop.set()

    def start(self):
        """Starts the client threads and returns at once (see wait())."""
        self._threads = [threading.Thread(target=self._worker, daemon=True)
                         for _ in range(self.threads)]
        if self.abandon:
            per = [self.abandon // 3 + (1 if i < self.abandon % 3 else 0) for i in range(3)]
            self._threads += [threading.Thread(target=self._abandoner, args=(n,), daemon=True)
                              for n in per if n]
        self._t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def running(self):
        return any(t.is_alive() for t in self._threads)

    def completed(self):
        """Requests completed so far (any thread)."""
        with self._lock:
            return self.done_count

    def wait(self, limit=600.0):
        """Waits for the threads (stopping them after `duration` seconds when
        one was given, or after `limit`); returns the outcomes."""
        while self.running():
            el = time.monotonic() - self._t0
            if self.duration is not None and el >= self.duration:
                self.stop()
            if el > limit:
                self.stop()
                raise AssertionError("ledger load still running after %.0fs" % limit)
            time.sleep(0.05)
        for t in self._threads:
            t.join()
        return list(self.outcomes)

    def run(self, limit=600.0):
        """start() then wait(): sends the whole load and returns the outcomes."""
        return self.start().wait(limit)


def expected_usage(outcomes, prices):
    """{tenant: {model: [requests, prompt, completion, cost_nano]}} over the
    outcomes a ledger must hold a record for (complete ones, and abandoned
    streams that got their 200 head), in exact integers."""
    out = {}
    for o in recorded_outcomes(outcomes):
        m = out.setdefault(o.tenant, {}).setdefault(o.model, [0, 0, 0, 0])
        m[0] += 1
        m[1] += o.prompt
        m[2] += o.completion
        m[3] += o.cost_nano(prices)
    return out


LEDGER_COLUMNS = ("request_id", "ts_ms", "tenant", "key_id", "model", "endpoint",
                  "prompt_tokens", "completion_tokens", "cost_nano", "status", "usage_counted",
                  "queue_us", "ttft_us", "total_us")
_LEDGER_INTS = set(LEDGER_COLUMNS) - {"request_id", "tenant", "key_id", "model", "endpoint"}


def _ledger_dicts(rows):
    out = []
    for row in rows:
        d = dict(zip(LEDGER_COLUMNS, row))
        for k in _LEDGER_INTS:
            d[k] = int(d[k])
        out.append(d)
    return out


def sqlite_ledger_rows(db_path, where="", args=()):
    """Every ledger row of a SQLite database (a list of dicts, LEDGER_COLUMNS)."""
    import sqlite3
    db = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=10)
    try:
        rows = db.execute("SELECT %s FROM ledger %s" % (", ".join(LEDGER_COLUMNS), where),
                          args).fetchall()
    finally:
        db.close()
    return _ledger_dicts(rows)


def sqlite_ledger_row(db_path, request_id):
    """The one ledger row of a request (asserts there is exactly one)."""
    rows = sqlite_ledger_rows(db_path, "WHERE request_id = ?", (request_id,))
    assert len(rows) == 1, (request_id, rows)
    return rows[0]


def pg_ledger_rows(pg, db="tollgate_test", where=""):
    """Every ledger row of a PostgreSQL database (see sqlite_ledger_rows)."""
    return _ledger_dicts(pg.sql("SELECT %s FROM ledger %s" % (", ".join(LEDGER_COLUMNS), where),
                                db=db))


def by_request_id(rows):
    """{request_id: row}, asserting that no request id appears twice."""
    out = {}
    for r in rows:
        assert r["request_id"] not in out, "request id %s stored twice" % r["request_id"]
        out[r["request_id"]] = r
    return out


def recorded_outcomes(outcomes):
    """The outcomes the ledger must hold a row for: completed requests and
    abandoned streams that got their 200 head and at least one event."""
    return [o for o in outcomes
            if o.complete or (o.kind == "abandon" and o.status == 200 and o.events > 0)]


def check_ledger_rows(outcomes, rows, prices, endpoint=None, exact_set=True):
    """Asserts that each recorded outcome has exactly one row with what the
    client saw: tenant, key, model, tokens, the exact cost, the status (499
    and usage_counted for an abandoned stream), an arrival time inside the
    request's span and sane latency figures. With exact_set, the ledger holds
    no other row."""
    rows = by_request_id(rows)
    want = recorded_outcomes(outcomes)
    rids = [o.rid for o in want]
    assert len(set(rids)) == len(rids), "the gateway gave two requests one id"
    for o in want:
        r = rows.get(o.rid)
        assert r is not None, "no ledger row for %r" % o
        got = (r["tenant"], r["key_id"], r["model"], r["prompt_tokens"], r["completion_tokens"],
               r["cost_nano"])
        exp = (o.tenant, key_id(o.key), o.model, o.prompt, o.completion, o.cost_nano(prices))
        assert got == exp, "row %s: %r, the client saw %r (%r)" % (o.rid, got, exp, o)
        if o.kind == "abandon":
            assert (r["status"], r["usage_counted"]) == (499, 1), (r, o)
        else:
            assert (r["status"], r["usage_counted"]) == (200, 0), (r, o)
        assert o.t_start * 1000 - 1000 <= r["ts_ms"] <= o.t_end * 1000 + 1000, (r, o)
        assert 0 <= r["ttft_us"] <= r["total_us"], r
        assert 0 <= r["queue_us"] <= r["total_us"], r
        if endpoint is not None:
            assert r["endpoint"] == endpoint, r
    if exact_set:
        extra = set(rows) - set(rids)
        assert not extra, "%d ledger rows no client request explains: %s" % (
            len(extra), sorted(extra)[:5])


def periods(outcomes, fmt):
    """The UTC months ("%Y-%m") or days ("%Y-%m-%d") the outcomes span (a
    run may cross midnight)."""
    ts = [o.t_start for o in outcomes if o.t_start] + [o.t_end for o in outcomes if o.t_end]
    lo, hi = min(ts) - 2, max(ts) + 2
    out, t = [], lo
    while True:
        p = time.strftime(fmt, time.gmtime(t))
        if p not in out:
            out.append(p)
        if t >= hi:
            return out
        t = min(hi, t + 3600)


def check_invoice_nano(inv, rows=None):
    """An invoice's integer nano-USD fields: each model's cost_nano_usd is
    an integer, the exact nano-USD of its cost_usd; the summary's
    total_cost_nano_usd that of total_cost_usd and the sum of the models'.
    With rows (the ledger rows of the invoice's tenant and month), each is
    also the sum of their cost_nano."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)
    by_model = {}
    for model, line in inv["usage_by_model"].items():
        n = line["cost_nano_usd"]
        assert whole(n) and n == nano_of_usd(line["cost_usd"]), (model, line)
        by_model[model] = n
    s = inv["summary"]
    assert whole(s["total_cost_nano_usd"]), s
    assert s["total_cost_nano_usd"] == nano_of_usd(s["total_cost_usd"]) == \
        sum(by_model.values()), inv
    if rows is not None:
        want = {}
        for r in rows:
            want[r["model"]] = want.get(r["model"], 0) + r["cost_nano"]
        assert by_model == want, (by_model, want)
        assert s["total_cost_nano_usd"] == sum(r["cost_nano"] for r in rows), inv


def check_invoices(gw, outcomes, prices, tenants, admin_key=None):
    """For each tenant: the invoice (CLI; summed over the months the load
    spans) equals, per model and in total, the requests, tokens and exact
    cost the client observed; every USD figure has nine decimals and its
    integer nano-USD beside it (check_invoice_nano); the usage
    command, summed over the days spanned, agrees."""
    exp = expected_usage(outcomes, prices)
    months = periods(outcomes, "%Y-%m")
    days = periods(outcomes, "%Y-%m-%d")
    for tenant in tenants:
        want = exp.get(tenant, {})
        got = {}
        total_req = total_nano = 0
        for month in months:
            text = gw.tool("invoice", "--tenant", tenant, "--month", month).stdout
            usd9_fields(text)
            inv = money_json(text)
            assert inv["tenant_id"] == tenant and inv["billing_period"] == month, inv
            check_invoice_nano(inv)
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", inv["generated_at"]), inv
            for model, line in inv["usage_by_model"].items():
                g = got.setdefault(model, [0, 0, 0, 0])
                g[0] += line["requests"]
                g[1] += line["prompt_tokens"]
                g[2] += line["completion_tokens"]
                g[3] += nano_of_usd(line["cost_usd"])
            total_req += inv["summary"]["total_requests"]
            total_nano += nano_of_usd(inv["summary"]["total_cost_usd"])
        assert got == want, "tenant %s: invoice %r, client %r" % (tenant, got, want)
        assert total_req == sum(v[0] for v in want.values()), (tenant, total_req)
        assert total_nano == sum(v[3] for v in want.values()), (tenant, total_nano)
        u = [0, 0, 0, 0]
        for day in days:
            text = gw.tool("usage", "--tenant", tenant, "--day", day).stdout
            usd9_fields(text)
            doc = money_json(text)
            assert doc["tenant_id"] == tenant and doc["day"] == day, doc
            assert nano_of_usd(doc["spend_usd"]) == doc["spend_nano_usd"], doc
            for i, k in enumerate(("requests", "prompt_tokens", "completion_tokens",
                                   "spend_nano_usd")):
                u[i] += doc[k]
        assert u == [sum(v[i] for v in want.values()) for i in range(4)], (tenant, u, want)


# --------------------------------------------------------------------------
# a faked wall clock (libfaketime), the monotonic clock left alone

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"


def faked_clock(start):
    """The environment of a gateway whose wall clock starts at `start` (UTC,
    "YYYY-MM-DD hh:mm:ss") and runs from there (libfaketime); its monotonic
    clock, which its timers use, is left alone."""
    return {"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": "@" + start, "TZ": "UTC",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "ASAN_OPTIONS": SAN_ENV["ASAN_OPTIONS"] + ":verify_asan_link_order=0"}


def stepped_clock(path):
    """The environment of a gateway whose wall clock is set by the file at
    path ("@YYYY-MM-DD hh:mm:ss", runs from there), read again at each
    reading of the clock: rewriting the file steps the clock, forward or
    back, as an NTP correction does (libfaketime's FAKETIME_TIMESTAMP_FILE
    with FAKETIME_NO_CACHE)."""
    env = faked_clock("2000-01-01 00:00:00")
    del env["FAKETIME"]
    env.update({"FAKETIME_TIMESTAMP_FILE": path, "FAKETIME_NO_CACHE": "1"})
    return env
