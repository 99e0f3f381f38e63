"""``mutual_tls.client_intermediates``: may the intermediates a client sends link its leaf
to a trusted root (``use``, nginx's and Envoy's behaviour), or only the truststore's own
CAs (``ignore``, the default: the model's truststore holds "the whole chain from each
issuing CA up to its root")?

Python's ``ssl`` has no verify callback, so OpenSSL completes the handshake with the chain
the client sent; the refusal is the policy's 403 after it, over real sockets and real TLS
on uvloop and asyncio. The PKI: root -> inter, the truststore holds inter and root.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from mtlsproxy.admission.verify import evaluate
from mtlsproxy.cli import build_parser, cmd_truststore_check
from mtlsproxy.config import MutualTLSConfig, load_config
from mtlsproxy.errors import ConfigError
from mtlsproxy.truststore.bundle import parse_bundle
from tests.support.harness import Harness
from tests.support.pki import PKI, UTC, Cert, make_cert

FAILURES = "mtlsproxy_tls_handshake_failures_total"
GET = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


def same_name_ca(like: Cert, signer: Cert, key: Any = None) -> Cert:
    """A CA with ``like``'s subject, signed by ``signer``, with a key of its own (or
    ``key``): a certificate named like a truststore CA that the truststore does not hold."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(like.cert.subject)
            .issuer_name(signer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.key.public_key()), critical=False)
            .sign(signer.key, hashes.SHA256()))
    chain = [c for c in [signer.cert, *signer.chain] if c.issuer != c.subject]
    return Cert(cert, key, chain)


def sub_ca_client(pki: PKI) -> Cert:
    """A leaf of a sub-CA that the trusted root signed, the sub-CA sent by the client and
    absent from the truststore."""
    sub = make_cert("Client-sent Sub CA", pki.root, ca=True)
    leaf = make_cert("sub-ca-client", sub)
    assert [c.subject for c in leaf.chain] == [sub.cert.subject]  # the client sends it
    return leaf


def start(h: Harness, mode: str | None) -> None:
    """The proxy with ``client_intermediates: mode`` (None: the key absent)."""
    mtls: dict[str, Any] = {"truststore_uri": str(h.pki.truststore)}
    if mode is not None:
        mtls["client_intermediates"] = mode
    h.start(h.config(mutual_tls=mtls))


def config_with(h: Harness, mode: str) -> dict[str, Any]:
    return h.config(mutual_tls={"truststore_uri": str(h.pki.truststore),
                                "client_intermediates": mode})


def answer(h: Harness, cert: Cert, name: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of one keep-alive GET that the proxy refuses: read until the
    proxy closes the connection (a timeout if it does not)."""
    data = h.raw(GET, h.client_context(cert, name=name))
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def wait_metric(h: Harness, reason: str, timeout: float = 5) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = h.metric(FAILURES, listener="public", reason=reason)
        if value:
            return value
        time.sleep(0.02)
    return 0.0


def request(conn: Any, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read()


# -- a sub-CA the client sends ------------------------------------------------------------

@pytest.mark.parametrize("mode", [None, "ignore"])
def test_a_client_sent_sub_ca_of_a_trusted_root_is_refused_as_untrusted_and_counted(
        harness: Harness, mode: str | None) -> None:
    start(harness, mode)
    status, body = answer(harness, sub_ca_client(harness.pki), "sub-ca")
    assert status == 403 and body == {"message": "Forbidden", "reason": "untrusted"}
    assert wait_metric(harness, "untrusted") == 1
    assert harness.metric("mtlsproxy_requests_total", listener="public", route="/",
                          code="200") == 0


def test_a_client_sent_sub_ca_of_a_trusted_root_is_admitted_with_use(
        harness: Harness) -> None:
    start(harness, "use")
    leaf = sub_ca_client(harness.pki)
    body = harness.echo_json(ctx=harness.client_context(leaf, name="sub-ca"))
    # The forwarded chain is the one OpenSSL verified: the client's sub-CA, then the root.
    (chain,) = [v for k, v in body["headers"] if k == "client-cert-chain"]
    assert chain.split(", ") == [":" + base64.b64encode(c.der).decode() + ":"
                                 for c in (Cert(leaf.chain[0], None), harness.pki.root)]
    assert harness.metric(FAILURES, listener="public", reason="untrusted") == 0


@pytest.mark.parametrize("mode, status", [("ignore", 403), ("use", 200)])
def test_a_client_sent_ca_named_like_the_truststore_intermediate_counts_only_with_use(
        harness: Harness, mode: str, status: int) -> None:
    """The same subject as a truststore CA is not the same CA: the DER decides."""
    pki = harness.pki
    impostor = same_name_ca(pki.inter, pki.root)
    leaf = make_cert("same-name-client", impostor)
    assert leaf.chain == [impostor.cert] and leaf.cert.issuer == pki.inter.cert.subject
    start(harness, mode)
    got, _, body = harness.get("/", ctx=harness.client_context(leaf, name="same-name"))
    assert got == status
    if status == 403:
        assert json.loads(body)["reason"] == "untrusted"
        assert wait_metric(harness, "untrusted") == 1


# -- clients of the truststore's own CAs ---------------------------------------------------

@pytest.mark.parametrize("mode", ["ignore", "use"])
def test_a_client_of_the_truststore_intermediate_is_admitted_in_both_modes(
        harness: Harness, mode: str) -> None:
    pki = harness.pki
    assert pki.client.chain == [pki.inter.cert]  # it sends a copy of the truststore's CA
    start(harness, mode)
    status, _, _ = harness.get("/")
    assert status == 200


@pytest.mark.parametrize("mode", ["ignore", "use"])
def test_a_client_sending_a_forged_copy_of_the_truststore_intermediate_is_admitted(
        harness: Harness, mode: str) -> None:
    """The leaf is the truststore intermediate's; the copy the client sends beside it is
    a stranger's certificate under the intermediate's name. OpenSSL links the leaf to the
    truststore's own copy, and so does the policy."""
    pki = harness.pki
    forged = same_name_ca(pki.inter, make_cert("Forger Root", ca=True))
    client = Cert(pki.client.cert, pki.client.key, [forged.cert])
    start(harness, mode)
    status, _, _ = harness.get("/", ctx=harness.client_context(client, name="forged"))
    assert status == 200


def test_a_chain_through_a_client_sent_cross_certificate_is_rebuilt_from_the_truststore(
        pki: PKI) -> None:
    """A chain OpenSSL built through a client-sent copy of a truststore CA (same name, same
    key, other bytes) is admitted with ``ignore``, and what is forwarded is the
    truststore's own copy. Pure: OpenSSL itself prefers the trusted copy (trusted-first),
    so only ``evaluate`` can be handed such a chain."""
    bundle = parse_bundle(pki.truststore.read_bytes())
    leaf = make_cert("cross-client", pki.inter)
    cross = same_name_ca(pki.inter, pki.root, key=pki.inter.key)
    assert cross.der not in bundle.ders
    chain = [leaf.der, cross.der, pki.root.der]
    ignored = evaluate(leaf.der, chain, bundle, 1, MutualTLSConfig())
    assert ignored.reason is None and ignored.identity is not None
    assert ignored.identity.chain_der == (pki.inter.der, pki.root.der)
    used = evaluate(leaf.der, chain, bundle, 1, MutualTLSConfig(client_intermediates="use"))
    assert used.reason is None and used.identity is not None
    assert used.identity.chain_der == (cross.der, pki.root.der)


# -- the verdict cache and SIGHUP ----------------------------------------------------------

def test_a_sighup_to_ignore_refuses_a_sub_ca_client_on_its_kept_and_new_connections(
        harness: Harness) -> None:
    leaf = sub_ca_client(harness.pki)
    harness.start(config_with(harness, "use"))
    kept = harness.https(harness.client_context(leaf, name="sub-ca"))
    assert request(kept, "/before")[0] == 200
    assert harness.reload(config_with(harness, "ignore")) == []
    status, body = request(kept, "/after")
    assert status == 403 and json.loads(body)["reason"] == "untrusted"
    kept.close()
    # A new connection of the same leaf finds no verdict of the old mode in the cache.
    status, body = answer(harness, leaf, "sub-ca")
    assert status == 403 and body["reason"] == "untrusted"


def test_a_sighup_to_use_admits_a_sub_ca_client_refused_before(harness: Harness) -> None:
    leaf = sub_ca_client(harness.pki)
    harness.start(config_with(harness, "ignore"))
    assert answer(harness, leaf, "sub-ca")[0] == 403
    assert harness.reload(config_with(harness, "use")) == []
    status, _, _ = harness.get("/", ctx=harness.client_context(leaf, name="sub-ca"))
    assert status == 200


def test_with_use_a_recheck_without_a_chain_leaves_no_refusal_in_the_cache(
        harness: Harness) -> None:
    """After a truststore swap a keep-alive connection is re-checked from the truststore
    alone (it has no chain to show again): its sub-CA client is refused there. That
    refusal must not be what the same leaf's next full handshake, which shows its
    sub-CA, finds in the cache."""
    from mtlsproxy.server.generation import build_generation
    leaf = sub_ca_client(harness.pki)
    harness.start(config_with(harness, "use"))
    kept = harness.https(harness.client_context(leaf, name="sub-ca"))
    assert request(kept, "/before")[0] == 200
    assert harness.server is not None
    runtime = harness.server.listeners[0]
    generation = build_generation(runtime.config, harness.pki.truststore.read_bytes())
    harness.loop.call(lambda: runtime.holder.swap(generation))
    status, body = request(kept, "/after")
    assert status == 403 and json.loads(body)["reason"] == "untrusted"
    kept.close()
    status, _, _ = harness.get("/", ctx=harness.client_context(leaf, name="sub-ca"))
    assert status == 200


def test_a_resumed_session_of_a_refused_sub_ca_client_is_refused_too(
        harness: Harness) -> None:
    """The handshake completed (the refusal is after it), so the client holds a ticket: a
    resumption carries no chain and is decided from the truststore alone."""
    leaf = sub_ca_client(harness.pki)
    start(harness, "ignore")
    ctx = harness.client_context(leaf, name="sub-ca", maximum_version=ssl.TLSVersion.TLSv1_2)
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            t.sendall(GET)
            first = _read_all(t)
            session = t.session
    assert first.startswith(b"HTTP/1.1 403")
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="localhost", session=session) as t:
            assert t.session_reused
            t.sendall(GET)
            again = _read_all(t)
    assert again.startswith(b"HTTP/1.1 403") and b'"untrusted"' in again


def _read_all(t: ssl.SSLSocket) -> bytes:
    out = b""
    try:
        while chunk := t.recv(65536):
            out += chunk
    except (ssl.SSLError, ConnectionError):
        pass  # the proxy closed without close_notify: what came before is the answer
    return out


# -- configuration and the CLI --------------------------------------------------------------

def _config(pki: PKI, tmp: Path, mtls: dict[str, Any]) -> Path:
    import yaml
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({"listeners": [{
        "name": "public", "address": "127.0.0.1:8443",
        "tls": {"certificates": [{"cert_file": str(pki.server_cert),
                                  "key_file": str(pki.server_key)}]},
        "mutual_tls": {"truststore_uri": str(pki.truststore), **mtls},
        "routes": [{"path_prefix": "/", "upstream": "http://127.0.0.1:8080"}]}]}))
    return path


def test_client_intermediates_defaults_to_ignore_and_accepts_use(pki: PKI,
                                                                 tmp_path: Path) -> None:
    default = load_config(_config(pki, tmp_path, {}))
    assert default.listeners[0].mutual_tls.client_intermediates == "ignore"
    use = load_config(_config(pki, tmp_path, {"client_intermediates": "use"}))
    assert use.listeners[0].mutual_tls.client_intermediates == "use"


@pytest.mark.parametrize("value, problem", [
    ("trust", "must be ignore or use"),
    ("USE", "must be ignore or use"),
    (True, "must be a string, got bool"),
])
def test_a_bad_client_intermediates_is_a_config_error_naming_its_key(
        pki: PKI, tmp_path: Path, value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config(pki, tmp_path, {"client_intermediates": value}))
    assert info.value.problems == [
        f"listeners[0].mutual_tls.client_intermediates: {problem}"]


@pytest.mark.parametrize("extra, line", [
    ((), "client intermediates: ignored (mutual_tls.client_intermediates: ignore, the "
         "default): a client must be issued by a CA of this bundle"),
    (("--client-intermediates", "ignore"), "client intermediates: ignored"),
    (("--client-intermediates", "use"), "client intermediates: used "
                                        "(mutual_tls.client_intermediates: use)"),
])
def test_truststore_check_says_whether_client_intermediates_count(
        pki: PKI, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...],
        line: str) -> None:
    args = build_parser().parse_args(["truststore", "check", str(pki.truststore), *extra])
    assert cmd_truststore_check(args) == 0
    lines = [x for x in capsys.readouterr().out.splitlines()
             if x.startswith("client intermediates:")]
    assert len(lines) == 1 and lines[0].startswith(line)


def test_truststore_check_refuses_an_unknown_client_intermediates_mode(
        pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["truststore", "check", str(pki.truststore),
                                   "--client-intermediates", "trust"])
    assert info.value.code == 2
    assert "--client-intermediates: invalid choice: 'trust'" in capsys.readouterr().err
