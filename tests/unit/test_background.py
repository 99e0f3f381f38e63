"""The build thread (runtime/background.py) runs below the event loop's priority."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest

from mtlsproxy.config import CertificateConfig, TLSConfig
from mtlsproxy.runtime import background, pacing
from mtlsproxy.tls import contexts as context
from mtlsproxy.tls.contexts import build_server_contexts
from mtlsproxy.truststore.bundle import parse_bundle
from tests.support.pki import PKI, make_cert

T = TypeVar("T")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_builds_run_on_one_thread_niced_below_the_event_loop() -> None:
    async def go() -> tuple[int, str, int, str]:
        a = await background.run_build(_nice)
        name_a = await background.run_build(lambda: threading.current_thread().name)
        b = await background.run_build(_nice)
        name_b = await background.run_build(lambda: threading.current_thread().name)
        return a, name_a, b, name_b
    base = _nice()
    a, name_a, b, name_b = asyncio.run(go())
    assert a == b == min(19, base + background.NICE)
    assert name_a == name_b and name_a.startswith("mtlsproxy-build")
    assert _nice() == base  # the caller's thread is untouched


def test_a_disposed_object_is_freed_on_the_build_thread() -> None:
    # A replaced generation (1,000 CAs: 10-20 ms to free with the GIL held) must not be
    # freed on the event loop.
    freed_on: list[str] = []

    class Heavy:
        def __del__(self) -> None:
            freed_on.append(threading.current_thread().name)

    obj = Heavy()
    background.dispose(obj)
    del obj
    background.executor().submit(lambda: None).result(5)  # the thread has run the item
    assert len(freed_on) == 1 and freed_on[0].startswith("mtlsproxy-build")


YIELDS: list[str] = []  # one entry per sched_yield call (the thread that made it)


@pytest.fixture(autouse=True)
def count_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count pace()'s sched_yield calls: the real call, after noting it."""
    real = os.sched_yield

    def counted() -> None:
        YIELDS.append(threading.current_thread().name)
        real()
    monkeypatch.setattr(os, "sched_yield", counted)


def test_pacing_yields_only_on_the_build_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pacing, "PACE_S", 0.0)

    def yields_during_pace() -> tuple[bool, int]:
        before = len(YIELDS)
        for _ in range(10):
            pacing.pace()
        return pacing.enabled(), len(YIELDS) - before

    assert asyncio.run(_on_build_thread(yields_during_pace)) == (True, 10)
    assert yields_during_pace() == (False, 0)  # start-up, the CLI: no yields


def test_a_truststore_build_paces_itself_on_the_build_thread(
        pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pacing, "PACE_S", 0.0)
    others = b"".join(make_cert(f"other CA {i}", ca=True).cert_pem() for i in range(70))
    data = pki.truststore.read_bytes() + others
    tls = TLSConfig("TLS_1_2", (CertificateConfig(pki.server_cert, pki.server_key),))

    def build() -> int:
        before = len(YIELDS)
        build_server_contexts(tls, parse_bundle(data), "public")
        return len(YIELDS) - before

    # At least once per certificate analysed and once per chunk handed to OpenSSL.
    assert asyncio.run(_on_build_thread(build)) >= 72 + 72 // context.CHUNK


async def _on_build_thread(fn: Callable[[], T]) -> T:
    return await background.run_build(fn)


def test_a_long_crl_paces_its_indexing_on_the_build_thread(
        pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding

    from mtlsproxy.revocation.crl import build_state
    monkeypatch.setattr(pacing, "PACE_S", 0.0)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(pki.inter.cert.subject)
               .last_update(now).next_update(now + dt.timedelta(days=1)))
    for serial in range(1, 3001):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    data = builder.sign(pki.inter.key, hashes.SHA256()).public_bytes(Encoding.DER)
    bundle = parse_bundle(pki.truststore.read_bytes())

    def index() -> tuple[int, int]:
        before = len(YIELDS)
        state = build_state("soft", {"inter.crl": data}, bundle)
        return sum(len(c.revoked) for c in state.crls.values()), len(YIELDS) - before

    revoked, yields = asyncio.run(_on_build_thread(index))
    assert revoked == 3000 and yields >= 3  # every 1,024 entries
