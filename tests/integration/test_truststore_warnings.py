"""Warnings at every create and update (issue 22, item 2): ``run`` at start-up,
``check-config`` and a SIGHUP that changes a truststore say its version and every warning,
as the gateway returns them when a domain is created or updated."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.harness import Harness
from tests.support.pki import PKI, Cert, make_cert


def expired_ca() -> Cert:
    now = dt.datetime.now(dt.UTC)
    return make_cert("Retired Root", ca=True, not_before=now - dt.timedelta(days=30),
                     not_after=now - dt.timedelta(days=1))


def with_expired_ca(pki: PKI, tmp: Path) -> Path:
    path = tmp / "truststore-with-warning.pem"
    path.write_bytes(pki.truststore.read_bytes() + expired_ca().cert_pem())
    return path


def warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "WARNING CN=Retired Root" in line]


def test_check_config_prints_the_version_and_warnings_and_exits_0(pki: PKI,
                                                                  tmp_path: Path) -> None:
    store = with_expired_ca(pki, tmp_path)
    for name in ("server.pem", "server.key"):
        shutil.copy(pki.directory / name, tmp_path / name)
    config = {"listeners": [{
        "name": "public", "address": "127.0.0.1:8443",
        "tls": {"certificates": [{"cert_file": "server.pem", "key_file": "server.key"}]},
        "mutual_tls": {"truststore_uri": str(store)},
        "routes": [{"path_prefix": "/", "upstream": "http://127.0.0.1:8080"}]}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "mtlsproxy", "check-config", "--config",
                          str(tmp_path / "c.yaml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "truststore of public: " in out.stdout and "2 usable CAs, 1 warnings" in out.stdout
    (line,) = warning_lines(out.stdout)
    assert "expired on" in line


def test_run_logs_each_truststore_and_its_warnings_at_start_up(
        harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = with_expired_ca(harness.pki, tmp_path)
    with caplog.at_level(logging.INFO, "mtlsproxy"):
        harness.start(harness.config(mutual_tls={"truststore_uri": str(store)}))
    assert any("truststore of public: " in r.getMessage() and "1 warnings" in r.getMessage()
               for r in caplog.records)
    assert [r.levelname for r in caplog.records if "WARNING CN=Retired Root" in r.getMessage()
            ] == ["WARNING"]


def test_a_reload_that_changes_the_truststore_logs_its_version_and_warnings(
        harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    harness.start()
    store = with_expired_ca(harness.pki, tmp_path)
    with caplog.at_level(logging.INFO, "mtlsproxy"):
        assert harness.reload(harness.config(mutual_tls={"truststore_uri": str(store)})) == []
    assert len(warning_lines("\n".join(r.getMessage() for r in caplog.records))) == 1
