r"""Host, then longest path prefix -> route; pure.

Rules of this module:
- The target it is given is already normalised (http/normalize.py): the path routed is the
  path forwarded.
- A route with a matching ``host`` wins over every route without one, whatever the prefix
  lengths (the virtual host first, as nginx's ``server_name`` and Envoy's
  ``virtual_hosts``); among routes of the same kind the longest prefix wins. A request
  whose host has routes but none whose prefix matches falls through to the routes without
  a host.
- Hosts compare without case, without the port and without one trailing dot
  (``API.example.com.:8443`` is ``api.example.com``; RFC 9110 section 4.2.3 and RFC 1034
  section 3.1: the trailing dot names the same host).
- A prefix matches on a path-segment boundary (``/api`` matches ``/api`` and ``/api/x``,
  never ``/apix``), like a gateway's base path mapping.
- Routes match the path as the most lenient upstream reads it (``normalize.routing_view``:
  no case, no path parameters, no empty segments, and with ``escaped_slashes: keep`` the
  encoded slashes as ``/``): ``/PAY``, ``/pay;x``, ``/;x/pay``, ``//pay``
  (``merge_slashes: false``) and ``/x%2F..%2Fpay`` (``keep``) are ``/pay`` to some
  upstream, so they meet ``/pay``'s rules here. The path is forwarded as normalised.
"""

from __future__ import annotations

from mtlsproxy.config import RouteConfig
from mtlsproxy.http.normalize import routing_view, under_prefix


def route_host(host: bytes) -> str:
    """A Host value as routes compare it: lower-case, no port, no trailing dot."""
    if host[:1] == b"[":  # an IPv6 literal: its colons are not a port
        end = host.find(b"]")
        name = host[:end + 1] if end > 0 else host
    else:
        name = host.split(b":", 1)[0]
    if name[-1:] == b".":
        name = name[:-1]
    return name.lower().decode("latin-1")


def _after_segments(path: bytes, count: int) -> bytes:
    """What follows the first ``count`` non-empty segments of ``path`` (strip_prefix)."""
    segments = path.split(b"/")[1:]
    seen = 0
    for i, segment in enumerate(segments):
        if segment.split(b";", 1)[0]:
            seen += 1
            if seen == count:
                return b"/" + b"/".join(segments[i + 1:])
    return b"/"


class DomainNames:
    """Which of a listener's domains a name (an SNI name, a Host) belongs to; pure.

    An exact name before a wildcard; ``*.example.com`` matches one label, as in a
    certificate (RFC 6125 section 6.4.3): ``a.example.com``, not ``example.com`` nor
    ``a.b.example.com``. Names arrive lower-case without a trailing dot (tls/client_hello.py,
    ``route_host``)."""

    __slots__ = ("_exact", "_wildcard")

    def __init__(self, domains: tuple[tuple[str, ...], ...]) -> None:
        self._exact: dict[str, int] = {}
        self._wildcard: dict[str, int] = {}
        for index, names in enumerate(domains):
            for name in names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], index)
                else:
                    self._exact.setdefault(name, index)

    def index(self, name: str | None) -> int | None:
        """The domain's index, or None when no domain names it."""
        if not name or not (self._exact or self._wildcard) or name[0] == "." or ".." in name:
            return None  # an empty label matches no name (RFC 6125 section 6.4.3)
        index = self._exact.get(name)
        if index is None and "." in name:
            index = self._wildcard.get(name.split(".", 1)[1])
        return index


class Router:
    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        # Host-specific routes before every host-agnostic one; longest prefix first within.
        self.routes = sorted(routes, key=lambda r: (r.host is None, -len(r.path_prefix)))
        self._has_hosts = any(r.host is not None for r in routes)
        # The usual sidecar: one catch-all route that forwards the target as it came.
        only = self.routes[0] if len(self.routes) == 1 else None
        self._catch_all = only if (only is not None and only.path_prefix == "/"
                                   and only.host is None and not only.upstream.base_path) \
            else None
        # Matched as bytes (latin-1, as the target arrives), so a request decodes nothing.
        self._compiled = [(r, r.host, r.path_prefix.lower().encode("latin-1"),
                           r.strip_prefix and r.path_prefix != "/",
                           r.upstream.base_path.encode("latin-1"))
                          for r in self.routes]

    def match(self, host: bytes, target: bytes) -> tuple[RouteConfig, bytes] | None:
        """The route and the upstream target (path + query) for a request, or None."""
        if not target.startswith(b"/"):
            return None  # "*" (the parser turns absolute-form into origin-form)
        if self._catch_all is not None:
            return self._catch_all, target
        path, sep, query = target.partition(b"?")
        hostname = route_host(host) if self._has_hosts and host else ""
        matched = routing_view(path)
        for route, host_of_route, prefix, strip, base in self._compiled:
            if host_of_route is not None and host_of_route != hostname:
                continue
            if prefix != b"/" and not under_prefix(matched, prefix):
                continue
            if not strip and not base:
                return route, target  # the common catch-all: the target as it came
            if not strip:
                rest = path
            else:  # the prefix's segments go, whatever case or parameters they carried
                rest = _after_segments(path, prefix.count(b"/"))
            if not rest.startswith(b"/"):
                rest = b"/" + rest
            return route, base + rest + sep + query
        return None

    def __repr__(self) -> str:
        return f"<Router routes={[r.name for r in self.routes]}>"
