"""Client-side TLS to ``https://`` upstreams (``routes[].upstream_tls``): contexts that
reload their files, session resumption, and the TLS layer as an asyncio Protocol over
``ssl.MemoryBIO``.

Why not ``create_connection(ssl=...)``: neither asyncio nor uvloop takes an
``SSLSession`` to resume, so every pooled connection would pay a full handshake
(nginx's proxy_ssl_session_reuse and Envoy resume by default). Over MemoryBIO the
session of the last handshake is offered to the next (``SSLContext.wrap_bio(session=)``).

Rules of this module:
- ``UpstreamTLSContexts`` owns the contexts and the sessions, one entry per (settings,
  ALPN). A context is built completely and then swapped in with one assignment when its
  files change (checked at most every ``CHECK_INTERVAL`` seconds, when a connection
  opens: a cert-manager renewal of the client certificate is picked up without a
  restart, as the server certificates are). A build that fails keeps the old context and
  is logged once per content. Sessions belong to the context that made them: a swap
  drops them.
- ``TLSUpstream`` is the socket's protocol, and to the protocol above it (an HTTP/1.1 or
  HTTP/2 upstream connection, a tunnel's end) it is the transport: that protocol sees
  plaintext only, and its ``connection_made`` comes once the handshake is over.
- A failed handshake (an unknown CA, a wrong name, no ALPN h2 for an h2 route) fails the
  connect with ``UpstreamTLSError``: the caller's 502 with kind ``tls``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

from mtlsproxy.config.model import UpstreamTLS
from mtlsproxy.errors import MtlsProxyError

log = logging.getLogger("mtlsproxy.tls")

CHECK_INTERVAL = 5.0
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_READ_SIZE = 64 * 1024


class UpstreamTLSError(MtlsProxyError):
    """The TLS handshake with an upstream failed, or its context could not be built."""


def build_context(tls: UpstreamTLS, alpn: str) -> ssl.SSLContext:
    """Blocking (reads files); raises OSError, ssl.SSLError or ValueError."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = _VERSIONS[tls.min_version]
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file),
                            str(tls.key_file) if tls.key_file is not None else None)
    ctx.set_alpn_protocols([alpn])
    return ctx


def _signature(tls: UpstreamTLS) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file does (a kubelet ``..data`` swap changes the inode)."""
    out = []
    for path in (tls.ca_file, tls.cert_file, tls.key_file):
        if path is None:
            out.append((0, 0, 0))
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append((-1, 0, 0))
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class _Entry:
    __slots__ = ("context", "signature", "checked", "failed", "session")

    def __init__(self, context: ssl.SSLContext, signature: tuple[tuple[int, int, int], ...],
                 checked: float) -> None:
        self.context = context
        self.signature = signature
        self.checked = checked
        self.failed: tuple[tuple[int, int, int], ...] | None = None
        self.session: ssl.SSLSession | None = None


class UpstreamTLSContexts:
    """The contexts and sessions of every TLS upstream of a process; see the rules."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.check_interval = CHECK_INTERVAL
        self._entries: dict[tuple[UpstreamTLS, str, str], _Entry] = {}

    def __repr__(self) -> str:
        return f"<UpstreamTLSContexts {len(self._entries)}>"

    def entry(self, tls: UpstreamTLS, alpn: str, pool_key: str) -> _Entry:
        """The entry to connect with; raises UpstreamTLSError if none can be built."""
        key = (tls, alpn, pool_key)
        now = self.clock()
        entry = self._entries.get(key)
        if entry is None:
            signature = _signature(tls)
            try:
                entry = _Entry(build_context(tls, alpn), signature, now)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise UpstreamTLSError(f"upstream TLS settings unusable: {exc}") from None
            self._entries[key] = entry
        elif now - entry.checked >= self.check_interval:
            entry.checked = now
            signature = _signature(tls)
            if signature != entry.signature and signature != entry.failed:
                try:
                    context = build_context(tls, alpn)
                except (OSError, ssl.SSLError, ValueError) as exc:
                    entry.failed = signature
                    log.warning("upstream TLS files for %s changed but do not load, the "
                                "old ones stay in use: %s", pool_key, exc)
                else:
                    entry.context, entry.session = context, None  # one swap
                    entry.signature, entry.failed = signature, None
                    log.info("upstream TLS files for %s reloaded", pool_key)
        return entry


class TLSUpstream(asyncio.Transport, asyncio.Protocol):
    """The TLS layer between a socket and an upstream protocol; see the rules."""

    def __init__(self, entry: _Entry, server_name: str | None,
                 factory: Callable[[], asyncio.Protocol], alpn: str,
                 done: asyncio.Future[asyncio.Protocol]) -> None:
        super().__init__()
        self._entry = entry
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = entry.context.wrap_bio(self._incoming, self._outgoing, server_side=False,
                                           server_hostname=server_name,
                                           session=entry.session)
        self._factory = factory
        self._alpn = alpn
        self._done = done
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._closing = False
        self._saved = False  # a session with a ticket has been kept

    def __repr__(self) -> str:
        return f"<TLSUpstream open={self._inner is not None} closing={self._closing}>"

    @property
    def session_reused(self) -> bool:
        return self._ssl.session_reused

    # -- asyncio.Protocol (the socket's side) --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._handshake()

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self._inner is None:
            self._handshake()
        else:
            self._read()

    def eof_received(self) -> bool | None:
        if self._inner is None:
            self._fail(UpstreamTLSError("the upstream closed during the TLS handshake"))
            return False
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._inner is None:
            self._fail(UpstreamTLSError("the upstream closed during the TLS handshake"))
            return
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- the handshake and reads -----------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
            self._fail(UpstreamTLSError(f"TLS handshake failed: {reason or exc}"))
            return
        self._flush()
        if self._alpn == "h2" and self._ssl.selected_alpn_protocol() != "h2":
            self._fail(UpstreamTLSError("the upstream did not choose h2 by ALPN"))
            return
        self._save_session()
        inner = self._factory()
        self._inner = inner
        inner.connection_made(self)
        if not self._done.done():
            self._done.set_result(inner)
        self._read()  # records that came with the handshake's last flight

    def _fail(self, exc: UpstreamTLSError) -> None:
        if not self._done.done():
            self._done.set_exception(exc)
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _read(self) -> None:
        chunks: list[bytes] = []
        eof = False
        while True:
            try:
                chunk = self._ssl.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True  # close_notify
                break
            except ssl.SSLError:
                self._flush()
                self.abort()
                return
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        self._flush()
        if not self._saved:
            self._save_session()  # a TLS 1.3 ticket arrives after the handshake
        inner = self._inner
        if inner is None:
            return
        if chunks:
            inner.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof and not self._closing:
            inner.eof_received()
            self.close()

    def _save_session(self) -> None:
        session = self._ssl.session
        if session is not None and (session.has_ticket or self._ssl.version() != "TLSv1.3"):
            self._entry.session = session
            self._saved = True

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # -- asyncio.Transport (the upstream protocol's side) ---------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError:
            self.abort()
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing or self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self._ssl.unwrap()  # close_notify
        except (ssl.SSLError, ValueError):
            pass
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport is not None and self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._transport is not None:
            self._transport.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._inner is not None
        return self._inner

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)
