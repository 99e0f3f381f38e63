"""A blocking mTLS GET with the standard library (what ``demo`` uses to prove it works)."""

from __future__ import annotations

import http.client
import ssl

from mtlsproxy.dev.pki import DevPKI


def mtls_get(host: str, port: int, path: str, pki: DevPKI,
             timeout: float = 10.0) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(pki.root_cert))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    # The server certificate names localhost and 127.0.0.1; SNI carries "localhost".
    conn._tunnel_host = None  # type: ignore[attr-defined]
    try:
        conn.request("GET", path, headers={"Host": "localhost"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
