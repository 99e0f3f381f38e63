"""A small blocking HTTP/2 client for tests: h2 (the real state machine) over a real TLS
socket with ALPN h2, able to send what well-behaved clients never send."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions


@dataclass
class H2Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None  # the error code of a RST_STREAM, if the server reset it
    ended: bool = False

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


class H2Client:
    def __init__(self, port: int, ctx: ssl.SSLContext, server_name: str = "localhost",
                 timeout: float = 10) -> None:
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname=server_name)
        assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False))
        self.h2.initiate_connection()
        self.responses: dict[int, H2Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.remote_settings: dict[int, int] = {}
        self.closed = False
        self.closed_for_writes = False
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            try:
                self.sock.sendall(data)
            except OSError:  # the server closed (after a GOAWAY, usually): reads tell
                self.closed_for_writes = True

    def close(self) -> None:
        self.sock.close()

    def request(self, path: str = "/", method: str = "GET", authority: str = "localhost",
                headers: list[tuple[str, str]] | None = None, body: bytes | None = None,
                end: bool = True) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        fields = [(b":method", method.encode()), (b":scheme", b"https"),
                  (b":authority", authority.encode()), (b":path", path.encode())]
        fields += [(n.encode(), v.encode()) for n, v in headers or []]
        self.responses[stream_id] = H2Response()
        self.h2.send_headers(stream_id, fields, end_stream=end and body is None)
        if body is not None:
            self.send_body(stream_id, body, end)
        self.flush()
        return stream_id

    def send_body(self, stream_id: int, body: bytes, end: bool = True) -> None:
        view = memoryview(body)
        while view:
            window = min(self.h2.local_flow_control_window(stream_id),
                         self.h2.max_outbound_frame_size)
            if window <= 0:
                self.flush()
                self.receive()
                continue
            self.h2.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
        if end:
            self.h2.end_stream(stream_id)
        self.flush()

    def receive(self) -> list[h2.events.Event]:
        """One read's events (empty list and ``closed`` when the server closed)."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return []
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return []
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                r = self.responses.setdefault(ev.stream_id, H2Response())
                r.headers = list(ev.headers)
                r.status = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                self.responses[ev.stream_id].body += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.responses[ev.stream_id].trailers = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                self.responses[ev.stream_id].ended = True
            elif isinstance(ev, h2.events.StreamReset):
                self.responses.setdefault(ev.stream_id, H2Response()).reset = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                for code, change in ev.changed_settings.items():
                    self.remote_settings[int(code)] = change.new_value
        self.flush()
        return events

    def response(self, stream_id: int) -> H2Response:
        """Read until the stream ends, is reset, or the connection closes."""
        r = self.responses[stream_id]
        while not (r.ended or r.reset is not None or self.closed):
            self.receive()
            r = self.responses[stream_id]
        return r

    def until_closed(self) -> None:
        while not self.closed:
            self.receive()

    def get(self, path: str = "/", **kw: object) -> H2Response:
        return self.response(self.request(path, **kw))  # type: ignore[arg-type]
