"""What both authorizer formats read from an answer (authorizer.py, apigateway.py)."""

from __future__ import annotations

import json
import re
from typing import Any

# A header name (RFC 9110 section 5.6.2 token). \Z, not $: "$" also matches before a
# final newline ("X-Tenant\n" is no header name).
HEADER_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_answer(body: bytes) -> Any:
    """An answer's JSON. NaN and Infinity are refused (RFC 8259 section 6 has neither;
    Python's parser takes them): ValueError, as for any malformed answer."""
    return json.loads(body, parse_constant=_refuse_constant)
