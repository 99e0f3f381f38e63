"""Request path normalisation before routing, rules and the authorizer; pure.

Rules of this module:
- What is routed, authorized and forwarded is one path: the normalised one. An upstream
  that normalises on its own (most do) then serves exactly what was authorized, however
  the client spelled it (``/x/../pay``, ``/./pay``, ``/%70ay``, ``//pay`` all are ``/pay``).
- RFC 3986 section 6.2.2: percent-encodings of unreserved characters are decoded (6.2.2.2),
  the hex digits of the others upper-cased (6.2.2.1), dot-segments removed (6.2.2.3,
  section 5.2.4). A ``..`` that would climb above the root is refused (400), not clamped:
  no client needs it, and a clamp would hide a probe.
- Slashes are merged by default (``merge_slashes``, Envoy's option of that name): most
  upstreams read ``//pay`` as ``/pay``. Leading ones always are: ``//x/pay`` is the host
  ``x`` and the path ``/pay`` to a URL parser.
- An encoded ``/`` or ``\\`` (``%2F``, ``%5C``), a raw ``\\`` and an encoded NUL follow
  ``escaped_slashes`` (Envoy's ``path_with_escaped_slashes_action``): ``reject`` (default,
  400), ``keep`` (forwarded as they came, hex upper-cased; the route sees one segment), or
  ``unescape`` (``/`` for all three slashes; a NUL is still refused: it cannot be sent).
- A dot-segment with path parameters (``..;x``, ``.;``) is refused: Tomcat and Spring strip
  the parameters and then climb (the ``/public/..;/admin`` bypass).
- A malformed percent-encoding (``%zz``, a lone ``%``) is refused: upstreams disagree on it.
- A fragment (``#``) anywhere in the target is refused.
- The query string is left alone.
"""

from __future__ import annotations

from mtlsproxy.errors import RemoteProtocolError

ESCAPED_SLASH_ACTIONS = ("reject", "keep", "unescape")

# RFC 3986 section 2.3: ALPHA / DIGIT / "-" / "." / "_" / "~".
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SLASHES = (0x2F, 0x5C)  # "/" and "\"


class PathError(RemoteProtocolError):
    """A path the proxy will not route (400); ``reason`` names why, for the client."""

    reason = "bad_path"


def may_need_normalising(target: bytes) -> bool:
    """Whether ``normalize_target`` may change or refuse ``target``: False for the usual
    target (nothing to normalise). Compiled in http/_speedups.pyx, which the proxy uses
    when it is built (proxy/session.py)."""
    # ``find``, not ``in``: CPython's bytes ``__contains__`` first tries its operand as an
    # integer and builds (then drops) a TypeError with a formatted message before it
    # searches (Objects/bytes_methods.c, _Py_bytes_contains), several times the search's
    # cost; this runs on every request.
    find = target.find
    return (find(b"%") >= 0 or find(b"/.") >= 0 or find(b"//") >= 0 or find(b"\\") >= 0
            or find(b"#") >= 0)


def _needs_work(path: bytes, merge_slashes: bool) -> bool:
    # The common path has none of these: four C-level searches, no Python loop.
    return (b"%" in path or b"/." in path or b"\\" in path
            or (merge_slashes and b"//" in path))


def normalize_target(target: bytes, merge_slashes: bool = True,
                     escaped_slashes: str = "reject") -> bytes:
    """The request target with its path normalised (the query kept as it came).

    ``*`` (OPTIONS) passes. Raises PathError (400) for what must not be routed."""
    if target[:1] != b"/":
        return target
    if b"#" in target:
        # RFC 9112 section 3.2: no fragment in a request target; an upstream that cuts it
        # off would serve "/pay" for "/pay#x", which routed as another segment (Envoy
        # refuses it too).
        raise PathError("fragment in the request target")
    path, sep, query = target.partition(b"?")
    if not _needs_work(path, merge_slashes):
        return target
    return normalize_path(path, merge_slashes, escaped_slashes) + sep + query


def normalize_path(path: bytes, merge_slashes: bool = True,
                   escaped_slashes: str = "reject") -> bytes:
    """An absolute path (starting with ``/``), normalised; see the module's rules."""
    decoded = _percent(path, escaped_slashes)
    segments = decoded.split(b"/")
    out: list[bytes] = []
    trailing = False  # the input ended in a directory ("/a/", "/a/.", "/a/..")
    last = len(segments) - 1
    for i, seg in enumerate(segments[1:], 1):
        trailing = False
        if seg == b".":
            trailing = True
            continue
        if seg == b"..":
            if not out:
                raise PathError("path climbs above the root")
            out.pop()
            trailing = True
            continue
        if seg[:1] == b"." and (seg.split(b";", 1)[0] in (b".", b"..")
                                or seg.split(b"%3B", 1)[0] in (b".", b"..")):
            # Also with the ";" encoded: a server that decodes before it strips
            # parameters reads "..%3B" as ".." (Spring's StrictHttpFirewall refuses it).
            raise PathError("dot-segment with path parameters")
        if not seg:
            if i == last:
                trailing = True
                continue
            if merge_slashes or not out:
                # A path that starts with "//" reads as a network-path reference ("//host/
                # path", RFC 3986 section 4.2) to WHATWG URL parsers and urlsplit: never.
                continue
        out.append(seg)
    result = b"/" + b"/".join(out)
    if trailing and out:
        result += b"/"
    return result


def _percent(path: bytes, escaped_slashes: str) -> bytes:
    """Decode unreserved percent-encodings, upper-case the rest; apply escaped_slashes."""
    if b"\\" in path:
        if escaped_slashes == "reject":
            raise PathError("backslash in the path")
        if escaped_slashes == "unescape":
            path = path.replace(b"\\", b"/")
    if b"%" not in path:
        return path
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c != 0x25:  # "%"
            out.append(c)
            i += 1
            continue
        if i + 2 >= n or path[i + 1] not in _HEX or path[i + 2] not in _HEX:
            raise PathError("malformed percent-encoding in the path")
        byte = int(path[i + 1:i + 3], 16)
        if byte in _UNRESERVED:
            out.append(byte)
        elif byte in _SLASHES or byte == 0:
            if escaped_slashes == "reject" or (byte == 0 and escaped_slashes == "unescape"):
                raise PathError("encoded slash, backslash or NUL in the path")
            if escaped_slashes == "unescape":
                out.append(0x2F)
            else:
                out += b"%%%02X" % byte
        else:
            out += b"%%%02X" % byte
        i += 3
    return bytes(out)


def needs_routing_view(path: bytes) -> bool:
    """Whether ``routing_view`` could differ from the lower-cased path."""
    return (b";" in path or b"//" in path or b"\\" in path or b"%2f" in path
            or b"%5c" in path or b"./" in path or b"%20" in path
            or b":" in path or path.endswith((b"/", b".")) and len(path) > 1)


def _windows_name(name: bytes) -> bytes:
    """A segment as Windows and IIS read it: an NTFS stream name ("name::$DATA" is the file
    "name") and trailing dots and spaces dropped. One pass from the end (a long run of dots
    costs linear time)."""
    name = name.split(b"::$", 1)[0]
    end = len(name)
    while end:
        if name[end - 1] == 0x2E:  # "."
            end -= 1
        elif end >= 3 and name[end - 3:end] == b"%20":
            end -= 3
        else:
            break
    return name[:end]


def routing_view(path: bytes) -> bytes:
    """A normalised path as the most lenient upstream reads it, for deciding which rules
    apply (routes, authorizer policies); never forwarded. Lower-cased (Express, IIS and
    ASP.NET match without case), path parameters dropped (Tomcat and Spring strip
    ``;...``), empty segments dropped (most servers merge slashes), ``\\``, ``%2F`` and
    ``%5C`` read as ``/`` (IIS; what ``escaped_slashes: keep`` forwards), trailing dots,
    spaces and ``::$DATA`` stream names dropped from each segment (Windows and IIS:
    ``/admin./`` and ``/admin%20/`` are ``/admin/``), a trailing ``/``
    dropped (Express and Rails ignore it), and the dot-segments that makes resolved
    (``..;`` is ``..`` to Tomcat)."""
    path = path.lower()
    if not needs_routing_view(path):
        return path
    path = path.replace(b"\\", b"/").replace(b"%2f", b"/").replace(b"%5c", b"/")
    # "%3B" is not read as ";" here: a view that climbs where the upstream does not would
    # let a rule for the climbed-to path decide (nginx, Express and Tomcat keep "..%3B" a
    # name). normalize_path refuses a dot-segment followed by "%3B" instead.
    kept: list[bytes] = []
    for segment in path.split(b"/"):
        name = segment.split(b";", 1)[0]
        if name not in (b"..", b"."):
            name = _windows_name(name)
        if name == b"..":
            if kept:
                kept.pop()
        elif name and name != b".":
            kept.append(name)
    return b"/" + b"/".join(kept)


def under_prefix(view: bytes, prefix: bytes) -> bool:
    """``view`` (a ``routing_view``) is ``prefix`` (lower-case, no trailing ``/``) or below
    it, on a path-segment boundary: ``/api`` takes ``/api`` and ``/api/x``, not ``/apix``."""
    return (prefix == b"/" or view == prefix or view.startswith(prefix)
            and view[len(prefix):len(prefix) + 1] == b"/")

