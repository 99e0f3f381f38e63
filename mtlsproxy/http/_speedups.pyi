from mtlsproxy.http.events import Headers

def split_request_head(data: bytes) -> tuple[bytes, bytes, Headers] | None: ...

ACTIONS: tuple[int, int, int, int, int, int]

def header_lines(headers: Headers, plain: set[bytes], actions: dict[bytes, int],
                 expect_continue: bool) -> tuple[bytes, bytes, bytes, bytes] | None: ...
