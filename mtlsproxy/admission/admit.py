"""The one admission step: may this client make this request? Every protocol asks here.

Rules of this module:
- One decision point. The HTTP/1.1 fast path and general path call ``admit_now`` /
  ``admit`` and nothing else decides; an HTTP/2 stream, a WebSocket upgrade (a request like
  any other) and a TCP connection (its listener's route, no request) are to call the same,
  so no protocol can disagree about who may pass.
- The client's identity is the ``Verdict`` the TLS layer established (``handshake``); a
  request never adds to it.
- Order: the connection's verdict (decided again when the listener's generation changed
  since; its validity at the injected clock; OCSP when configured), then the route's
  ``allow`` rules, then its access token (admission/jwks.py), then its authorizer. The
  first refusal wins.
- Sans-IO apart from the two awaits a decision may need (the OCSP responder, the external
  authorizer): it counts nothing and writes nothing; the caller answers and counts the
  refusal (``Refusal.scope`` says how).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mtlsproxy.admission.authorizer import AuthorizerClient
from mtlsproxy.admission.cache import ValidationCache, Verdict
from mtlsproxy.admission.jwks import AccessTokens
from mtlsproxy.admission.rules import authorize
from mtlsproxy.admission.tokens import challenge
from mtlsproxy.admission.verify import anonymous, cached_verdict, refused
from mtlsproxy.config import MutualTLSConfig, RouteConfig
from mtlsproxy.http.parser import Request
from mtlsproxy.revocation.crl import RevocationState
from mtlsproxy.revocation.ocsp import OcspClient, reason_for
from mtlsproxy.truststore.bundle import TrustBundle


class Scope(enum.Enum):
    """What a refusal is about, which says how the caller answers and counts it."""

    CLIENT = "client"  # the certificate itself: every request is refused; close, count once
    ROUTE = "route"  # this route refuses this client: answer, keep the connection, count
    UNAVAILABLE = "unavailable"  # no decision could be had (authorizer down): 503, no count
    # The request's access token (401/403, or 503 without keys): answered with its
    # WWW-Authenticate; counted by mtlsproxy_access_tokens_total, not as a refusal of
    # the certificate.
    TOKEN = "token"


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # 403, or 503 for UNAVAILABLE
    reason: str  # the JSON body's and the metric's reason
    scope: Scope
    detail: str = ""  # for the log line: which rules did not match
    # Response headers of the refusal (WWW-Authenticate for a token, RFC 6750 section 3).
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Admitted:
    headers: tuple[tuple[bytes, bytes], ...] = ()  # the authorizer's, added upstream
    # Folded names a client's headers may not carry upstream on this route even when the
    # proxy sets none of them (a token without the claim that claims_to_headers names).
    strip: frozenset[bytes] = frozenset()


ADMITTED = Admitted()


class _Pending:
    """``admit_now`` cannot decide without an await (OCSP, the authorizer): use ``admit``."""

    __slots__ = ()


PENDING = _Pending()
Outcome = Admitted | Refusal


class Installed(Protocol):
    """The listener's current generation, as admission sees it."""

    @property
    def number(self) -> int: ...
    @property
    def bundle(self) -> TrustBundle | None: ...
    @property
    def revocation(self) -> RevocationState | None: ...


class Holder(Protocol):
    """Where the listener's current generation is read (server/generation.py)."""

    @property
    def current(self) -> Installed: ...


class Admission:
    """One listener's admission step. ``mutual_tls`` and ``ocsp`` are replaced by the
    listener when a reload changes them; the rest is fixed for the listener's life."""

    __slots__ = ("listener", "holder", "cache", "clock", "mutual_tls", "ocsp", "authorizer",
                 "on_cache", "tokens")

    def __init__(self, listener: str, holder: Holder, cache: ValidationCache,
                 clock: Callable[[], dt.datetime], mutual_tls: MutualTLSConfig,
                 authorizer: AuthorizerClient, on_cache: Callable[[bool], None],
                 ocsp: OcspClient | None = None, tokens: AccessTokens | None = None) -> None:
        self.listener = listener
        self.holder = holder  # read, never written: its owner swaps generations
        self.cache = cache
        self.clock = clock
        self.mutual_tls = mutual_tls
        self.authorizer = authorizer
        self.on_cache = on_cache  # a verdict cache hit (True) or miss
        self.ocsp = ocsp
        # Routes' access tokens; shared by the listener's domains (one key-set owner).
        self.tokens = tokens if tokens is not None else AccessTokens(lambda r, res: None)

    def __repr__(self) -> str:
        return f"<Admission {self.listener} ocsp={self.ocsp is not None}>"

    # -- the connection -----------------------------------------------------------------

    def handshake(self, gen: Installed, leaf_der: bytes | None,
                  chain: Callable[[], list[bytes] | None] | None) -> Verdict:
        """The verdict on what a handshake established, under ``gen`` (the generation whose
        contexts it used). ``chain``: the verified chain, asked for on a cache miss only."""
        if gen.bundle is None:
            return anonymous(gen.number)
        if leaf_der is None:
            return refused(gen.number, "no_client_certificate")
        verdict, hit = cached_verdict(self.cache, leaf_der, chain, gen.bundle, gen.number,
                                      self.mutual_tls, gen.revocation)
        self.on_cache(hit)
        return verdict

    def _recheck(self, old: Verdict) -> Verdict:
        """The generation changed since this verdict: decide it again."""
        gen = self.holder.current
        identity = old.identity
        if gen.bundle is None:
            return anonymous(gen.number)
        if identity is None:
            # Mutual TLS was turned on under a connection that never showed a certificate
            # (or was refused before one was read): it cannot be admitted now.
            return refused(gen.number, old.reason or "no_client_certificate")
        verdict, hit = cached_verdict(self.cache, identity.leaf_der, None, gen.bundle,
                                      gen.number, self.mutual_tls, gen.revocation)
        self.on_cache(hit)
        return verdict

    # -- the request --------------------------------------------------------------------

    def admit_now(self, verdict: Verdict, route: RouteConfig | None
                  ) -> tuple[Verdict, Outcome | _Pending]:
        """The decision, when it needs no await; PENDING otherwise. ``route`` None: the
        request matched no route, so only the client itself is judged. Returns the verdict
        to keep (decided again when the generation changed)."""
        if verdict.generation != self.holder.current.number:
            verdict = self._recheck(verdict)
        if not verdict.admits(self.clock()):
            reason = verdict.reason_at(self.clock())
            return verdict, Refusal(403, reason or "untrusted", Scope.CLIENT)
        if self.ocsp is not None and verdict.identity is not None:
            return verdict, PENDING
        if route is None or (route.allow is None and route.authorizer is None
                             and route.access_token is None):
            return verdict, ADMITTED  # the usual route: nothing more to decide, no call
        return verdict, self._route_now(verdict, route)

    def _route_now(self, verdict: Verdict, route: RouteConfig | None) -> Outcome | _Pending:
        if route is None:
            return ADMITTED
        if route.allow is not None:
            allowed = verdict.authz.get(route)
            if allowed is None:
                allowed = verdict.authz[route] = authorize(route.allow, verdict.identity)
            if not allowed:
                return Refusal(403, "unauthorized", Scope.ROUTE,
                               " | ".join(r.source for r in route.allow))
        if route.authorizer is not None or route.access_token is not None:
            return PENDING
        return ADMITTED

    async def still_admitted(self, verdict: Verdict, route: RouteConfig
                             ) -> tuple[Verdict, Refusal | None]:
        """For a connection admitted earlier and still open (a tunnel): the certificate
        (OCSP included) and the route's rules again; the Refusal, or None. The authorizer
        is not asked again: it decided the request that opened the tunnel (Envoy's
        ext_authz, too, judges a request, not the bytes after its upgrade)."""
        verdict, outcome = self.admit_now(verdict, route)
        if isinstance(outcome, Refusal):
            return verdict, outcome
        identity = verdict.identity
        if isinstance(outcome, _Pending) and self.ocsp is not None and identity is not None:
            answer = await self.ocsp.answer(identity)  # cached until its nextUpdate
            reason = reason_for(answer, self.mutual_tls.revocation.mode)
            if reason is not None:
                return verdict, Refusal(403, reason, Scope.CLIENT)
            outcome = self._route_now(verdict, route)
            if isinstance(outcome, Refusal):
                return verdict, outcome
        return verdict, None

    async def admit(self, verdict: Verdict, route: RouteConfig | None,
                    req: Request | None) -> tuple[Verdict, Outcome]:
        """The whole decision, awaiting OCSP and the authorizer when they are needed."""
        verdict, outcome = self.admit_now(verdict, route)
        if not isinstance(outcome, _Pending):
            return verdict, outcome
        identity = verdict.identity
        if self.ocsp is not None and identity is not None:
            answer = await self.ocsp.answer(identity)  # cached until its nextUpdate
            reason = reason_for(answer, self.mutual_tls.revocation.mode)
            if reason is not None:
                return verdict, Refusal(403, reason, Scope.CLIENT)
            outcome = self._route_now(verdict, route)
            if not isinstance(outcome, _Pending):
                return verdict, outcome
        assert route is not None
        if identity is None or req is None:
            # Fail closed: nothing to authorize (no certificate), or nothing to show.
            return verdict, Refusal(403, "unauthorized", Scope.ROUTE)
        added: tuple[tuple[bytes, bytes], ...] = ()
        strip: frozenset[bytes] = frozenset()
        token = route.access_token
        if token is not None:
            checked = await self.tokens.check(token, route.name, req.headers, identity,
                                              req.target)
            if not checked.ok and (checked.result != "missing" or token.required):
                if checked.result == "jwks_unavailable":
                    return verdict, Refusal(503, checked.result, Scope.TOKEN,
                                            checked.description)
                status, www = challenge(checked)
                return verdict, Refusal(status, checked.result, Scope.TOKEN,
                                        checked.description, ((b"www-authenticate", www),))
            added = checked.headers
            strip = token.protected
        if route.authorizer is None:
            return verdict, Admitted(added, strip)
        decision = await self.authorizer.decide(route.authorizer, identity, req, route.name,
                                                self.listener, verdict.generation, route)
        if decision.allow:
            if added or strip:
                return verdict, Admitted(decision.headers + added, strip)
            return verdict, Admitted(decision.headers) if decision.headers else ADMITTED
        if decision.result == "deny":
            return verdict, Refusal(403, "unauthorized", Scope.ROUTE)
        return verdict, Refusal(503, "authorizer_unavailable", Scope.UNAVAILABLE)
