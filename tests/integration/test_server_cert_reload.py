"""Server certificate hot reload (issue #5 item): renewed files are picked up; a broken or
mismatched pair keeps the old certificate serving and is counted."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.harness import Harness
from tests.support.pki import make_cert
from tests.support.tools import freeing_thread, wait_for


def served_subject(h: Harness) -> str:
    ctx = h.client_context()
    with socket.create_connection(("127.0.0.1", h.port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            der = t.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def start(h: Harness, tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "server.pem", tmp / "server.key"
    shutil.copy(h.pki.server_cert, cert)
    shutil.copy(h.pki.server_key, key)
    h.start(h.config(tls={"reload_interval": 0.2,
                          "certificates": [{"cert_file": str(cert), "key_file": str(key)}]}))
    return cert, key


def reloads(h: Harness, result: str) -> float:
    return h.metric("mtlsproxy_server_cert_reloads_total", listener="public", result=result)


def test_a_renewed_certificate_is_served_to_new_connections(harness: Harness,
                                                            tmp_path: Path) -> None:
    cert, key = start(harness, tmp_path)
    before = served_subject(harness)
    renewed = make_cert("renewed-server", harness.pki.inter,
                        eku=[ExtendedKeyUsageOID.SERVER_AUTH], dns=("localhost",))
    key.write_bytes(renewed.key_pem())
    cert.write_bytes(renewed.cert_pem())
    wait_for(lambda: reloads(harness, "applied") >= 1)
    assert "CN=renewed-server" in served_subject(harness) and before != served_subject(harness)
    assert harness.metric("mtlsproxy_server_cert_not_after_timestamp_seconds",
                          listener="public") == renewed.cert.not_valid_after_utc.timestamp()
    assert harness.get("/")[0] == 200  # mTLS still works on the new contexts


def test_a_mismatched_pair_keeps_the_old_certificate(harness: Harness, tmp_path: Path) -> None:
    cert, _ = start(harness, tmp_path)
    before = served_subject(harness)
    other = make_cert("half-written", harness.pki.inter,
                      eku=[ExtendedKeyUsageOID.SERVER_AUTH], dns=("localhost",))
    cert.write_bytes(other.cert_pem())  # the key was not renewed: the pair does not match
    wait_for(lambda: reloads(harness, "failed") >= 2)
    assert served_subject(harness) == before
    assert reloads(harness, "applied") == 0


def test_the_replaced_contexts_are_freed_on_the_build_thread(harness: Harness,
                                                             tmp_path: Path) -> None:
    cert, key = start(harness, tmp_path)
    freed_on = freeing_thread(harness.server.listeners[0].holder.current)
    renewed = make_cert("renewed-server", harness.pki.inter,
                        eku=[ExtendedKeyUsageOID.SERVER_AUTH], dns=("localhost",))
    key.write_bytes(renewed.key_pem())
    cert.write_bytes(renewed.cert_pem())
    wait_for(lambda: reloads(harness, "applied") >= 1)
    wait_for(lambda: bool(freed_on))
    assert freed_on[0].startswith("mtlsproxy-build")
