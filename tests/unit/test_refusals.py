"""Refusals in the log (server/refusals.py, issue 22 item 6): one INFO line each, with
what identifies the client, at most a burst per reason per window, the rest counted."""

from __future__ import annotations

import json
import logging

import pytest

from mtlsproxy.cli import JsonFormatter
from mtlsproxy.identity.peer import read_identity
from mtlsproxy.server.refusals import RefusalLog
from tests.support.pki import PKI


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, "mtlsproxy.refusals")
    return caplog


def fields(record: logging.LogRecord) -> dict[str, object]:
    return record.fields  # type: ignore[attr-defined, no-any-return]


def test_a_refusal_names_the_listener_reason_client_and_certificate(
        pki: PKI, logged: pytest.LogCaptureFixture) -> None:
    identity = read_identity(pki.client.der, [pki.inter.der])
    RefusalLog(logging.getLogger("mtlsproxy.refusals")).refused(
        "public", "expired", "192.0.2.7", identity)
    (record,) = logged.records
    assert record.levelno == logging.INFO and record.getMessage() == "client refused"
    assert fields(record) == {
        "event": "refused", "listener": "public", "reason": "expired", "client": "192.0.2.7",
        "subject": identity.subject, "issuer": identity.issuer, "serial": identity.serial_hex,
        "fingerprint_sha256": identity.fingerprint_sha256}


def test_a_refusal_without_a_certificate_has_no_certificate_fields(
        logged: pytest.LogCaptureFixture) -> None:
    RefusalLog(logging.getLogger("mtlsproxy.refusals")).refused(
        "public", "no_client_certificate", "192.0.2.7")
    assert "subject" not in fields(logged.records[0])


def test_a_flood_is_cut_to_a_burst_per_reason_and_the_rest_counted(
        logged: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RefusalLog(logging.getLogger("mtlsproxy.refusals"), clock, burst=3, window=1.0)
    for _ in range(50):
        log.refused("public", "protocol", "192.0.2.7")
    log.refused("public", "untrusted", "192.0.2.8")  # another reason has its own budget
    assert [fields(r)["reason"] for r in logged.records] == ["protocol"] * 3 + ["untrusted"]
    clock.now += 1.0
    log.refused("public", "protocol", "192.0.2.7")
    assert fields(logged.records[4]) == {"event": "refusals_suppressed", "reason": "protocol",
                                 "suppressed": 47, "window_seconds": 1.0}
    assert fields(logged.records[5])["event"] == "refused"


def test_log_lines_are_json_with_milliseconds_utc_and_the_fields() -> None:
    record = logging.LogRecord("mtlsproxy.refusals", logging.INFO, __file__, 1,
                               "client refused", None, None)
    record.created, record.msecs = 1_700_000_000.25, 250.0
    record.fields = {"reason": "untrusted"}
    line = json.loads(JsonFormatter().format(record))
    assert line["time"] == "2023-11-14T22:13:20.250Z"
    assert (line["message"], line["reason"]) == ("client refused", "untrusted")
