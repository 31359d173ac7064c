"""The Helm chart in helm/tollgate, rendered by Helm's own engine (helm-python-sdk, no helm binary).

Two value sets: the chart's defaults, and tests/deploy/values-full.yaml, which turns every
optional part on. Every rendered object is checked against the Kubernetes schemas
(kubernetes-validate --strict), the two Prometheus Operator objects structurally, and the
rendered gateway configuration against the gateway itself: `tollgate -t`, then a real process
whose /health and /health/ready the probes point at.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

import helm_python as helm
import kubernetes_validate

from conftest import CHART, ROOT, check_config, free_ports, require_tool

K8S_VERSION = "1.33.0"
RELEASE, NAMESPACE = "edge", "gateways"
FULLNAME = f"{RELEASE}-tollgate"
VALUES_FULL = Path(__file__).with_name("values-full.yaml")
ALERTS_FILE = CHART / "files" / "tollgate-alerts.yaml"
DASHBOARD_FILE = CHART / "files" / "tollgate-dashboard.json"
# Not in the Kubernetes schemas: checked structurally below.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
# In the pod, mounted from Secrets; for a local run, files with the same role.
TEST_ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


# --- rendering --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def full_values() -> dict:
    # Parsed the way `helm -f` parses it (YAML 1.1 keys like `on` included).
    return helm.values_from_yaml(VALUES_FULL.read_text())


def render(chart, values: dict | None = None) -> dict[str, str]:
    return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)


def objects(rendered: dict[str, str]) -> list[dict]:
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def gateway_config(objs: list[dict]) -> dict:
    return yaml.safe_load(one(objs, "ConfigMap", FULLNAME)["data"]["tollgate.yaml"])


def container(objs: list[dict]) -> dict:
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def seconds(duration: str) -> int:
    """Whole seconds, rounded up, of a humantime duration (the subset the chart accepts)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", duration)
    assert parts and re.fullmatch(r"(\s*\d+\s*(ms|s|m|h)\s*)+", duration), duration
    return math.ceil(sum(int(n) * units[u] for n, u in parts) - 1e-9)


@pytest.fixture(scope="module", params=["default", "full"])
def case(request, chart):
    values = {} if request.param == "default" else full_values()
    merged = chart.merge_values(values)
    objs = objects(render(chart, values))
    return {"name": request.param, "values": values, "merged": merged, "objs": objs}


# --- chart files and lint -----------------------------------------------------------------------

def test_chart_metadata_and_files():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "tollgate"
    assert str(meta["appVersion"]) == "0.1.0"
    for f in ["values.yaml", "values.schema.json", ".helmignore", "templates/NOTES.txt",
              "templates/_helpers.tpl", "files/tollgate-alerts.yaml", "files/tollgate-dashboard.json"]:
        assert (CHART / f).is_file(), f"helm/tollgate/{f} is missing"
    json.loads((CHART / "values.schema.json").read_text())


@pytest.mark.parametrize("which", ["default", "full"])
def test_helm_lint_strict_is_clean(which):
    values = None if which == "default" else full_values()
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{K8S_VERSION}")
    assert report["total_charts_linted"] == 1
    # Severity 1 is informational ("icon is recommended"); strict lint fails on 2 (warning) and 3.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], json.dumps(report, indent=2)


def test_rendered_object_set(case):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in case["objs"])
    expected = [("ConfigMap", FULLNAME), ("Deployment", FULLNAME), ("PodDisruptionBudget", FULLNAME),
                ("Service", FULLNAME), ("ServiceAccount", FULLNAME)]
    if case["name"] == "full":
        expected = [("ConfigMap", FULLNAME), ("ConfigMap", f"{FULLNAME}-dashboard"), ("Deployment", FULLNAME),
                    ("HorizontalPodAutoscaler", FULLNAME), ("Ingress", FULLNAME),
                    ("PodDisruptionBudget", FULLNAME), ("PrometheusRule", FULLNAME), ("Service", FULLNAME),
                    ("ServiceAccount", "tollgate-edge"), ("ServiceMonitor", FULLNAME)]
    assert kinds == sorted(expected)
    for o in case["objs"]:
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard"):
            continue
        assert o["metadata"]["namespace"] == NAMESPACE
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


# --- Kubernetes schemas -------------------------------------------------------------------------

def test_every_object_passes_kubernetes_schemas_strict(case):
    crds = []
    for o in case["objs"]:
        key = (o["apiVersion"], o["kind"])
        if key in CRDS:
            # kubernetes-validate has no schema for them: it must say so, not pass them silently.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(o, K8S_VERSION, strict=True)
            crds.append(o)
            continue
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{e.message}: an object the test does not know how to check")
    assert len(crds) == (2 if case["name"] == "full" else 0)


def test_kubernetes_validate_cli_on_the_whole_stream(chart):
    """The CLI on `helm template` output: rc 0, every core object INFO passed, the CRDs WARN only."""
    exe = require_tool("kubernetes-validate")
    stream = "\n---\n".join(yaml.safe_dump(o) for o in objects(render(chart, full_values())))
    p = subprocess.run([exe, "--strict", "-k", K8S_VERSION, "-"], input=stream,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    warns = [l for l in lines if l.startswith("WARN")]
    passed = [l for l in lines if l.startswith("INFO") and " passed " in l]
    assert len(warns) == 2 and all("monitoring.coreos.com/v1" in l for l in warns), lines
    assert {re.search(r"kind (\w+)", l).group(1) for l in warns} == {"ServiceMonitor", "PrometheusRule"}
    assert len(passed) == 8 and len(lines) == 10, lines


def test_strict_validation_can_fail(chart):
    """The validator is really checking: an unknown field and a wrong type are errors."""
    objs = objects(render(chart))
    dep = copy.deepcopy(one(objs, "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    svc = copy.deepcopy(one(objs, "Service"))
    svc["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, K8S_VERSION, strict=True)


# --- Prometheus Operator objects, structurally ------------------------------------------------------

def check_metadata(o: dict, kind: str):
    assert o["apiVersion"] == "monitoring.coreos.com/v1" and o["kind"] == kind
    assert set(o) == {"apiVersion", "kind", "metadata", "spec"}
    md = o["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", md["name"]) and len(md["name"]) <= 63
    assert md["namespace"] == NAMESPACE
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md["labels"].items())


def test_service_monitor_structure(chart):
    values = full_values()
    objs = objects(render(chart, values))
    sm, svc = one(objs, "ServiceMonitor"), one(objs, "Service")
    check_metadata(sm, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = sm["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    # It selects the Service (labels a subset of the Service's) in the release namespace.
    assert spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (ep,) = spec["endpoints"]
    assert set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "bearerTokenSecret",
                       "relabelings", "metricRelabelings"}
    assert ep["port"] == "admin" and "admin" in {p["name"] for p in svc["spec"]["ports"]}
    assert ep["path"] == "/metrics" and ep["scheme"] == "http"
    assert ep["interval"] == "15s" and ep["scrapeTimeout"] == "5s"
    # The admin token protects /metrics: the scrape sends it from the same Secret the pod mounts.
    assert ep["bearerTokenSecret"] == {"name": "tollgate-admin", "key": "admin-token"}
    assert ep["metricRelabelings"] == [{"action": "labeldrop", "regex": "backend"}]

    # Without a token there is nothing to send.
    objs = objects(render(chart, {"serviceMonitor": {"enabled": True}}))
    (ep,) = one(objs, "ServiceMonitor")["spec"]["endpoints"]
    assert "bearerTokenSecret" not in ep and ep["port"] == "admin"


def test_prometheus_rule_is_the_alerts_file(chart):
    objs = objects(render(chart, full_values()))
    pr = one(objs, "PrometheusRule")
    check_metadata(pr, "PrometheusRule")
    assert pr["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(pr["spec"]) == {"groups"}
    rules_file = yaml.safe_load(ALERTS_FILE.read_text())
    assert set(rules_file) == {"groups"}
    assert pr["spec"]["groups"] == rules_file["groups"]
    names = [g["name"] for g in pr["spec"]["groups"]]
    assert names and len(names) == len(set(names))
    for g in pr["spec"]["groups"]:
        assert set(g) <= {"name", "interval", "rules", "limit", "partial_response_strategy"}
        assert g["rules"]
        for r in g["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert ("alert" in r) != ("record" in r), r
            assert isinstance(r["expr"], str) and r["expr"].strip()
            assert all(isinstance(v, str) for v in (r.get("labels") or {}).values())


def test_dashboard_configmap_carries_the_json_and_sidecar_label(chart):
    objs = objects(render(chart, full_values()))
    cm = one(objs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Gateways"}
    assert list(cm["data"]) == ["tollgate-dashboard.json"]
    text = DASHBOARD_FILE.read_text()
    assert cm["data"]["tollgate-dashboard.json"] == text  # byte for byte
    assert json.loads(cm["data"]["tollgate-dashboard.json"]) == json.loads(text)
    assert len(yaml.safe_dump(cm).encode()) < 1024 * 1024  # a ConfigMap holds at most 1 MiB

    objs = objects(render(chart, {"dashboard": {"enabled": True, "labelKey": "example.com/dashboard",
                                                "labelValue": "yes", "namespace": "monitoring"}}))
    cm = one(objs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["example.com/dashboard"] == "yes"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "monitoring"


# --- Deployment ---------------------------------------------------------------------------------

def test_probes_point_at_the_admin_health_endpoints(case):
    c = container(case["objs"])
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "admin"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "admin"}
    admin_port = {p["name"]: p["containerPort"] for p in c["ports"]}["admin"]
    assert admin_port == port_of(gateway_config(case["objs"])["admin"]["address"])


def test_ports_agree_everywhere(case):
    objs, merged = case["objs"], case["merged"]
    cfg = gateway_config(objs)
    c = container(objs)
    cports = {p["name"]: p["containerPort"] for p in c["ports"]}
    tls = merged["tls"]["enabled"]
    expected = {"http": merged["ports"]["http"], "admin": merged["ports"]["admin"]}
    if tls:
        expected["https"] = merged["ports"]["https"]
    assert cports == expected
    assert [port_of(l["address"]) for l in cfg["listeners"]] == [cports["http"]] + ([cports["https"]] if tls else [])
    assert ["tls" in l for l in cfg["listeners"]] == [False] + ([True] if tls else [])
    assert port_of(cfg["admin"]["address"]) == cports["admin"]
    assert {l["address"].rsplit(":", 1)[0] for l in cfg["listeners"]} == {"0.0.0.0"}
    assert cfg["admin"]["address"].startswith("0.0.0.0:")  # kubelet probes come from outside the pod
    svc = one(objs, "Service")
    sports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(sports) == set(cports)
    for name, p in sports.items():
        # By name, so it follows the container port; the name resolves to the same number.
        assert p["targetPort"] == name and name in cports
    assert sports["http"]["port"] == merged["service"]["port"]
    assert sports["admin"]["port"] == merged["service"]["adminPort"]
    if tls:
        assert sports["https"]["port"] == merged["service"]["httpsPort"]
    assert svc["spec"]["selector"].items() <= one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    if case["name"] == "full":
        assert cports == {"http": 8000, "admin": 9000, "https": 8443}
        for rule in one(objs, "Ingress")["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"] == {"name": svc["metadata"]["name"], "port": {"name": "http"}}


def test_container_command_config_mount_and_tmp(case):
    objs = case["objs"]
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(objs)
    assert c["args"] == ["-c", "/etc/tollgate/tollgate.yaml"] and "command" not in c
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cfg_vol = volumes[mounts["/etc/tollgate"]["name"]]
    assert cfg_vol["configMap"] == {"name": FULLNAME, "items": [{"key": "tollgate.yaml", "path": "tollgate.yaml"}]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    cfg = gateway_config(objs)
    for key in ("pid_file", "upgrade_sock"):
        assert cfg["server"][key].startswith("/tmp/"), key  # the only writable place
    assert pod["automountServiceAccountToken"] is False
    expected_image = "tollgate:0.1.0" if case["name"] == "default" else "registry.example.com/edge/tollgate:0.1.0"
    assert c["image"] == expected_image


def test_tls_certificates_come_from_secrets_mounted_as_directories(chart):
    objs = objects(render(chart, full_values()))
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = container(objs)
    cfg = gateway_config(objs)
    [tls_listener] = [l for l in cfg["listeners"] if "tls" in l]
    tls = tls_listener["tls"]
    assert tls["unknown_sni"] == "reject" and tls["http2"] is True
    assert [e.get("names") for e in tls["certificates"]] == [None, ["*.example.org"]]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for i, (entry, secret) in enumerate(zip(tls["certificates"], ["edge-tls", "wildcard-tls"])):
        m = mounts[f"tls-{i}"]
        # A directory mount (no subPath), so a renewed Secret reaches the running pod.
        assert "subPath" not in m and m["readOnly"] is True
        assert entry["cert"] == f"{m['mountPath']}/tls.crt" and entry["key"] == f"{m['mountPath']}/tls.key"
        assert volumes[f"tls-{i}"]["secret"]["secretName"] == secret
        assert {it["key"] for it in volumes[f"tls-{i}"]["secret"]["items"]} == {"tls.crt", "tls.key"}
    # Off by default: no https port, listener or volume.
    d = objects(render(chart))
    assert all("tls" not in l for l in gateway_config(d)["listeners"])
    assert "https" not in {p["name"] for p in container(d)["ports"]}


def test_security_context(case):
    pod = one(case["objs"], "Deployment")["spec"]["template"]["spec"]
    sc = container(case["objs"])["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001 and sc["runAsGroup"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 and psc["runAsGroup"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_resources_and_rollout_strategy(case):
    dep = one(case["objs"], "Deployment")
    res = container(case["objs"])["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]
    if case["name"] == "default":
        assert res == {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def test_termination_grace_covers_the_drain(case):
    merged = case["merged"]
    pod = one(case["objs"], "Deployment")["spec"]["template"]["spec"]
    server = gateway_config(case["objs"])["server"]
    pre_stop = merged["preStopSeconds"]
    needed = pre_stop + seconds(server["grace_period"]) + seconds(server["graceful_shutdown_timeout"])
    assert pod["terminationGracePeriodSeconds"] >= needed + merged["shutdownMarginSeconds"]
    assert container(case["objs"])["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", str(pre_stop)]}}
    if case["name"] == "default":
        assert pod["terminationGracePeriodSeconds"] == 30  # 5 + 10 + 10 + 5 (docs/operations.md)
    else:
        assert pod["terminationGracePeriodSeconds"] == 60  # given, and ≥ 10 + 20 + 15 + 5


@pytest.mark.parametrize("server, pre_stop, margin, expected", [
    ({"grace_period": "1m 30s", "graceful_shutdown_timeout": "500ms"}, 5, 5, 5 + 90 + 1 + 5),
    ({"grace_period": "1h", "graceful_shutdown_timeout": "1m30s"}, 0, 1, 3600 + 90 + 1),
    ({"grace_period": "2s", "graceful_shutdown_timeout": "1999ms"}, 3, 2, 3 + 2 + 2 + 2),
    ({"grace_period": None, "graceful_shutdown_timeout": None}, 5, 5, 30),  # the gateway's defaults, 10s each
])
def test_termination_grace_is_computed(chart, server, pre_stop, margin, expected):
    values = {"config": {"server": server}, "preStopSeconds": pre_stop, "shutdownMarginSeconds": margin}
    objs = objects(render(chart, values))
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == expected
    hook = container(objs).get("lifecycle")
    assert hook == ({"preStop": {"exec": {"command": ["sleep", str(pre_stop)]}}} if pre_stop else None)


@pytest.mark.parametrize("values, needed", [
    ({"terminationGracePeriodSeconds": 29}, 30),
    ({"terminationGracePeriodSeconds": 60, "config": {"server": {"graceful_shutdown_timeout": "41s"}}}, 61),
    ({"terminationGracePeriodSeconds": 30, "preStopSeconds": 6}, 31),
    ({"terminationGracePeriodSeconds": 45, "config": {"server": {"grace_period": "30s"}}}, 50),
])
def test_inconsistent_grace_values_fail(chart, values, needed):
    with pytest.raises(helm.HelmRenderError) as e:
        render(chart, values)
    msg = str(e.value)
    assert f"terminationGracePeriodSeconds ({values['terminationGracePeriodSeconds']}) is shorter" in msg
    assert f"at least {needed}" in msg
    # Exactly enough is fine.
    render(chart, dict(values, terminationGracePeriodSeconds=needed))


def test_checksum_follows_the_config_and_nothing_else(chart):
    def annotated(values):
        objs = objects(render(chart, values))
        ann = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        data = one(objs, "ConfigMap", FULLNAME)["data"]["tollgate.yaml"]
        return ann, data

    base, data = annotated({})
    assert base == hashlib.sha256(data.encode()).hexdigest()
    assert annotated({})[0] == base  # deterministic
    full, data = annotated(full_values())
    assert full == hashlib.sha256(data.encode()).hexdigest()
    # Anything that changes the file changes the checksum ...
    for changed in [{"config": {"server": {"log_level": "debug"}}},
                    {"config": {"routes": [{"name": "r", "match": {"path_prefix": "/x"}, "upstream": "example"}]}},
                    {"ports": {"http": 8081}},
                    {"ports": {"admin": 9902}},
                    {"admin": {"existingSecret": "tok"}}]:
        assert annotated(changed)[0] != base, changed
    # ... and nothing else does.
    for same in [{"replicaCount": 5}, {"image": {"tag": "0.2.0"}}, {"podAnnotations": {"a": "b"}},
                 {"resources": {"requests": {"cpu": "1"}}}, {"service": {"port": 8080}},
                 {"ingress": {"enabled": True}}, {"preStopSeconds": 1}, {"podLabels": {"x": "y"}}]:
        assert annotated(same)[0] == base, same


def test_replicas_autoscaling_and_disruption_budget(chart):
    objs = objects(render(chart))
    dep, pdb = one(objs, "Deployment"), one(objs, "PodDisruptionBudget")
    assert dep["spec"]["replicas"] == 2
    assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()

    objs = objects(render(chart, full_values()))
    dep, hpa, pdb = one(objs, "Deployment"), one(objs, "HorizontalPodAutoscaler"), one(objs, "PodDisruptionBudget")
    assert "replicas" not in dep["spec"]  # the HPA owns it
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"]}
    assert targets == {"cpu": 65, "memory": 80}
    assert pdb["spec"] == {"selector": pdb["spec"]["selector"], "minAvailable": 2,
                           "unhealthyPodEvictionPolicy": "AlwaysAllow"}

    # One pod: no budget (it would block drains or protect nothing).
    for values in [{"replicaCount": 1}, {"autoscaling": {"enabled": True, "minReplicas": 1}},
                   {"podDisruptionBudget": {"enabled": False}}]:
        assert not [o for o in objects(render(chart, values)) if o["kind"] == "PodDisruptionBudget"], values
    with pytest.raises(helm.HelmRenderError, match="minReplicas .* is above"):
        render(chart, {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 4}})


def test_image_reference(chart):
    assert container(objects(render(chart, {"image": {"tag": "1.2.3"}})))["image"] == "tollgate:1.2.3"
    digest = "sha256:" + "ab" * 32
    assert container(objects(render(chart, {"image": {"digest": digest}})))["image"] == f"tollgate@{digest}"


def test_admin_token_secret_is_mounted_where_the_config_reads_it(case):
    objs = case["objs"]
    cfg_admin = gateway_config(objs)["admin"]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secrets = [v for v in volumes.values() if "secret" in v and v["secret"]["secretName"] == "tollgate-admin"]
    if case["name"] == "default":
        assert cfg_admin == {"address": "0.0.0.0:9901", "allow_insecure": True}
        assert not secrets
        return
    assert set(cfg_admin) == {"address", "token_file", "readiness"}
    assert cfg_admin["readiness"] == "upstreams"
    (vol,) = secrets
    (item,) = vol["secret"]["items"]
    assert item["key"] == "admin-token"
    (mount,) = [m for m in container(objs)["volumeMounts"] if m["name"] == vol["name"]]
    assert f"{mount['mountPath']}/{item['path']}" == cfg_admin["token_file"]
    assert mount["readOnly"] is True


def test_notes(chart):
    notes = render(chart)["tollgate/templates/NOTES.txt"]
    for s in ["port-forward svc/edge-tollgate", "/health/ready", "checksum/config", "rollout restart",
              "WARNING: the admin listener has no token"]:
        assert s in notes, s
    notes = render(chart, full_values())["tollgate/templates/NOTES.txt"]
    assert "https://api.example.com/" in notes and "WARNING" not in notes and "Bearer" in notes


# --- values schema --------------------------------------------------------------------------------

def test_schema_accepts_both_value_sets(chart):
    chart.validate_schema({})
    chart.validate_schema(full_values())


@pytest.mark.parametrize("values, where", [
    ({"replicaCount": "3"}, "/replicaCount"),
    ({"replicaCount": -1}, "/replicaCount"),
    ({"replicaCout": 3}, "'replicaCout' not allowed"),
    ({"ports": {"http": -1}}, "/ports/http"),
    ({"ports": {"admin": 70000}}, "/ports/admin"),
    ({"admin": {"readiness": "backends"}}, "/admin/readiness"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"tag": 1.2}}, "/image/tag"),
    ({"tls": {"unknownSni": "maybe"}}, "/tls/unknownSni"),
    ({"tls": {"certificates": [{"secret": "x"}]}}, "/tls/certificates/0"),
    ({"ports": {"https": 0}}, "/ports/https"),
    ({"service": {"type": "ExternalName"}}, "/service/type"),
    ({"terminationGracePeriodSeconds": "30"}, "/terminationGracePeriodSeconds"),
    ({"preStopSeconds": -5}, "/preStopSeconds"),
    ({"autoscaling": {"minReplicas": 0}}, "/autoscaling/minReplicas"),
    ({"podDisruptionBudget": {"unhealthyPodEvictionPolicy": "Never"}}, "/podDisruptionBudget/unhealthyPodEvictionPolicy"),
    ({"ingress": {"hosts": [{"host": "a.example", "paths": [{"path": "x"}]}]}}, "/ingress/hosts/0/paths/0/path"),
    ({"config": {"listeners": [{"address": "0.0.0.0:80"}]}}, "ports.http"),
    ({"config": {"admin": {"address": "0.0.0.0:9999"}}}, "ports.admin"),
    ({"config": {"servr": {}}}, "'servr' not allowed"),
    ({"config": {"server": {"grace_period": "ten seconds"}}}, "/config/server/grace_period"),
    ({"config": {"server": {"graceful_shutdown_timeout": 10}}}, "/config/server/graceful_shutdown_timeout"),
    ({"config": {"server": {"grace_period": "1.5s"}}}, "/config/server/grace_period"),
    ({"config": {"server": {"pid_file": "/var/run/tollgate.pid"}}}, "/config/server/pid_file"),
    ({"config": {"server": {"threads": 0}}}, "/config/server/threads"),
    ({"config": {"server": {"log_level": "verbose"}}}, "/config/server/log_level"),
    ({"config": {"access_log": {"format": "xml"}}}, "/config/access_log/format"),
    ({"serviceMonitor": {"interval": "30 seconds"}}, "/serviceMonitor/interval"),
])
def test_schema_rejects_bad_values(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as e:
        chart.validate_schema(values)
    assert where in str(e.value)
    with pytest.raises(helm.HelmValuesError):  # an install renders nothing either
        render(chart, values)


def test_unquoted_on_key_is_caught(chart):
    """`retries: {on: [...]}` unquoted becomes the key "true" in Helm's YAML 1.1 parser."""
    values = helm.values_from_yaml("config:\n  upstreams:\n    example:\n      retries:\n        on: [reset]\n")
    assert values["config"]["upstreams"]["example"]["retries"] == {"true": ["reset"]}
    with pytest.raises(helm.HelmRenderError, match=r'config.upstreams.example.retries .* write "on"'):
        render(chart, values)
    quoted = helm.values_from_yaml('config:\n  upstreams:\n    example:\n      retries:\n        "on": [reset]\n')
    cfg = gateway_config(objects(render(chart, quoted)))
    assert cfg["upstreams"]["example"]["retries"] == {"on": ["reset"]}


def test_template_checks_hold_without_the_schema(chart, tmp_path):
    """`helm install --skip-schema-validation` must still not produce a contradictory config."""
    copy_dir = tmp_path / "tollgate"
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    with helm.Chart.load(copy_dir) as bare:
        for values, msg in [
            ({"config": {"listeners": [{"address": "0.0.0.0:80"}]}}, "remove it and set ports.http"),
            ({"config": {"admin": {"token": "x" * 20}}}, "set ports.admin"),
            ({"config": {"server": {"grace_period": "1.5s"}}}, "config.server.grace_period"),
            ({"ports": {"http": 9901}}, "ports.http and ports.admin"),
            ({"service": {"adminPort": 80}}, "service.port and service.adminPort"),
            ({"tls": {"enabled": True, "certificates": []}}, "tls.enabled needs at least one entry"),
            ({"tls": {"enabled": True, "certificates": [{"secretName": "s"}]}, "ports": {"https": 8080}},
             "ports.https (8080) must differ"),
        ]:
            with pytest.raises(helm.HelmRenderError, match=re.escape(msg)):
                bare.render(values, name=RELEASE, namespace=NAMESPACE)


# --- the rendered configuration, run by the gateway ------------------------------------------------

def localize(cfg: dict, pod: dict, c: dict, tmp: Path) -> dict:
    """Files the pod gets from Secrets, for a local run: each path must be on a mounted volume."""
    cfg = copy.deepcopy(cfg)
    mounts = [m["mountPath"] for m in c["volumeMounts"]]

    def local(path: str, replacement: Path) -> str:
        assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), f"{path} is on no volume of the pod"
        return str(replacement)

    if "token_file" in cfg.get("admin", {}):
        tok = tmp / "admin-token"
        tok.write_text(TEST_ADMIN_TOKEN + "\n")
        cfg["admin"]["token_file"] = local(cfg["admin"]["token_file"], tok)
    for route in cfg.get("routes", []):
        for f in route.get("filters", []):
            if f.get("kind") == "auth" and "jwks_file" in f.get("jwt", {}):
                f["jwt"]["jwks_file"] = local(f["jwt"]["jwks_file"], ROOT / "conf" / "jwks.example.json")
    for li, listener in enumerate(cfg["listeners"]):
        for ci, cert in enumerate(listener.get("tls", {}).get("certificates", [])):
            # A throwaway self-signed certificate for the names the entry serves.
            names = cert.get("names") or ["edge.example.com"]
            crt, key = tmp / f"tls-{li}-{ci}.crt", tmp / f"tls-{li}-{ci}.key"
            san = ",".join(f"DNS:{n}" for n in names)
            subprocess.run(
                [require_tool("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-days", "1", "-subj", "/CN=tollgate-test", "-addext", f"subjectAltName={san}",
                 "-keyout", str(key), "-out", str(crt)],
                check=True, capture_output=True, timeout=30,
            )
            cert["cert"] = local(cert["cert"], crt)
            cert["key"] = local(cert["key"], key)
    return cfg


def test_rendered_config_passes_tollgate_check(case, tollgate_bin, tmp_path):
    objs = case["objs"]
    text = one(objs, "ConfigMap", FULLNAME)["data"]["tollgate.yaml"]
    cfg = yaml.safe_load(text)
    local = localize(cfg, one(objs, "Deployment")["spec"]["template"]["spec"], container(objs), tmp_path)
    path = tmp_path / "tollgate.yaml"
    # The default configuration needs no local file: the rendered text itself is checked.
    path.write_text(text if local == cfg else yaml.safe_dump(local))
    assert (local == cfg) == (case["name"] == "default")
    p = check_config(path)
    assert p.returncode == 0, f"tollgate -t rejected the {case['name']} config:\n{p.stdout}{p.stderr}\n{text}"


def test_tollgate_check_catches_what_the_loose_config_schema_lets_through(chart, tollgate_bin, tmp_path):
    objs = objects(render(chart, {"config": {"upstreams": {"example": {"bakends": [{"address": "127.0.0.1:1"}]}}}}))
    path = tmp_path / "tollgate.yaml"
    path.write_text(one(objs, "ConfigMap", FULLNAME)["data"]["tollgate.yaml"])
    p = check_config(path)
    assert p.returncode == 64 and "bakends" in p.stdout + p.stderr, p.stdout + p.stderr


def http_get(url: str, headers: dict | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_gateway_answers_the_probe_paths(case, tollgate_bin, tmp_path):
    """The real gateway with the rendered configuration: probes hit real endpoints."""
    objs = case["objs"]
    cfg = localize(gateway_config(objs), one(objs, "Deployment")["spec"]["template"]["spec"], container(objs), tmp_path)
    http_port, admin_port, https_port = free_ports(3)
    tls_listeners = [l for l in cfg["listeners"] if "tls" in l]
    cfg["listeners"] = [{"address": f"127.0.0.1:{http_port}"}] + [
        {**l, "address": f"127.0.0.1:{https_port}"} for l in tls_listeners
    ]
    cfg["admin"]["address"] = f"127.0.0.1:{admin_port}"
    cfg["server"]["pid_file"] = str(tmp_path / "tollgate.pid")
    cfg["server"]["upgrade_sock"] = str(tmp_path / "upgrade.sock")
    conf = tmp_path / "tollgate.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    log = (tmp_path / "tollgate.log").open("w")
    proc = subprocess.Popen([str(tollgate_bin), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    c = container(objs)
    try:
        base = f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"tollgate exited {proc.returncode}:\n{(tmp_path / 'tollgate.log').read_text()}"
            try:
                status, body = http_get(base + c["livenessProbe"]["httpGet"]["path"])
                break
            except OSError:
                assert time.monotonic() < deadline, "admin listener never answered"
                time.sleep(0.1)
        assert status == 200 and json.loads(body) == {"status": "ok"}

        status, body = http_get(base + c["readinessProbe"]["httpGet"]["path"])
        ready = json.loads(body)
        if case["name"] == "default":
            # The placeholder upstream is a static backend: ready without anything to discover.
            assert (status, ready) == (200, {"ready": True, "reasons": []})
        else:
            # `api` is found by DNS (a cluster name that does not resolve here): not ready, and
            # the reason says why. The static `web` upstream does not appear.
            assert status == 503 and ready["ready"] is False
            assert ready["reasons"] and all(r.startswith("upstream api has no") for r in ready["reasons"]), ready
            # The admin token is in force: the health checks are open, the rest is not.
            assert http_get(base + "/metrics")[0] == 401
            status, body = http_get(base + "/metrics", {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"})
            assert status == 200 and b"tollgate_build_info" in body

        # The http listener is there (its answer depends on the backends: 404/502/503, not a refusal).
        status, _ = http_get(f"http://127.0.0.1:{http_port}/")
        assert 200 <= status < 600
        if tls_listeners:
            # The TLS listener completes a handshake for the first certificate's name.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            with socket.create_connection(("127.0.0.1", https_port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="edge.example.com") as s:
                    assert s.version() in ("TLSv1.2", "TLSv1.3")
                    assert s.selected_alpn_protocol() == ("h2" if tls_listeners[0]["tls"]["http2"] else "http/1.1")
    finally:
        proc.send_signal(signal.SIGINT)  # stop at once: SIGTERM would sit out the grace period
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
