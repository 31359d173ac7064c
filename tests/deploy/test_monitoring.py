"""The Grafana dashboard and the Prometheus alert rules shipped in helm/tollgate/files/.

- the alert rules pass `promtool check rules`, and `promtool test rules` on
  tests/deploy/alerts_test.yaml, which must cover every alert (a case that fires, one that does not);
- the dashboard is structurally sound (ids, gridPos, datasource refs, variables) and covers the
  required topics; every PromQL expression in it passes `promtool check rules` once Grafana's
  variables are substituted;
- end to end: a real gateway (a caching route, a rate-limited route, a dead upstream with an open
  breaker, an unhealthy one, reloads, purges) scraped by a real Prometheus that also loads the
  alert rules; every dashboard expression returns data, every alert rule evaluates without error,
  and the alerts whose condition the traffic creates go pending.

Run: `.venv/bin/pytest tests/deploy/test_monitoring.py -q` (tools: `make deps-deploy`).
"""

import http.client as httpclient
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import CHART, ROOT, check_config, free_ports, require_tool

DASHBOARD = CHART / "files" / "tollgate-dashboard.json"
ALERTS = CHART / "files" / "tollgate-alerts.yaml"
ALERT_TESTS = Path(__file__).resolve().parent / "alerts_test.yaml"
OBSERVABILITY_DOC = ROOT / "docs" / "observability.md"

# Metrics of the prometheus crate's `process` feature (Linux).
PROCESS_METRICS = {
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
    "process_max_fds", "process_virtual_memory_bytes", "process_start_time_seconds",
    "process_threads",
}
# Grafana's built-in interval variables, and what the checks put in their place.
BUILTIN_VARS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
VAR_RE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")
METRIC_RE = re.compile(r"\b((?:tollgate|process)_[a-zA-Z0-9_]+)\b")
LABEL_VALUES_RE = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", re.S)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture(scope="module")
def promtool():
    return require_tool("promtool")


@pytest.fixture(scope="module")
def prometheus_bin():
    return require_tool("prometheus")


# ----------------------------------------------------------------------------- alert rules

def load_alerts():
    return yaml.safe_load(ALERTS.read_text())


def alert_rules():
    return [r for g in load_alerts()["groups"] for r in g["rules"] if "alert" in r]


def test_alert_rules_pass_promtool_check(promtool):
    r = run([promtool, "check", "rules", str(ALERTS)])
    assert r.returncode == 0, f"promtool check rules {ALERTS}:\n{r.stdout}{r.stderr}"
    assert "SUCCESS" in r.stdout


def test_alert_rules_are_plain_prometheus_rules():
    doc = load_alerts()
    assert set(doc) == {"groups"}, "the PrometheusRule embeds `groups:` as they are"
    text = ALERTS.read_text()
    # Only alert templates ({{ $labels.x }}, {{ $value | ... }}): no Helm templating.
    for m in re.finditer(r"\{\{(.*?)\}\}", text):
        assert re.match(r"\s*\$(labels|value)\b", m.group(1)), f"not an alert template: {m.group(0)}"
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names)), names
    assert {"TollgateHigh5xxRatio", "TollgateBreakerOpen", "TollgateNoHealthyBackend",
            "TollgateHighP99Latency", "TollgateReloadFailures"} <= set(names)
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("for"), f"{name}: no `for:`"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        ann = rule.get("annotations", {})
        for key in ("summary", "description"):
            assert ann.get(key), f"{name}: no {key} annotation"
        assert "$labels" in ann["summary"] + ann["description"], f"{name}: annotations name no label"


def test_alert_unit_tests_pass_and_cover_every_alert(promtool):
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    rule_files = [(ALERT_TESTS.parent / f).resolve() for f in tests["rule_files"]]
    assert ALERTS.resolve() in rule_files, f"{ALERT_TESTS} must test {ALERTS}"
    firing, silent = set(), set()
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else silent).add(t["alertname"])
    text = ALERT_TESTS.read_text()
    for rule in alert_rules():
        name = rule["alert"]
        assert name in text, f"{name} has no promtool test in {ALERT_TESTS}"
        assert name in firing, f"{name}: no test case where it fires"
        assert name in silent, f"{name}: no test case where it does not fire"
    r = run([promtool, "test", "rules", str(ALERT_TESTS)])
    assert r.returncode == 0, f"promtool test rules {ALERT_TESTS}:\n{r.stdout}{r.stderr}"


# ------------------------------------------------------------------------------- dashboard

def load_dashboard():
    return json.loads(DASHBOARD.read_text())


def all_panels(d):
    """Every panel, including those nested in collapsed rows."""
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs(d):
    """(where, expr) for every PromQL expression: panel targets and annotation queries."""
    out = []
    for p in all_panels(d):
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}", t["expr"]))
    for a in d.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f"annotation {a['name']!r}", a["expr"]))
    return out


def variable_queries(d):
    """(name, selector, label) of every `label_values(selector, label)` query variable."""
    out = []
    for v in d["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = LABEL_VALUES_RE.match(q)
        assert m, f"variable {v['name']}: expected label_values(selector, label), got {q!r}"
        out.append((v["name"], m.group(1), m.group(2)))
    return out


def variables_in(expr):
    return {a or b or c for a, b, c in VAR_RE.findall(expr)}


def substitute(expr, values):
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in BUILTIN_VARS:
            return BUILTIN_VARS[name]
        return values[name]
    return VAR_RE.sub(repl, expr)


ALL = {"job": ".*", "instance": ".*", "route": ".*", "upstream": ".*"}


def test_dashboard_identity_and_variables():
    d = load_dashboard()
    assert d["uid"] == "tollgate" and d["title"] == "tollgate"
    assert 36 <= d["schemaVersion"] <= 41
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("job", "instance", "route", "upstream"):
        v = variables[name]
        assert v["type"] == "query", name
        assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
        assert v["includeAll"] and v["multi"] and v["allValue"] == ".*", name
    # Every variable a variable query uses is defined before it (Grafana resolves in order).
    order = [v["name"] for v in d["templating"]["list"]]
    for name, selector, _ in variable_queries(d):
        for used in variables_in(selector):
            assert used in order[: order.index(name)], f"variable {name} uses ${used} before it is defined"


def test_dashboard_panels_are_well_formed():
    d = load_dashboard()
    panels = all_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    defined = {v["name"] for v in d["templating"]["list"]} | set(BUILTIN_VARS)
    for p in panels:
        where = f"panel {p['id']} {p.get('title')!r}"
        g = p.get("gridPos")
        assert g and all(isinstance(g.get(k), int) for k in "hwxy"), f"{where}: gridPos {g}"
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{where}: {g}"
        assert p.get("title"), f"{where}: no title"
        if p["type"] == "row":
            continue
        assert p.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, f"{where}: datasource"
        assert p.get("targets"), f"{where}: no targets"
        refs = [t.get("refId") for t in p["targets"]]
        assert all(refs) and len(refs) == len(set(refs)), f"{where}: refIds {refs}"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"{where}: target {t.get('refId')} has no expr"
            ds = t.get("datasource")
            assert ds is None or ds == p["datasource"], f"{where}: target datasource {ds}"
    for where, expr in dashboard_exprs(d):
        missing = variables_in(expr) - defined
        assert not missing, f"{where}: undefined variables {missing} in {expr}"
        for matcher in re.findall(r'(\w+)\s*=~?\s*"\$\{?(\w+)\}?"', expr):
            label, var = matcher
            assert label == var, f"{where}: label {label} matched against ${var}"
    for a in d["annotations"]["list"]:
        if a.get("expr"):
            assert a["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_panels_do_not_overlap():
    d = load_dashboard()
    # Top-level panels share one grid (a collapsed row's children only show when expanded).
    boxes = [(p["id"], p["gridPos"]) for p in d["panels"]]
    for i, (a, ga) in enumerate(boxes):
        for b, gb in boxes[i + 1:]:
            overlap = (ga["x"] < gb["x"] + gb["w"] and gb["x"] < ga["x"] + ga["w"]
                       and ga["y"] < gb["y"] + gb["h"] and gb["y"] < ga["y"] + ga["h"])
            assert not overlap, f"panels {a} {ga} and {b} {gb} overlap"


def test_dashboard_rate_windows_use_rate_interval():
    for where, expr in dashboard_exprs(load_dashboard()):
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", f"{where}: range [{window}] instead of [$__rate_interval]"
        for label in ("job", "instance"):
            for sel in re.findall(r"\b(?:tollgate|process)_\w+\{([^}]*)\}", expr):
                assert f'{label}=~"${label}"' in sel, f"{where}: selector {{{sel}}} ignores ${label}"


def test_dashboard_covers_the_required_topics():
    d = load_dashboard()
    exprs = [e for _, e in dashboard_exprs(d)]
    text = "\n".join(exprs)
    titles = " | ".join(p.get("title", "") for p in all_panels(d)).lower()
    required = {
        "traffic by route and status class": r"sum by \(route, status_class\) \(rate\(tollgate_requests_total",
        "5xx ratio": r'tollgate_requests_total\{[^}]*status_class="5xx"',
        "latency p50": r"histogram_quantile\(0\.5, sum by \(route, le\) \(rate\(tollgate_request_duration_seconds_bucket",
        "latency p95": r"histogram_quantile\(0\.95, sum by \(route, le\) \(rate\(tollgate_request_duration_seconds_bucket",
        "latency p99": r"histogram_quantile\(0\.99, sum by \(route, le\) \(rate\(tollgate_request_duration_seconds_bucket",
        "upstream p99": r"histogram_quantile\(0\.99, sum by \(upstream, backend, le\) \(rate\(tollgate_upstream_duration_seconds_bucket",
        "in flight": r"tollgate_requests_in_flight\{",
        "connections": r"tollgate_downstream_connections\{",
        "backend health": r"tollgate_backend_healthy\{",
        "breaker open": r'tollgate_backend_breaker_state\{[^}]*state="open"',
        "breaker transitions": r"tollgate_backend_breaker_transitions_total\{",
        "rejections": r"tollgate_upstream_rejected_total\{",
        "retries": r"tollgate_retries_total\{",
        "cache hit ratio": r'tollgate_cache_lookups_total\{[^}]*result="hit"',
        "cache bytes": r"tollgate_cache_bytes\{",
        "cache evictions": r"tollgate_cache_evictions_total\{",
        "rate limited": r"tollgate_rate_limited_total\{",
        "reloads": r"sum by \(outcome\) \(increase\(tollgate_config_reloads_total",
        "last reload": r"tollgate_config_last_reload_success\{",
        "cpu": r"rate\(process_cpu_seconds_total\{",
        "memory": r"process_resident_memory_bytes\{",
        "bytes in": r"rate\(tollgate_request_bytes_total\{",
        "bytes out": r"rate\(tollgate_response_bytes_total\{",
    }
    missing = [topic for topic, pattern in required.items() if not re.search(pattern, text)]
    assert not missing, f"no dashboard expression for: {missing}"
    for word in ("latency", "error", "breaker", "health", "cache", "rate-limited", "reload", "cpu", "memory"):
        assert word in titles, f"no panel title mentions {word!r}"


def documented_metrics():
    names = set(re.findall(r"^\| `((?:tollgate)_\w+)` \|", OBSERVABILITY_DOC.read_text(), re.M))
    assert len(names) > 20, f"could not read the metric table of {OBSERVABILITY_DOC}"
    return names


def base_metric(name, known):
    """A histogram's _bucket/_count/_sum series belong to the documented histogram."""
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name[: -len(suffix)] in known:
            return name[: -len(suffix)]
    return name


def test_dashboard_and_alerts_use_only_documented_metrics():
    known = documented_metrics() | PROCESS_METRICS
    d = load_dashboard()
    sources = [(w, e) for w, e in dashboard_exprs(d)]
    sources += [(f"variable {n}", s) for n, s, _ in variable_queries(d)]
    sources += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    for where, expr in sources:
        for name in METRIC_RE.findall(expr):
            assert base_metric(name, known) in known, f"{where}: {name} is not in {OBSERVABILITY_DOC.name}"
    used = {base_metric(n, known) for _, e in dashboard_exprs(d) for n in METRIC_RE.findall(e)}
    assert not documented_metrics() - used, f"documented metrics without a panel: {documented_metrics() - used}"


def test_dashboard_exprs_pass_promtool(promtool, tmp_path):
    d = load_dashboard()
    rules = [{"record": f"tollgate_dashboard:expr_{i}", "expr": substitute(e, ALL)}
             for i, (_, e) in enumerate(dashboard_exprs(d))]
    rules += [{"record": f"tollgate_dashboard:variable_{n}", "expr": f"count by ({label}) ({substitute(sel, ALL)})"}
              for n, sel, label in variable_queries(d)]
    f = tmp_path / "dashboard-rules.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    r = run([promtool, "check", "rules", str(f)])
    assert r.returncode == 0, f"promtool check rules on the dashboard's expressions:\n{r.stdout}{r.stderr}"
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout


# ------------------------------------------------------------------------------ end to end

class Origin(BaseHTTPRequestHandler):
    """200 everywhere; /static/* cacheable for 60 s, /static/big-* 100 KiB (to cause evictions)."""

    protocol_version = "HTTP/1.1"

    def reply(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        if self.path.startswith("/static/big-"):
            body = b"x" * (100 * 1024)
        else:
            body = b"ok " + self.path.encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if self.path.startswith("/static/"):
            self.send_header("Cache-Control", "max-age=60")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = reply

    def log_message(self, *args):
        pass


def request(port, method, path, body=None, timeout=5.0):
    c = httpclient.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_for(what, cond, timeout, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{log.read_text() if log else ''}")
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout} s\n{log.read_text()[-4000:] if log else ''}")


def stop(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


GATEWAY_CONFIG = """\
server:
  threads: 2
  grace_period: 0s
  graceful_shutdown_timeout: 1s
  pid_file: {tmp}/tollgate.pid
  upgrade_sock: {tmp}/upgrade.sock
listeners:
  - address: 127.0.0.1:{port}
admin:
  address: 127.0.0.1:{admin}
upstreams:
  origin:
    backends: [{{ address: "127.0.0.1:{origin}" }}]
  dead:                         # nothing listens: 502, retries, then open breakers and 503s
    backends: [{{ address: "127.0.0.1:{dead1}" }}, {{ address: "127.0.0.1:{dead2}" }}]
    retries: {{ attempts: 1 }}
    circuit_breaker: {{ consecutive_failures: 2, open_for: 60s }}
  down:                         # fails its health check at once: 503 unhealthy
    backends: [{{ address: "127.0.0.1:{dead3}" }}]
    health_check: {{ kind: tcp, interval: 1s, timeout: 500ms, unhealthy: 1 }}
routes:
  - {{ name: cached, match: {{ path_prefix: /static }}, upstream: origin, cache: {{ ttl: 60s }} }}
  - name: limited
    match: {{ path_prefix: /limited }}
    upstream: origin
    filters: [{{ kind: rate_limit, key: global, rate: 2/s, burst: 1 }}]
  - {{ name: api, match: {{ path_prefix: /api }}, upstream: origin }}
  - {{ name: dead, match: {{ path_prefix: /dead }}, upstream: dead }}
  - {{ name: down, match: {{ path_prefix: /down }}, upstream: down }}
cache:
  max_size: 1MiB
"""

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {alerts}
scrape_configs:
  - job_name: tollgate
    static_configs:
      - targets: ["127.0.0.1:{admin}"]
"""

TRAFFIC_SECONDS = 12
ROUND_SECONDS = 0.5


class Stack:
    def __init__(self, prom_port, gw_port, admin_port, timings):
        self.prom_port, self.gw_port, self.admin_port, self.timings = prom_port, gw_port, admin_port, timings

    def api(self, path, **params):
        q = urllib.parse.urlencode(params)
        status, body = request(self.prom_port, "GET", f"/api/v1/{path}" + (f"?{q}" if q else ""), timeout=10)
        doc = json.loads(body)
        return status, doc

    def query(self, expr):
        return self.api("query", query=expr)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tollgate_bin, prometheus_bin):
    t0 = time.monotonic()
    timings = {}
    tmp = tmp_path_factory.mktemp("monitoring")
    origin = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    origin.daemon_threads = True
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    port, admin, prom_port, dead1, dead2, dead3 = free_ports(6)
    conf = tmp / "tollgate.yaml"
    good = GATEWAY_CONFIG.format(tmp=tmp, port=port, admin=admin, origin=origin.server_address[1],
                                 dead1=dead1, dead2=dead2, dead3=dead3)
    conf.write_text(good)
    chk = check_config(conf)
    assert chk.returncode == 0, f"test config invalid:\n{chk.stdout}{chk.stderr}"
    procs = []
    try:
        gw_log = tmp / "gateway.log"
        env = dict(os.environ, RUST_LOG="warn")
        gw = subprocess.Popen([str(tollgate_bin), "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=gw_log.open("w"), env=env, cwd=tmp)
        procs.append((gw, signal.SIGTERM))
        wait_for("the gateway listens", lambda: request(admin, "GET", "/health")[0] == 200
                 and request(port, "GET", "/api/ping")[0] == 200, 20, gw, gw_log)
        timings["gateway_up_s"] = round(time.monotonic() - t0, 1)

        prom_conf = tmp / "prometheus.yml"
        prom_conf.write_text(PROMETHEUS_CONFIG.format(alerts=ALERTS, admin=admin))
        prom_log = tmp / "prometheus.log"
        prom = subprocess.Popen(
            [prometheus_bin, f"--config.file={prom_conf}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=prom_log.open("w"), cwd=tmp)
        procs.append((prom, signal.SIGTERM))
        s = Stack(prom_port, port, admin, timings)
        wait_for("prometheus is ready", lambda: request(prom_port, "GET", "/-/ready")[0] == 200, 30, prom, prom_log)
        timings["prometheus_ready_s"] = round(time.monotonic() - t0, 1)

        def scraped():
            _, doc = s.query('up{job="tollgate"} == 1')
            return bool(doc["data"]["result"])
        wait_for("prometheus scrapes the gateway", scraped, 15, prom, prom_log)
        timings["startup_s"] = round(time.monotonic() - t0, 1)

        # Bounded traffic: ~20 requests every 0.5 s for 12 s.
        t1 = time.monotonic()
        counts = {}
        rounds = int(TRAFFIC_SECONDS / ROUND_SECONDS)
        for i in range(rounds):
            start = time.monotonic()
            batch = [("GET", f"/api/items?n={j}", None) for j in range(6)]
            batch += [("POST", "/api/items", b"y" * 512)]
            batch += [("GET", "/static/app.css", None)] * 4          # a miss, then hits
            batch += [("GET", f"/static/big-{i}.js", None)]           # misses; evictions past 1 MiB
            batch += [("GET", "/limited/x", None)] * 3                # 2/s allowed: some 429
            batch += [("GET", "/dead/x", None), ("GET", "/down/x", None), ("GET", "/nowhere", None)]
            for method, path, body in batch:
                st, _ = request(port, method, path, body)
                counts[st] = counts.get(st, 0) + 1
            if i == rounds // 3:
                # A failed reload (the old configuration stays), then a good one.
                conf.write_text("routes: [ this is not valid\n")
                st, body = request(admin, "POST", "/reload")
                assert st == 400, (st, body)
                conf.write_text(good)
                st, body = request(admin, "POST", "/reload")
                assert st == 200, (st, body)
            if i == rounds // 2:
                # The big-*.js misses can evict app.css (1 MiB cache, sharded LRU): fetch it
                # again right before, so there is a stored copy to purge.
                for _ in range(2):
                    request(port, "GET", "/static/app.css")
                st, body = request(admin, "POST", "/cache/purge",
                                json.dumps({"url": f"http://127.0.0.1:{port}/static/app.css"}).encode())
                assert st == 200 and json.loads(body)["purged"] >= 1, (st, body)
            if time.monotonic() - t1 > 3 * TRAFFIC_SECONDS:
                pytest.fail(f"the traffic took over {3 * TRAFFIC_SECONDS} s ({i + 1}/{rounds} rounds): {counts}")
            time.sleep(max(0.0, ROUND_SECONDS - (time.monotonic() - start)))
        timings["traffic_s"] = round(time.monotonic() - t1, 1)
        timings["requests"] = sum(counts.values())
        timings["statuses"] = dict(sorted(counts.items()))
        for st in (200, 404, 429, 502, 503):
            assert counts.get(st), f"the traffic produced no {st}: {counts}"
        # Let the last scrape and rule evaluations land.
        time.sleep(2.5)
        timings["fixture_s"] = round(time.monotonic() - t0, 1)
        s.exposition = request(admin, "GET", "/metrics")[1].decode()
        s.gw_log, s.prom_log = gw_log, prom_log
        yield s
    finally:
        for p, sig in reversed(procs):
            stop(p, sig)
        origin.shutdown()
        origin.server_close()
        timings["total_s"] = round(time.monotonic() - t0, 1)
        print(f"\nmonitoring e2e timings: {timings}")


def e2e_values(stack):
    """Variable values as Grafana would resolve them: job from its query, the rest "All"."""
    _, doc = stack.query("count by (job) (tollgate_build_info)")
    jobs = sorted(r["metric"]["job"] for r in doc["data"]["result"])
    assert jobs == ["tollgate"], jobs
    return dict(ALL, job="(" + "|".join(jobs) + ")")


def test_exposition_has_process_metrics(stack, promtool):
    names = {l.split("{")[0].split(" ")[0] for l in stack.exposition.splitlines() if l and not l.startswith("#")}
    missing = PROCESS_METRICS - names
    assert not missing, f"the gateway's /metrics lacks {missing} (prometheus crate feature `process`)"
    r = subprocess.run([promtool, "check", "metrics"], input=stack.exposition, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, f"promtool check metrics:\n{r.stdout}{r.stderr}"


def test_dashboard_variable_queries_return_values(stack):
    values = e2e_values(stack)
    for name, selector, label in variable_queries(load_dashboard()):
        expr = f"count by ({label}) ({substitute(selector, values)})"
        status, doc = stack.query(expr)
        assert status == 200 and doc["status"] == "success", (name, expr, doc)
        got = {r["metric"].get(label) for r in doc["data"]["result"]}
        assert got and None not in got, f"variable {name}: {expr} gave {got}"
    _, doc = stack.query('count by (route) (tollgate_requests_total{job="tollgate"})')
    assert {r["metric"]["route"] for r in doc["data"]["result"]} >= {"cached", "limited", "api", "dead", "down", "none"}


def test_every_dashboard_expression_returns_data(stack):
    values = e2e_values(stack)
    failures = []
    for where, expr in dashboard_exprs(load_dashboard()):
        q = substitute(expr, values)
        status, doc = stack.query(q)
        if status != 200 or doc.get("status") != "success":
            failures.append(f"{where}: {doc.get('error')}\n  {q}")
            continue
        result = doc["data"]["result"]
        samples = [float(r["value"][1]) for r in result] if doc["data"]["resultType"] == "vector" else []
        if not result:
            failures.append(f"{where}: empty result\n  {q}")
        elif not any(math.isfinite(v) for v in samples):
            failures.append(f"{where}: only NaN/Inf {samples}\n  {q}")
    assert not failures, "dashboard expressions without data:\n" + "\n".join(failures)


def test_dashboard_values_match_the_traffic(stack):
    values = e2e_values(stack)

    def one(expr):
        _, doc = stack.query(substitute(expr, values))
        res = doc["data"]["result"]
        assert res, expr
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in res}

    hit = one('sum(tollgate_cache_lookups_total{job=~"$job", result="hit"})')
    assert list(hit.values())[0] >= 40, hit
    limited = one('sum(tollgate_rate_limited_total{job=~"$job", route="limited"})')
    assert list(limited.values())[0] >= 10, limited
    evicted = one('sum(tollgate_cache_evictions_total{job=~"$job"})')
    assert list(evicted.values())[0] >= 1, evicted
    # Breaker state panel: 2 (open) for both dead backends, 0 (closed) elsewhere.
    panel = next(p for p in all_panels(load_dashboard()) if p["title"] == "Breaker state")
    states = one(panel["targets"][0]["expr"])
    by_upstream = {}
    for labels, v in states.items():
        by_upstream.setdefault(dict(labels)["upstream"], set()).add(v)
    assert by_upstream == {"dead": {2.0}, "origin": {0.0}, "down": {0.0}}, states


def test_every_alert_rule_evaluates_against_real_data(stack):
    # Prometheus loaded the rules file: every rule evaluated, none with an error.
    _, doc = stack.api("rules")
    loaded = {r["name"]: r for g in doc["data"]["groups"] for r in g["rules"]}
    for rule in alert_rules():
        name = rule["alert"]
        assert name in loaded, f"{name} not loaded by Prometheus: {list(loaded)}"
        assert loaded[name]["health"] == "ok", f"{name}: {loaded[name].get('lastError')}"
        status, q = stack.query(rule["expr"])
        assert status == 200 and q["status"] == "success", (name, q)
    # Every metric an alert uses is scraped from the gateway (a typo would silently never fire).
    _, doc = stack.api("label/__name__/values")
    scraped = set(doc["data"])
    for rule in alert_rules():
        for name in METRIC_RE.findall(rule["expr"]):
            assert name in scraped, f"{rule['alert']}: {name} is not scraped from the gateway"
    # The conditions the traffic created: pending (their `for:` outlasts the test).
    _, doc = stack.api("alerts")
    active = {}
    for a in doc["data"]["alerts"]:
        active.setdefault(a["labels"]["alertname"], []).append(a["labels"])
    assert {l["upstream"] for l in active.get("TollgateNoHealthyBackend", [])} == {"down"}, active
    assert {l["upstream"] for l in active.get("TollgateBreakerOpen", [])} == {"dead"}, active
    assert len(active.get("TollgateBreakerOpen", [])) == 2, active
    assert [l["job"] for l in active.get("TollgateReloadFailures", [])] == ["tollgate"], active
    assert "TollgateHighP99Latency" not in active, active


def test_e2e_is_bounded(stack):
    assert stack.timings["fixture_s"] < 60, stack.timings
    assert 200 <= stack.timings["requests"] <= 1000, stack.timings
