"""The one module that reaches below Python's ``ssl`` API: shared TLS session-ticket keys,
the in-memory session cache, the verified chain (private before Python 3.13) and the C
object behind ``ssl.SSLObject`` (``core``).

Why: worker processes each build their own ``SSLContext``; OpenSSL gives every context
random ticket keys, so a client whose resumed connection lands on another worker (the
kernel spreads SO_REUSEPORT connections by hash) pays a full handshake. nginx solves this
with ``ssl_session_ticket_key`` files; Python's ``ssl`` has no such setting.

How: ``SSL_CTX_set_tlsext_ticket_keys`` (a macro for ``SSL_CTX_ctrl(ctx,
SSL_CTRL_SET_TLSEXT_TICKET_KEYS=59, 80, keys)``; 16-byte key name, 32-byte HMAC key,
32-byte AES key, OpenSSL ssl/s3_lib.c) called through ctypes on the ``SSL_CTX *`` that
CPython keeps right after the object header of ``_ssl._SSLContext`` (Modules/_ssl.c,
``PySSLContext``). Both are details the public API does not promise, so:

Rules of this module:
- ``self_test()`` runs once before any key is installed. It checks that the pointer it
  reads is the context's (``SSL_CTX_get_options`` must equal ``ctx.options``) and that two
  contexts given the same keys resume each other's tickets while a third, with other
  keys, does not. Any failure disables sharing for the process with one log line: workers
  then fall back to OpenSSL's per-context random keys (correct, only slower: a full
  handshake where a resumption could have been).
- Keys are derived (HKDF-SHA256) from a secret shared by the workers and a label that
  names the listener and the truststore's SHA-256: they rotate with every truststore
  change, so a ticket never outlives the truststore that validated its certificate.

The session cache (a single process: nothing to share). A stateless TLS 1.3 ticket holds
the whole session, client certificate included: OpenSSL 3.0 serialises it for every
ticket and parses it back (``d2i_SSL_SESSION``, its slow provider decoders) on every
resumption. With ``OP_NO_TICKET`` a TLS 1.3 ticket only names a session kept in the
context's memory (RFC 8446 section 2.2 allows either), which made the server side of
resumed and of full mutual-TLS handshakes cheaper (docs/performance.md).
Python's ``ssl`` cannot turn it on by itself: OpenSSL caches no session of a client-
verifying server without a session id context (``ssl_update_cache``), and Python sets none.
``SSL_CTX_set_session_id_context`` is set here, and ``SSL_CTX_sess_set_cache_size`` bounds
the cache at ``SESSION_CACHE_SIZE`` (a session keeps its client chain). Its own self-test (a
real handshake, a resumption from memory, none from a context of another label) decides,
with the same one-line fallback to stateless tickets.
A session survives its connection only when the connection ended with close_notify
(``SSLObject.unwrap``): OpenSSL drops the sessions of connections freed without one.
With ``workers: N`` the stateless shared-key tickets stay, since a worker's memory cannot
resume a session another worker made.

Over ~400 lines on purpose: every ctypes declaration lives here and nowhere else, so
that what reaches below ``ssl`` can be audited in one file.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from mtlsproxy.runtime.pacing import pace

log = logging.getLogger("mtlsproxy.tls")

SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59  # OpenSSL include/openssl/ssl.h
KEY_LENGTH = 80  # name 16 + HMAC 32 + AES 32 (OpenSSL's TLSEXT_KEYNAME_LENGTH etc.)
SSL_CTRL_SET_SESS_CACHE_SIZE = 42  # SSL_CTX_sess_set_cache_size, include/openssl/ssl.h
# SSL_CTX_set1_client_sigalgs_list: the signature_algorithms of a CertificateRequest.
SSL_CTRL_SET_CLIENT_SIGALGS_LIST = 102
# What the model's policy accepts (identity/algorithms.py: RSA >= 2048, ECDSA P-256/P-384,
# SHA-256 or stronger), as OpenSSL names them. In TLS 1.3 an ECDSA scheme names its curve
# (RFC 8446 section 4.2.3): without ecdsa_secp521r1_sha512 and ed25519/ed448, a P-521 or
# Ed25519 client finds no scheme for its key and sends no certificate, so it is refused in
# the handshake. TLS 1.2's ECDSA schemes name no curve: a P-521 client there is refused
# by the policy after the handshake (403 weak_algorithm), as before.
CLIENT_SIGALGS = (b"ECDSA+SHA256:ECDSA+SHA384:rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:"
                  b"rsa_pss_rsae_sha512:rsa_pss_pss_sha256:rsa_pss_pss_sha384:"
                  b"rsa_pss_pss_sha512:RSA+SHA256:RSA+SHA384:RSA+SHA512")
# Sessions kept per context (a listener's truststore generation). OpenSSL's default,
# 20,480, could hold hundreds of MiB of client chains; a sidecar's clients are few. Each
# resumption adds the session of its new ticket, so about two entries per returning client.
SESSION_CACHE_SIZE = 2048

# TLS 1.3 suites in the server's order of preference: AES-128-GCM first, as in Mozilla's
# "intermediate" and "modern" configurations and as BoringSSL (Envoy) and Go (ghostunnel)
# choose with AES hardware. OpenSSL's own order puts AES-256-GCM-SHA384 first, which runs
# every key schedule on SHA-384 (no CPU instructions for it here; SHA-256 has them):
# measured on resumed connections (openssl s_time -reuse; docs/performance.md).
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

_lock = threading.Lock()
_secret: bytes | None = None  # process-wide: set once by a worker at start-up


class _Lib:
    def __init__(self) -> None:
        import _ssl  # the libssl that Python's ssl module is linked with, not another one
        lib = ctypes.CDLL(_ssl.__file__)
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64
        self.set_sid_ctx = lib.SSL_CTX_set_session_id_context
        self.set_sid_ctx.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
        self.set_sid_ctx.restype = ctypes.c_int
        self.set_suites = lib.SSL_CTX_set_ciphersuites
        self.set_suites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.set_suites.restype = ctypes.c_int
        # The CA names of a CertificateRequest (nginx's ssl_client_certificate sends them):
        # each CA's DER parsed by libcrypto, its subject copied into the context's list.
        self.d2i_x509 = lib.d2i_X509
        self.d2i_x509.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p),
                                  ctypes.c_long]
        self.d2i_x509.restype = ctypes.c_void_p
        self.x509_free = lib.X509_free
        self.x509_free.argtypes = [ctypes.c_void_p]
        self.x509_free.restype = None
        self.add_client_ca = lib.SSL_CTX_add_client_CA
        self.add_client_ca.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.add_client_ca.restype = ctypes.c_int
        self.get_client_ca_list = lib.SSL_CTX_get_client_CA_list
        self.get_client_ca_list.argtypes = [ctypes.c_void_p]
        self.get_client_ca_list.restype = ctypes.c_void_p
        self.sk_num = lib.OPENSSL_sk_num
        self.sk_num.argtypes = [ctypes.c_void_p]
        self.sk_num.restype = ctypes.c_int


LIBSSL: _Lib | None = None


def ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` of a context: the first field after PyObject_HEAD."""
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise RuntimeError("no SSL_CTX pointer where CPython keeps it")
    return int(ptr)


def _checked_pointer(ctx: ssl.SSLContext) -> int:
    assert LIBSSL is not None
    ptr = ctx_pointer(ctx)
    if LIBSSL.get_options(ptr) != int(ctx.options):
        raise RuntimeError("SSL_CTX pointer check failed (options differ)")
    return ptr


def _install(ctx: ssl.SSLContext, keys: bytes) -> None:
    assert LIBSSL is not None and len(keys) == KEY_LENGTH
    ptr = _checked_pointer(ctx)
    buf = ctypes.create_string_buffer(keys, KEY_LENGTH)
    if LIBSSL.ctrl(ptr, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, KEY_LENGTH, buf) != 1:
        raise RuntimeError("SSL_CTX_set_tlsext_ticket_keys returned an error")


def derive_keys(secret: bytes, label: str) -> bytes:
    return HKDF(hashes.SHA256(), KEY_LENGTH, salt=b"mtlsproxy ticket keys v1",
                info=label.encode()).derive(secret)


def _self_test(check: Callable[[], None], warning: str) -> tuple[bool, str]:
    """(passed, reason): run ``check`` once; a failure logs ``warning`` % reason."""
    global LIBSSL
    try:
        if LIBSSL is None:
            LIBSSL = _Lib()
        check()
        return True, ""
    except Exception as exc:  # any failure means: do not touch OpenSSL; fall back
        reason = f"{type(exc).__name__}: {exc}"
        log.warning(warning, reason)
        return False, reason


class SelfCheck:
    """One self-test, run once per process (under the module lock) before its feature
    is first used; ``status`` None until then."""

    def __init__(self, check: Callable[[], None], warning: str) -> None:
        self.check, self.warning = check, warning
        self.status: bool | None = None
        self.reason = ""

    def passed(self) -> bool:
        with _lock:
            if self.status is None:
                self.status, self.reason = _self_test(self.check, self.warning)
            return self.status


def available() -> bool:
    """Run the self-test once per process; True when keys can be shared."""
    return TICKET_KEYS.passed()


def _keep_sessions(ctx: ssl.SSLContext, label: str) -> None:
    """Stateful TLS 1.3 tickets: sessions stay in ``ctx``'s bounded memory cache."""
    assert LIBSSL is not None
    ptr = _checked_pointer(ctx)
    sid = hashlib.sha256(label.encode()).digest()  # SSL_MAX_SID_CTX_LENGTH is 32
    if LIBSSL.set_sid_ctx(ptr, sid, len(sid)) != 1:
        raise RuntimeError("SSL_CTX_set_session_id_context returned an error")
    LIBSSL.ctrl(ptr, SSL_CTRL_SET_SESS_CACHE_SIZE, SESSION_CACHE_SIZE, None)
    ctx.options |= ssl.OP_NO_TICKET


def session_cache_available() -> bool:
    """Run the session cache's self-test once per process; True when it can be used."""
    return SESSION_CACHE.passed()


def _prefer_suites(ctx: ssl.SSLContext) -> None:
    assert LIBSSL is not None
    if LIBSSL.set_suites(_checked_pointer(ctx), TLS13_SUITES) != 1:
        raise RuntimeError("SSL_CTX_set_ciphersuites returned an error")


def prefer_tls13_suites(ctx: ssl.SSLContext) -> bool:
    """Give ``ctx`` the TLS 1.3 suite order ``TLS13_SUITES`` (Python's ``set_ciphers``
    reaches TLS 1.2 only); False, leaving OpenSSL's order, when the self-test failed.
    The context must also have ``OP_CIPHER_SERVER_PREFERENCE``."""
    if not SUITES.passed():
        return False
    _prefer_suites(ctx)
    return True


def restrict_client_sigalgs(ctx: ssl.SSLContext) -> bool:
    """Ask clients only for signatures the policy accepts (``CLIENT_SIGALGS``); False,
    leaving OpenSSL's list (the policy still refuses after the handshake), when the
    pointer check fails or OpenSSL refuses the list."""
    if not SUITES.passed():  # the same pointer and library checks
        return False
    assert LIBSSL is not None
    buf = ctypes.create_string_buffer(CLIENT_SIGALGS)
    if LIBSSL.ctrl(_checked_pointer(ctx), SSL_CTRL_SET_CLIENT_SIGALGS_LIST, 0, buf) != 1:
        log.warning("OpenSSL refused the client signature algorithms list: clients are "
                    "asked for any, and the policy refuses after the handshake")
        return False
    return True


def keep_sessions(ctx: ssl.SSLContext, label: str) -> bool:
    """Resume ``ctx``'s sessions from its memory (stateful tickets); False when the
    self-test failed, leaving OpenSSL's stateless tickets. ``label``: as for ``apply``,
    so a new truststore starts an empty cache that old sessions cannot enter."""
    if not session_cache_available():
        return False
    _keep_sessions(ctx, label)
    return True


def use_secret(secret: bytes | None) -> bool:
    """Share ticket keys derived from ``secret`` from now on (a worker calls this once at
    start-up, before building contexts). Returns whether sharing is on."""
    global _secret
    _secret = secret if secret is not None and available() else None
    return _secret is not None


def apply(ctx: ssl.SSLContext, label: str) -> bool:
    """Give ``ctx`` the ticket keys derived from (the process secret, label); False when
    not applied (no secret: a single process needs no sharing; or the self-test failed)."""
    if _secret is None:
        return False
    _install(ctx, derive_keys(_secret, label))
    return True


# -- the self-test: a real in-memory TLS 1.3 handshake, then resumption ---------------------

def _handshake(client: ssl.SSLObject, server: ssl.SSLObject,
               c_in: ssl.MemoryBIO, c_out: ssl.MemoryBIO,
               s_in: ssl.MemoryBIO, s_out: ssl.MemoryBIO) -> None:
    for _ in range(20):
        done = 0
        for obj in (client, server):
            try:
                obj.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if done == 2:
            break
    else:
        raise RuntimeError("self-test handshake did not finish")
    # TLS 1.3 tickets arrive after the handshake: let the client read them.
    server.write(b"x")
    c_in.write(s_out.read())
    client.read(1)
    # End as the proxy does, with close_notify: OpenSSL keeps the cached session only then.
    try:
        server.unwrap()
    except ssl.SSLError:
        pass


def connect_in_memory(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
             session: ssl.SSLSession | None) -> ssl.SSLObject:
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c_in, c_out, s_in, s_out = bios
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    _handshake(client, server, c_in, c_out, s_in, s_out)
    return client


def _self_signed() -> tuple[bytes, bytes]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _self_test_contexts(count: int) -> tuple[list[ssl.SSLContext], ssl.SSLContext]:
    """``count`` TLS 1.3 server contexts with one throwaway certificate, and a client."""
    cert, key = _self_signed()
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
        with open(cert_file, "wb") as fh:
            fh.write(cert)
        with open(key_file, "wb") as fh:
            fh.write(key)
        servers = []
        for _ in range(count):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(cert_file, key_file)
            servers.append(ctx)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return servers, client


def _resumption_check() -> None:
    (a, b, other), client_ctx = _self_test_contexts(3)
    secret = os.urandom(32)
    _install(a, derive_keys(secret, "self-test"))
    _install(b, derive_keys(secret, "self-test"))
    _install(other, derive_keys(secret, "self-test other"))
    first = connect_in_memory(a, client_ctx, None)
    session: Any = first.session
    if session is None:
        raise RuntimeError("no session ticket received")
    if not connect_in_memory(b, client_ctx, session).session_reused:
        raise RuntimeError("a context with the same keys did not resume the session")
    if connect_in_memory(other, client_ctx, session).session_reused:
        raise RuntimeError("a context with other keys resumed the session")


def _session_cache_check() -> None:
    (ours, other), client_ctx = _self_test_contexts(2)
    _keep_sessions(ours, "self-test")
    _keep_sessions(other, "self-test other")
    session: Any = connect_in_memory(ours, client_ctx, None).session
    if session is None:
        raise RuntimeError("no session ticket received")
    resumed = connect_in_memory(ours, client_ctx, session)
    if not resumed.session_reused:
        raise RuntimeError("a session kept in memory did not resume")
    if connect_in_memory(other, client_ctx, resumed.session).session_reused:
        raise RuntimeError("a context of another label resumed the session")


def _suites_check() -> None:
    (server,), client_ctx = _self_test_contexts(1)
    server.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _prefer_suites(server)
    cipher = connect_in_memory(server, client_ctx, None).cipher()  # OpenSSL's client: AES-256 first
    if cipher is None or cipher[0] != "TLS_AES_128_GCM_SHA256":
        raise RuntimeError(f"the server's order did not decide (negotiated {cipher})")


def _add_ca_names(ctx: ssl.SSLContext, ders: Iterable[bytes]) -> int:
    """Add each CA's subject to ``ctx``'s CertificateRequest; the number of names now."""
    assert LIBSSL is not None
    ptr = _checked_pointer(ctx)
    for der in ders:
        pace()
        cursor = ctypes.c_char_p(der)
        x509 = LIBSSL.d2i_x509(None, ctypes.byref(cursor), len(der))
        if not x509:
            raise RuntimeError("d2i_X509 refused a CA certificate")
        try:
            if LIBSSL.add_client_ca(ptr, x509) != 1:
                raise RuntimeError("SSL_CTX_add_client_CA returned an error")
        finally:
            LIBSSL.x509_free(x509)
    names = LIBSSL.get_client_ca_list(ptr)
    return LIBSSL.sk_num(names) if names else 0


def _ca_names_check() -> None:
    """A throw-away CA's name goes in, and the context's list holds exactly it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mtlsproxy self-test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if _add_ca_names(ctx, [cert.public_bytes(serialization.Encoding.DER)]) != 1:
        raise RuntimeError("the CA name did not reach the context's list")


def add_ca_names(ctx: ssl.SSLContext, ders: Iterable[bytes]) -> bool:
    """Send these CAs' names in ``ctx``'s CertificateRequest (Python's ``ssl`` cannot), so
    that a client with several certificates picks one they issued; False, sending none,
    when the self-test failed."""
    if not CA_NAMES.passed():
        return False
    _add_ca_names(ctx, ders)
    return True


TICKET_KEYS = SelfCheck(
    _resumption_check, "shared TLS ticket keys disabled (self-test failed: %s); each "
    "worker keeps its own keys, so resumption across workers is lost")
SESSION_CACHE = SelfCheck(
    _session_cache_check, "TLS session cache disabled (self-test failed: %s); sessions "
    "resume from stateless tickets instead")
SUITES = SelfCheck(_suites_check, "TLS 1.3 cipher suites in OpenSSL's order (self-test "
                 "failed: %s): AES-256-GCM-SHA384 first")
CA_NAMES = SelfCheck(_ca_names_check, "no CA names in the CertificateRequest (self-test "
                     "failed: %s): clients choose their certificate without them")


def status() -> tuple[bool | None, str]:
    """(self-test result or None if not run yet, failure reason)."""
    return TICKET_KEYS.status, TICKET_KEYS.reason


def session_cache_status() -> tuple[bool | None, str]:
    """(the session cache's self-test result or None if not run yet, failure reason)."""
    return SESSION_CACHE.status, SESSION_CACHE.reason


# -- the verified chain -------------------------------------------------------------------

def verified_chain_der(sslobj: ssl.SSLObject) -> list[bytes] | None:
    """The chain OpenSSL verified, leaf first, as DER; None on a resumed session (OpenSSL
    keeps no chain then). Public as ``get_verified_chain`` from Python 3.13; present but
    private on ``_sslobj`` in 3.11 and 3.12."""
    public = getattr(sslobj, "get_verified_chain", None)
    if public is not None:  # 3.13+: DER already ([] when there is no chain)
        chain_der: list[bytes] = public()
        return chain_der or None
    chain = sslobj._sslobj.get_verified_chain()  # type: ignore[attr-defined]
    if not chain:
        return None
    return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]


# -- the C object behind SSLObject ------------------------------------------------------

class SSLCore(Protocol):
    """What the TLS layer calls on every record: ``ssl.SSLObject``'s methods of these
    names forward to the C object's one for one (Lib/ssl.py, 3.11 to 3.13)."""

    @property
    def session_reused(self) -> bool: ...
    def do_handshake(self) -> None: ...
    def read(self, size: int, /) -> bytes: ...
    def write(self, data: bytes, /) -> int: ...
    def pending(self) -> int: ...
    def getpeercert(self, binary_form: bool, /) -> Any: ...


_CORE_NAMES = ("session_reused", "do_handshake", "read", "write", "pending", "getpeercert")


def core_check() -> bool:
    """Self-test, once at import: the SSLObject of a real context has a ``_sslobj`` with
    every name TLSConnection calls. Else ``core`` hands back the public object."""
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
        raw = obj._sslobj  # type: ignore[attr-defined]
        missing = [n for n in _CORE_NAMES if not hasattr(raw, n)]
        if missing:
            raise RuntimeError(f"_sslobj lacks {', '.join(missing)}")
        if raw.pending() != obj.pending() or raw.session_reused is not obj.session_reused:
            raise RuntimeError("_sslobj disagrees with its SSLObject")
        return True
    except Exception as exc:  # any surprise: use the public object (one call slower)
        log.warning("TLS records go through ssl.SSLObject (self-test of its C object "
                    "failed: %s: %s)", type(exc).__name__, exc)
        return False


_CORE_OK = core_check()


def core(sslobj: ssl.SSLObject) -> SSLCore:
    """The C object behind ``sslobj``: each ``SSLObject`` method is a Python function that
    only forwards to it, and a connection makes ~10 such calls before its first response
    (2 per keep-alive request). ``sslobj`` itself when the self-test failed."""
    if _CORE_OK:
        return sslobj._sslobj  # type: ignore[attr-defined,no-any-return]
    return sslobj
