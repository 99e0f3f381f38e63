"""Certificate-bound access tokens (``routes[].access_token``): the check, sans-IO.

A JWT from ``Authorization: Bearer`` (RFC 6750 section 2.1) is verified against the
route's JWKS and bound to the certificate of the connection (RFC 8705 section 3: the
``cnf`` claim's ``x5t#S256`` is the base64url SHA-256 thumbprint of the certificate's DER).

Rules of this module:
- Order: the header, the signature (an algorithm of the route's list, never ``none``; the
  key by ``kid``), then time (``exp`` required, ``nbf``, ``iat``, with ``leeway``, at the
  injected clock), ``iss`` (exact), ``aud`` (one of the route's), the binding, the scopes.
  The first failure decides; its result is the metric's label (reasons.ACCESS_TOKEN_RESULTS).
- A bound token is checked whatever ``require_binding`` says: a token bound to another
  certificate is never admitted (RFC 8705 section 3). The comparison is constant-time.
- Time claims are checked here, not by PyJWT, so that the clock is the one injected.
- The token itself never reaches a log line, a metric or an error description.
- Verified tokens are remembered per (route config, key set version, token hash, leaf
  fingerprint) until their ``exp``; bounded. Only successes are remembered; a new key
  set (a key removed at the issuer) re-verifies every token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import jwt

from mtlsproxy.config.model import AccessTokenConfig
from mtlsproxy.http.events import Headers
from mtlsproxy.identity.headers import safe_value

# RFC 6750 section 2.1: credentials = "Bearer" 1*SP b64token. The scheme is
# case-insensitive (RFC 9110 section 11.1).
_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)")
MAX_TOKEN_BYTES = 16384  # far above any real JWT; a bound on the work per request


@dataclass(frozen=True, slots=True)
class Checked:
    """What the check made of a request's token."""

    result: str  # reasons.ACCESS_TOKEN_RESULTS
    description: str = ""  # short, for error_description and the JSON body; no token
    headers: tuple[tuple[bytes, bytes], ...] = ()  # claims_to_headers, for the upstream
    expires: float = 0.0  # exp, for the cache

    @property
    def ok(self) -> bool:
        return self.result == "valid"


MISSING = Checked("missing", "no bearer token")
QUERY_TOKEN = Checked("bad_signature", "token in the URI query not accepted")


class UnknownKey(Exception):
    """The token names a key the JWKS does not hold: worth one refresh of the set."""


def bearer_token(headers: Headers) -> bytes | None | Checked:
    """The request's bearer token; None when it sends none (no Authorization header, or
    another scheme); a failed Checked when the header cannot be read as one."""
    found: bytes | None = None
    for name, value in headers:
        if name != b"authorization":
            continue
        if found is not None:
            return Checked("bad_signature", "more than one Authorization header")
        found = value
    if found is None:
        return None
    if found[:6].lower() != b"bearer":
        return None  # another scheme (Basic, ...): no bearer token
    # Anything that starts like one is read as one, or refused: "Bearer\t<token>" must
    # not pass as "no token" to an upstream that splits on any whitespace.
    m = _BEARER.fullmatch(found)
    if m is None or len(m.group(1)) > MAX_TOKEN_BYTES:
        return Checked("bad_signature", "malformed bearer token")
    return m.group(1)


# RFC 6750 section 2.3: the token as a URI query parameter. Not accepted here (it ends up
# in logs and Referer headers, as the RFC warns), refused on token routes, and never
# written to the access log. Parameter names are compared as frameworks read them:
# percent-decoded ("access%5Ftoken") and without case.
_QUERY_NAME = b"access_token"


def _query_parts(target: bytes) -> tuple[bytes, list[bytes]]:
    path, _, query = target.partition(b"?")
    return path, re.split(rb"([&;])", query)


def _is_token_name(part: bytes) -> bool:
    name = part.split(b"=", 1)[0]
    if b"%" in name or b"+" in name:
        name = unquote_to_bytes(name.replace(b"+", b" "))
    return name.strip().lower() == _QUERY_NAME


def query_token(target: bytes) -> bool:
    """True when the request target carries an ``access_token`` query parameter."""
    if b"?" not in target:
        return False
    _, parts = _query_parts(target)
    return any(_is_token_name(p) for p in parts[::2])


def redact_query(target: bytes) -> bytes:
    """``target`` with any ``access_token`` query value replaced (for logs)."""
    if b"?" not in target or (b"%" not in target and b"access_token" not in target.lower()):
        return target
    path, parts = _query_parts(target)
    for i in range(0, len(parts), 2):
        if _is_token_name(parts[i]):
            parts[i] = parts[i].split(b"=", 1)[0] + b"=REDACTED"
    return path + b"?" + b"".join(parts)


def thumbprint(leaf_der: bytes) -> bytes:
    """RFC 8705 section 3.1: base64url (no padding) of the SHA-256 of the DER."""
    return base64.urlsafe_b64encode(hashlib.sha256(leaf_der).digest()).rstrip(b"=")


def _claim_value(value: Any) -> bytes | None:
    if isinstance(value, bool) or value is None:
        return None if value is None else (b"true" if value else b"false")
    if isinstance(value, str):
        return safe_value(value)
    if isinstance(value, int | float):
        return safe_value(json.dumps(value))
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return safe_value(",".join(value))
    return safe_value(json.dumps(value, separators=(",", ":"), sort_keys=True))


def _scopes(claims: Mapping[str, Any]) -> set[str]:
    # RFC 9068 section 2.2.3 / RFC 8693 section 4.2: "scope", space-separated; Azure AD
    # and others send "scp" (a string or a list).
    granted: set[str] = set()
    for key in ("scope", "scp"):
        value = claims.get(key)
        if isinstance(value, str):
            granted.update(value.split())
        elif isinstance(value, list):
            granted.update(v for v in value if isinstance(v, str))
    return granted


def _number(value: Any) -> float | None:
    """A finite NumericDate (RFC 7519 section 2); None for anything else (JSON as Python
    reads it takes NaN, Infinity and 1e400)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def verify(token: bytes, keys: Callable[[str | None, str], Any], cfg: AccessTokenConfig,
           leaf_der: bytes, now: float) -> Checked:
    """Check ``token`` for a client whose certificate is ``leaf_der``, at ``now`` (Unix
    time). ``keys(kid, alg)``: the verification key; raises UnknownKey when the JWKS has
    none for ``kid``."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return Checked("bad_signature", "malformed token")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none" or alg not in cfg.algorithms:
        return Checked("bad_signature", "algorithm not accepted")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return Checked("bad_signature", "malformed token")
    key = keys(kid, alg)  # UnknownKey goes to the caller (a refresh, then again)
    try:
        claims = jwt.decode(
            token, key=key, algorithms=[alg],
            options={"verify_signature": True, "verify_exp": False, "verify_nbf": False,
                     "verify_iat": False, "verify_aud": False, "verify_iss": False,
                     "verify_sub": False, "verify_jti": False, "require": []})
    except jwt.InvalidSignatureError:
        return Checked("bad_signature", "signature does not verify")
    except (jwt.PyJWTError, TypeError, ValueError):
        # A key of the wrong type for the algorithm, or a body that is not a JSON object.
        return Checked("bad_signature", "signature does not verify")
    if not isinstance(claims, dict):
        return Checked("bad_signature", "malformed token")
    leeway = cfg.leeway
    exp = _number(claims.get("exp"))
    if exp is None:
        return Checked("expired", "no exp claim")  # RFC 9068 section 2.2: required
    if now > exp + leeway:
        return Checked("expired", "token expired")
    for claim, problem in (("nbf", "token not valid yet"),
                           ("iat", "token issued in the future")):
        value = claims.get(claim)
        if value is not None:
            number = _number(value)
            if number is None or now + leeway < number:
                return Checked("expired", problem)
    # Exact comparison: PyJWT before 2.10.1 matched an issuer by substring (CVE-2024-53861).
    if claims.get("iss") != cfg.issuer:
        return Checked("wrong_issuer", "issuer not accepted")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(isinstance(a, str) and a in cfg.audiences for a in audiences):
        return Checked("wrong_audience", "audience not accepted")
    if "cnf" not in claims:
        if cfg.require_binding:
            return Checked("unbound", "token not bound to a certificate")
    else:
        # A confirmation is there: the token is sender-constrained (RFC 7800). Only an
        # x5t#S256 that matches this connection's certificate satisfies it; any other
        # shape (a DPoP jkt, a list, null) is a binding the proxy cannot check, refused
        # whatever require_binding says.
        cnf = claims["cnf"]
        bound = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
        if not isinstance(bound, str) or not hmac.compare_digest(
                bound.encode("ascii", "replace"), thumbprint(leaf_der)):
            return Checked("binding_mismatch", "token bound to another certificate")
    if cfg.scopes and not set(cfg.scopes) <= _scopes(claims):
        return Checked("insufficient_scope", "token lacks a required scope")
    headers = []
    for claim, name in cfg.claims_to_headers:
        value = _claim_value(claims.get(claim))
        if value is not None:
            headers.append((name.encode(), value))
    return Checked("valid", headers=tuple(headers), expires=exp)


CacheKey = tuple[AccessTokenConfig, int, bytes, str]


class TokenCache:
    """Verified tokens until their ``exp``: (config, token hash, leaf fingerprint) ->
    Checked. Bounded; emptied when full (tokens expire: the cache refills with live ones).
    One owner: the listener's AccessTokens."""

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int = 10000) -> None:
        self._entries: dict[CacheKey, Checked] = {}
        self._size = size

    def get(self, key: CacheKey, now: float) -> Checked | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if now > hit.expires:
            del self._entries[key]
            return None
        return hit

    def put(self, key: CacheKey, checked: Checked) -> None:
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[key] = checked

    def __len__(self) -> int:
        return len(self._entries)


def cache_key(cfg: AccessTokenConfig, keys_version: int, token: bytes,
              fingerprint: str) -> CacheKey:
    """``keys_version``: of the key set the token was verified with (KeySets.version)."""
    return cfg, keys_version, hashlib.sha256(token).digest(), fingerprint


def challenge(checked: Checked) -> tuple[int, bytes]:
    """(status, WWW-Authenticate value) for a failed check (RFC 6750 section 3)."""
    if checked.result == "missing":
        # Section 3.1: a request without credentials gets no error code.
        return 401, b'Bearer realm="mtlsproxy"'
    if checked.result == "insufficient_scope":
        return 403, (b'Bearer realm="mtlsproxy", error="insufficient_scope", '
                     b'error_description="' + checked.description.encode() + b'"')
    return 401, (b'Bearer realm="mtlsproxy", error="invalid_token", '
                 b'error_description="' + checked.description.encode() + b'"')
