"""Configuration: typed values, defaults, and errors that name the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlsproxy.config import load_config, parse_config
from mtlsproxy.errors import ConfigError
from tests.support.pki import PKI


def write(tmp: Path, data: dict[str, Any]) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def good(pki: PKI, **over: Any) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": "public",
        "address": "127.0.0.1:8443",
        "tls": {"security_policy": "TLS_1_2",
                "certificates": [{"cert_file": "server.pem", "key_file": "server.key"}]},
        "mutual_tls": {"truststore_uri": "truststore.pem", "max_chain_length": 4,
                       "forward_client_cert": ["rfc9440", "xfcc", "details"]},
        "routes": [{"path_prefix": "/", "upstream": "http://127.0.0.1:8080",
                    "strip_prefix": False}],
    }
    listener.update(over)
    return {"listeners": [listener], "admin": {"address": "127.0.0.1:9901"}}


def problems(pki: PKI, data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(pki.directory, data))
    return info.value.problems


def test_the_issue_example_loads_with_paths_relative_to_the_file(pki: PKI) -> None:
    config = load_config(write(pki.directory, good(pki)))
    (lc,) = config.listeners
    assert (lc.host, lc.port) == ("127.0.0.1", 8443)
    assert lc.tls.certificates[0].cert_file == pki.directory / "server.pem"
    assert lc.mutual_tls.truststore_uri == str(pki.directory / "truststore.pem")
    assert lc.routes[0].upstream.key == "127.0.0.1:8080"
    assert config.admin is not None and config.admin.port == 9901
    assert lc.timeouts.handshake > 0 and lc.limits.max_header_bytes == 32768


def test_file_uri_truststore_is_accepted(pki: PKI) -> None:
    data = good(pki, mutual_tls={"truststore_uri": f"file://{pki.truststore}"})
    assert load_config(write(pki.directory, data)).listeners[0].mutual_tls.enabled


def test_missing_key_file_names_its_key_path(pki: PKI) -> None:
    data = good(pki)
    data["listeners"][0]["tls"]["certificates"][0]["key_file"] = "nope.key"
    assert problems(pki, data) == [
        f"listeners[0].tls.certificates[0].key_file: file not found: {pki.directory}/nope.key"]


def test_unknown_keys_are_errors_not_ignored(pki: PKI) -> None:
    data = good(pki)
    data["listeners"][0]["mutual_tls"]["truststore_url"] = "typo"
    data["lsteners"] = []
    found = problems(pki, data)
    assert any(p.startswith("listeners[0].mutual_tls.truststore_url: unknown key")
               for p in found)
    assert any(p.startswith("lsteners: unknown key") for p in found)


@pytest.mark.parametrize("path, value, expected", [
    (("tls", "security_policy"), "TLS_1_0", "listeners[0].tls.security_policy: must be one of"),
    (("mutual_tls", "max_chain_length"), 0, "listeners[0].mutual_tls.max_chain_length: must be"),
    (("mutual_tls", "forward_client_cert"), ["pem"],
     "listeners[0].mutual_tls.forward_client_cert[0]: unknown header family"),
    (("routes",), [{"path_prefix": "/", "upstream": "ftp://x"}],
     "listeners[0].routes[0].upstream: must be http://host:port, https://host:port or "
     "unix:/path"),
    (("routes",), [{"path_prefix": "/", "upstream": "unix:relative.sock"}],
     "listeners[0].routes[0].upstream: a unix socket upstream is unix:/absolute/path"),
    (("routes",), [{"path_prefix": "/", "upstream": "http://x",
                    "upstream_tls": {"verify": False}}],
     "listeners[0].routes[0].upstream_tls: applies to https:// upstreams only"),
    (("routes",), [{"path_prefix": "/", "upstream": "https://x",
                    "upstream_tls": {"min_version": "TLSv1.1"}}],
     "listeners[0].routes[0].upstream_tls.min_version: must be one of"),
    (("routes",), [{"path_prefix": "/", "upstream": "https://x",
                    "upstream_tls": {"ca_file": "/nonexistent/ca.pem"}}],
     "listeners[0].routes[0].upstream_tls.ca_file: file not found"),
    (("tcp",), {"upstream": "http://x:1"},
     "listeners[0].routes: not allowed beside tcp"),
    (("tcp",), {"upstream": "http://x:1"}, "listeners[0].tcp.upstream: bad host"),
    (("tcp",), {"upstream": "1.2.3.4:5:6"}, "listeners[0].tcp.upstream: bad host"),
    (("tcp",), {"upstream": "::1:5432"}, "listeners[0].tcp.upstream: bad host"),
    (("tcp",), {"upstream": "[1.2.3.4]:80"}, "listeners[0].tcp.upstream:"),
    (("tcp",), {"upstream": "127.0.0.1:\u0665\u0664"}, "listeners[0].tcp.upstream: bad port"),
    (("tcp",), {"upstream": "unix:/" + "x" * 120}, "listeners[0].tcp.upstream: a unix"),
    (("routes",), [{"path_prefix": "/", "upstream": "https://x",
                    "upstream_tls": {"server_name": "a..b"}}],
     "listeners[0].routes[0].upstream_tls.server_name: must be a DNS name"),
    (("routes",), [{"path_prefix": "/", "upstream": "https://x",
                    "upstream_tls": {"server_name": "x" * 64 + ".example"}}],
     "listeners[0].routes[0].upstream_tls.server_name: must be a DNS name"),
    (("routes",), [{"path_prefix": "/", "upstream": "https://x",
                    "upstream_tls": {"verify": False, "ca_file": "config.yaml"}}],
     "listeners[0].routes[0].upstream_tls.verify: false with a ca_file"),
    (("tcp",), {"upstream": "x:1", "proxy_protocol_upstream": "v1"},
     "listeners[0].tcp.proxy_protocol_upstream: must be false or v2"),
    (("routes",), [{"path_prefix": "api", "upstream": "http://x"}],
     "listeners[0].routes[0].path_prefix: must start with /"),
    (("address",), "nohost", "listeners[0].address: expected host:port"),
    (("timeouts",), {"idle": -1}, "listeners[0].timeouts.idle: must be greater than 0"),
    (("limits",), {"max_header_bytes": "big"}, "listeners[0].limits.max_header_bytes: must be"),
])
def test_bad_values_name_their_key_path(pki: PKI, path: tuple[str, ...], value: Any,
                                        expected: str) -> None:
    data = good(pki)
    target = data["listeners"][0]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert any(p.startswith(expected) for p in problems(pki, data)), problems(pki, data)


def test_a_listener_without_tls_is_refused(pki: PKI) -> None:
    data = good(pki)
    del data["listeners"][0]["tls"]
    assert any(p.startswith("listeners[0].tls: required") for p in problems(pki, data))


def test_every_problem_is_reported_at_once(pki: PKI) -> None:
    data = good(pki, address="bad", routes=[])
    data["listeners"][0]["tls"]["security_policy"] = "x"
    assert len(problems(pki, data)) == 3


def test_s3_truststore_uris_need_a_bucket_and_a_key(pki: PKI) -> None:
    data = good(pki, mutual_tls={"truststore_uri": "s3://bucket-only"})
    assert problems(pki, data) == [
        "listeners[0].mutual_tls.truststore_uri: expected s3://bucket/key"]
    data = good(pki, mutual_tls={"truststore_uri": "s3://bucket/path/key.pem",
                                 "truststore_version": "v1", "refresh_interval": 5})
    mtls = load_config(write(pki.directory, data)).listeners[0].mutual_tls
    assert (mtls.truststore_version, mtls.refresh_interval) == ("v1", 5.0)


def test_not_a_mapping_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        parse_config(["a"], tmp_path)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtlsproxy", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_check_config_exits_0_on_a_good_file(pki: PKI) -> None:
    result = _cli("check-config", "--config", str(write(pki.directory, good(pki))))
    assert result.returncode == 0, result.stderr


def test_check_config_exits_2_with_one_line_per_problem(pki: PKI) -> None:
    data = good(pki, address="bad")
    data["listeners"][0]["tls"]["certificates"][0]["key_file"] = "nope.key"
    result = _cli("check-config", "--config", str(write(pki.directory, data)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["listeners[0].address: expected host:port",
                     f"listeners[0].tls.certificates[0].key_file: file not found: "
                     f"{pki.directory}/nope.key"]


def test_check_config_loads_the_truststore_and_certificates(pki: PKI, tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pem"
    bad.write_text("not a certificate")
    data = good(pki, mutual_tls={"truststore_uri": str(bad)})
    result = _cli("check-config", "--config", str(write(pki.directory, data)))
    assert result.returncode == 2
    assert result.stderr.startswith("listeners[0].mutual_tls.truststore_uri:")


def test_check_config_builds_upstream_tls_contexts(pki: PKI) -> None:
    """A client certificate that does not match its key names its route's key."""
    data = good(pki)
    data["listeners"][0]["routes"] = [{
        "path_prefix": "/", "upstream": "https://127.0.0.1:8443",
        "upstream_tls": {"ca_file": str(pki.directory / "root.pem"),
                         "cert_file": str(pki.server_cert),
                         "key_file": str(pki.client_files()[1])}}]
    result = _cli("check-config", "--config", str(write(pki.directory, data)))
    assert result.returncode == 2
    assert result.stderr.startswith("listeners[0].routes[0].upstream_tls: unusable:"), \
        result.stderr


def test_check_config_accepts_a_tcp_listener(pki: PKI) -> None:
    data = good(pki)
    del data["listeners"][0]["routes"]
    data["listeners"][0]["tcp"] = {"upstream": "127.0.0.1:5432",
                                   "proxy_protocol_upstream": "v2"}
    result = _cli("check-config", "--config", str(write(pki.directory, data)))
    assert result.returncode == 0, result.stderr


def test_run_refuses_a_bad_config_before_listening(pki: PKI) -> None:
    data = good(pki, address="127.0.0.1:1")  # would need root; must not even try
    data["listeners"][0]["routes"] = []
    result = _cli("run", "--config", str(write(pki.directory, data)))
    assert result.returncode == 2
    assert "listeners[0].routes: at least one route is required" in result.stderr


def test_run_reads_MTLSPROXY_CONFIG(pki: PKI) -> None:  # noqa: N802
    import os
    data = good(pki)
    data["listeners"][0]["routes"] = []
    env = dict(os.environ, MTLSPROXY_CONFIG=str(write(pki.directory, data)))
    result = _cli("check-config", env=env)
    assert result.returncode == 2 and "routes" in result.stderr


def test_logs_are_one_json_object_per_line_even_with_quotes() -> None:
    import json
    import logging

    from mtlsproxy.cli import JsonFormatter
    record = logging.LogRecord("mtlsproxy", logging.WARNING, __file__, 1,
                               'bad "quoted" %s', ("value\nnewline",), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line)["message"] == 'bad "quoted" value\nnewline'


def test_the_example_config_is_valid_with_a_dev_pki(tmp_path: Path) -> None:
    import shutil
    root = Path(__file__).resolve().parents[2]
    shutil.copy(root / "config" / "example.yaml", tmp_path / "example.yaml")
    assert _cli("dev-pki", str(tmp_path / "dev")).returncode == 0
    result = _cli("check-config", "--config", str(tmp_path / "example.yaml"))
    assert result.returncode == 0, result.stderr
