"""The optional compiled pieces of the HTTP layer, or None for each when not built.

``pip install`` builds ``_speedups`` when a C compiler is there (setup.py); without one,
or with ``MTLSPROXY_PURE=1`` in the environment when the process starts, every caller
takes its pure-Python path, with the same behaviour (tests/unit/test_compiled_head.py;
CI runs the suite both ways).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from mtlsproxy.http.events import Headers

SplitHead = Callable[[bytes], "tuple[bytes, bytes, Headers] | None"]

split_request_head: SplitHead | None = None
if os.environ.get("MTLSPROXY_PURE", "") in ("", "0"):
    try:
        from mtlsproxy.http._speedups import split_request_head
    except ImportError:  # not built: pure Python
        split_request_head = None

COMPILED = split_request_head is not None
