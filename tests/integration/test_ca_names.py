"""The truststore's CA names in the CertificateRequest (issue 22, item 3), as a real
client sees them: ``openssl s_client`` prints the names the server sent."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.harness import Harness

needs_openssl = pytest.mark.needs_tool("openssl", "openssl")


def acceptable_names(h: Harness) -> str:
    cert, key = h.pki.client_files()
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{h.port}", "-servername", "localhost",
         "-CAfile", str(h.pki.directory / "root.pem"), "-cert", str(cert), "-key", str(key)],
        input="", capture_output=True, text=True, timeout=30)
    return out.stdout


@needs_openssl
def test_the_certificate_request_names_every_usable_ca(harness: Harness) -> None:
    harness.start()
    text = acceptable_names(harness)
    assert "Acceptable client certificate CA names" in text, text
    section = text.split("Acceptable client certificate CA names", 1)[1].split("\n---", 1)[0]
    assert section.count("Testing CA") == 2, section  # the intermediate and the root


@needs_openssl
def test_send_ca_names_false_sends_none(harness: Harness) -> None:
    harness.start(harness.config(mutual_tls={"truststore_uri": str(harness.pki.truststore),
                                             "send_ca_names": False}))
    text = acceptable_names(harness)
    assert "No client certificate CA names sent" in text, text
