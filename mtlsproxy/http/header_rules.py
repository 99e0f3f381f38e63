"""What a listener does with each request header a client sends; pure.

Rules of this module:
- A backend does not see header names as the proxy does: WSGI, CGI, PHP and Rails fold
  ``-`` and ``_`` together and ignore case (``Client_Cert`` is ``HTTP_CLIENT_CERT``, the
  same variable as the real ``Client-Cert``). So every comparison here is on the FOLDED
  name (``identity.headers.fold``), and a name with ``_`` is never forwarded when its
  folded form is one the proxy owns (identity, forwarding, framing).
- ``headers_with_underscores`` (Envoy's ``headers_with_underscores_action``; nginx's
  ``underscores_in_headers off`` drops them too): ``drop`` (default) removes every name
  with ``_``, ``reject`` answers 400, ``allow`` forwards them unless their folded name is
  one the proxy owns.
- Identity comes only from the TLS layer: every certificate-identity family of common
  proxies, load balancers and application servers (``identity.headers``), the
  ``X-Authorizer-*`` an API Gateway format authorizer's answer sets, and the operator's
  ``strip_headers`` are removed, in every spelling; so are the headers that make
  a backend serve another path or method than the one authorized (``_OVERRIDE``).
- ``forwarded_headers``: ``append`` (the default, for a sidecar behind a trusted hop) keeps
  a client's X-Forwarded-For / Forwarded chain and appends the peer the proxy saw, so the
  last element is always the proxy's; ``replace`` (an edge facing clients directly) drops
  what the client said - X-Forwarded-*, Forwarded and the client-address headers
  (X-Real-IP and friends) - and states only the peer. X-Forwarded-Proto and
  X-Forwarded-Host are always the proxy's own.
- Actions are memoised per listener by the name as it arrived (bounded: clients choose
  names); the memo holds pure functions of the name and this listener's settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.identity.headers import fold, is_identity_header
from mtlsproxy.reasons import HEADER_DROP_REASONS

# RFC 9110 section 7.6.1 (Connection) and the de-facto hop-by-hop list proxies strip.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})

# The actions, by (lower-case) name. DROP is silent (framing, or a header the proxy sets
# itself); the three DROP_* are counted in mtlsproxy_headers_dropped_total by reason.
(KEEP, DROP, XFF, HOST, EXPECT, FORWARDED, DROP_UNDERSCORE, DROP_IDENTITY, DROP_STRIP,
 DROP_OVERRIDE) = range(10)
DROP_REASONS = dict(zip((DROP_UNDERSCORE, DROP_IDENTITY, DROP_STRIP, DROP_OVERRIDE),
                        HEADER_DROP_REASONS, strict=True))

# Headers that make a backend serve another path or method than the request line's: IIS
# URL Rewrite, Laminas and older Symfony read X-Original-URL / X-Rewrite-URL; Express's
# method-override, ASP.NET and many frameworks read X-HTTP-Method-Override. The route,
# its rules and the authorizer decided on the request line: what the upstream serves
# must be that (the nginx-ingress X-Original-URL advisories).
_OVERRIDE = frozenset({
    b"x-original-url", b"x-rewrite-url", b"x-original-uri", b"x-http-method-override",
    b"x-http-method", b"x-method-override", b"x-original-method",
})

# What an API Gateway format authorizer's principal and context go upstream as
# (admission/apigateway.py): a client's, in any spelling, on any route, are forgeries.
_AUTHORIZER_CONTEXT = b"x-authorizer-"

_SET_BY_PROXY = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"content-length"})
# Headers that name the client's address, read by applications and frameworks in place of
# X-Forwarded-For (nginx's X-Real-IP, Akamai's True-Client-IP, Cloudflare's
# CF-Connecting-IP, ...). Under ``replace`` a client's are dropped with X-Forwarded-*.
_CLIENT_ADDRESS = frozenset({
    b"x-real-ip", b"x-client-ip", b"true-client-ip", b"x-cluster-client-ip", b"client-ip",
    b"cf-connecting-ip", b"fastly-client-ip", b"x-envoy-external-address",
    b"x-original-forwarded-for", b"x-forwarded", b"forwarded-for", b"x-originating-ip",
    b"x-remote-ip", b"x-remote-addr", b"wl-proxy-client-ip", b"x-proxyuser-ip",
})

_MEMO_LIMIT = 1024


class UnderscoreRejected(RemoteProtocolError):
    """``headers_with_underscores: reject``: 400, never forwarded."""

    reason = "header_with_underscores"


class HeaderRules:
    """One listener's header settings, and the action for each name it has seen."""

    __slots__ = ("underscores", "rejects_underscores", "strip_exact", "strip_prefixes",
                 "forwarded", "actions", "plain", "on_drop")

    def __init__(self, underscores: str = "drop", strip: tuple[str, ...] = (),
                 forwarded: str = "append",
                 on_drop: Callable[[str], None] | None = None) -> None:
        self.underscores = underscores
        self.rejects_underscores = underscores == "reject"  # read on every request
        patterns = [fold(s.encode("latin-1")) for s in strip]
        self.strip_exact = frozenset(p for p in patterns if not p.endswith(b"*"))
        self.strip_prefixes = tuple(p[:-1] for p in patterns if p.endswith(b"*"))
        self.forwarded = forwarded
        # Memoised actions by name as it arrived, and the names simply forwarded (a set
        # test is all most headers cost on the hot path).
        self.actions: dict[bytes, int] = {}
        self.plain: set[bytes] = set()
        self.on_drop = on_drop  # counts a DROP_* by reason (the listener's metric)

    def __repr__(self) -> str:
        return (f"<HeaderRules underscores={self.underscores} forwarded={self.forwarded} "
                f"strip={sorted(self.strip_exact)}+{list(self.strip_prefixes)}>")

    def action(self, name: bytes) -> int:
        action = self.actions.get(name)
        if action is None:
            action = self._decide(name)
            if len(self.actions) < _MEMO_LIMIT:
                self.actions[name] = action
                if action == KEEP:
                    self.plain.add(name)
        return action

    def _decide(self, name: bytes) -> int:
        if name in HOP_BY_HOP:
            return DROP
        folded = fold(name)
        if folded != name.lower() and self.underscores != "allow":
            return DROP_UNDERSCORE  # "reject" was answered before; here it is only dropped
        if is_identity_header(folded) or folded.startswith(_AUTHORIZER_CONTEXT):
            return DROP_IDENTITY
        if folded in self.strip_exact or (self.strip_prefixes
                                          and folded.startswith(self.strip_prefixes)):
            return DROP_STRIP
        if folded in _OVERRIDE:
            return DROP_OVERRIDE
        action = self._by_folded(folded)
        if action != KEEP and folded != name:
            # "X_Forwarded_For", "Content_Length" under allow: the backend would read it as
            # the proxy's own header; only the real spelling is the proxy's.
            return DROP_UNDERSCORE
        return action

    def _by_folded(self, folded: bytes) -> int:
        if folded in HOP_BY_HOP or folded in _SET_BY_PROXY:
            return DROP
        if folded == b"x-forwarded-for":
            return XFF if self.forwarded == "append" else DROP
        if folded == b"forwarded":
            return FORWARDED if self.forwarded == "append" else DROP
        if self.forwarded == "replace" and (folded in _CLIENT_ADDRESS
                                            or folded.startswith(b"x-forwarded-")):
            return DROP
        if folded == b"host":
            return HOST
        if folded == b"expect":
            return EXPECT
        return KEEP

    def underscore_header(self, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """The first header name with ``_`` (``reject`` answers 400 for it), or None."""
        for name, _ in headers:
            if b"_" in name:
                return name
        return None

    def count(self, action: int) -> None:
        if self.on_drop is not None:
            self.on_drop(DROP_REASONS[action])


DEFAULT_RULES = HeaderRules()


# RFC 7239 section 4: Forwarded = 1#forwarded-element; forwarded-element =
# [ forwarded-pair ] *( ";" [ forwarded-pair ] ); forwarded-pair = token "=" value;
# value = token / quoted-string. A client's list that does not parse is not appended to:
# an unclosed quote would swallow the element the proxy appends.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_PAIR = rb"(?:" + _TOKEN + rb"=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))"
_ELEMENT = rb"(?:" + _PAIR + rb")?(?:[ \t]*;[ \t]*(?:" + _PAIR + rb")?)*"
_FORWARDED_LIST = re.compile(rb"[ \t]*" + _ELEMENT + rb"(?:[ \t]*,[ \t]*" + _ELEMENT
                             + rb")*[ \t]*")
_TOKEN_ONLY = re.compile(_TOKEN)


def valid_forwarded(value: bytes) -> bool:
    return _FORWARDED_LIST.fullmatch(value) is not None


def forwarded_element(client_ip: str, host: bytes) -> bytes:
    """``for=...;host=...;proto=https`` (RFC 7239 sections 4, 5.2, 6: an IPv6 node is
    bracketed and quoted; a host with a port or other non-token bytes is quoted)."""
    node = f'"[{client_ip}]"' if ":" in client_ip else client_ip
    if _TOKEN_ONLY.fullmatch(host):
        quoted_host = host
    else:
        quoted_host = b'"' + host.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"for=" + node.encode() + b";host=" + quoted_host + b";proto=https"
