"""The thin HTTP wrapper that lets mtlsproxy call an API Gateway Lambda authorizer: each
POST body is the event, handler.lambda_handler's return value is the answer. Standard
library only.

    ORDER_CLIENTS='CN=billing-1,O=Example Corp' python app.py --port 9000

Listen on loopback (or a network only mtlsproxy reaches): whoever can POST here can ask
for a policy. A handler that raises (the ``raise Exception("Unauthorized")`` idiom
included) is answered 500, which mtlsproxy treats as a failure: refused under
``failure_mode: closed``.
"""

from __future__ import annotations

import argparse
import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from handler import lambda_handler

MAX_EVENT = 1 << 20  # bytes; an event is a few KiB (a certificate and some headers)
log = logging.getLogger("apigateway-authorizer")


class AuthorizerRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            length = int(self.headers.get("content-length", ""))
        except ValueError:
            self.answer(411, {"message": "content-length required"})
            return
        if not 0 <= length <= MAX_EVENT:
            self.answer(413, {"message": "event too large"})
            return
        try:
            event = json.loads(self.rfile.read(length))
            if not isinstance(event, dict):
                raise ValueError("the event must be an object")
        except ValueError:
            self.answer(400, {"message": "not a JSON event"})
            return
        try:
            result = lambda_handler(event, None)
        except Exception:  # the handler's refusal or bug: never a policy
            log.exception("the authorizer handler failed")
            self.answer(500, {"message": "authorizer error"})
            return
        self.answer(200, result)

    def answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug(format, *args)


def make_server(host: str = "127.0.0.1", port: int = 9000) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), AuthorizerRequestHandler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    make_server(args.host, args.port).serve_forever()


if __name__ == "__main__":
    main()
