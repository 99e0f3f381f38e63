"""``http.normalize.routing_view``: the path as the most lenient upstream reads it, which
decides the route and the authorizer's policy (never forwarded). Each spelling below is
one a server reads as another path; the view must read it that way too, so the rules of
that path apply."""

from __future__ import annotations

import pytest

from mtlsproxy.http.normalize import PathError, normalize_path, routing_view


@pytest.mark.parametrize("path, view", [
    (b"/Admin/X", b"/admin/x"),  # Express, IIS, ASP.NET: no case
    (b"/admin;jsessionid=1/x", b"/admin/x"),  # Tomcat, Spring: path parameters
    (b"/public/..;/admin", b"/admin"),  # Tomcat: "..;" is ".."
    # Not climbed: nginx, Express and Tomcat keep "..%3B" a name (normalize_path refuses
    # it before routing: see below), and a view that climbs would let the wrong rule decide.
    (b"/admin/..%3B/public/x", b"/admin/..%3b/public/x"),
    (b"//admin//x", b"/admin/x"),  # merged slashes
    (b"/a%2fb\\c%5Cd", b"/a/b/c/d"),  # IIS reads escaped and back slashes as "/"
    (b"/admin./x", b"/admin/x"),  # Windows drops trailing dots ...
    (b"/admin%20/x", b"/admin/x"),  # ... and spaces
    (b"/admin::$DATA/x", b"/admin/x"),  # NTFS stream names
    (b"/orders/1/", b"/orders/1"),  # Express and Rails ignore a trailing slash
    (b"/orders/1.", b"/orders/1"),
    (b"/a/b/../c", b"/a/c"),
    (b"/", b"/"),
    (b"/pay.json", b"/pay.json"),  # a suffix is another resource name: kept
    (b"/v1.2/x", b"/v1.2/x"),
])
def test_the_routing_view_reads_a_path_as_lenient_servers_do(path: bytes,
                                                            view: bytes) -> None:
    assert routing_view(path) == view


@pytest.mark.parametrize("path", [b"/public/..;/admin", b"/public/..%3B/admin",
                                  b"/public/..%3b/admin", b"/public/%2e%2e%3B/admin",
                                  b"/a/.%3Bx/b", b"/a/.;x/b"])
def test_a_dot_segment_with_parameters_is_refused_even_encoded(path: bytes) -> None:
    # A server that decodes before it strips parameters reads "..%3B" as ".." (Spring's
    # StrictHttpFirewall refuses it for that reason).
    with pytest.raises(PathError):
        normalize_path(path)


def test_a_long_run_of_dots_costs_linear_time() -> None:
    # Each segment is read from its end once (it was a copy per dot: quadratic).
    assert routing_view(b"/a" + b"." * 30000 + b"/b") == b"/a/b"
    assert routing_view(b"/a" + b"%20." * 5000) == b"/a"
