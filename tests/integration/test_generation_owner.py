"""One owner per listener generation: truststore, CRL and server-certificate changes and
the SIGHUP path are applied one at a time, each built from the inputs current when it is
built, so no change can undo another (issue 21, item 4)."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

from cryptography.x509.oid import ExtendedKeyUsageOID

from mtlsproxy.runtime.background import executor
from tests.support.harness import Harness
from tests.support.pki import make_cert


async def until(predicate: object, what: str) -> None:
    """Let the loop run until ``predicate()`` holds (the build thread is held meanwhile)."""
    for _ in range(500):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_a_server_certificate_reload_never_undoes_a_truststore_swap(harness: Harness,
                                                                    tmp_path: Path) -> None:
    """The interleaving that undid a swap: the certificate watcher read the generation,
    the truststore watcher swapped in a new CA while the contexts were being built, and
    the certificate watcher then installed contexts built on the old CA's store."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(harness.pki.server_cert, cert)
    shutil.copy(harness.pki.server_key, key)
    truststore = tmp_path / "truststore.pem"
    shutil.copy(harness.pki.truststore, truststore)
    # Long intervals: only the test drives the watchers.
    harness.start(harness.config(
        tls={"reload_interval": 3600,
             "certificates": [{"cert_file": str(cert), "key_file": str(key)}]},
        mutual_tls={"truststore_uri": str(truststore), "refresh_interval": 3600}))
    assert harness.server is not None
    server = harness.server
    new_ca = make_cert("second root", ca=True)
    new_client = make_cert("second-client", new_ca)
    truststore.write_bytes(new_ca.cert_pem())  # the old CAs are removed
    renewed = make_cert("renewed-server", harness.pki.inter,
                        eku=[ExtendedKeyUsageOID.SERVER_AUTH], dns=("localhost",))
    key.write_bytes(renewed.key_pem())
    cert.write_bytes(renewed.cert_pem() + harness.pki.inter.cert_pem())
    truststore_watcher = server.watchers["public", ""]
    cert_watcher = server.cert_watchers[0]
    checked = threading.Event()
    source = truststore_watcher.source
    original_check = source.check

    def check(version: str | None) -> object:
        try:
            return original_check(version)
        finally:
            checked.set()
    source.check = check  # type: ignore[method-assign]

    async def interleave() -> None:
        gate = threading.Event()
        loop = asyncio.get_running_loop()
        held = loop.run_in_executor(executor(), gate.wait)  # the build thread is busy
        swap = loop.create_task(truststore_watcher.refresh())
        await until(checked.is_set, "the truststore was fetched")
        await asyncio.sleep(0.1)  # its build is queued behind the gate
        reload = loop.create_task(cert_watcher.refresh())
        await asyncio.sleep(0.3)  # the certificate files were hashed; its build queued
        gate.set()
        await held
        assert await swap == "applied"
        assert await reload == "applied"

    harness.loop.run(interleave())
    # The new CA's client completes a handshake and a request: the contexts in use trust
    # the truststore in use, and they serve the renewed certificate.
    status, _, _ = harness.get("/", ctx=harness.client_context(new_client, name="second"))
    assert status == 200
    generation = server.listeners[0].holder.current
    assert generation.bundle is not None
    assert [c.subject.split(",")[0] for c in generation.bundle.certs] == ["CN=second root"]
    with harness.tls(harness.client_context(new_client, name="second")) as t:
        served = t.getpeercert()
    assert served is not None and ((("commonName", "renewed-server"),) in served["subject"])
