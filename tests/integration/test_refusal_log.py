"""Refusals are visible in the log (issue 22, item 6): through the real proxy, a refused
handshake and a refusal after it each log one INFO line naming the client; the CLI takes
--log-level before or after its subcommand and refuses a level it does not know."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import subprocess
import sys

import pytest

from tests.support.harness import Harness
from tests.support.pki import make_cert
from tests.support.tools import wait_for


def refusals(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.fields for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "mtlsproxy.refusals" and r.getMessage() == "client refused"]


def test_a_refused_handshake_is_logged_with_its_reason_and_client(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtlsproxy.refusals")
    harness.start()
    stranger = make_cert("stranger", make_cert("Stranger Root", ca=True))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        harness.get("/", ctx=harness.client_context(stranger, name="stranger"))
    wait_for(lambda: bool(refusals(caplog)))
    (line,) = refusals(caplog)
    assert (line["listener"], line["reason"], line["client"]) == ("public", "untrusted",
                                                                  "127.0.0.1")


def test_a_refusal_after_the_handshake_names_the_certificate(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtlsproxy.refusals")
    harness.start()
    harness.clock.advance(dt.timedelta(days=3650))  # the policy's clock: expired now
    assert harness.get("/")[0] == 403
    (line,) = refusals(caplog)
    client = harness.pki.client
    assert line["reason"] == "expired"
    assert line["subject"] == client.cert.subject.rfc4514_string()
    assert line["serial"] == format(client.cert.serial_number, "x")
    assert line["issuer"] == client.cert.issuer.rfc4514_string()
    assert len(str(line["fingerprint_sha256"])) == 64


@pytest.mark.parametrize("argv", [["--log-level", "debug", "check-config"],
                                  ["check-config", "--log-level", "DEBUG"]])
def test_the_log_level_goes_before_or_after_the_subcommand(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "mtlsproxy", *argv], capture_output=True,
                         text=True, timeout=60)
    # Parsed: the command itself then fails on the missing --config, naming it.
    assert out.returncode == 2 and "--config FILE" in out.stderr, out.stderr


@pytest.mark.parametrize("argv", [["--log-level", "loud", "check-config"],
                                  ["check-config", "--log-level", "loud"]])
def test_an_unknown_log_level_is_refused_with_the_choices(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "mtlsproxy", *argv], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "invalid log level 'loud' (choose from debug, info, warning, error, critical)" \
        in out.stderr
