"""Shipping artefacts are checked like code: the Dockerfile with hadolint, the Kubernetes
manifests offline with kubernetes-validate --strict (both from the test extras)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import tool

ROOT = Path(__file__).resolve().parent.parent
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


PROM = ROOT / "deploy" / "prometheus"


def test_alert_rules_pass_promtool_check() -> None:
    out = subprocess.run(["promtool", "check", "rules", "mtlsproxy-rules.yml"], cwd=PROM,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


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
