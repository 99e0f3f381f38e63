"""The Kubernetes packaging (issue 25, items 1 and 2), as an operator applies it: every
shape (the native-sidecar base, the classic-sidecar overlay, the edge base) rendered by
``kubectl kustomize`` alone and with each component (cert-manager, trust-manager,
prometheus-operator, irsa) and all of them, each rendering validated strictly; and what
must hold in every one: the admin port on no load-balanced Service, probes and a restricted
securityContext on every container, a grace period that covers preStop and the drain, no
placeholder Secret or truststore, the config mounted so that its updates arrive."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.tools import tool

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SHAPES = {"sidecar": K8S / "base" / "sidecar", "sidecar-classic": K8S / "overlays" /
          "sidecar-classic", "edge": K8S / "base" / "edge"}
COMPONENTS = ("cert-manager", "trust-manager", "prometheus-operator", "irsa")
COMBINATIONS = [(), *((c,) for c in COMPONENTS), COMPONENTS]
RENDERINGS = [(shape, combo) for shape in SHAPES for combo in COMBINATIONS]

pytestmark = pytest.mark.needs_tool("kubectl", "kubectl (https://kubernetes.io/docs/tasks/tools/)")

_CACHE: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}


def render(shape: str, components: tuple[str, ...], tmp: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of an operator's kustomization: the shape plus components."""
    key = (shape, components)
    if key not in _CACHE:
        d = tmp / f"{shape}-{'-'.join(components) or 'none'}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(SHAPES[shape], d)],
            "components": [os.path.relpath(K8S / "components" / c, d) for c in components],
        }))
        out = subprocess.run([tool("kubectl"), "kustomize", str(d)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        _CACHE[key] = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    return _CACHE[key]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kustomize")


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [deployment] = of_kind(docs, "Deployment")
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def long_running(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers that serve: ordinary ones and native sidecars."""
    return [*spec["containers"], *(c for c in spec.get("initContainers", [])
                                   if c.get("restartPolicy") == "Always")]


def proxy(spec: dict[str, Any]) -> dict[str, Any]:
    [c] = [c for c in long_running(spec) if c["name"] == "mtlsproxy"]
    return c


def ports(spec: dict[str, Any]) -> tuple[tuple[str, int], tuple[str, int]]:
    p = {port["name"]: port["containerPort"] for port in proxy(spec)["ports"]}
    return ("admin", p["admin"]), ("https", p["https"])


def targets(service_port: dict[str, Any], port: tuple[str, int]) -> bool:
    return service_port.get("targetPort", service_port["port"]) in port


def load_balanced(service: dict[str, Any]) -> bool:
    annotations = service["metadata"].get("annotations") or {}
    return (service["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort")
            or bool(service["spec"].get("externalIPs"))
            or any("load-balancer" in a for a in annotations))


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return match_labels.items() <= labels.items()


def proxy_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [cm] = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith(
        "mtlsproxy-config")]
    config: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])
    return config


def sleep_of(container: dict[str, Any]) -> float:
    command = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}
               ).get("command") or []
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


# -- every rendering -----------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "components"), RENDERINGS,
                         ids=[f"{s}+{'+'.join(c) or 'none'}" for s, c in RENDERINGS])
def test_every_shape_with_every_component_renders_and_validates_strictly(
        shape: str, components: tuple[str, ...], tmp: Path) -> None:
    docs = render(shape, components, tmp)
    out = tmp / f"{shape}-{'-'.join(components) or 'none'}.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {d["kind"] for d in docs}
    assert ("Certificate" in kinds) == ("cert-manager" in components)
    assert ("Bundle" in kinds) == ("trust-manager" in components)
    assert ("ServiceMonitor" in kinds) == ("prometheus-operator" in components)
    [account] = of_kind(docs, "ServiceAccount")
    assert ("eks.amazonaws.com/role-arn" in (account["metadata"].get("annotations") or {})
            ) == ("irsa" in components)


# -- every shape ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_every_container_has_probes_and_a_restricted_security_context(shape: str,
                                                                      tmp: Path) -> None:
    """The Pod Security Standards' restricted level, container by container (a pod-level
    field counts where the standard lets it)."""
    spec = pod_spec(render(shape, COMPONENTS, tmp))
    pod = spec.get("securityContext") or {}
    for c in long_running(spec) + [c for c in spec.get("initContainers", [])
                                   if c.get("restartPolicy") != "Always"]:
        name = c["name"]
        if c in long_running(spec):
            assert c.get("readinessProbe") and c.get("livenessProbe"), name
        sc = c.get("securityContext") or {}
        assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
        seccomp = sc.get("seccompProfile") or pod.get("seccompProfile") or {}
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), name
    volume_kinds = {k for v in spec["volumes"] for k in v if k != "name"}
    assert volume_kinds <= {"configMap", "secret", "emptyDir", "projected"}, volume_kinds


@pytest.mark.parametrize("shape", SHAPES)
def test_no_load_balanced_service_nor_the_tls_service_exposes_the_admin_port(
        shape: str, tmp: Path) -> None:
    docs = render(shape, COMPONENTS, tmp)
    admin, tls = ports(pod_spec(docs))
    services = of_kind(docs, "Service")
    assert services
    for service in services:
        service_ports = service["spec"]["ports"]
        if load_balanced(service) or any(targets(p, tls) for p in service_ports):
            assert not any(targets(p, admin) for p in service_ports), \
                service["metadata"]["name"]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_service_monitor_scrapes_a_cluster_ip_service_carrying_only_the_admin_port(
        shape: str, tmp: Path) -> None:
    docs = render(shape, ("prometheus-operator",), tmp)
    admin, tls = ports(pod_spec(docs))
    [monitor] = of_kind(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"}, selector
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    scraped = [s for s in of_kind(docs, "Service")
               if selects(selector["matchLabels"], s["metadata"].get("labels") or {})
               and any(p.get("name") in endpoint_ports for p in s["spec"]["ports"])]
    assert scraped, "the ServiceMonitor selects no Service with its endpoint port"
    for service in scraped:
        assert not load_balanced(service)
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert all(targets(p, admin) for p in service["spec"]["ports"])
        assert not any(targets(p, tls) for p in service["spec"]["ports"])
        # ... and that Service selects the proxy's pods.
        [deployment] = of_kind(docs, "Deployment")
        assert selects(service["spec"]["selector"],
                       deployment["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("shape", SHAPES)
def test_the_monitoring_resources_carry_the_label_kube_prometheus_stack_selects(
        shape: str, tmp: Path) -> None:
    docs = render(shape, ("prometheus-operator",), tmp)
    for kind in ("ServiceMonitor", "PrometheusRule"):
        [doc] = of_kind(docs, kind)
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack", kind


def _rule_covers(rule: dict[str, Any], port: tuple[str, int]) -> bool:
    entries = rule.get("ports")
    if not entries:
        return True
    return any("port" not in e or e["port"] in port for e in entries)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_network_policy_admits_to_the_admin_port_only_the_monitoring_namespace(
        shape: str, tmp: Path) -> None:
    docs = render(shape, (), tmp)
    admin, tls = ports(pod_spec(docs))
    [deployment] = of_kind(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in of_kind(docs, "NetworkPolicy")
                if selects(p["spec"]["podSelector"].get("matchLabels") or {}, labels)]
    assert policies
    rules = [r for p in policies for r in p["spec"].get("ingress") or []]
    admin_rules = [r for r in rules if _rule_covers(r, admin)]
    assert admin_rules
    for rule in admin_rules:
        for peer in rule.get("from") or [{}]:
            assert peer.get("namespaceSelector") == {
                "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}, rule
    assert any(_rule_covers(r, tls) and not r.get("from") for r in rules)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_grace_period_covers_prestop_and_the_drain(shape: str, tmp: Path) -> None:
    docs = render(shape, (), tmp)
    spec = pod_spec(docs)
    grace = spec["terminationGracePeriodSeconds"]
    drain = proxy_config(docs)["drain_timeout"]
    native = proxy(spec) in spec.get("initContainers", [])
    apps = [c for c in spec["containers"] if c["name"] != "mtlsproxy"]
    if native:
        # The proxy stops after the app: the app's preStop, then the proxy's drain.
        assert grace > max((sleep_of(a) for a in apps), default=0) + drain
    else:
        # All together: the proxy's preStop and drain; the apps' preStop outlasts it.
        assert grace > sleep_of(proxy(spec)) + drain
        for app in apps:
            assert sleep_of(app) >= sleep_of(proxy(spec)) + drain, app["name"]
            assert grace > sleep_of(app)


def test_the_native_sidecar_starts_and_is_ready_before_the_app(tmp: Path) -> None:
    spec = pod_spec(render("sidecar", (), tmp))
    [sidecar] = spec["initContainers"]
    assert sidecar["name"] == "mtlsproxy" and sidecar["restartPolicy"] == "Always"
    # The kubelet starts the next container once a sidecar's startupProbe passes.
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert [c["name"] for c in spec["containers"]] == ["app"]
    app = spec["containers"][0]
    assert sleep_of(app) > 0 and app.get("readinessProbe")


def test_the_classic_overlay_makes_the_proxy_an_ordinary_container(tmp: Path) -> None:
    spec = pod_spec(render("sidecar-classic", (), tmp))
    assert not spec.get("initContainers")
    assert {c["name"] for c in spec["containers"]} == {"mtlsproxy", "app"}
    assert all("restartPolicy" not in c for c in spec["containers"])


@pytest.mark.parametrize("shape", SHAPES)
def test_the_config_is_generated_and_mounted_as_a_directory(shape: str, tmp: Path) -> None:
    """A hashed name (a change rolls the pods), and no subPath (a ConfigMap update reaches
    the file without a rollout, and the proxy follows it)."""
    docs = render(shape, (), tmp)
    spec = pod_spec(docs)
    [cm] = [c for c in of_kind(docs, "ConfigMap")
            if c["metadata"]["name"].startswith("mtlsproxy-config-")]
    [volume] = [v for v in spec["volumes"] if v.get("configMap", {}).get("name") ==
                cm["metadata"]["name"]]
    [mount] = [m for m in proxy(spec)["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount
    assert proxy(spec)["args"][-1] == mount["mountPath"] + "/config.yaml"
    assert proxy_config(docs).get("config_watch_interval", 5) > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_no_placeholder_secret_and_cert_manager_writes_the_mounted_one(shape: str,
                                                                       tmp: Path) -> None:
    assert not of_kind(render(shape, (), tmp), "Secret")  # it would fight cert-manager
    docs = render(shape, ("cert-manager",), tmp)
    [certificate] = of_kind(docs, "Certificate")
    secrets = {v["secret"]["secretName"] for v in pod_spec(docs)["volumes"] if "secret" in v}
    assert secrets == {certificate["spec"]["secretName"]}
    tls = proxy_config(docs)["listeners"][0]["tls"]["certificates"][0]
    assert tls["cert_file"].endswith("/tls.crt") and tls["key_file"].endswith("/tls.key")


@pytest.mark.parametrize("shape", ["sidecar", "sidecar-classic"])
def test_trust_manager_fills_the_truststore_configmap_the_pods_mount(shape: str,
                                                                     tmp: Path) -> None:
    assert not [c for c in of_kind(render(shape, (), tmp), "ConfigMap")
                if c["metadata"]["name"] == "mtlsproxy-truststore"]
    docs = render(shape, ("trust-manager",), tmp)
    [bundle] = of_kind(docs, "Bundle")
    spec = pod_spec(docs)
    [volume] = [v for v in spec["volumes"]
                if v.get("configMap", {}).get("name") == bundle["metadata"]["name"]]
    [mount] = [m for m in proxy(spec)["volumeMounts"] if m["name"] == volume["name"]]
    uri = proxy_config(docs)["listeners"][0]["mutual_tls"]["truststore_uri"]
    assert uri == f"{mount['mountPath']}/{bundle['spec']['target']['configMap']['key']}"


def test_the_prometheus_rule_carries_the_rules_file() -> None:
    manifest = yaml.safe_load((K8S / "components/prometheus-operator/prometheusrule.yaml")
                              .read_text())
    rules = yaml.safe_load((ROOT / "deploy/prometheus/mtlsproxy-rules.yml").read_text())
    assert manifest["kind"] == "PrometheusRule" and manifest["spec"] == rules


@pytest.mark.parametrize("shape", SHAPES)
def test_the_shapes_config_is_a_valid_mtlsproxy_config(shape: str, tmp: Path,
                                                       tmp_path: Path) -> None:
    from mtlsproxy.config import parse_config
    from mtlsproxy.errors import ConfigError
    try:
        parse_config(proxy_config(render(shape, (), tmp)), tmp_path)
    except ConfigError as exc:
        # Only the mounted files are missing outside a pod; every key must be known.
        assert all("file not found" in p for p in exc.problems), exc.problems
