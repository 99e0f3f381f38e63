"""A Flask (or any WSGI) app behind mtlsproxy that knows who is calling.

    gunicorn --bind 127.0.0.1:8081 flask_mtls:app     # or: flask --app flask_mtls run

REMOTE_ADDR must be the socket peer: keep this middleware outside any ProxyFix (wrap it
last), which would put the client's X-Forwarded-For address there.
"""

from __future__ import annotations

from collections.abc import Iterable
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from flask import Flask, abort, request
from mtls_identity import (
    TRUSTED_PEERS,
    BadClientCert,
    ClientIdentity,
    identity_from_headers,
    peer_name,
)
from werkzeug.wrappers import Response

ENVIRON_KEY = "mtlsproxy.client_identity"


class ClientCertMiddleware:
    """environ[ENVIRON_KEY]: a ClientIdentity, or None; a malformed header: 400."""

    def __init__(self, app: WSGIApplication, trusted_peers: frozenset[str] = TRUSTED_PEERS
                 ) -> None:
        self.app, self.trusted_peers = app, trusted_peers

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse
                 ) -> Iterable[bytes]:
        # A WSGI server joins a repeated header with ","; the strict parse refuses the join.
        def field(key: str) -> list[str]:
            return [environ[key]] if key in environ else []
        try:
            environ[ENVIRON_KEY] = identity_from_headers(
                peer_name(environ.get("REMOTE_ADDR")), self.trusted_peers,
                field("HTTP_CLIENT_CERT"), field("HTTP_X_FORWARDED_CLIENT_CERT"))
        except BadClientCert as exc:
            return Response(str(exc), 400, mimetype="text/plain")(environ, start_response)
        return self.app(environ, start_response)


def client_identity() -> ClientIdentity:
    """The caller's identity, or 401: a view's first line."""
    identity: ClientIdentity | None = request.environ.get(ENVIRON_KEY)
    if identity is None:
        abort(401, "a client certificate, through mtlsproxy, is required")
    return identity


app = Flask(__name__)
# Flask's documented way to add WSGI middleware (as for ProxyFix); mypy sees a method.
app.wsgi_app = ClientCertMiddleware(app.wsgi_app)  # type: ignore[method-assign]


@app.get("/whoami")
def whoami() -> dict[str, object]:
    identity = client_identity()
    return {"subject": identity.subject, "san_dns": list(identity.san_dns),
            "san_uri": list(identity.san_uri),
            "fingerprint_sha256": identity.fingerprint_sha256}
