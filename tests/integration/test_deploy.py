"""The shipped monitoring files in deploy/: Prometheus rules, their promtool
unit tests, the Prometheus config and the Grafana dashboard.

- tests/deploy/test_promtool.sh passes (promtool check rules, check config,
  test rules) and fails, naming the failure, when a rule is broken.
- The unit tests pin what they claim: every alert has a firing and a silent
  case, and shortening any rule's `for`, or turning a seed threshold's `>`
  into `>=`, or going back to the seed's un-aggregated expressions, makes
  promtool's tests fail.
- The seed's three rules keep their names, `for`, severity and summary.
- The dashboard parses, has the `tenant` variable and the panels an operator
  looks for, filters every tenant-labelled series by $tenant, and every metric
  name it or the rules use is one the gateway exports (METRICS below), with
  labels that metric has.
- A real Prometheus (Debian's, like promtool) loads the shipped config and
  rules, scrapes a stand-in exporter serving every metric in METRICS, returns
  data for every dashboard query and raises the alerts the figures call for.

Standard library only; promtool and prometheus come from Debian's
`prometheus` package (scripts/install-deps.sh).
"""

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
import urllib.request

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import tgtest  # noqa: E402

REPO = tgtest.REPO
PROM_DIR = os.path.join(REPO, "deploy", "prometheus")
RULES = os.path.join(PROM_DIR, "tenant-alerts.yaml")
RULE_TESTS = os.path.join(PROM_DIR, "tenant-alerts.test.yaml")
PROM_CONFIG = os.path.join(PROM_DIR, "prometheus.yml")
DASHBOARD = os.path.join(REPO, "deploy", "grafana", "tollgate-tenant.json")
SCRIPT = os.path.join(REPO, "tests", "deploy", "test_promtool.sh")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

# Every series the gateway exports on its admin listener: name -> (type, labels).
METRICS = {
    "llm_tenant_requests_total": ("counter", ("tenant",)),
    "llm_tenant_errors_total": ("counter", ("tenant", "code")),
    "llm_rate_limit_rejections_total": ("counter", ("tenant", "limit")),
    "llm_tenant_daily_spend_usd": ("gauge", ("tenant",)),
    "llm_tenant_daily_budget_usd": ("gauge", ("tenant",)),
    "llm_tenant_monthly_spend_usd": ("gauge", ("tenant",)),
    "llm_tenant_monthly_budget_usd": ("gauge", ("tenant",)),
    "llm_tenant_prompt_tokens_total": ("counter", ("tenant", "model")),
    "llm_tenant_completion_tokens_total": ("counter", ("tenant", "model")),
    "llm_request_duration_seconds": ("histogram", ("tenant",)),
    "llm_time_to_first_token_seconds": ("histogram", ("tenant",)),
    "llm_gateway_overhead_seconds": ("histogram", ()),
    "llm_queue_length": ("gauge", ("pool", "tenant")),
    "llm_inflight_requests": ("gauge", ("pool", "tenant")),
    "llm_endpoint_up": ("gauge", ("pool", "endpoint")),
    "llm_upstream_errors_total": ("counter", ("pool", "endpoint", "kind")),
    "llm_ledger_backlog": ("gauge", ()),
    "llm_ledger_spool_bytes": ("gauge", ()),
    "llm_ledger_transactions_total": ("counter", ()),
    "llm_ledger_records_total": ("counter", ("outcome",)),
    "llm_ledger_purges_total": ("counter", ()),
    "llm_ledger_purge_failures_total": ("counter", ()),
    "llm_ledger_purged_records_total": ("counter", ()),
    "llm_config_reloads_total": ("counter", ()),
    "llm_config_reload_failures_total": ("counter", ()),
    "llm_budget_threshold_events_total": ("counter", ("tenant", "window")),
    "llm_metrics_omitted_families": ("gauge", ()),
    "llm_metrics_overflow_requests_total": ("counter", ()),
    "llm_tenant_spend_untracked": ("gauge", ()),
}
# labels Prometheus adds to every scraped series, and the histogram bucket label
SCRAPE_LABELS = ("job", "instance")

SEED_RULES = {   # the seed's rules: name -> (for, severity, summary)
    "TenantBudgetWarning": ("5m", "warning", "Tenant {{ $labels.tenant }} at 80% of daily budget"),
    "TenantRateLimitHitting": ("5m", "info", "Tenant {{ $labels.tenant }} hitting rate limits"),
    "TenantErrorRateHigh": ("5m", "warning", "Tenant {{ $labels.tenant }} error rate above 10%"),
}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---- PromQL: metric names and labels an expression uses ----------------------

_KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring",
             "group_left", "group_right", "offset", "inf", "nan", "atan2"}
_IDENT = r"[A-Za-z_:][A-Za-z0-9_:]*"


def _strip_strings(expr):
    return re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)


def metric_names(expr):
    """The metric names an expression selects (functions, keywords, labels,
    numbers and Grafana variables left out)."""
    e = _strip_strings(expr)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+-?\w+", " ", e)
    e = re.sub(r"(?<![A-Za-z0-9_:])[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?", " ", e)
    names = set()
    for m in re.finditer(_IDENT, e):
        word = m.group(0)
        if word.lower() in _KEYWORDS or re.match(r"\s*\(", e[m.end():]):
            continue
        names.add(word)
    return names


def selectors(expr):
    """(metric, {label: (op, value)}) for each `metric{...}` selector."""
    out = []
    for m in re.finditer(r"(%s)\s*\{([^}]*)\}" % _IDENT, expr):
        matchers = {}
        for mm in re.finditer(r'(%s)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"' % _IDENT, m.group(2)):
            matchers[mm.group(1)] = (mm.group(2), mm.group(3))
        out.append((m.group(1), matchers))
    return out


def grouping_labels(expr):
    """Every label named in by/without/on/ignoring/group_x clauses."""
    labels = set()
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels.update(x.strip() for x in m.group(2).split(",") if x.strip())
    return labels


def base_metric(name):
    """The exported metric a name belongs to (a histogram's _bucket/_sum/_count
    series map to the histogram), or None when the gateway exports no such name."""
    if name in METRICS:
        return None if METRICS[name][0] == "histogram" else name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if base in METRICS and METRICS[base][0] == "histogram":
                return base
    return None


def check_expr(expr):
    """Problems with one expression's metric and label names (empty = fine)."""
    problems = []
    bases = set()
    for name in sorted(metric_names(expr)):
        base = base_metric(name)
        if base is None:
            problems.append("unknown metric %r" % name)
        else:
            bases.add(base)
    known = set(SCRAPE_LABELS)
    for b in bases:
        known.update(METRICS[b][1])
        if METRICS[b][0] == "histogram":
            known.add("le")
    for name, matchers in selectors(expr):
        base = base_metric(name)
        if base is None:
            continue
        allowed = set(METRICS[base][1]) | set(SCRAPE_LABELS) | ({"le"} if name.endswith("_bucket") else set())
        for label in matchers:
            if label not in allowed:
                problems.append("%s has no label %r" % (name, label))
    for label in grouping_labels(expr):
        if label not in known:
            problems.append("no metric in the expression has label %r" % label)
    return problems


def test_expression_checker_sees_names_and_labels():
    # the checks below are only as good as this extraction
    expr = ('sum by (tenant) (rate(llm_tenant_errors_total{tenant=~"$tenant",code!="404"}[$__rate_interval]))'
            ' / on (tenant) group_left sum by (tenant) (rate(llm_tenant_requests_total[5m] offset 1h))'
            ' > 0.10 and up == bool 1e3 or histogram_quantile(0.99, sum by (le) '
            '(rate(llm_request_duration_seconds_bucket[1m])))')
    assert metric_names(expr) == {"llm_tenant_errors_total", "llm_tenant_requests_total", "up",
                                  "llm_request_duration_seconds_bucket"}
    assert check_expr(expr) == ["unknown metric 'up'"]
    assert check_expr("llm_queue_length{model=\"x\"}") == ["llm_queue_length has no label 'model'"]
    assert check_expr("sum by (code) (llm_tenant_requests_total)") == \
        ["no metric in the expression has label 'code'"]
    assert check_expr("llm_request_duration_seconds") == ["unknown metric 'llm_request_duration_seconds'"]
    assert check_expr("rate(llm_gateway_overhead_seconds_sum[5m])") == []
    assert check_expr("llm_tenant_requests_total_bucket") == ["unknown metric 'llm_tenant_requests_total_bucket'"]


# ---- the rules file and its tests, read as text (no YAML library needed) ----

def parse_rules(text):
    """[{group, name, expr, for, severity, summary}] from tenant-alerts.yaml."""
    rules, group, cur = [], None, None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if re.match(r"^\s*#", line) or not line.strip():
            continue
        m = re.match(r"^\s*- name:\s*(\S+)", line)
        if m:
            group = m.group(1)
            continue
        m = re.match(r"^\s*- alert:\s*(\S+)", line)
        if m:
            cur = {"group": group, "name": m.group(1), "for": None, "severity": None, "summary": None}
            rules.append(cur)
            continue
        if cur is None:
            continue
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if m:
            if m.group(2).strip() in ("|", "|-", ">", ">-"):
                indent, body = len(m.group(1)), []
                while i < len(lines) and (not lines[i].strip() or
                                          len(lines[i]) - len(lines[i].lstrip()) > indent):
                    body.append(lines[i].strip())
                    i += 1
                cur["expr"] = " ".join(x for x in body if x)
            else:
                cur["expr"] = m.group(2).strip()
            continue
        for key in ("for", "severity", "summary"):
            m = re.match(r"^\s*%s:\s*\"?(.*?)\"?\s*$" % key, line)
            if m:
                cur[key] = m.group(1)
    return rules


def parse_alert_cases(text):
    """{alertname: {"firing": [eval_time...], "silent": [eval_time...]}}."""
    cases = {}
    lines = text.splitlines()
    eval_time = None
    name = None
    for i, line in enumerate(lines):
        m = re.match(r"^\s*-?\s*eval_time:\s*(\S+)", line)
        if m:
            eval_time = m.group(1)
        m = re.match(r"^\s*alertname:\s*(\S+)", line)
        if m:
            name = m.group(1)
        m = re.match(r"^\s*exp_alerts:\s*(\[\])?\s*(#.*)?$", line)
        if m and name:
            c = cases.setdefault(name, {"firing": [], "silent": []})
            if m.group(1):
                c["silent"].append(eval_time)
            else:
                nxt = next(x for x in lines[i + 1:] if x.strip())
                assert re.match(r"^\s*- exp_labels:", nxt), "exp_alerts of %s at %s" % (name, eval_time)
                c["firing"].append(eval_time)
            name = None
    return cases


def promtool(*args, cwd=None):
    return subprocess.run([PROMTOOL] + list(args), capture_output=True, text=True, cwd=cwd, timeout=120)


def test_promtool_script_passes():
    r = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, cwd="/", timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # it says what it ran, and promtool's own verdicts are in the output
    assert "check rules %s" % RULES in out
    assert "check config %s" % PROM_CONFIG in out
    assert "test rules %s" % RULE_TESTS in out
    assert "SUCCESS: 12 rules found" in out
    assert "valid prometheus config file syntax" in out
    assert re.search(r"Unit Testing:\s+%s\s+SUCCESS" % re.escape(RULE_TESTS), out), out
    assert "all 3 checks passed" in out


def _copy_tree(tmp):
    """The script and the deploy/prometheus files in a scratch repo layout."""
    os.makedirs(os.path.join(tmp, "tests", "deploy"))
    shutil.copy(SCRIPT, os.path.join(tmp, "tests", "deploy"))
    shutil.copytree(PROM_DIR, os.path.join(tmp, "deploy", "prometheus"))
    return os.path.join(tmp, "deploy", "prometheus")


def test_promtool_script_fails_on_a_broken_rule_or_config(tmp_path):
    prom = _copy_tree(str(tmp_path))
    script = os.path.join(str(tmp_path), "tests", "deploy", "test_promtool.sh")
    rules = os.path.join(prom, "tenant-alerts.yaml")
    text = read(rules)
    # a threshold one step too low: the rules still parse, the unit tests fail
    with open(rules, "w") as f:
        f.write(text.replace("llm_tenant_daily_budget_usd > 0.80", "llm_tenant_daily_budget_usd > 0.79", 1))
    r = subprocess.run(["bash", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout
    assert "test rules" in r.stdout and "-> FAILED" in r.stdout
    assert "TenantBudgetWarning" in r.stdout            # promtool names the alert
    assert "1 of 3 checks FAILED" in r.stdout
    # a config that does not parse: check config fails, the other two still run
    with open(rules, "w") as f:
        f.write(text)
    with open(os.path.join(prom, "prometheus.yml"), "a") as f:
        f.write("scrape_configs: [\n")
    r = subprocess.run(["bash", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout
    assert r.stdout.count("-> ok") == 2 and r.stdout.count("-> FAILED") == 1, r.stdout


def test_seed_rules_kept():
    rules = {r["name"]: r for r in parse_rules(read(RULES))}
    for name, (dur, severity, summary) in SEED_RULES.items():
        assert name in rules, name
        r = rules[name]
        assert r["group"] == "tenant-alerts"
        assert (r["for"], r["severity"], r["summary"]) == (dur, severity, summary), name
    # the seed's thresholds, in the seed's form
    assert "llm_tenant_daily_spend_usd / llm_tenant_daily_budget_usd > 0.80" in \
        rules["TenantBudgetWarning"]["expr"]
    assert rules["TenantRateLimitHitting"]["expr"].endswith("(rate(llm_rate_limit_rejections_total[5m])) > 1")
    assert rules["TenantErrorRateHigh"]["expr"].endswith("(rate(llm_tenant_requests_total[5m])) > 0.10")
    # ours are apart from the seed's
    assert {r["group"] for n, r in rules.items() if n not in SEED_RULES} == {"tollgate-ours"}


def test_every_alert_has_firing_and_silent_cases():
    names = [r["name"] for r in parse_rules(read(RULES))]
    assert len(names) == len(set(names)) == 12
    cases = parse_alert_cases(read(RULE_TESTS))
    assert set(cases) == set(names)
    for name in names:
        assert cases[name]["firing"], "%s never shown firing" % name
        assert cases[name]["silent"], "%s never shown silent" % name


def test_rule_metrics_are_exported_ones():
    for r in parse_rules(read(RULES)):
        assert metric_names(r["expr"]), r["name"]
        assert check_expr(r["expr"]) == [], "%s: %s" % (r["name"], r["expr"])


def _mutated_run(tmp, rules_text):
    with open(os.path.join(tmp, "tenant-alerts.yaml"), "w") as f:
        f.write(rules_text)
    shutil.copy(RULE_TESTS, tmp)
    return promtool("test", "rules", "tenant-alerts.test.yaml", cwd=tmp)


def _for_lines(text):
    """{alert name: (offset of its `for:` value, value)}."""
    out = {}
    for m in re.finditer(r"- alert:\s*(\S+)(?:(?!- alert:).)*?\n\s*for:\s*(\S+)", text, re.S):
        out[m.group(1)] = (m.start(2), m.group(2))
    return out


def test_unit_tests_pin_every_for_duration(tmp_path):
    text = read(RULES)
    fors = _for_lines(text)
    # every rule but the reload, lost-record and purge ones (news at once) waits
    assert set(fors) == {r["name"] for r in parse_rules(text)} - {"TollgateConfigReloadFailed",
                                                                    "TollgateLedgerRecordsLost",
                                                                    "TollgateLedgerPurgeFailing"}
    assert promtool("test", "rules", RULE_TESTS).returncode == 0
    for name, (off, dur) in fors.items():
        m = re.fullmatch(r"(\d+)m", dur)
        assert m, (name, dur)
        # a minute short (the tests evaluate once a minute): 5m -> 4m, 1m -> 0s
        shorter = "%dm" % (int(m.group(1)) - 1) if int(m.group(1)) > 1 else "0s"
        mutated = text[:off] + shorter + text[off + len(dur):]
        r = _mutated_run(str(tmp_path), mutated)
        assert r.returncode != 0, "%s with for: %s still passes the unit tests" % (name, shorter)
        assert name in r.stdout + r.stderr


@pytest.mark.parametrize("name,old,new", [
    # a threshold reached exactly must stay silent: 80% of budget, 1/s, 10%
    ("TenantBudgetWarning", "llm_tenant_daily_budget_usd > 0.80", "llm_tenant_daily_budget_usd >= 0.80"),
    ("TenantRateLimitHitting", "[5m])) > 1", "[5m])) >= 1"),
    ("TenantErrorRateHigh", "[5m])) > 0.10", "[5m])) >= 0.10"),
    ("TenantMonthlyBudgetWarning", "llm_tenant_monthly_budget_usd > 0.80",
     "llm_tenant_monthly_budget_usd >= 0.80"),
    # a tenant without a budget (gauge 0) must not alert on spend / 0
    ("TenantBudgetWarning", "\n          and llm_tenant_daily_budget_usd > 0\n", "\n"),
    # the seed's per-series forms: two limits at 0.75/s each go unnoticed, and
    # errors{code} / requests matches nothing, so the rule never fires
    ("TenantRateLimitHitting", "sum by (tenant) (rate(llm_rate_limit_rejections_total[5m]))",
     "rate(llm_rate_limit_rejections_total[5m])"),
    ("TenantErrorRateHigh", "sum by (tenant) (rate(llm_tenant_errors_total[5m]))\n"
     "            / sum by (tenant) (rate(llm_tenant_requests_total[5m]))",
     "rate(llm_tenant_errors_total[5m])\n            / rate(llm_tenant_requests_total[5m])"),
    # a pool with one endpoint up is not down
    ("TollgatePoolDown", "max by (pool) (llm_endpoint_up)", "min by (pool) (llm_endpoint_up)"),
    # a steady backlog is not a growing one
    ("TollgateLedgerBacklogGrowing", "\n          and deriv(llm_ledger_backlog[10m]) > 0\n", "\n"),
    # records lost before a restart are not news; lost ones since are
    ("TollgateLedgerRecordsLost",
     'increase(llm_ledger_records_total{outcome=~"lost|damaged"}[10m]) > 0',
     'llm_ledger_records_total{outcome=~"lost|damaged"} > 0'),
    # a failure long ago (or before a restart) is not news
    ("TollgateConfigReloadFailed", "increase(llm_config_reload_failures_total[10m]) > 0",
     "llm_config_reload_failures_total > 0"),
    # one failed purge is a blip; two long ago (or before a restart) are not news
    ("TollgateLedgerPurgeFailing", "[3h]) >= 2", "[3h]) >= 1"),
    ("TollgateLedgerPurgeFailing", "increase(llm_ledger_purge_failures_total[3h]) >= 2",
     "llm_ledger_purge_failures_total >= 2"),
    # one scrape past the bound is a burst; five minutes of them are not
    ("TollgateMetricsIncomplete", "llm_metrics_omitted_families > 0\n        for: 5m",
     "llm_metrics_omitted_families > 0\n        for: 1m"),
])
def test_unit_tests_pin_thresholds_and_aggregation(tmp_path, name, old, new):
    text = read(RULES)
    assert text.count(old) == 1, old
    r = _mutated_run(str(tmp_path), text.replace(old, new))
    assert r.returncode != 0, "%s with %r still passes the unit tests" % (name, new)
    assert name in r.stdout + r.stderr


# ---- the Grafana dashboard ---------------------------------------------------

def dashboard():
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def panels(d):
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))     # collapsed rows hold their panels
    return [p for p in out if p.get("type") != "row"]


def panel_exprs(p):
    return [t["expr"] for t in p.get("targets", [])]


def tenant_variable(d):
    v = [x for x in d["templating"]["list"] if x["name"] == "tenant"]
    assert len(v) == 1
    return v[0]


def test_dashboard_parses_and_has_the_tenant_variable():
    d = dashboard()
    assert d["uid"] == "tollgate-tenant" and d["title"]
    v = tenant_variable(d)
    q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
    assert v["type"] == "query"
    assert q == "label_values(llm_tenant_requests_total, tenant)"
    assert v["definition"] == q
    assert v["multi"] is True and v["includeAll"] is True
    ds = [x for x in d["templating"]["list"] if x["type"] == "datasource"]
    assert len(ds) == 1 and ds[0]["query"] == "prometheus"
    # every panel and query reads from that data source variable
    for p in panels(d):
        assert p["datasource"]["uid"] == "${%s}" % ds[0]["name"], p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${%s}" % ds[0]["name"], p["title"]
            assert t["expr"].strip(), p["title"]


def test_dashboard_panels_fit_the_grid_without_overlap():
    d = dashboard()
    taken = {}
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, "%r overlaps %r" % (p["title"], taken[(x, y)])
                taken[(x, y)] = p["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_shows_what_an_operator_looks_for():
    d = dashboard()
    ps = panels(d)

    def panel_with(*needles):
        hits = [p for p in ps if all(any(n in e for e in panel_exprs(p)) for n in needles)]
        assert hits, "no panel with %s" % (needles,)
        return hits[0]

    panel_with("llm_tenant_requests_total")
    assert "code" in grouping_labels(" ".join(panel_exprs(panel_with("llm_tenant_errors_total{"))))
    tokens = panel_with("llm_tenant_prompt_tokens_total", "llm_tenant_completion_tokens_total")
    assert "model" in grouping_labels(" ".join(panel_exprs(tokens)))
    panel_with("llm_tenant_daily_spend_usd", "llm_tenant_daily_budget_usd")
    panel_with("llm_tenant_monthly_spend_usd", "llm_tenant_monthly_budget_usd")
    assert "limit" in grouping_labels(" ".join(panel_exprs(panel_with("llm_rate_limit_rejections_total"))))
    panel_with("histogram_quantile(0.50", "histogram_quantile(0.99", "llm_request_duration_seconds_bucket")
    panel_with("histogram_quantile(0.50", "histogram_quantile(0.99", "llm_time_to_first_token_seconds_bucket")
    panel_with("llm_queue_length")
    panel_with("llm_inflight_requests")


def test_dashboard_metrics_are_exported_ones_and_follow_the_tenant_variable():
    d = dashboard()
    q = tenant_variable(d)["definition"]
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
    assert check_expr(m.group(1)) == [] and m.group(2) in METRICS[m.group(1)][1]
    used = set()
    for p in panels(d):
        for e in panel_exprs(p):
            assert check_expr(e) == [], "%s: %s" % (p["title"], e)
            for name, matchers in selectors(e):
                base = base_metric(name)
                # a tenant-labelled series must follow the tenant picker
                if "tenant" in METRICS[base][1]:
                    assert matchers.get("tenant") == ("=~", "$tenant"), "%s: %s" % (p["title"], e)
            used |= {base_metric(n) for n in metric_names(e)}
    assert used == set(METRICS), "exported but not shown: %s" % sorted(set(METRICS) - used)


# ---- a real Prometheus with the shipped config, rules and dashboard ----------

TENANTS = ("acme-corp", "startup-xyz")
BUCKETS = ("0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "+Inf")
BUCKET_SHARE = (5, 20, 45, 70, 85, 95, 99, 100)     # cumulative % of observations


def exposition(n):
    """The /metrics body at scrape number n (1, 2, ...): counters grow with n.
    acme-corp is at 90% of its daily budget, 11% errors and 500 refusals a
    scrape; startup-xyz at 20%, 5% and none; endpoint .2 of llama-3.1-8b is
    down; one config reload failed from the third scrape on."""
    out = []

    def family(name, typ, rows):
        out.append("# HELP %s Tollgate test exporter.\n# TYPE %s %s" % (name, name, typ))
        for labels, value in rows:
            lab = ",".join('%s="%s"' % kv for kv in labels)
            out.append("%s%s %s" % (name, "{%s}" % lab if lab else "", value))

    def hist(name, label_sets, per_scrape):
        rows = []
        for labels in label_sets:
            count = per_scrape * n
            for le, share in zip(BUCKETS, BUCKET_SHARE):
                rows.append((labels + (("le", le),), count * share // 100))
        family(name, "histogram", [])
        for labels, v in rows:
            lab = ",".join('%s="%s"' % kv for kv in labels)
            out.append("%s_bucket{%s} %d" % (name, lab, v))
        for labels in label_sets:
            lab = ",".join('%s="%s"' % kv for kv in labels)
            out.append("%s_sum%s %s" % (name, "{%s}" % lab if lab else "", 0.3 * per_scrape * n))
            out.append("%s_count%s %d" % (name, "{%s}" % lab if lab else "", per_scrape * n))

    acme, start = ("tenant", "acme-corp"), ("tenant", "startup-xyz")
    m8, m70 = ("model", "llama-3.1-8b"), ("model", "llama-3.1-70b")
    p8, p70 = ("pool", "llama-3.1-8b"), ("pool", "llama-3.1-70b")
    family("llm_tenant_requests_total", "counter", [((acme,), 100 * n), ((start,), 20 * n)])
    family("llm_tenant_errors_total", "counter", [((acme, ("code", "500")), 5 * n),
                                                   ((acme, ("code", "503")), 6 * n),
                                                   ((start, ("code", "404")), 1 * n)])
    family("llm_rate_limit_rejections_total", "counter", [((acme, ("limit", "requests")), 500 * n),
                                                           ((start, ("limit", "tokens")), 0)])
    family("llm_tenant_daily_spend_usd", "gauge", [((acme,), 450), ((start,), 10)])
    family("llm_tenant_daily_budget_usd", "gauge", [((acme,), 500), ((start,), 50)])
    family("llm_tenant_monthly_spend_usd", "gauge", [((acme,), 5000), ((start,), 100)])
    family("llm_tenant_monthly_budget_usd", "gauge", [((acme,), 10000), ((start,), 1000)])
    family("llm_tenant_prompt_tokens_total", "counter", [((acme, m8), 1000 * n), ((acme, m70), 500 * n),
                                                          ((start, m8), 200 * n)])
    family("llm_tenant_completion_tokens_total", "counter", [((acme, m8), 300 * n), ((acme, m70), 150 * n),
                                                              ((start, m8), 60 * n)])
    hist("llm_request_duration_seconds", [(acme,), (start,)], 100)
    hist("llm_time_to_first_token_seconds", [(acme,), (start,)], 100)
    hist("llm_gateway_overhead_seconds", [()], 200)
    family("llm_queue_length", "gauge", [((p8, acme), 3), ((p8, start), 0)])
    family("llm_inflight_requests", "gauge", [((p8, acme), 12), ((p70, acme), 4), ((p8, start), 2)])
    e1, e2, e3 = (("endpoint", "http://10.0.0.%d:8000" % i) for i in (1, 2, 3))
    family("llm_endpoint_up", "gauge", [((p8, e1), 1), ((p8, e2), 0), ((p70, e3), 1)])
    family("llm_upstream_errors_total", "counter", [((p8, e2, ("kind", "connect")), 2 * n)])
    family("llm_ledger_backlog", "gauge", [((), 7)])
    family("llm_ledger_spool_bytes", "gauge", [((), 0)])
    family("llm_ledger_transactions_total", "counter", [((), 40 * n)])
    family("llm_ledger_records_total", "counter", [((("outcome", "committed"),), 1500 * n),
                                                    ((("outcome", "lost"),), 0)])
    family("llm_ledger_purges_total", "counter", [((), n // 4)])
    family("llm_ledger_purge_failures_total", "counter", [((), 0)])
    family("llm_ledger_purged_records_total", "counter", [((), 300 * (n // 4))])
    family("llm_config_reloads_total", "counter", [((), n // 2)])
    family("llm_config_reload_failures_total", "counter", [((), 1 if n >= 3 else 0)])
    family("llm_budget_threshold_events_total", "counter", [((acme, ("window", "day")), 1)])
    family("llm_metrics_omitted_families", "gauge", [((), 0)])
    family("llm_metrics_overflow_requests_total", "counter", [((), 0)])
    family("llm_tenant_spend_untracked", "gauge", [((), 0)])
    return "\n".join(x for x in out if x) + "\n"


class Exporter:
    """A stand-in for the gateway's admin listener: GET /metrics only."""

    def __init__(self):
        self.scrapes = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                with owner.lock:
                    owner.scrapes += 1
                    body = exposition(owner.scrapes).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_exposition_covers_every_metric_with_its_labels():
    body = exposition(3)
    for name, (typ, labels) in METRICS.items():
        assert "# TYPE %s %s" % (name, typ) in body
        sample = name + ("_bucket" if typ == "histogram" else "")
        rows = [ln for ln in body.splitlines() if re.match(r"%s[{ ]" % re.escape(sample), ln)]
        assert rows, name
        for ln in rows:
            got = set(re.findall(r'(\w+)="', ln)) - {"le"}
            assert got == set(labels), ln


def test_the_gateway_exports_every_metric_with_its_labels():
    """The stand-in exporter above is what Prometheus, the rules and the
    dashboard are tested against; this holds the real gateway to the same
    list: after a little traffic (a 200, a 500 from the upstream, a budget
    alert) every family is in its /metrics with the declared type and
    exactly the declared labels, and nothing else named llm_ is."""
    sim = tgtest.Sim().start()
    m1 = tgtest.DEFAULT_MODELS[0]
    tenants = tgtest.default_tenants((m1,))
    tenants["acme"]["budget"] = {"daily_limit_usd": "0.001", "monthly_limit_usd": 1000.0,
                                 "alert_threshold_percent": 1}
    gw = tgtest.Gateway({m1: [sim.url]}, tenants=tenants, workers=1).start()
    try:
        key = gw.create_key("acme")
        assert tgtest.chat(gw.port, key, model=m1, max_tokens=16).status == 200
        assert tgtest.chat(gw.port, key, model=m1, max_tokens=16,
                           headers={"x-sim-fault": "status:500"}).status == 500
        body = tgtest.admin(gw, "/metrics").body.decode()
    finally:
        gw.stop()
        sim.stop()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, re.M))
    assert {k: v for k, v in types.items() if k.startswith("llm_")} == \
        {name: typ for name, (typ, _) in METRICS.items()}
    for name, (typ, labels) in METRICS.items():
        sample = name + ("_bucket" if typ == "histogram" else "")
        rows = [ln for ln in body.splitlines() if re.match(r"%s[{ ]" % re.escape(sample), ln)]
        assert rows, "no %s series" % name
        for ln in rows:
            assert set(re.findall(r'(\w+)="', ln)) - {"le"} == set(labels), ln


def test_shipped_prometheus_config():
    text = read(PROM_CONFIG)
    # scrape the admin listener every 15 s, evaluate the rules beside the file
    assert re.search(r"^global:\n(?:  .*\n)*?  scrape_interval: 15s$", text, re.M)
    assert re.search(r"^  - job_name: tollgate$", text, re.M)
    assert re.search(r"^    scrape_interval: 15s$", text, re.M)
    assert re.search(r"^    metrics_path: /metrics$", text, re.M)
    assert re.search(r'^      - targets: \["127\.0\.0\.1:8081"\]$', text, re.M)
    assert re.search(r"^rule_files:\n  - tenant-alerts\.yaml$", text, re.M)


class Prom:
    """Debian's prometheus on a free loopback port with the shipped config,
    changed only where a test must: the target (the stand-in exporter), 1 s
    scrape and evaluation intervals and an absolute rules path."""

    def __init__(self, exporter_port):
        self.exporter_port = exporter_port
        self.dir = tgtest.make_tmpdir("tg-prom-")
        text = read(PROM_CONFIG)
        for old, new in (("scrape_interval: 15s", "scrape_interval: 1s"),
                         ("evaluation_interval: 15s", "evaluation_interval: 1s"),
                         ("scrape_timeout: 10s", "scrape_timeout: 1s"),
                         ('"127.0.0.1:8081"', '"127.0.0.1:%d"' % exporter_port),
                         ("  - tenant-alerts.yaml", "  - %s" % RULES)):
            assert old in text, old
            text = text.replace(old, new)
        self.config = os.path.join(self.dir, "prometheus.yml")
        with open(self.config, "w") as f:
            f.write(text)
        self.port = tgtest.free_port()
        self.proc = tgtest.Proc("prometheus", [
            PROMETHEUS, "--config.file=" + self.config,
            "--storage.tsdb.path=" + os.path.join(self.dir, "data"),
            "--web.listen-address=127.0.0.1:%d" % self.port,
            "--log.level=warn"], self.dir)
        tgtest.wait_for(tgtest.alive_check(self.proc)(self.ready), timeout=30, what="prometheus ready")

    def ready(self):
        with urllib.request.urlopen("http://127.0.0.1:%d/-/ready" % self.port, timeout=2) as r:
            return r.status == 200

    def api(self, path, **params):
        url = "http://127.0.0.1:%d/api/v1/%s" % (self.port, path)
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:     # 400 bad_data: the body says why
            return json.load(e)

    def query(self, expr):
        r = self.api("query", query=expr)
        assert r["status"] == "success", "%s: %s" % (expr, r)
        return r["data"]["result"]

    def stop(self):
        return self.proc.stop()


@pytest.fixture(scope="module")
def prom():
    exporter = Exporter()
    p = Prom(exporter.port)
    try:
        # at least a few scrapes, so every rate() has two samples or more
        tgtest.wait_for(lambda: exporter.scrapes >= 4 and p.query("llm_config_reload_failures_total > 0"),
                        timeout=30, what="four scrapes")
        yield p
    finally:
        rc = p.stop()
        exporter.close()
        assert rc == 0, p.proc.tail()


def test_prometheus_scrapes_the_target_and_loads_every_rule(prom):
    targets = prom.api("targets")["data"]["activeTargets"]
    assert len(targets) == 1
    assert targets[0]["labels"]["job"] == "tollgate" and targets[0]["health"] == "up"
    assert targets[0]["scrapeUrl"].endswith("/metrics")

    def evaluated():
        groups = prom.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return groups if rules and all(r["health"] == "ok" for r in rules) else None

    groups = tgtest.wait_for(evaluated, timeout=15, what="every rule evaluated")
    parsed = {r["name"]: r for r in parse_rules(read(RULES))}
    seen = {}
    for g in groups:
        for r in g["rules"]:
            assert r["type"] == "alerting" and r.get("lastError", "") == "", r
            seen[r["name"]] = (g["name"], r)
    assert set(seen) == set(parsed)
    for name, (group, r) in seen.items():
        assert group == parsed[name]["group"]
        want_for = {"5m": 300, "10m": 600, "1m": 60, None: 0}[parsed[name]["for"]]
        assert r["duration"] == want_for, name
        # Prometheus' own rendering of the expression names the same metrics
        assert metric_names(r["query"]) == metric_names(parsed[name]["expr"]), name


def _alerts(prom):
    out = {}
    for a in prom.api("alerts")["data"]["alerts"]:
        key = (a["labels"]["alertname"], a["labels"].get("tenant") or a["labels"].get("endpoint") or "")
        out[key] = a
    return out


def test_alerts_follow_the_figures(prom):
    want = {
        ("TenantBudgetWarning", "acme-corp"): "pending",        # 90% of its day; startup-xyz 20%
        ("TenantRateLimitHitting", "acme-corp"): "pending",     # 500 refusals a second
        ("TenantErrorRateHigh", "acme-corp"): "pending",        # 11%; startup-xyz 5%
        ("TollgateEndpointDown", "http://10.0.0.2:8000"): "pending",
        ("TollgateConfigReloadFailed", ""): "firing",           # no `for`
    }

    def settled():
        got = _alerts(prom)
        return got if {k: a["state"] for k, a in got.items()} == want else None

    try:
        got = tgtest.wait_for(settled, timeout=20, what="the expected alerts")
    except AssertionError:
        raise AssertionError("alerts: %s" % {k: a["state"] for k, a in _alerts(prom).items()}) from None
    a = got[("TenantBudgetWarning", "acme-corp")]
    assert a["labels"] == {"alertname": "TenantBudgetWarning", "severity": "warning", "tenant": "acme-corp",
                           "job": "tollgate", "instance": "127.0.0.1:%d" % prom.exporter_port}
    assert float(a["value"]) == 0.9
    assert a["annotations"]["summary"] == "Tenant acme-corp at 80% of daily budget"
    # aggregated by tenant: no limit or code label, one alert per tenant
    assert set(got[("TenantRateLimitHitting", "acme-corp")]["labels"]) == {"alertname", "severity", "tenant"}
    e = got[("TenantErrorRateHigh", "acme-corp")]
    assert set(e["labels"]) == {"alertname", "severity", "tenant"}
    assert abs(float(e["value"]) - 0.11) < 1e-9
    assert got[("TollgateEndpointDown", "http://10.0.0.2:8000")]["labels"]["pool"] == "llama-3.1-8b"


def _grafana_vars(expr, tenant):
    return expr.replace("$tenant", tenant).replace("$__rate_interval", "1m")


def test_every_dashboard_query_returns_data(prom):
    d = dashboard()
    # the tenant picker's list, as Grafana asks Prometheus for it
    r = prom.api("label/tenant/values", **{"match[]": "llm_tenant_requests_total"})
    assert r["data"] == sorted(TENANTS)
    allv = tenant_variable(d)["allValue"]
    for p in panels(d):
        for t in p["targets"]:
            for tenant in (allv, "acme-corp"):
                res = prom.query(_grafana_vars(t["expr"], tenant))
                assert res, "%s / %s: no data for tenant %s" % (p["title"], t["refId"], tenant)
                for s in res:
                    v = float(s["value"][1])
                    assert v == v and v != float("inf"), (p["title"], s)   # not NaN, not +Inf
                    if "tenant" in s["metric"] and tenant != allv:
                        assert s["metric"]["tenant"] == "acme-corp", p["title"]


def test_dashboard_figures(prom):
    d = dashboard()
    by_title = {p["title"]: p for p in panels(d)}

    def values(title, ref="A", tenant=".+"):
        t = [x for x in by_title[title]["targets"] if x["refId"] == ref][0]
        res = prom.query(_grafana_vars(t["expr"], tenant))
        return {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in res}

    assert values("Budget used", "A") == {(("tenant", "acme-corp"),): 0.9, (("tenant", "startup-xyz"),): 0.2}
    assert values("Budget used", "B") == {(("tenant", "acme-corp"),): 0.5, (("tenant", "startup-xyz"),): 0.1}
    assert values("Daily spend vs budget", "B", "startup-xyz") == {(("tenant", "startup-xyz"),): 50}
    assert values("Queue length") == {(("pool", "llama-3.1-8b"), ("tenant", "acme-corp")): 3,
                                      (("pool", "llama-3.1-8b"), ("tenant", "startup-xyz")): 0}
    assert values("In flight", tenant="acme-corp") == {
        (("pool", "llama-3.1-8b"), ("tenant", "acme-corp")): 12,
        (("pool", "llama-3.1-70b"), ("tenant", "acme-corp")): 4}
    assert sorted(values("Endpoints up").values()) == [0, 1, 1]
    ratio = values("Error ratio")
    assert abs(ratio[(("tenant", "acme-corp"),)] - 0.11) < 1e-9
    assert abs(ratio[(("tenant", "startup-xyz"),)] - 0.05) < 1e-9
    # the median of the stand-in histogram lies in its (0.25, 0.5] bucket
    p50 = values("Request duration p50 / p99", "A", "acme-corp")[(("tenant", "acme-corp"),)]
    assert 0.25 < p50 <= 0.5
    p99 = values("Request duration p50 / p99", "B", "acme-corp")[(("tenant", "acme-corp"),)]
    assert 2.5 < p99 <= 5
