"""Build the server ``SSLContext`` set for one listener and one truststore generation; pure.

Rules of this module:
- A truststore change always builds NEW contexts: a live context can gain CAs but never
  lose one (docs/architecture.md, "What Python's ssl does and does not do"), and old
  session tickets die with the old context.
- One context per server certificate, all sharing the truststore; the SNI callback only
  selects among the contexts of the SAME generation, so tickets stay tied to the
  generation that issued them.
"""

from __future__ import annotations

import logging
import os
import ssl
import weakref
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from mtlsproxy.config import TLSConfig
from mtlsproxy.errors import TruststoreError
from mtlsproxy.runtime.pacing import pace
from mtlsproxy.tls import native
from mtlsproxy.truststore.bundle import TrustBundle

log = logging.getLogger("mtlsproxy.tls")


@dataclass(frozen=True)
class ServerContexts:
    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext]
    wildcard: dict[str, ssl.SSLContext]  # "example.com" for "*.example.com"

    def select(self, server_name: str | None) -> ssl.SSLContext | None:
        """Exact name before wildcard; None keeps the default (first) certificate."""
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        if name[:1] == "." or ".." in name:
            return None  # an empty label matches no name (RFC 6125 section 6.4.3)
        ctx = self.exact.get(name)
        if ctx is None and "." in name:
            ctx = self.wildcard.get(name.split(".", 1)[1])
        return ctx


def _names(cert_file: str) -> list[str]:
    with open(cert_file, "rb") as fh:
        leaf = x509.load_pem_x509_certificate(fh.read())
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value).lower()
                 for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names


def _new_context(tls: TLSConfig, bundle: TrustBundle | None,
                 send_ca_names: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if tls.security_policy == "TLS_1_3"
                           else ssl.TLSVersion.TLSv1_2)
    ctx.set_alpn_protocols(list(tls.alpn))
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    native.prefer_tls13_suites(ctx)  # AES-128-GCM first (see native.TLS13_SUITES)
    # One TLS 1.3 ticket per handshake, not OpenSSL's default two: a client resumes with
    # one, and each ticket is costly here (OpenSSL 3.0 encodes the session with the
    # client certificate, decodes it again and re-encodes it: construct_stateless_ticket;
    # the handshake's cost per ticket is in docs/performance.md).
    ctx.num_tickets = 1
    if bundle is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            _load_cas(ctx, bundle)
        except ssl.SSLError as exc:
            raise TruststoreError(f"OpenSSL refused the truststore: {exc}",
                                  key="mutual_tls.truststore_uri") from exc
        if send_ca_names:
            native.add_ca_names(ctx, (c.der for c in bundle.certs))
        # Only the signature schemes the policy accepts: an Ed25519 or P-521 client (TLS
        # 1.3) is refused in the handshake, not by a 403 after it.
        native.restrict_client_sigalgs(ctx)
    return ctx


# Above this many CAs the truststore goes through a file: CPython releases the GIL while
# OpenSSL reads ``cafile`` but holds it while it parses ``cadata`` (Modules/_ssl.c), and
# OpenSSL 3.0 decodes a certificate slowly (its provider decoder for the public key): a
# large truststore held the event loop (bench/run.py scenario 7) although the build runs
# in an executor thread.
FILE_THRESHOLD = 64
# CAs per file handed to OpenSSL: about one pace of decoding, so the build can pace()
# between files (runtime/pacing.py); each file costs a little more (memfd, open, BIO).
CHUNK = 4


def _load_cas(ctx: ssl.SSLContext, bundle: TrustBundle) -> None:
    if len(bundle.certs) < FILE_THRESHOLD or not hasattr(os, "memfd_create"):
        ctx.load_verify_locations(cadata=bundle.cadata)
        return
    # An anonymous in-memory file: no writable filesystem needed (read-only root in k8s),
    # nothing left behind; OpenSSL opens it again through /proc/self/fd.
    fd = os.memfd_create("mtlsproxy-truststore", os.MFD_CLOEXEC)
    try:
        for i in range(0, len(bundle.certs), CHUNK):
            pace()
            pem = "".join(ssl.DER_cert_to_PEM_cert(c.der)
                          for c in bundle.certs[i:i + CHUNK]).encode("ascii")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view):]
            ctx.load_verify_locations(cafile=f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


# The CA names travel in one list with a two-byte length (RFC 8446 section 4.2.4; RFC 5246
# section 7.4.4): past it OpenSSL fails every handshake with an internal error. Some room is
# left for the rest of the CertificateRequest.
CA_NAMES_LIMIT = 65535 - 2048


def _ca_names_fit(bundle: TrustBundle) -> bool:
    size = sum(2 + len(c.cert.subject.public_bytes()) for c in bundle.certs)
    if size <= CA_NAMES_LIMIT:
        return True
    log.warning("the names of the truststore's %d CAs take %d bytes, more than a "
                "CertificateRequest carries (%d): none are sent; set "
                "mutual_tls.send_ca_names: false to say so", len(bundle.certs), size,
                CA_NAMES_LIMIT)
    return False


def build_server_contexts(tls: TLSConfig, bundle: TrustBundle | None,
                          listener: str = "", send_ca_names: bool = True) -> ServerContexts:
    """One context per server certificate; raises TruststoreError on unusable input.

    With workers, every context of one (listener, truststore) gets the same ticket keys in
    every worker (tls/native.py), so a session resumes on whichever worker the kernel
    picks; a new truststore derives new keys, so old tickets stop resuming. A single
    process keeps its sessions in memory instead (stateful TLS 1.3 tickets: no session
    serialised into tickets, none parsed back on resumption)."""
    contexts: list[tuple[ssl.SSLContext, list[str]]] = []
    send_ca_names = send_ca_names and bundle is not None and _ca_names_fit(bundle)
    label = f"{listener}|{bundle.sha256 if bundle is not None else '-'}"
    for i, cert in enumerate(tls.certificates):
        ctx = _new_context(tls, bundle, send_ca_names)
        if not native.apply(ctx, label):
            native.keep_sessions(ctx, label)
        try:
            ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
            names = _names(str(cert.cert_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise TruststoreError(
                f"cannot load server certificate {cert.cert_file} with key {cert.key_file}: "
                f"{exc}", key=f"tls.certificates[{i}]") from exc
        contexts.append((ctx, names))
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    for ctx, names in contexts:
        for n in names:
            if n.startswith("*."):
                wildcard.setdefault(n[2:], ctx)
            else:
                exact.setdefault(n, ctx)
    result = ServerContexts(contexts[0][0], exact, wildcard)
    if len(contexts) > 1:
        # A weak reference: the callback hangs on each context, which ``result`` holds; a
        # strong one is a reference cycle, and a replaced generation (its X509_STORE of
        # the whole truststore) would wait for a full GC, to be freed wherever that runs.
        # A handshake's generation holds ``result``, so it is alive whenever this runs.
        selector = weakref.ref(result)

        def on_sni(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            current = selector()
            chosen = current.select(name) if current is not None else None
            if chosen is not None:
                sslobj.context = chosen
        for ctx, _ in contexts:
            ctx.sni_callback = on_sni
    return result
