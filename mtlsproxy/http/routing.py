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

    def match(self, host: bytes, target: bytes) -> tuple[RouteConfig, bytes] | None:
        """The route and the upstream target (path + query) for a request, or None."""
        path, sep, query = target.partition(b"?")
        if not path.startswith(b"/"):
            return None  # absolute-form and "*" targets are not routed
        hostname = host.split(b":", 1)[0].lower().decode("latin-1") if host else ""
        spath = path.decode("latin-1")
        for route in self.routes:
            if route.host is not None and route.host != hostname:
                continue
            prefix = route.path_prefix
            if prefix != "/" and not (spath == prefix or spath.startswith(prefix + "/")):
                continue
            rest = spath[len(prefix):] if route.strip_prefix and prefix != "/" else spath
            if not rest.startswith("/"):
                rest = "/" + rest
            new_path = (route.upstream.base_path + rest).encode("latin-1")
            return route, new_path + sep + query
        return None

    def __repr__(self) -> str:
        return f"<Router routes={[r.name for r in self.routes]}>"
