"""pytest fixtures for the integration tests: they start the real tollgate-sim
and tollgate binaries through tests/lib/tgtest.py and guarantee that every
process is gone when a test (or the module) ends, printing the processes'
stderr tails when something failed.

Fixtures
- `tg`: function scope; a factory (`tg.sim(...)`, `tg.gateway(...)`) whose
  processes stop at the end of the test. Gateways stopped there must exit 0
  (a sanitizer report or a leak makes the test fail).
- `stack`: module scope; one sim serving every default model and one gateway
  in front of it, with keys for tenants `acme` (all models) and `small`
  (first model only). Shared by the read-only tests of a module.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import tgtest  # noqa: E402


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


class Factory:
    """Starts processes for one scope and stops them all at its end."""

    def __init__(self, tmpdir):
        self.tmpdir = str(tmpdir)
        self.sims = []
        self.gateways = []
        self.n = 0

    def _dir(self, what):
        self.n += 1
        d = os.path.join(self.tmpdir, "%s-%d" % (what, self.n))
        os.makedirs(d, exist_ok=True)
        return d

    def sim(self, start=True, **kw):
        s = tgtest.Sim(workdir=self._dir("sim"), **kw)
        self.sims.append(s)
        return s.start() if start else s

    def gateway(self, models, start=True, ready=True, keys=("acme",), **kw):
        """A gateway for models; a key per tenant in `keys` is created before
        it starts (gateway.keys[tenant])."""
        g = tgtest.Gateway(models, workdir=self._dir("gw"), **kw)
        self.gateways.append(g)
        g.keys = {t: g.create_key(t) for t in keys}
        return g.start(ready=ready) if start else g

    def procs(self):
        return [x.proc for x in self.sims + self.gateways if x.proc is not None]

    def finish(self):
        """Stops gateways first (so they exit cleanly), then sims. Returns a
        description of each gateway whose exit code was not 0 (a test that
        checked an exit itself sets gateway.checked_exit)."""
        bad = []
        for g in self.gateways:
            if g.proc is None or g.checked_exit:
                continue
            was_alive = g.proc.alive()
            rc = g.stop()
            if rc != 0:
                bad.append("%s exit code %s %s" % (g.proc.name, rc,
                                                   "after SIGTERM" if was_alive else "(died early)"))
        for s in self.sims:
            if s.proc is not None:
                s.stop(timeout=5)
        for p in self.procs():
            p.kill()
        return bad


def _report(factory, header):
    sys.stderr.write("\n==== %s ====\n%s\n" % (header, tgtest.tails(factory.procs())))


@pytest.fixture
def tg(request, tmp_path):
    f = Factory(tmp_path)
    yield f
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    bad = f.finish()
    if failed or bad:
        _report(f, "processes of %s" % request.node.nodeid)
    if bad and not failed:
        pytest.fail("gateway did not exit 0: %s" % "; ".join(bad))


class Stack:
    def __init__(self, f):
        self.f = f
        self.sim = f.sim(token_ms=0, ttft_ms=0)
        self.models = list(tgtest.DEFAULT_MODELS)
        self.gw = f.gateway({m: [self.sim.url] for m in self.models}, start=False)
        self.key = self.gw.create_key("acme")
        self.small_key = self.gw.create_key("small")
        self.admin_key = self.gw.create_admin_key(name="ops")
        self.gw.start()

    @property
    def port(self):
        return self.gw.port


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    f = Factory(tmp_path_factory.mktemp("stack"))
    st = None
    try:
        st = Stack(f)
        yield st
    finally:
        bad = f.finish()
        failed = any(getattr(i, "rep_call", None) is not None and i.rep_call.failed
                     for i in request.session.items if i.module is request.module)
        if failed or bad or st is None:
            _report(f, "processes of module %s" % request.module.__name__)
        if bad:
            pytest.fail("gateway did not exit 0: %s" % "; ".join(bad))


def pytest_sessionfinish(session, exitstatus):
    tgtest.kill_all()
