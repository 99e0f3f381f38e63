"""A scripted HTTP/2 upstream (h2c, prior knowledge) for tests: the h2 state machine on
an asyncio server, answering by path with what well-behaved servers never send.

Paths:
- ``/bytes/N``: 200 with N bytes of body, sent as the proxy's windows allow.
- ``/goaway``: a graceful GOAWAY naming this stream as the last, then (later) the answer.
- ``/status/S``: a response whose ``:status`` is S, sent as it is.
- ``/field``: a 200 with a control byte in a field value.
- ``/slow``: 200 ``slow`` after 0.5 s.
- ``/early``: 200 ``early`` at once, without waiting for the request body (and without
  the RST_STREAM a server may send after it: RFC 9113 section 8.1 makes it optional).
- ``/grpc-stall``: a gRPC response's HEADERS, then nothing.

``max_streams``: its SETTINGS_MAX_CONCURRENT_STREAMS. ``closed``: connections it saw end.
- anything else: 200 ``ok``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


class ScriptedH2Upstream:
    def __init__(self, max_streams: int | None = None) -> None:
        self.max_streams = max_streams
        self.closed = 0
        self.connections = 0
        self.goaways = 0
        self.paths: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        if self.max_streams is not None:
            conn.local_settings = h2.settings.Settings(client=False, initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        conn.initiate_connection()
        pending: dict[int, bytearray] = {}  # body bytes waiting for windows, by stream
        tasks: set[asyncio.Task[None]] = set()

        def flush() -> None:
            data = conn.data_to_send()
            if data:
                writer.write(data)

        def send_pending() -> None:
            for stream_id, buf in list(pending.items()):
                while buf:
                    try:
                        window = min(conn.local_flow_control_window(stream_id),
                                     conn.max_outbound_frame_size)
                    except h2.exceptions.StreamClosedError:
                        buf.clear()
                        break
                    if window <= 0:
                        break
                    conn.send_data(stream_id, bytes(buf[:window]))
                    del buf[:window]
                if not buf:
                    del pending[stream_id]
                    try:
                        conn.end_stream(stream_id)
                    except h2.exceptions.ProtocolError:
                        pass
            flush()

        def answer(stream_id: int, status: bytes, body: bytes,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
            conn.send_headers(stream_id, [(b":status", status), *(extra or [])])
            pending[stream_id] = bytearray(body)
            send_pending()

        async def later(stream_id: int, delay: float, body: bytes) -> None:
            await asyncio.sleep(delay)
            answer(stream_id, b"200", body)

        def request(stream_id: int, headers: Any) -> None:
            path = dict(headers)[b":path"].decode()
            self.paths.append(path)
            if path.startswith("/bytes/"):
                answer(stream_id, b"200", b"x" * int(path[7:]))
            elif path == "/goaway":
                # Written by hand: h2's own GOAWAY would close its state machine, and
                # this server still answers the stream (RFC 9113 section 6.8).
                flush()
                writer.write(b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"
                             + stream_id.to_bytes(4, "big") + bytes(4))
                self.goaways += 1
                tasks.add(asyncio.get_running_loop().create_task(
                    later(stream_id, 0.3, b"after goaway")))
            elif path == "/slow":
                tasks.add(asyncio.get_running_loop().create_task(
                    later(stream_id, 0.5, b"slow")))
            elif path.startswith("/status/"):
                answer(stream_id, path[8:].encode(), b"odd")
            elif path == "/early":
                answer(stream_id, b"200", b"early")
            elif path == "/grpc-stall":
                conn.send_headers(stream_id, [(b":status", b"200"),
                                              (b"content-type", b"application/grpc")])
                flush()
            elif path == "/field":
                answer(stream_id, b"200", b"odd", [(b"x-odd", b"a\x01b")])
            else:
                answer(stream_id, b"200", b"ok")

        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        request(ev.stream_id, ev.headers)
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length,
                                                       ev.stream_id)
                    elif isinstance(ev, h2.events.WindowUpdated):
                        send_pending()
                flush()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed += 1
            for task in tasks:
                task.cancel()
            writer.close()
