"""Server-side TLS as an asyncio Protocol over ``ssl.MemoryBIO``.

Why not ``create_server(ssl=...)`` or ``start_tls``: the context must be chosen per
connection (hot-swappable truststore), uvloop's ``start_tls`` loses ClientHellos
(uvloop issue 707), and only the MemoryBIO way lets OpenSSL's alert reach the client
(docs/architecture.md, "What Python's ssl does and does not do").

Rules of this module:
- The context is taken once, when the ClientHello has arrived, from
  ``handler.context(server_name)`` (tls/client_hello.py): the SNI name chooses the
  listener's domain before OpenSSL reads a byte.
- The handshake's time limit is the handler's to keep (the proxy checks it on its
  listener's ticker, a float per connection instead of a timer handle); it calls
  ``handshake_expired()`` when the time is up.
- Every call into the SSLObject is followed by ``_flush()`` so alerts, tickets and
  records reach the socket in order. Application data written with ``write`` may wait
  in the outgoing BIO for the end of the loop's pass (``runtime/writes.py``); every later
  ``_flush`` (a close included) sends it first. One exception saves system calls: the TLS 1.3
  ticket written when the handshake ends waits in the outgoing BIO when a request came
  with the client's Finished and the handler will answer it (``response_pending``); it
  then leaves with the response, in the same write. A last response and close_notify
  also leave in one write (``write_and_close``).
- States move [PROXY_HEADER ->] HELLO -> HANDSHAKING -> OPEN -> CLOSING -> CLOSED (or to
  CLOSED from any of them); any other transition is a bug and raises.
- The handler sees plaintext only; it never touches the transport.

Over ~400 lines on purpose: the TLS connection's states, its reads, writes, handshake
and close are one state machine; split, its transitions would no longer read in one place.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from collections.abc import Callable
from typing import Protocol

from mtlsproxy.config.model import Networks
from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.runtime.writes import WriteBatch
from mtlsproxy.tls import native, proxy_protocol
from mtlsproxy.tls.client_hello import read_hello
from mtlsproxy.tls.failures import classify
from mtlsproxy.tls.proxy_protocol import trusted_source

# One TLS record's plaintext at most (RFC 8446 section 5.1: 2^14 bytes): SSL_read (no read
# pipelining) returns one record per call, and CPython allocates the size before shrinking.
_READ_SIZE = 16 * 1024


# nginx's lingering_time and lingering_timeout defaults (see TLSConnection.close).
LINGERING_TIME = 30.0
LINGERING_TIMEOUT = 5.0
# After a handshake alert: long enough for the client's bytes in flight to arrive, short
# enough that refused connections do not pile up.
ALERT_LINGER = 1.0


class _Linger:
    """A closing connection still draining what its client sends."""

    __slots__ = ("until", "timer", "read")

    def __init__(self, until: float, timer: asyncio.TimerHandle) -> None:
        self.until = until  # LINGERING_TIME after it began
        self.timer = timer  # the next check, LINGERING_TIMEOUT after the last one
        self.read = False  # bytes arrived since that check


class TLSState(enum.Enum):
    PROXY_HEADER = "proxy_header"  # waiting for a PROXY protocol header (when enabled)
    HELLO = "client_hello"  # buffering the ClientHello to read its SNI name
    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"

    # Members are singletons: identity hashing (a C slot) instead of Enum's Python-level
    # hash(name), which the transition checks paid on every state change.
    __hash__ = object.__hash__


# The members as module globals, for the checks made per record. In Python 3.11 every
# ``TLSState.X`` runs through ``EnumType.__getattr__``'s slot, much slower than a global;
# such reads were a visible share of a keep-alive request's instructions
# (bench/instructions.py).
# Python 3.12 dropped that ``__getattr__``.
PROXY_HEADER, HELLO, HANDSHAKING, OPEN, CLOSING, CLOSED = (
    TLSState.PROXY_HEADER, TLSState.HELLO, TLSState.HANDSHAKING, TLSState.OPEN,
    TLSState.CLOSING, TLSState.CLOSED)

_ALLOWED = {
    TLSState.PROXY_HEADER: {TLSState.HELLO, TLSState.CLOSED},
    TLSState.HELLO: {TLSState.HANDSHAKING, TLSState.CLOSED},
    TLSState.HANDSHAKING: {TLSState.OPEN, TLSState.CLOSING, TLSState.CLOSED},
    TLSState.OPEN: {TLSState.CLOSING, TLSState.CLOSED},
    TLSState.CLOSING: {TLSState.CLOSED},
    TLSState.CLOSED: set(),
}


class TLSHandler(Protocol):
    """What a TLS connection reports to the layer above it."""

    def context(self, server_name: str | None) -> ssl.SSLContext: ...
    def handshake_done(self, conn: TLSConnection) -> None: ...
    def handshake_failed(self, conn: TLSConnection, reason: str, exc: BaseException) -> None: ...
    def plaintext_received(self, data: bytes) -> None: ...
    def response_pending(self) -> bool: ...
    def eof_received(self) -> None: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...


class HandshakeOver:
    """The part of ``TLSHandler`` a handler that takes over an open connection (an HTTP/2
    session, a tunnel, a TCP-mode session) never sees called: the handshake is over."""

    __slots__ = ()

    def context(self, server_name: str | None) -> ssl.SSLContext:  # pragma: no cover
        raise RuntimeError("the handshake is over")

    def handshake_done(self, conn: TLSConnection) -> None:  # pragma: no cover - never
        raise RuntimeError("the handshake is over")

    def handshake_failed(self, conn: TLSConnection, reason: str,
                         exc: BaseException) -> None:  # pragma: no cover - never
        raise RuntimeError("the handshake is over")

    def response_pending(self) -> bool:
        return False


class TLSConnection:
    """An ``asyncio.Protocol`` (every method of one), without that base class: compiled
    (mtlsproxy/compiled.py), an extension type's bases are extension types, and the loops
    call a protocol's methods, never check its class."""

    # One per connection: slots make it smaller (no __dict__).
    __slots__ = ("_handler_factory", "state", "_proxy_buf", "_proxy_sources", "transport",
                 "_hello_buf", "_hello_need", "server_name",
                 "handler", "sslobj", "_tls", "peername", "sockname", "_incoming", "_outgoing",
                 "write_paused", "_drain_waiter", "_reading_paused", "_writes", "_linger",
                 "write_shut", "__weakref__")

    def __init__(self, handler_factory: Callable[[TLSConnection], TLSHandler],
                 proxy_protocol: bool = False, writes: WriteBatch | None = None,
                 proxy_sources: Networks | None = None) -> None:
        self._handler_factory = handler_factory
        # Where write() defers its send to the end of the loop's pass (runtime/writes.py); None:
        # send at once.
        self._writes = writes
        self.state = PROXY_HEADER if proxy_protocol else HELLO
        self._proxy_buf = b""
        self._hello_buf = bytearray()  # the ClientHello so far (HELLO)
        self._hello_need = 0  # bytes that must have arrived before it is read again
        self.server_name: str | None = None  # its SNI name, lower-case, once read
        # The socket peers allowed to send the PROXY header; None: any (read only when
        # a header is expected).
        self._proxy_sources = proxy_sources
        self.transport: asyncio.Transport | None = None
        self.handler: TLSHandler | None = None
        self.sslobj: ssl.SSLObject | None = None
        # Its C object, for the per-record calls (native.core); set with sslobj.
        self._tls: native.SSLCore | None = None
        self.peername: tuple[str, int] = ("", 0)
        self.sockname: tuple[str, int] = ("", 0)  # the listening address it came to
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        # Set by the transport's flow control; read after every fast-path response (a
        # plain attribute: no property call on that path).
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._linger: _Linger | None = None  # closing, the client still sending (close)
        self.write_shut = False  # shutdown_write: close_notify sent, still reading

    def __repr__(self) -> str:
        return f"<TLSConnection {self.state.value} peer={self.peername[0]}:{self.peername[1]}>"

    @property
    def in_handshake(self) -> bool:
        """Not yet through the handshake (or the PROXY header or ClientHello before it)."""
        state = self.state
        return state is HANDSHAKING or state is HELLO or state is PROXY_HEADER

    def _set_state(self, new: TLSState) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"TLS state {self.state.value} -> {new.value} is not allowed")
        self.state = new

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: no subclass
        peer = transport.get_extra_info("peername")
        if peer:
            self.peername = (peer[0], peer[1])  # (host, port[, flowinfo, scope_id])
        local = transport.get_extra_info("sockname")
        if local and isinstance(local, tuple):
            self.sockname = (local[0], local[1])
        self.handler = self._handler_factory(self)
        if self.state is PROXY_HEADER and self._proxy_sources is not None and (
                not trusted_source(self.peername[0], self._proxy_sources)):
            # Refused before a byte of the header is read (its address would be believed)
            # and before any TLS byte is sent: no SSLObject is even made.
            self._fail_handshake(RemoteProtocolError(
                f"PROXY protocol from an untrusted source {self.peername[0]}"), "protocol")
            return

    def data_received(self, data: bytes) -> None:
        if self.state is PROXY_HEADER:
            data = self._proxy_header(data)
            if not data:
                return
        if self.state is HELLO:
            data = self._client_hello(data)
            if not data:
                return
        state = self.state
        if state is OPEN:
            self._incoming.write(data)
            self._read_plaintext()
            return
        if self._linger is not None:
            self._linger.read = True  # dropped unread: the response went out (see close)
            return
        self._incoming.write(data)
        if state is HANDSHAKING:
            self._do_handshake()
        # The state may have moved in _do_handshake; re-read it (mypy narrows too eagerly).
        state = self.state
        if state is OPEN or state is CLOSING:
            self._read_plaintext()

    def eof_received(self) -> bool | None:
        self._incoming.write_eof()
        if self.in_handshake:
            self._fail_handshake(ssl.SSLEOFError("EOF during handshake"))
        elif self.state is OPEN or self.write_shut:
            self._read_plaintext()
            if self.handler is not None and (self.state is OPEN or self.write_shut):
                self.handler.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.timer.cancel()
            self._linger = None
        was = self.state
        if was is not CLOSED:
            self.state = CLOSED
        if was in (HANDSHAKING, HELLO, PROXY_HEADER) and self.handler is not None:
            self.handler.handshake_failed(
                self, "client_closed", exc or ConnectionResetError("closed in handshake"))
        self._wake_drain(exc)
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.connection_lost(exc)
        # The handler and the transport both point back at this object: without these
        # references dropped, every connection would be freed by the cyclic GC (a gen-0
        # collection every few connections, each tracing and freeing them, SSL objects
        # included) instead of by reference counting when its last user lets go.
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain(None)

    def _proxy_header(self, data: bytes) -> bytes:
        """Consume the PROXY protocol header; returns the bytes after it (TLS)."""
        buf = self._proxy_buf + data
        try:
            parsed = proxy_protocol.parse(buf)
        except RemoteProtocolError as exc:
            self._fail_handshake(exc, "protocol")
            return b""
        if parsed is None:
            self._proxy_buf = buf
            return b""
        consumed, client = parsed
        self._proxy_buf = b""
        if client is not None:
            self.peername = client  # logs, X-Forwarded-For and limits see the real client
        self._set_state(HELLO)
        return buf[consumed:]

    def _client_hello(self, data: bytes) -> bytes:
        """Buffer until the ClientHello is whole, then take the context its SNI name
        chooses; returns every byte buffered (for OpenSSL) once it has, else b""."""
        # A bytearray: a hello that arrives in many small reads is appended to, not copied
        # again for each (quadratic in its size).
        self._hello_buf += data
        if len(self._hello_buf) < self._hello_need:
            return b""
        buf = bytes(self._hello_buf)
        hello = read_hello(buf)
        if isinstance(hello, int):
            self._hello_need = hello
            return b""
        self._hello_buf = bytearray()
        self.server_name = hello.server_name
        assert self.handler is not None
        self.sslobj = self.handler.context(hello.server_name).wrap_bio(
            self._incoming, self._outgoing, server_side=True)
        self._tls = native.core(self.sslobj)
        self._set_state(HANDSHAKING)
        return buf

    # -- handshake ----------------------------------------------------------------------

    def _do_handshake(self) -> None:
        assert self._tls is not None and self.handler is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._fail_handshake(exc)
            return
        self._set_state(OPEN)
        if not self._incoming.pending:
            self._flush()  # else data_received reads the request next (see the rules)
        self.handler.handshake_done(self)

    def _fail_handshake(self, exc: BaseException, reason: str | None = None) -> None:
        # OpenSSL has written the alert (certificate expired, unknown ca, ...) into the
        # outgoing BIO: send it before closing so the client sees a real TLS alert.
        self._flush()
        self._set_state(CLOSED)
        if self.handler is not None:
            self.handler.handshake_failed(self, reason or classify(exc), exc)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        # A TLS 1.3 client sends its first request (an HTTP/2 preface) right after its
        # Finished, before it reads the alert the server answers that Finished with: a
        # close with those bytes unread would reset the connection and the client would
        # see "connection reset", not the alert. So only the sending side is shut; what
        # still comes is dropped for ALERT_LINGER seconds at most (see ``close``).
        try:
            transport.write_eof()
        except OSError:
            transport.close()
            return
        loop = asyncio.get_running_loop()
        self._linger = _Linger(loop.time() + ALERT_LINGER,
                               loop.call_later(ALERT_LINGER, self._linger_check))

    def handshake_expired(self) -> None:
        """The handler's time limit for the handshake passed: count it and cut off."""
        if self.in_handshake:
            self._set_state(CLOSED)
            if self.handler is not None:
                self.handler.handshake_failed(self, "timeout", TimeoutError("TLS handshake"))
            if self.transport is not None:
                self.transport.abort()

    # -- data -------------------------------------------------------------------------

    def _read_plaintext(self) -> None:
        assert self._tls is not None and self.handler is not None
        chunks: list[bytes] = []
        eof = False
        sslobj, incoming = self._tls, self._incoming
        try:
            while True:
                chunk = sslobj.read(_READ_SIZE)
                if not chunk:
                    eof = True
                    break
                chunks.append(chunk)
                # Nothing left to decrypt: stop here rather than read again into an
                # SSLWantReadError (building that exception costs more than the read).
                # SSL_read returns one record's plaintext, all of it up to the size asked
                # (OpenSSL ssl/record/rec_layer_s3.c, ssl3_read_bytes): a shorter chunk
                # left none of its record behind, so ``pending()`` (a call that releases
                # and takes back the GIL) is asked only after a full one.
                if not incoming.pending and (len(chunk) < _READ_SIZE
                                             or not sslobj.pending()):
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            eof = True
        except ssl.SSLError:
            self.abort()  # sends OpenSSL's alert first (abort flushes)
            return
        if chunks:
            handler = self.handler
            handler.plaintext_received(b"".join(chunks) if len(chunks) > 1 else chunks[0])
            if self._outgoing.pending and not handler.response_pending():
                self._flush()
        else:
            self._flush()
        if eof and (self.state is OPEN or self.write_shut):
            self.handler.eof_received()

    def _flush(self) -> None:
        if self._outgoing.pending and self.transport is not None:
            self.transport.write(self._outgoing.read())

    def _encrypt(self, data: bytes) -> bool:
        """Into the outgoing BIO; False (the connection aborted) on a TLS error, or when
        the connection is no longer open (the data is dropped)."""
        if self.state is not OPEN or self._tls is None:
            return False
        try:
            self._tls.write(data)
        except ssl.SSLError:
            self.abort()
            return False
        return True

    def write(self, data: bytes) -> None:
        """Encrypt and send (at the end of the loop's pass when deferring: the bytes wait
        in the outgoing BIO, so anything sent before them still goes first); silently
        dropped once the connection is closing."""
        if self._encrypt(data):
            if self._writes is None:
                self._flush()
            else:
                self._writes.add(self)

    def flush_deferred(self) -> None:
        self._flush()

    def shutdown_write(self) -> None:
        """Half-close (a tunnel whose upstream finished): close_notify goes out, the
        client's bytes and its own end still reach the handler (``write_shut``)."""
        if self.state is not OPEN:
            return
        self.write_shut = True
        self._set_state(CLOSING)
        if self.sslobj is not None:
            try:
                self.sslobj.unwrap()
            except (ssl.SSLError, ValueError):
                pass  # want-read: the client's close_notify has not come (it may not)
        self._flush()

    def write_and_close(self, data: bytes) -> None:
        """The connection's last bytes: ``data`` and close_notify in one system call."""
        self._encrypt(data)
        self.close()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is under its low-water mark."""
        if not self.write_paused or self.state is CLOSED:
            return
        if self._drain_waiter is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
        await self._drain_waiter

    def _wake_drain(self, exc: BaseException | None) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            if exc is None and self.state is not CLOSED:
                waiter.set_result(None)
            else:
                waiter.set_exception(ConnectionResetError("client connection lost"))

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def close(self, linger: bool = False) -> None:
        """Send close_notify, then close the socket after the buffered data is written.

        ``linger``: the client may still be sending (a request body that was not read, a
        pipelined request). Closing a socket with unread bytes makes the kernel answer
        with a reset, and the reset can destroy the response still waiting in the
        client's receive buffer: the client sees "connection reset" instead of its 413
        or 403. So only the sending side is shut after the response, and whatever still
        comes is read and dropped until the client closes, LINGERING_TIMEOUT passes
        without a byte, or LINGERING_TIME in all (nginx's lingering_close)."""
        if self.state is OPEN:
            self._set_state(CLOSING)
            if self.sslobj is not None:
                try:
                    self.sslobj.unwrap()
                except (ssl.SSLError, ValueError):
                    pass
                self._flush()
        transport = self.transport
        if transport is None or transport.is_closing() or self._linger is not None:
            return
        if linger and self.state is CLOSING and transport.can_write_eof():
            loop = asyncio.get_running_loop()
            try:
                transport.write_eof()  # a FIN after the buffered response
            except OSError:
                # The client is gone already (asyncio's transport calls shutdown() at once
                # and raises ENOTCONN after a reset it has not read yet; uvloop reports
                # it later instead): nothing to linger for.
                transport.close()
                return
            self._linger = _Linger(loop.time() + LINGERING_TIME,
                                   loop.call_later(LINGERING_TIMEOUT, self._linger_check))
            if self._reading_paused:
                self._reading_paused = False
                transport.resume_reading()
            return
        transport.close()

    def _linger_check(self) -> None:
        linger = self._linger
        if linger is None or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if linger.read and now < linger.until:
            linger.read = False
            linger.timer = loop.call_later(min(LINGERING_TIMEOUT, linger.until - now),
                                           self._linger_check)
            return
        self._linger = None
        self.transport.close()

    def abort(self) -> None:
        # What this pass wrote and deferred (runtime/writes.py) still leaves first, as it would
        # have without the deferral: a response cut short reaches the client cut short,
        # not as nothing at all.
        self._flush()
        if self.state is not CLOSED and self.state is not HANDSHAKING:
            self._set_state(CLOSED)
        if self.transport is not None:
            self.transport.abort()

    # -- what the handshake established ---------------------------------------------------

    def peer_certificate_der(self) -> bytes | None:
        assert self._tls is not None
        return self._tls.getpeercert(True)  # type: ignore[no-any-return]

    def verified_chain_der(self) -> list[bytes] | None:
        """Leaf first, root last; None on a resumed session (OpenSSL keeps no chain)."""
        assert self.sslobj is not None
        return native.verified_chain_der(self.sslobj)

    @property
    def session_reused(self) -> bool:
        return self._tls is not None and self._tls.session_reused
