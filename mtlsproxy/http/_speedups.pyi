from mtlsproxy.http.events import Headers

def split_request_head(
    data: bytes) -> tuple[bytes, bytes, Headers, bytes, list[bytes] | None, bool] | None: ...

ACTIONS: tuple[int, int, int, int, int, int]

def upstream_head(method: bytes, target: bytes, headers: Headers, plain: set[bytes],
                  actions: dict[bytes, int], expect_continue: bool, client_ip: bytes,
                  cert_block: bytes, framing: bytes) -> bytes | None: ...
