"""The keys access tokens are verified with, and the step that checks a request's token.

Rules of this module:
- One ``KeySets`` per listener owns every JWKS its routes name, one entry per URI. A set is
  fetched when first needed, again every ``refresh_interval`` (on use), and at most once
  per ``min_refresh`` when a token names a ``kid`` the set does not hold (a key rotated in
  at the issuer). Concurrent needs share one fetch.
- A fetch that fails, or brings no usable key, never replaces a good set (the truststore's
  rule): the old keys stay in use and the failure is logged. With no set ever fetched,
  requests get ``jwks_unavailable`` (503): fail closed, and say why.
- Fetching is blocking I/O (a file, S3 through boto3, https through urllib): it runs on a
  thread, under ``timeout``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt

from mtlsproxy.admission.tokens import (
    MISSING,
    QUERY_TOKEN,
    Checked,
    TokenCache,
    UnknownKey,
    bearer_token,
    cache_key,
    query_token,
    verify,
)
from mtlsproxy.config.model import AccessTokenConfig
from mtlsproxy.errors import TruststoreError
from mtlsproxy.http.events import Headers
from mtlsproxy.identity.peer import ClientIdentity
from mtlsproxy.truststore.sources import HttpSource, Source, make_source

log = logging.getLogger("mtlsproxy")

Fetch = Callable[[AccessTokenConfig], bytes]


MAX_JWKS_BYTES = 1024 * 1024


def fetch_jwks(cfg: AccessTokenConfig) -> bytes:
    """The JWKS document at ``cfg.jwks_uri`` (blocking)."""
    source: Source
    if cfg.jwks_uri.startswith("https://"):
        context = ssl.create_default_context(
            cafile=str(cfg.jwks_ca_file) if cfg.jwks_ca_file else None)
        # Fetched from exactly the URL configured: a redirect (to http://, where the keys
        # could be replaced on the way, or anywhere else) is a failed fetch.
        source = HttpSource(cfg.jwks_uri, cfg.timeout, context, follow_redirects=False,
                            limit=MAX_JWKS_BYTES + 1)
    else:
        source = make_source(cfg.jwks_uri)
    fetched = source.check(None)
    assert fetched is not None  # no current version: always fetched
    if len(fetched.data) > MAX_JWKS_BYTES:
        raise ValueError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
    return fetched.data


def parse_jwks(data: bytes) -> dict[str | None, list[jwt.PyJWK]]:
    """Signing keys by kid (None: keys without one); ValueError when none is usable."""
    try:
        keyset = jwt.PyJWKSet.from_json(data.decode("utf-8"))
    except (jwt.PyJWTError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a usable JWKS: {exc}") from None
    keys: dict[str | None, list[jwt.PyJWK]] = {}
    for key in keyset.keys:
        use = key._jwk_data.get("use")
        if use not in (None, "sig"):
            continue  # RFC 7517 section 4.2: an encryption key verifies nothing
        keys.setdefault(key.key_id, []).append(key)
    if not keys:
        raise ValueError("not a usable JWKS: no signing key")
    return keys


@dataclass
class _KeySet:
    keys: dict[str | None, list[jwt.PyJWK]] | None = None
    fetched: float = float("-inf")  # the last fetch that succeeded
    attempted: float = float("-inf")  # the last fetch started
    forced: float = float("-inf")  # the last fetch an unknown kid started
    digest: bytes = b""  # of the document the keys came from
    # Counts the key sets taken that differ from the one before: verified tokens are
    # remembered under it, so a key removed at the issuer stops admitting its tokens.
    version: int = 0
    inflight: asyncio.Task[None] | None = field(default=None, repr=False)


class KeySets:
    def __init__(self, fetch: Fetch = fetch_jwks,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._clock = clock
        self._sets: dict[str, _KeySet] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # background refreshes, held

    def _state(self, cfg: AccessTokenConfig) -> _KeySet:
        state = self._sets.get(cfg.jwks_uri)
        if state is None:
            state = self._sets[cfg.jwks_uri] = _KeySet()
        return state

    def version(self, cfg: AccessTokenConfig) -> int:
        """The version of the keys held for ``cfg`` (0: none yet)."""
        state = self._sets.get(cfg.jwks_uri)
        return state.version if state is not None else 0

    async def keys(self, cfg: AccessTokenConfig,
                   unknown_kid: bool = False) -> dict[str | None, list[jwt.PyJWK]] | None:
        """The current keys (fetched first when none are held, when they are older than
        ``refresh_interval``, or, with ``unknown_kid``, when the last fetch is older than
        ``min_refresh``); None when no set could ever be fetched."""
        state = self._state(cfg)
        now = self._clock()
        if unknown_kid and now - state.forced >= cfg.min_refresh:
            state.forced = now
            await self._join(self._start(cfg, state))
        elif state.keys is None:
            if state.inflight is not None:
                await self._join(state.inflight)
            elif now - state.attempted >= min(cfg.min_refresh, 1.0):
                await self._join(self._start(cfg, state))
        elif (state.inflight is None and now - state.fetched >= cfg.refresh_interval
              and now - state.attempted >= cfg.min_refresh):
            # Keys held: the periodic refresh runs beside the requests, which keep using
            # them meanwhile (no request waits for a routine fetch).
            self._start(cfg, state)
        return state.keys

    @staticmethod
    async def _join(task: asyncio.Task[None]) -> None:
        # Shielded: a request that goes away (a client's disconnect, an RST_STREAM) must
        # not cancel the fetch every other request is waiting for.
        await asyncio.shield(task)

    def _start(self, cfg: AccessTokenConfig, state: _KeySet) -> asyncio.Task[None]:
        """The fetch in flight for ``state``, started when there is none: a task these key
        sets own, so no request's cancellation reaches it."""
        if state.inflight is not None:
            return state.inflight
        state.attempted = self._clock()
        task = asyncio.get_running_loop().create_task(self._refresh(cfg, state))
        state.inflight = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _refresh(self, cfg: AccessTokenConfig, state: _KeySet) -> None:
        try:
            async with asyncio.timeout(cfg.timeout):
                data = await asyncio.to_thread(self._fetch, cfg)
            keys = parse_jwks(data)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the keys held
            if not isinstance(exc, TruststoreError | ValueError | OSError | TimeoutError):
                log.exception("unexpected JWKS fetch failure")
            log.warning("JWKS fetch failed; the keys held stay in use", extra={"fields": {
                "event": "jwks_fetch_failed", "jwks_uri": cfg.jwks_uri,
                "error": str(exc)[:300], "keys_held": state.keys is not None}})
        else:
            digest = hashlib.sha256(data).digest()
            if digest != state.digest:
                state.digest = digest
                state.version += 1
            state.keys = keys
            state.fetched = self._clock()
        finally:
            state.inflight = None


def _pick(keys: dict[str | None, list[jwt.PyJWK]], kid: str | None, alg: str) -> Any:
    """The key for (kid, alg): a token without kid may use the set's only key."""
    if kid is None:
        candidates = [k for ks in keys.values() for k in ks]
        if len(candidates) != 1:
            raise UnknownKey()
    else:
        candidates = keys.get(kid, [])
        if not candidates:
            raise UnknownKey()
    for key in candidates:
        # RFC 7517 section 4.4: a key that names its algorithm is for that one only.
        named = key._jwk_data.get("alg")
        if named is None or named == alg:
            return key.key
    raise UnknownKey()


class AccessTokens:
    """The access-token step of admission for one listener: key sets, the verified-token
    cache, and the count of every result (``count(route, result)``)."""

    def __init__(self, count: Callable[[str, str], None], keysets: KeySets | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.count = count
        self.keysets = keysets or KeySets()
        self.cache = TokenCache()
        self.clock = clock  # Unix time, for exp/nbf/iat

    async def check(self, cfg: AccessTokenConfig, route: str, headers: Headers,
                    identity: ClientIdentity, target: bytes = b"") -> Checked:
        checked = await self._check(cfg, headers, identity, target)
        self.count(route, checked.result)
        return checked

    async def _check(self, cfg: AccessTokenConfig, headers: Headers,
                     identity: ClientIdentity, target: bytes) -> Checked:
        if query_token(target):
            # RFC 6750 section 2.3: not taken from the query; refused rather than passed
            # on, so that an upstream reading it there never gets an unchecked token.
            return QUERY_TOKEN
        token = bearer_token(headers)
        if token is None:
            return MISSING  # admitted when the route's token is not required (admit.py)
        if isinstance(token, Checked):
            return token
        now = self.clock()
        key = cache_key(cfg, self.keysets.version(cfg), token, identity.fingerprint_sha256)
        hit = self.cache.get(key, now)
        if hit is not None:
            return hit
        keys = await self.keysets.keys(cfg)
        if keys is None:
            return Checked("jwks_unavailable", "signing keys unavailable")
        try:
            checked = verify(token, lambda kid, alg: _pick(keys, kid, alg), cfg,
                             identity.leaf_der, now)
        except UnknownKey:
            fresh = await self.keysets.keys(cfg, unknown_kid=True)
            try:
                checked = verify(token, lambda kid, alg: _pick(fresh or {}, kid, alg), cfg,
                                 identity.leaf_der, now)
            except UnknownKey:
                checked = Checked("bad_signature", "unknown signing key")
        if checked.ok:
            self.cache.put(key, checked)
        return checked
