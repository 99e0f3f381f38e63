"""Shipping artefacts are checked like code: the Dockerfile with hadolint, the Kubernetes
manifests offline with kubernetes-validate --strict (both from the test extras)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.tools import tool

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_passes_hadolint_with_no_warnings() -> None:
    out = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_dockerfile_runs_mtlsproxy_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["mtlsproxy"]' in text
    assert 'CMD ["run", "--config", "/etc/mtlsproxy/config.yaml"]' in text
    assert "\nUSER 10001" in text and "HEALTHCHECK" in text


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
