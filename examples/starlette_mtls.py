"""A Starlette (or FastAPI) app behind mtlsproxy that knows who is calling.

    uvicorn starlette_mtls:app --host 127.0.0.1 --port 8081 --no-proxy-headers

--no-proxy-headers matters: otherwise uvicorn replaces the peer address with the last
X-Forwarded-For element (the *client's* address, which mtlsproxy appends), and with
FORWARDED_ALLOW_IPS=* any caller could claim to be 127.0.0.1.
"""

from __future__ import annotations

from mtls_identity import (
    TRUSTED_PEERS,
    BadClientCert,
    ClientIdentity,
    identity_from_headers,
    peer_name,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose


class ClientCertMiddleware:
    """request.state.client_identity: a ClientIdentity, or None; a malformed header: 400."""

    def __init__(self, app: ASGIApp, trusted_peers: frozenset[str] = TRUSTED_PEERS) -> None:
        self.app, self.trusted_peers = app, trusted_peers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            # Names come lower-case, one pair per field line: a repeated header is seen.
            fields = [(n, v.decode("latin-1")) for n, v in scope["headers"]]
            try:
                identity = identity_from_headers(
                    peer_name(client[0] if client else None), self.trusted_peers,
                    [v for n, v in fields if n == b"client-cert"],
                    [v for n, v in fields if n == b"x-forwarded-client-cert"])
            except BadClientCert as exc:
                refusal = PlainTextResponse(str(exc), 400) if scope["type"] == "http" \
                    else WebSocketClose(1008)
                return await refusal(scope, receive, send)
            scope.setdefault("state", {})["client_identity"] = identity
        await self.app(scope, receive, send)


def require_identity(request: Request) -> ClientIdentity:
    """The caller's identity, or 401; a handler's first line (or a FastAPI Depends)."""
    identity: ClientIdentity | None = getattr(request.state, "client_identity", None)
    if identity is None:
        raise HTTPException(401, "a client certificate, through mtlsproxy, is required")
    return identity


async def whoami(request: Request) -> JSONResponse:
    identity = require_identity(request)
    return JSONResponse({"subject": identity.subject, "san_dns": list(identity.san_dns),
                         "san_uri": list(identity.san_uri),
                         "fingerprint_sha256": identity.fingerprint_sha256})


app = Starlette(routes=[Route("/whoami", whoami)],
                middleware=[Middleware(ClientCertMiddleware)])
