"""Shipping artefacts are checked like code: the Dockerfile with hadolint, the Kubernetes
manifests offline with kubernetes-validate --strict (both from the test extras)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted(p for p in (ROOT / "deploy" / "k8s").rglob("*.yaml")
                   if p.name != "kustomization.yaml")


def test_dockerfile_passes_hadolint_with_no_warnings() -> None:
    out = subprocess.run(["hadolint", "Dockerfile"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_dockerfile_runs_mtlsproxy_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["mtlsproxy"]' in text
    assert 'CMD ["run", "--config", "/etc/mtlsproxy/config.yaml"]' in text
    assert "\nUSER 10001" in text and "HEALTHCHECK" in text


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_validates_strictly_offline(manifest: Path) -> None:
    out = subprocess.run(["kubernetes-validate", "--strict", str(manifest)],
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
