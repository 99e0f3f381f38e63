"""Server contexts: shared TLS ticket keys (tls/native.py) and large truststores;
real in-memory TLS 1.3 handshakes."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mtlsproxy.config import CertificateConfig, TLSConfig
from mtlsproxy.tls import native
from mtlsproxy.tls.contexts import build_server_contexts
from mtlsproxy.truststore.bundle import parse_bundle
from tests.support.pki import PKI, make_cert


@pytest.fixture
def shared() -> Iterator[None]:
    assert native.use_secret(b"k" * 32)
    yield
    native.use_secret(None)


def client(pki: PKI) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=pki.root.cert_pem().decode())
    cert, key = pki.client_files()
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def contexts(pki: PKI, listener: str, truststore: bytes) -> ssl.SSLContext:
    tls = TLSConfig("TLS_1_2", (CertificateConfig(pki.server_cert, pki.server_key),))
    return build_server_contexts(tls, parse_bundle(truststore), listener).default


def break_self_test(monkeypatch: pytest.MonkeyPatch, check: native.SelfCheck,
                    error: str) -> None:
    """What a self-test failing on this platform leaves: it runs again, and raises."""
    def broken() -> None:
        raise RuntimeError(error)
    monkeypatch.setattr(check, "status", None)
    monkeypatch.setattr(check, "check", broken)


def resumes(pki: PKI, first: ssl.SSLContext, second: ssl.SSLContext) -> bool:
    ctx = client(pki)  # a session resumes only from the client context that made it
    session = native.connect_in_memory(first, ctx, None).session
    assert session is not None
    return bool(native.connect_in_memory(second, ctx, session).session_reused)


def test_the_self_test_passes_on_this_python_and_openssl() -> None:
    assert native.available()
    assert native.status() == (True, "")


def test_tls_records_go_through_the_c_object_behind_sslobject() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert native.core_check()
    core = native.core(obj)
    assert core is not obj and type(core).__name__ == "_SSLSocket"
    assert core.pending() == 0 and core.session_reused is False


def test_keys_are_derived_per_label_and_secret() -> None:
    a = native.derive_keys(b"s" * 32, "public|abc")
    assert len(a) == 80
    assert a == native.derive_keys(b"s" * 32, "public|abc")
    assert a != native.derive_keys(b"s" * 32, "public|abd")
    assert a != native.derive_keys(b"t" * 32, "public|abc")


def test_contexts_built_apart_for_one_truststore_resume_each_other(pki: PKI,
                                                                  shared: None) -> None:
    store = pki.truststore.read_bytes()
    assert resumes(pki, contexts(pki, "public", store), contexts(pki, "public", store))


def test_a_new_truststore_rotates_the_keys_so_old_tickets_do_not_resume(pki: PKI,
                                                                       shared: None) -> None:
    store = pki.truststore.read_bytes()
    other = store + pki.root.cert_pem()  # same CAs, different bytes: a new generation
    assert not resumes(pki, contexts(pki, "public", store), contexts(pki, "public", other))


def test_without_a_shared_secret_each_context_keeps_its_own_keys(pki: PKI) -> None:
    store = pki.truststore.read_bytes()
    assert not resumes(pki, contexts(pki, "public", store), contexts(pki, "public", store))


def test_a_failed_self_test_falls_back_to_own_keys_with_one_log_line(
        pki: PKI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    break_self_test(monkeypatch, native.TICKET_KEYS,
                    "SSL_CTX pointer check failed (options differ)")
    with caplog.at_level(logging.WARNING, "mtlsproxy.tls"):
        assert not native.use_secret(b"k" * 32)
        assert not native.available()
    assert [r.getMessage() for r in caplog.records] == [
        "shared TLS ticket keys disabled (self-test failed: RuntimeError: SSL_CTX pointer "
        "check failed (options differ)); each worker keeps its own keys, so resumption "
        "across workers is lost"]
    store = pki.truststore.read_bytes()
    assert not resumes(pki, contexts(pki, "public", store), contexts(pki, "public", store))
    monkeypatch.setattr(native.TICKET_KEYS, "status", None)  # the next test: the real check


def test_a_large_truststore_loads_every_ca_through_the_file_path(pki: PKI) -> None:
    # Above contexts.FILE_THRESHOLD CAs, OpenSSL reads them from a memfd (the GIL is free
    # meanwhile); the context must hold all of them and still admit our clients.
    from mtlsproxy.tls import contexts as context_module
    others = b"".join(make_cert(f"other CA {i}", ca=True).cert_pem() for i in range(80))
    assert 80 > context_module.FILE_THRESHOLD
    bundle = parse_bundle(pki.truststore.read_bytes() + others)
    tls = TLSConfig("TLS_1_2", (CertificateConfig(pki.server_cert, pki.server_key),))
    ctx = build_server_contexts(tls, bundle, "public").default
    assert len(ctx.get_ca_certs()) == len(bundle.certs) == 82
    conn = native.connect_in_memory(ctx, client(pki), None)
    assert conn.getpeercert() is not None  # the handshake with our client certificate passed


def test_our_contexts_issue_one_ticket_per_handshake(pki: PKI) -> None:
    # OpenSSL's default is two; each costs ~0.4 ms of server CPU (context.py).
    assert contexts(pki, "public", pki.truststore.read_bytes()).num_tickets == 1


# -- the session cache: stateful TLS 1.3 tickets in a single process ------------------------

def test_the_session_cache_self_test_passes_on_this_python_and_openssl() -> None:
    assert native.session_cache_available()
    assert native.session_cache_status() == (True, "")


def test_a_single_process_resumes_sessions_from_memory(pki: PKI) -> None:
    ctx = contexts(pki, "public", pki.truststore.read_bytes())
    assert ctx.options & ssl.OP_NO_TICKET  # tickets name cached sessions
    assert resumes(pki, ctx, ctx)
    stats = ctx.session_stats()
    assert stats["hits"] == 1 and stats["misses"] == 0 and stats["number"] >= 1


def test_the_session_cache_is_bounded(pki: PKI) -> None:
    from mtlsproxy.tls.native import SSL_CTRL_SET_SESS_CACHE_SIZE, ctx_pointer
    ctx = contexts(pki, "public", pki.truststore.read_bytes())
    assert native.LIBSSL is not None
    # SSL_CTX_sess_get_cache_size is SSL_CTRL_SET_SESS_CACHE_SIZE + 1.
    assert native.LIBSSL.ctrl(ctx_pointer(ctx), SSL_CTRL_SET_SESS_CACHE_SIZE + 1, 0,
                            None) == native.SESSION_CACHE_SIZE


def test_workers_keep_stateless_tickets_that_any_worker_resumes(pki: PKI,
                                                                shared: None) -> None:
    ctx = contexts(pki, "public", pki.truststore.read_bytes())
    assert not ctx.options & ssl.OP_NO_TICKET


def test_a_failed_session_cache_self_test_falls_back_to_tickets_with_one_log_line(
        pki: PKI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    break_self_test(monkeypatch, native.SESSION_CACHE, "a session kept in memory did not resume")
    with caplog.at_level(logging.WARNING, "mtlsproxy.tls"):
        ctx = contexts(pki, "public", pki.truststore.read_bytes())
        contexts(pki, "public", pki.truststore.read_bytes())  # logged once, not per context
    assert [r.getMessage() for r in caplog.records] == [
        "TLS session cache disabled (self-test failed: RuntimeError: a session kept in "
        "memory did not resume); sessions resume from stateless tickets instead"]
    assert not ctx.options & ssl.OP_NO_TICKET
    assert resumes(pki, ctx, ctx)  # from a stateless ticket
    monkeypatch.setattr(native.SESSION_CACHE, "status", None)  # the next test: the real one


def test_without_the_c_object_records_go_through_the_public_sslobject(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_CORE_OK", False)  # what a failed self-test leaves
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert native.core(obj) is obj


def test_tls13_takes_aes_128_gcm_first_whatever_the_clients_order(pki: PKI) -> None:
    store = pki.truststore.read_bytes()
    ctx = client(pki)  # OpenSSL's client order: AES-256-GCM-SHA384 first
    conn = native.connect_in_memory(contexts(pki, "public", store), ctx, None)
    assert conn.version() == "TLSv1.3"
    assert conn.cipher()[0] == "TLS_AES_128_GCM_SHA256"  # type: ignore[index]
    assert native.SUITES.status is True


def test_a_failed_suites_self_test_leaves_openssls_order_with_one_log_line(
        pki: PKI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    break_self_test(monkeypatch, native.SUITES, "the server's order did not decide")
    with caplog.at_level(logging.WARNING, "mtlsproxy.tls"):
        store = pki.truststore.read_bytes()
        conn = native.connect_in_memory(contexts(pki, "public", store), client(pki), None)
    assert conn.cipher()[0] == "TLS_AES_256_GCM_SHA384"  # type: ignore[index]
    assert [r.getMessage() for r in caplog.records] == [
        "TLS 1.3 cipher suites in OpenSSL's order (self-test failed: RuntimeError: the "
        "server's order did not decide): AES-256-GCM-SHA384 first"]


def test_contexts_with_sni_selection_are_freed_by_reference_counting(pki: PKI) -> None:
    # With several server certificates each context's SNI callback refers to the set; a
    # strong reference made a cycle that kept a replaced generation's contexts (and their
    # truststore) until a full GC.
    import gc
    import weakref
    other = make_cert("other-server", pki.inter, dns=("other.example.test",))
    cert, key = other.write(pki.directory, "other-server")
    tls = TLSConfig("TLS_1_2", (CertificateConfig(pki.server_cert, pki.server_key),
                                CertificateConfig(cert, key)))
    gc.collect()
    gc.disable()
    try:
        built = build_server_contexts(tls, parse_bundle(pki.truststore.read_bytes()), "public")
        assert built.select("other.example.test") is not built.default
        refs = [weakref.ref(built), weakref.ref(built.default),
                weakref.ref(built.exact["other.example.test"])]
        del built
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()


def test_ca_names_that_do_not_fit_a_certificate_request_are_not_sent(
        pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    # Sent anyway, OpenSSL failed every handshake with an internal error: a large bundle
    # must still admit its clients, without names, and say so.
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    extra = []
    for i in range(600):
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "O" * 60),
                          x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"Issuing CA {i:04d} " + "x" * 40)])
        extra.append(x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(key.public_key()).serial_number(i + 1).not_valid_before(now)
                     .not_valid_after(now + dt.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    bundle = parse_bundle(pki.truststore.read_bytes() + b"".join(extra))
    assert len(bundle.certs) == 602
    tls = TLSConfig("TLS_1_2", (CertificateConfig(pki.server_cert, pki.server_key),))
    with caplog.at_level(logging.WARNING, "mtlsproxy.tls"):
        ctx = build_server_contexts(tls, bundle, "public").default
    conn = native.connect_in_memory(ctx, client(pki), None)
    assert conn.version() is not None  # the handshake completed
    assert any("none are sent" in r.getMessage() for r in caplog.records)
