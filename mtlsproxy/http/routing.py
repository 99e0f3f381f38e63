"""Host + longest path prefix -> route; pure.

A prefix matches on a path-segment boundary (``/api`` matches ``/api`` and ``/api/x``,
never ``/apix``), like a gateway's base path mapping. Among equal prefixes a route with
a matching ``host`` wins over one without.
"""

from __future__ import annotations

from mtlsproxy.config import RouteConfig


class Router:
    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        # Longest prefix first; host-specific before host-agnostic at equal length.
        self.routes = sorted(routes, key=lambda r: (-len(r.path_prefix), r.host is None))
        # Matched as bytes (latin-1, as the target arrives), so a request decodes nothing.
        self._compiled = [(r, r.host, r.path_prefix.encode("latin-1"),
                           r.path_prefix.encode("latin-1") + b"/",
                           r.strip_prefix and r.path_prefix != "/",
                           r.upstream.base_path.encode("latin-1"))
                          for r in self.routes]

    def match(self, host: bytes, target: bytes) -> tuple[RouteConfig, bytes] | None:
        """The route and the upstream target (path + query) for a request, or None."""
        if not target.startswith(b"/"):
            return None  # "*" (the parser turns absolute-form into origin-form)
        path, sep, query = target.partition(b"?")
        hostname: str | None = None
        for route, route_host, prefix, prefix_slash, strip, base in self._compiled:
            if route_host is not None:
                if hostname is None:
                    hostname = host.split(b":", 1)[0].lower().decode("latin-1") if host else ""
                if route_host != hostname:
                    continue
            if prefix != b"/" and not (path == prefix or path.startswith(prefix_slash)):
                continue
            if not strip and not base:
                return route, target  # the common catch-all: the target as it came
            rest = path[len(prefix):] if strip else path
            if not rest.startswith(b"/"):
                rest = b"/" + rest
            return route, base + rest + sep + query
        return None

    def __repr__(self) -> str:
        return f"<Router routes={[r.name for r in self.routes]}>"
