from mtlsproxy.http.events import Headers

def split_request_head(
    data: bytes) -> tuple[bytes, bytes, Headers, bytes, list[bytes] | None, bool] | None: ...

def split_response_head(
    data: bytes) -> tuple[int, bytes, Headers, list[bytes] | None, int, int] | None: ...

ACTIONS: tuple[int, int, int, int, int, int]
API: int

def upstream_head(method: bytes, target: bytes, headers: Headers, plain: set[bytes],
                  actions: dict[bytes, int], expect_continue: bool, client_ip: bytes,
                  cert_block: bytes, framing: bytes) -> tuple[bytes, bool] | None: ...

def kept_lines(headers: Headers, drop: frozenset[bytes]) -> bytes | None: ...

def may_need_normalising(target: bytes) -> bool: ...
