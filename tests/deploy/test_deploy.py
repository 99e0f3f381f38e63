"""Shipping artefacts are checked like code: the Dockerfile with hadolint, the Kubernetes
manifests offline with kubernetes-validate --strict (both from the test extras)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.tools import tool

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted(p for p in (ROOT / "deploy" / "k8s").rglob("*.yaml")
                   if p.name != "kustomization.yaml")


def test_dockerfile_passes_hadolint_with_no_warnings() -> None:
    out = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_dockerfile_runs_mtlsproxy_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["mtlsproxy"]' in text
    assert 'CMD ["run", "--config", "/etc/mtlsproxy/config.yaml"]' in text
    assert "\nUSER 10001" in text and "HEALTHCHECK" in text


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_validates_strictly_offline(manifest: Path) -> None:
    out = subprocess.run([tool("kubernetes-validate"), "--strict", str(manifest)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kustomizations_list_existing_files() -> None:
    kustomizations = list((ROOT / "deploy" / "k8s").rglob("kustomization.yaml"))
    assert kustomizations
    for k in kustomizations:
        for resource in yaml.safe_load(k.read_text())["resources"]:
            assert (k.parent / resource).exists(), f"{k}: {resource}"


def test_the_sidecar_configmap_is_a_valid_mtlsproxy_config(tmp_path: Path) -> None:
    from mtlsproxy.config import parse_config
    from mtlsproxy.errors import ConfigError
    cm = yaml.safe_load((ROOT / "deploy/k8s/sidecar/configmap.yaml").read_text())
    raw = yaml.safe_load(cm["data"]["config.yaml"])
    try:
        parse_config(raw, tmp_path)
    except ConfigError as exc:
        # Only the mounted files are missing outside a pod; every key must be known.
        assert all("file not found" in p for p in exc.problems), exc.problems



# The admin port (/metrics, /truststore: plain HTTP) is for operators: in Kubernetes it is on
# a ClusterIP Service of its own behind a NetworkPolicy, never on a load-balanced Service or
# beside the TLS port; in the sample configs it stays on loopback.

SHAPES = ["edge", "sidecar"]


def rendered(shape: str) -> list[dict[str, Any]]:
    """The shape as `kubectl kustomize` renders it. Where kubectl is missing (CI installs
    none), the listed resources in order: the same output while the kustomization does no
    more than list resources, which the fallback asserts."""
    k = ROOT / "deploy" / "k8s" / shape
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(k)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    kustomization = yaml.safe_load((k / "kustomization.yaml").read_text())
    assert set(kustomization) == {"apiVersion", "kind", "resources"}, kustomization
    return [d for r in kustomization["resources"]
            for d in yaml.safe_load_all((k / r).read_text()) if d]


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _proxy_ports(docs: list[dict[str, Any]]) -> tuple[tuple[str, int], tuple[str, int]]:
    """(name, containerPort) of the proxy container's admin and TLS ports."""
    [deployment] = _of_kind(docs, "Deployment")
    [proxy] = [c for c in deployment["spec"]["template"]["spec"]["containers"]
               if c["name"] == "mtlsproxy"]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    return ("admin", ports["admin"]), ("https", ports["https"])


def _targets(service_port: dict[str, Any], port: tuple[str, int]) -> bool:
    target = service_port.get("targetPort", service_port["port"])
    return target in port


def _load_balanced(service: dict[str, Any]) -> bool:
    annotations = service["metadata"].get("annotations") or {}
    return (service["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort")
            or bool(service["spec"].get("externalIPs"))
            or any("load-balancer" in a for a in annotations))


def _selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return match_labels.items() <= labels.items()


@pytest.mark.parametrize("shape", SHAPES)
def test_no_load_balanced_service_nor_the_tls_service_exposes_the_admin_port(
        shape: str) -> None:
    docs = rendered(shape)
    admin, tls = _proxy_ports(docs)
    services = _of_kind(docs, "Service")
    assert services
    for service in services:
        ports = service["spec"]["ports"]
        if _load_balanced(service) or any(_targets(p, tls) for p in ports):
            assert not any(_targets(p, admin) for p in ports), service["metadata"]["name"]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_service_monitor_scrapes_a_cluster_ip_service_carrying_only_the_admin_port(
        shape: str) -> None:
    docs = rendered(shape)
    admin, tls = _proxy_ports(docs)
    [monitor] = _of_kind(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"}, selector  # the only form evaluated here
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    scraped = [s for s in _of_kind(docs, "Service")
               if _selects(selector["matchLabels"], s["metadata"].get("labels") or {})
               and any(p.get("name") in endpoint_ports for p in s["spec"]["ports"])]
    assert scraped, "the ServiceMonitor selects no Service with its endpoint port"
    for service in scraped:
        name = service["metadata"]["name"]
        assert not _load_balanced(service), name
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", name
        assert all(_targets(p, admin) for p in service["spec"]["ports"]), name
        assert not any(_targets(p, tls) for p in service["spec"]["ports"]), name


def _rule_covers(rule: dict[str, Any], port: tuple[str, int]) -> bool:
    """Whether a NetworkPolicy ingress rule applies to the named container port: no ports
    means every port, as does an entry with no port."""
    entries = rule.get("ports")
    if not entries:
        return True
    for entry in entries:
        if "port" not in entry or entry["port"] in port:
            return True
        if "endPort" in entry and isinstance(entry["port"], int) \
                and entry["port"] <= port[1] <= entry["endPort"]:
            return True
    return False


MONITORING = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_network_policy_admits_to_the_admin_port_only_the_monitoring_namespace(
        shape: str) -> None:
    docs = rendered(shape)
    admin, tls = _proxy_ports(docs)
    [deployment] = _of_kind(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in _of_kind(docs, "NetworkPolicy")
                if _selects(p["spec"]["podSelector"].get("matchLabels") or {}, pod_labels)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    assert policies, "no NetworkPolicy isolates the proxy pods for ingress"
    rules = [r for p in policies for r in p["spec"].get("ingress") or []]
    admin_rules = [r for r in rules if _rule_covers(r, admin)]
    assert admin_rules, "the admin port is admitted from nowhere: Prometheus cannot scrape"
    for rule in admin_rules:
        peers = rule.get("from")
        assert peers, f"the admin port is open to every source: {rule}"
        for peer in peers:
            assert set(peer) <= {"namespaceSelector", "podSelector"}, peer
            assert peer.get("namespaceSelector") == MONITORING, peer
    # The TLS port stays open to every source (absent or empty from), as without a policy.
    assert any(_rule_covers(r, tls) and not r.get("from") for r in rules), rules


SAMPLE_CONFIGS = sorted(p for ext in ("yaml", "yml") for p in (ROOT / "config").rglob(f"*.{ext}"))


def test_there_are_sample_configs() -> None:
    assert SAMPLE_CONFIGS


@pytest.mark.parametrize("sample", SAMPLE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_sample_config_keeps_the_admin_port_on_loopback_or_off(sample: Path) -> None:
    from mtlsproxy.config import AdminConfig, Config, admin_is_loopback, parse_address
    raw = yaml.safe_load(sample.read_text())
    admin: AdminConfig | None = AdminConfig()  # the default when the key is absent
    if raw.get("admin") is False:
        admin = None
    elif "address" in (raw.get("admin") or {}):
        admin = AdminConfig(*parse_address(str(raw["admin"]["address"])))
    # The same predicate `mtlsproxy run` warns on.
    assert admin_is_loopback(Config(listeners=(), admin=admin)), raw.get("admin")


PROM = ROOT / "deploy" / "prometheus"


@pytest.mark.needs_tool("promtool", "prometheus")
def test_alert_rules_pass_promtool_check() -> None:
    out = subprocess.run(["promtool", "check", "rules", "mtlsproxy-rules.yml"], cwd=PROM,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.needs_tool("promtool", "prometheus")
def test_every_alert_has_a_passing_promtool_unit_test() -> None:
    out = subprocess.run(["promtool", "test", "rules", "mtlsproxy-rules.test.yml"], cwd=PROM,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {r["alert"] for g in yaml.safe_load((PROM / "mtlsproxy-rules.yml").read_text())
              ["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(
        (PROM / "mtlsproxy-rules.test.yml").read_text())["tests"]
        for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert alerts == tested


@pytest.mark.parametrize("shape", ["edge", "sidecar"])
def test_prometheus_rule_manifests_carry_the_rules_file(shape: str) -> None:
    manifest = yaml.safe_load((ROOT / "deploy/k8s" / shape / "prometheusrule.yaml").read_text())
    rules = yaml.safe_load((PROM / "mtlsproxy-rules.yml").read_text())
    assert manifest["kind"] == "PrometheusRule" and manifest["spec"] == rules


def test_dashboard_queries_only_metrics_the_proxy_exports(harness: Any) -> None:
    """Every metric a panel names appears in the real /metrics output of a running proxy."""
    import json
    import re
    import urllib.request
    dashboard = json.loads((ROOT / "deploy/grafana/mtlsproxy-dashboard.json").read_text())
    harness.start()
    assert harness.get("/")[0] == 200
    text = urllib.request.urlopen(f"http://127.0.0.1:{harness.admin_port}/metrics",
                                  timeout=5).read().decode()
    # A sample line, or the HELP line of a labelled metric with no series yet.
    exported = set(re.findall(r"^(?:# HELP )?(mtlsproxy_[a-z0-9_]+)", text, re.M))
    used = {m for p in dashboard["panels"] for t in p["targets"]
            for m in re.findall(r"mtlsproxy_[a-z0-9_]+", t["expr"])}
    assert used and used <= exported, used - exported
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
