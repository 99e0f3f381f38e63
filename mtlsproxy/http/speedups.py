"""The optional compiled pieces of the HTTP layer, or None for each when not built.

``pip install`` builds ``_speedups`` when a C compiler is there (setup.py); without one,
or with ``MTLSPROXY_PURE=1`` in the environment when the process starts, every caller
takes its pure-Python path, with the same behaviour (tests/unit/test_compiled_head.py;
CI runs the suite both ways).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from mtlsproxy.http import header_rules
from mtlsproxy.http.events import Headers

# (method, target, headers, Host value, Connection values or None, Expect: 100-continue)
SplitHead = Callable[
    [bytes], "tuple[bytes, bytes, Headers, bytes, list[bytes] | None, bool] | None"]
# (status, reason, headers, Connection values or None, Content-Length, where the body starts)
SplitResponse = Callable[
    [bytes], "tuple[int, bytes, Headers, list[bytes] | None, int, int] | None"]
# method, target, headers, plain names, actions, expect_continue, client address, the
# certificate lines, the framing line -> the whole upstream head (wire._upstream_head) and
# whether it kept an X-Request-Id line
UpstreamHead = Callable[[bytes, bytes, Headers, set[bytes], dict[bytes, int], bool, bytes,
                         bytes, bytes], "tuple[bytes, bool] | None"]

# headers, names to drop -> the kept header lines (wire.client_response_head)
KeptLines = Callable[[Headers, frozenset[bytes]], "bytes | None"]

split_request_head: SplitHead | None = None
may_need_normalising: Callable[[bytes], bool] | None = None
kept_lines: KeptLines | None = None
split_response_head: SplitResponse | None = None
upstream_head: UpstreamHead | None = None
if os.environ.get("MTLSPROXY_PURE", "") in ("", "0"):
    try:
        from mtlsproxy.http import _speedups
    except ImportError:  # not built: pure Python
        pass
    else:
        # The compiled loop knows header_rules' actions by number: only while they agree.
        # And all or nothing: a module built from an older _speedups.pyx (an in-place build
        # left beside the sources for another interpreter) lacks names or has another
        # API, and is not used.
        if getattr(_speedups, "API", 1) == 2 and getattr(_speedups, "ACTIONS", None) == (
                header_rules.KEEP, header_rules.DROP, header_rules.XFF, header_rules.HOST,
                header_rules.EXPECT, header_rules.FORWARDED) and all(
                hasattr(_speedups, name) for name in (
                    "split_request_head", "split_response_head", "upstream_head",
                    "kept_lines", "may_need_normalising")):
            split_request_head = _speedups.split_request_head
            split_response_head = _speedups.split_response_head
            upstream_head = _speedups.upstream_head
            kept_lines = _speedups.kept_lines
            may_need_normalising = _speedups.may_need_normalising

COMPILED = split_request_head is not None
