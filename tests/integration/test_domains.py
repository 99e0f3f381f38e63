"""Domains: one listener, a certificate, security policy, truststore and routes per SNI
name (issue 22, item 1; the gateway's custom domain names), through the real proxy."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtlsproxy.config import parse_config
from mtlsproxy.errors import ConfigError
from tests.support.harness import Harness
from tests.support.pki import Cert, make_cert
from tests.support.tools import require_tool


@dataclass
class Domains:
    """Domain A (a.test): the harness's CA; domain B (b.test, *.b.test): a CA of its own."""

    a_client: Cert
    b_ca: Cert
    b_client: Cert
    a_truststore: Path
    b_truststore: Path
    files: dict[str, tuple[Path, Path]]  # server certificate and key by domain


def _server(harness: Harness, tmp: Path, name: str, *dns: str) -> tuple[Path, Path]:
    cert = make_cert(f"server {name}", harness.pki.inter, dns=dns,
                     eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    cert_file, key_file = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_file.write_bytes(cert.cert_pem() + harness.pki.inter.cert_pem())
    key_file.write_bytes(cert.key_pem())
    return cert_file, key_file


@pytest.fixture
def domains(harness: Harness, tmp_path: Path) -> Domains:
    b_ca = make_cert("domain b root", ca=True)
    b_truststore = tmp_path / "b-truststore.pem"
    b_truststore.write_bytes(b_ca.cert_pem())
    return Domains(harness.pki.client, b_ca, make_cert("b-client", b_ca),
                   harness.pki.truststore, b_truststore,
                   {"a": _server(harness, tmp_path, "a", "a.test"),
                    "b": _server(harness, tmp_path, "b", "b.test", "*.b.test")})


def _domain(d: Domains, key: str, names: list[str], truststore: Path | None,
            upstream: str, **extra: Any) -> dict[str, Any]:
    cert, certkey = d.files[key]
    entry: dict[str, Any] = {
        "names": names,
        "certificates": [{"cert_file": str(cert), "key_file": str(certkey)}],
        "routes": [{"path_prefix": "/", "upstream": upstream}],
    }
    if truststore is not None:
        entry["mutual_tls"] = {"truststore_uri": str(truststore)}
    entry.update(extra)
    return entry


def _start(harness: Harness, d: Domains, b_mtls: bool = True, **b_extra: Any) -> None:
    upstream = f"http://127.0.0.1:{harness.start_echo()}"
    raw = harness.config()
    listener = raw["listeners"][0]
    for key in ("tls", "mutual_tls", "routes"):
        del listener[key]
    listener["domains"] = [
        _domain(d, "a", ["a.test"], d.a_truststore, upstream),
        _domain(d, "b", ["b.test", "*.b.test"],
                d.b_truststore if b_mtls else None, upstream, **b_extra)]
    harness.start(raw)


def _context(harness: Harness, client: Cert | None, **kw: Any) -> ssl.SSLContext:
    if client is None:
        return harness.client_context(with_cert=False, **kw)
    return harness.client_context(client, name=f"client-{id(client)}", **kw)


def _request(harness: Harness, sni: str, client: Cert | None, host: str | None = None,
             path: str = "/", **kw: Any) -> tuple[int, bytes, ssl.SSLSocket | None]:
    """One GET with SNI ``sni`` and Host ``host`` (default: the SNI name); (status, body,
    None) or (0, b"", None) when the handshake or the connection is refused."""
    ctx = _context(harness, client, **kw)
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=sni or None) as tls:
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host or sni}\r\n"
                            "Connection: close\r\n\r\n".encode())
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
        except (ssl.SSLError, ConnectionError):
            return 0, b"", None
    if not data:
        return 0, b"", None
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body, None


def _peer_subject(harness: Harness, sni: str) -> str:
    ctx = _context(harness, None)
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            cert = tls.getpeercert()
    return dict(x[0] for x in cert["subject"])["commonName"]  # type: ignore[index]


def test_each_domain_admits_the_clients_of_its_own_truststore(
        harness: Harness, domains: Domains) -> None:
    _start(harness, domains)
    status, body, _ = _request(harness, "a.test", domains.a_client)
    assert status == 200, body
    status, body, _ = _request(harness, "b.test", domains.b_client)
    assert status == 200, body
    headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert "CN=b-client" in headers["x-client-cert-subject"]


def test_a_client_of_domain_a_is_refused_on_domain_b_sni(
        harness: Harness, domains: Domains) -> None:
    _start(harness, domains)
    assert _request(harness, "b.test", domains.a_client)[0] == 0
    assert _request(harness, "a.test", domains.b_client)[0] == 0
    assert harness.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                          domain="b.test", reason="untrusted") == 1
    assert harness.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                          domain="a.test", reason="untrusted") == 1


def test_a_wildcard_name_chooses_its_domain(harness: Harness, domains: Domains) -> None:
    _start(harness, domains)
    assert _request(harness, "api.b.test", domains.b_client)[0] == 200
    assert _request(harness, "api.b.test", domains.a_client)[0] == 0


def test_each_domain_presents_its_own_server_certificate(
        harness: Harness, domains: Domains) -> None:
    _start(harness, domains)
    assert _peer_subject(harness, "a.test") == "server a"
    assert _peer_subject(harness, "b.test") == "server b"


def test_an_unknown_sni_name_gets_the_first_domain(harness: Harness,
                                                    domains: Domains) -> None:
    """The first domain is the default, as nginx's default_server."""
    _start(harness, domains)
    status, _, _ = _request(harness, "other.test", domains.a_client, check_hostname=False)
    assert status == 200
    assert _request(harness, "other.test", domains.b_client, check_hostname=False)[0] == 0


def test_a_host_naming_another_domain_gets_421_and_never_reaches_it(
        harness: Harness, domains: Domains) -> None:
    _start(harness, domains)
    for host in ("b.test", "B.TEST.", "b.test:443", "x.b.test"):
        status, body, _ = _request(harness, "a.test", domains.a_client, host=host)
        assert status == 421, host
        assert json.loads(body)["reason"] == "misdirected_request"
    # Without SNI the connection is the default domain's: Host b.test is misdirected too.
    status, _, _ = _request(harness, "", domains.a_client, host="b.test",
                            check_hostname=False)
    assert status == 421
    # A Host that names no domain is routed as before (the domain's routes).
    assert _request(harness, "a.test", domains.a_client, host="elsewhere.test")[0] == 200


def test_a_domain_with_mutual_tls_off_admits_clients_without_a_certificate(
        harness: Harness, domains: Domains) -> None:
    _start(harness, domains, b_mtls=False)
    assert _request(harness, "b.test", None)[0] == 200
    assert _request(harness, "a.test", None)[0] == 0


def test_each_domain_has_its_own_security_policy(harness: Harness, domains: Domains) -> None:
    _start(harness, domains, security_policy="TLS_1_3")
    assert _request(harness, "a.test", domains.a_client,
                    maximum_version=ssl.TLSVersion.TLSv1_2)[0] == 200
    assert _request(harness, "b.test", domains.b_client,
                    maximum_version=ssl.TLSVersion.TLSv1_2)[0] == 0
    assert _request(harness, "b.test", domains.b_client)[0] == 200


def test_truststore_endpoint_and_metrics_name_each_domain(
        harness: Harness, domains: Domains) -> None:
    _start(harness, domains)
    url = f"http://127.0.0.1:{harness.admin_port}/truststore"
    with urllib.request.urlopen(url, timeout=5) as r:
        described = json.loads(r.read())
    entries = described["public"]["domains"]
    assert list(entries) == ["a.test", "b.test"]
    assert [c["subject"] for c in entries["b.test"]["certificates"]] == [
        domains.b_ca.cert.subject.rfc4514_string()]
    assert harness.metric("mtlsproxy_truststore_certificates", listener="public",
                          domain="b.test") == 1
    assert harness.metric("mtlsproxy_truststore_certificates", listener="public",
                          domain="a.test") >= 1


def test_a_refusal_log_line_names_the_domain(harness: Harness, domains: Domains,
                                             caplog: pytest.LogCaptureFixture) -> None:
    _start(harness, domains)
    with caplog.at_level("INFO", logger="mtlsproxy.refusals"):
        assert _request(harness, "b.test", domains.a_client)[0] == 0
        harness.loop.call(lambda: None)
    fields = [getattr(r, "fields", {}) for r in caplog.records]
    assert any(f.get("domain") == "b.test" and f.get("reason") == "untrusted"
               for f in fields), fields


def test_the_certificate_request_carries_the_domains_ca_names(
        harness: Harness, domains: Domains) -> None:
    """What nginx's ssl_client_certificate sends, per domain: a client with several
    certificates picks the one the domain's CAs issued."""
    require_tool("openssl", "openssl")
    _start(harness, domains)

    def ca_names(sni: str) -> str:
        out = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{harness.port}",
             "-servername", sni, "-tls1_2"],
            input=b"", capture_output=True, timeout=20).stdout.decode()
        start = out.find("Acceptable client certificate CA names")
        assert start >= 0, out
        return out[start:out.find("---", start) if "---" in out[start:] else None]

    b_names = ca_names("b.test")
    assert "domain b root" in b_names
    assert "mtlsproxy tests root" not in b_names
    assert "domain b root" not in ca_names("a.test")


def test_a_sighup_reload_applies_a_domains_new_truststore(
        harness: Harness, domains: Domains, tmp_path: Path) -> None:
    _start(harness, domains)
    assert _request(harness, "b.test", domains.a_client)[0] == 0
    raw = yaml_of(harness)
    raw["listeners"][0]["domains"][1]["mutual_tls"]["truststore_uri"] = str(
        domains.a_truststore)
    assert harness.reload(raw) == []
    assert _request(harness, "b.test", domains.a_client)[0] == 200
    assert _request(harness, "b.test", domains.b_client)[0] == 0


def test_a_reload_cannot_add_a_domain(harness: Harness, domains: Domains) -> None:
    _start(harness, domains)
    raw = yaml_of(harness)
    extra = dict(raw["listeners"][0]["domains"][1])
    extra["names"] = ["c.test"]
    raw["listeners"][0]["domains"].append(extra)
    problems = harness.reload(raw)
    assert any(p.startswith("listeners[0].domains:") for p in problems), problems
    assert _request(harness, "b.test", domains.b_client)[0] == 200


def yaml_of(harness: Harness) -> dict[str, Any]:
    import yaml
    data: dict[str, Any] = yaml.safe_load(harness.config_file.read_text())
    return data


# -- the config -----------------------------------------------------------------------------

def _config(tmp: Path, pem: Path, **listener: Any) -> dict[str, Any]:
    domain = {"names": ["a.test"],
              "certificates": [{"cert_file": str(pem), "key_file": str(pem)}],
              "routes": [{"path_prefix": "/", "upstream": "http://127.0.0.1:1"}]}
    base: dict[str, Any] = {"name": "l", "address": "127.0.0.1:0",
                            "domains": [domain, {**domain, "names": ["b.test"]}]}
    base.update(listener)
    return {"listeners": [base]}


def _problems(raw: dict[str, Any], tmp: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp)
    return info.value.problems


def test_config_domains_are_read_with_their_routes_and_labels(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    config = parse_config(_config(tmp_path, pem), tmp_path)
    lc = config.listeners[0]
    assert [d.label for d in lc.domains] == ["a.test", "b.test"]
    views = lc.domain_views()
    assert [v.domain for v in views] == ["a.test", "b.test"]
    assert [v.routes[0].name for v in views] == ["a.test/", "b.test/"]
    assert lc.tls == lc.domains[0].tls  # the default domain's, for what reads the listener


def test_config_listener_keys_beside_domains_are_refused_by_key_path(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    problems = _problems(_config(tmp_path, pem, tls={"certificates": []}), tmp_path)
    assert any(p.startswith("listeners[0].tls: not allowed beside domains") for p in problems)


def test_config_a_name_in_two_domains_is_refused(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    raw = _config(tmp_path, pem)
    raw["listeners"][0]["domains"][1]["names"] = ["A.test"]
    problems = _problems(raw, tmp_path)
    assert any(p.startswith("listeners[0].domains[1].names[0]: duplicate name 'a.test'")
               for p in problems), problems


@pytest.mark.parametrize("name", ["", "*", "a.*.test", "*.", "a..test", "1.2.3.4:443",
                                  "a.test.", "ex ample.test", "*.*.test"])
def test_config_a_domain_name_that_no_sni_can_carry_is_refused(tmp_path: Path,
                                                                name: str) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    raw = _config(tmp_path, pem)
    raw["listeners"][0]["domains"][1]["names"] = [name]
    problems = _problems(raw, tmp_path)
    assert any(p.startswith("listeners[0].domains[1].names[0]: must be a host name")
               for p in problems), problems


def test_config_a_domain_without_certificates_is_refused(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    raw = _config(tmp_path, pem)
    del raw["listeners"][0]["domains"][1]["certificates"]
    problems = _problems(raw, tmp_path)
    assert any(p.startswith("listeners[0].domains[1].certificates: at least one")
               for p in problems), problems


def test_a_client_hello_arriving_in_pieces_still_chooses_its_domain(
        harness: Harness, domains: Domains) -> None:
    """The ClientHello is buffered until whole (tls/client_hello.py), across segments."""
    import time
    _start(harness, domains)
    ctx = _context(harness, domains.b_client)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="b.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as sock:
        for piece in (hello[:3], hello[3:9], hello[9:100], hello[100:]):
            sock.sendall(piece)
            time.sleep(0.05)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "the proxy closed the connection in the handshake"
                incoming.write(data)
        tls.write(b"GET / HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n")
        sock.sendall(outgoing.read())
        received = b""
        while True:
            try:
                received += tls.read(65536)
                if b"\r\n\r\n" in received:
                    break
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                assert data
                incoming.write(data)
    assert received.startswith(b"HTTP/1.1 200 "), received[:100]


# -- check-config and truststore check --------------------------------------------------------

def _config_file(harness: Harness, d: Domains, tmp: Path) -> Path:
    listener = {"name": "public", "address": "127.0.0.1:0", "domains": [
        _domain(d, "a", ["a.test"], d.a_truststore, "http://127.0.0.1:8080"),
        _domain(d, "b", ["b.test"], d.b_truststore, "http://127.0.0.1:8080")]}
    path = tmp / "domains.yaml"
    import yaml
    path.write_text(yaml.safe_dump({"listeners": [listener]}))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    import sys
    return subprocess.run([sys.executable, "-m", "mtlsproxy", *args], capture_output=True,
                          text=True, timeout=60)


def test_check_config_reports_each_domains_truststore(harness: Harness, domains: Domains,
                                                       tmp_path: Path) -> None:
    out = _cli("check-config", "--config", str(_config_file(harness, domains, tmp_path)))
    assert out.returncode == 0, out.stderr
    assert "truststore of public/a.test: " in out.stdout
    assert "truststore of public/b.test: " in out.stdout
    assert "truststore of public/b.test: WARNING CN=domain b root" in out.stdout  # expiring


def test_check_config_names_the_key_path_of_a_domains_bad_truststore(
        harness: Harness, domains: Domains, tmp_path: Path) -> None:
    domains.b_truststore.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                     b"-----END CERTIFICATE-----\n")
    out = _cli("check-config", "--config", str(_config_file(harness, domains, tmp_path)))
    assert out.returncode == 2
    assert "listeners[0].domains[1].mutual_tls.truststore_uri: " in out.stderr, out.stderr


def test_truststore_check_with_a_config_checks_each_domain(harness: Harness,
                                                            domains: Domains,
                                                            tmp_path: Path) -> None:
    config = str(_config_file(harness, domains, tmp_path))
    out = _cli("truststore", "check", "--config", config)
    assert out.returncode == 0, out.stderr
    assert "## public/a.test" in out.stdout and "## public/b.test" in out.stdout
    out = _cli("truststore", "check", "--config", config, "--domain", "B.test")
    assert out.returncode == 0, out.stderr
    assert "## public/b.test" in out.stdout and "public/a.test" not in out.stdout
    assert "CN=domain b root" in out.stdout
    out = _cli("truststore", "check", "--config", config, "--domain", "c.test")
    assert out.returncode == 2 and "no listener or domain" in out.stderr
