"""Reading ``routes[].access_token`` (RFC 8705 certificate-bound access tokens)."""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlsplit

from mtlsproxy.config.model import (
    ASYMMETRIC_ALGORITHMS,
    SYMMETRIC_ALGORITHMS,
    AccessTokenConfig,
)
from mtlsproxy.config.reader import Reader
from mtlsproxy.config.values import parse_s3_uri
from mtlsproxy.identity.headers import fold, is_identity_header

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Names whose meaning the proxy owns: framing, hop-by-hop (RFC 9110 section 7.6.1),
# routing, the forwarded chain. A claim may not be written into them (the authorizer's
# headers have the same rule). Spelled here: loading a config imports no HTTP module.
_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "authorization",
                       "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                       "forwarded", "x-real-ip", "x-request-id", "cookie", "connection",
                       "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                       "proxy-authenticate", "proxy-authorization"})
KEYS = ("jwks_uri", "issuer", "audiences", "algorithms", "leeway", "required",
        "require_binding", "scopes", "claims_to_headers", "min_refresh", "refresh_interval",
        "timeout", "jwks_ca_file")


def _strings(r: Reader, data: dict[str, Any], key: str, path: str,
             default: list[str]) -> tuple[str, ...]:
    values = r.get(data, key, path, list, default)
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v:
            r.problem(f"{path}.{key}[{i}]", "must be a non-empty string")
            continue
        out.append(v)
    return tuple(out)


def _finite_positive(value: float) -> str | None:
    return None if 0 < value < math.inf else "must be a finite number greater than 0"


def _protected(name: str) -> str | None:
    folded = fold(name.encode())
    if is_identity_header(folded):
        return "is a certificate-identity header name (set only from the TLS layer)"
    if folded.decode() in _RESERVED:
        return f"{name!r} is a header the proxy sets or forwards itself"
    return None


def read_access_token(r: Reader, raw: Any, path: str) -> AccessTokenConfig | None:
    if not isinstance(raw, dict):
        # "access_token:" with nothing (or mis-indented keys) must not leave a route open.
        r.problem(path, f"must be a mapping, got {type(raw).__name__}")
        return None
    data = r.mapping(raw, path, KEYS)
    ok = all(r.required(data, key, path) for key in ("jwks_uri", "issuer", "audiences"))
    uri = str(data.get("jwks_uri") or "")
    if uri:
        parts = urlsplit(uri)
        if parts.scheme in ("https", "s3"):
            uri = parts.scheme + uri[len(parts.scheme):]  # "HTTPS://" as "https://"
        if parts.scheme == "https":
            if not parts.hostname:
                r.problem(f"{path}.jwks_uri", "an https:// URL needs a host")
        elif parts.scheme == "s3":
            try:
                parse_s3_uri(uri)
            except ValueError as exc:
                r.problem(f"{path}.jwks_uri", str(exc))
        elif parts.scheme in ("", "file"):
            source = r.resolve(parts.path if parts.scheme == "file" else uri)
            if not source.is_file():
                r.problem(f"{path}.jwks_uri", f"no such file: {source}")
            uri = str(source)
        else:
            # A key set fetched in clear text could be replaced on the way: every token
            # would then verify. RFC 8414 section 2 requires https for jwks_uri.
            r.problem(f"{path}.jwks_uri", "must be an https:// URL, a file or an s3:// URI")
    issuer = r.get(data, "issuer", path, str, "")
    audiences = _strings(r, data, "audiences", path, [])
    if "audiences" in data and not audiences:
        r.problem(f"{path}.audiences", "must list at least one audience")
    algorithms = _strings(r, data, "algorithms", path, list(ASYMMETRIC_ALGORITHMS))
    if "algorithms" in data and not algorithms:
        r.problem(f"{path}.algorithms", "must list at least one algorithm")
    for i, alg in enumerate(algorithms):
        if alg.lower() == "none":
            r.problem(f"{path}.algorithms[{i}]", "'none' is never accepted (RFC 8725 "
                                                 "section 3.1)")
        elif alg not in ASYMMETRIC_ALGORITHMS + SYMMETRIC_ALGORITHMS:
            r.problem(f"{path}.algorithms[{i}]", f"unknown algorithm {alg!r} (allowed: "
                      f"{', '.join(ASYMMETRIC_ALGORITHMS + SYMMETRIC_ALGORITHMS)})")
    claims: list[tuple[str, str]] = []
    mapping = r.get(data, "claims_to_headers", path, dict, {})
    names: set[str] = set()
    for claim, header in mapping.items():
        where = f"{path}.claims_to_headers.{claim}"
        if not isinstance(header, str) or not _HEADER_NAME.match(header) or "_" in header:
            r.problem(where, "must be a header name (letters, digits, '-'; no '_')")
            continue
        if header.lower() in names:
            r.problem(where, f"{header!r} is already the header of another claim")
            continue
        names.add(header.lower())
        reason = _protected(header)
        if reason:
            r.problem(where, reason)
            continue
        claims.append((str(claim), header))
    ca_file = r.file(data, "jwks_ca_file", path) if data.get("jwks_ca_file") else None
    if ca_file is not None and not uri.startswith("https://"):
        r.problem(f"{path}.jwks_ca_file", "applies to an https:// jwks_uri only")
    if not ok:
        return None
    return AccessTokenConfig(
        jwks_uri=uri,
        issuer=issuer,
        audiences=audiences,
        algorithms=tuple(a for a in algorithms if a.lower() != "none"),
        leeway=r.get(data, "leeway", path, float, 60.0,
                     lambda v: None if 0 <= v < math.inf else "must be a finite 0 or more"),
        required=r.get(data, "required", path, bool, True),
        require_binding=r.get(data, "require_binding", path, bool, True),
        scopes=_strings(r, data, "scopes", path, []),
        claims_to_headers=tuple(claims),
        min_refresh=r.get(data, "min_refresh", path, float, 30.0, _finite_positive),
        refresh_interval=r.get(data, "refresh_interval", path, float, 300.0, _finite_positive),
        timeout=r.get(data, "timeout", path, float, 5.0, _finite_positive),
        jwks_ca_file=ca_file,
    )
