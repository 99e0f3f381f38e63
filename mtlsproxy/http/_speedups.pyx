# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The heads' split and the upstream head, compiled: the common head in one C pass instead
of llhttp's per-header callbacks into Python (issue 26). Optional: ``llhttp_parser.py`` uses it when
this module was built, and parses with llhttp otherwise (docs/performance.md).

Rules of this module:
- It accepts a strict subset of what llhttp accepts, and for that subset returns exactly
  what llhttp's callbacks collect: the method, the target, and each header as (lower-case
  name, value without surrounding SP/HTAB). Anything else returns None, and the caller
  parses the same bytes with llhttp: declining is always safe, accepting is the claim the
  differential tests (tests/unit/test_compiled_head.py) hold it to.
- Accepted: exactly one whole head and nothing after it; "METHOD SP target SP HTTP/1.1"
  with an upper-case method and an origin-form target of RFC 3986 characters (no "#");
  header lines of a token, ":", and a non-empty value of visible ASCII, SP and HTAB;
  CRLF line ends only; exactly one Host header. Never: obs-fold, bare CR or LF, obs-text
  or control bytes, an empty name or value, no Host or two, or the framing, upgrade and
  Proxy-Connection headers (Content-Length, Transfer-Encoding, Upgrade,
  Proxy-Connection), which stay llhttp's.
- With the head, the split returns what ``checks.make_request`` would scan the headers
  for (the Host value, the Connection values, Expect: 100-continue), so that
  ``checks.request_from_split`` makes the same Request without another pass.
- ``split_response_head`` does the same for an upstream's response, under the same rules,
  when the read is one whole response with a Content-Length body and nothing after it
  (llhttp_parser.py: "the compiled split").
- ``upstream_head`` writes the whole upstream head ``wire._upstream_head`` writes, for
  the requests its docstring names, in one buffer.
- Pure: no state, nothing kept between calls.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_GET_SIZE, PyBytes_AS_STRING
from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.set cimport PySet_Contains
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy

cdef unsigned char TOKEN[256]
cdef unsigned char VALUE[256]
cdef unsigned char TARGET[256]
cdef unsigned char LOWER[256]


cdef void _tables():
    cdef int c
    for c in range(256):
        TOKEN[c] = 0
        VALUE[c] = 0
        TARGET[c] = 0
        LOWER[c] = c + 32 if 65 <= c <= 90 else c
    # RFC 9110 section 5.6.2: tchar.
    for c in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        TOKEN[c] = 1
    # RFC 9110 section 5.5: field-vchar and SP/HTAB; obs-text (0x80-0xFF) is llhttp's call.
    for c in range(0x21, 0x7F):
        VALUE[c] = 1
    VALUE[0x20] = 1
    VALUE[0x09] = 1
    # RFC 3986 section 2: unreserved, sub-delims, ":", "@", "/", "?" and "%".
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%":
        TARGET[c] = 1


_tables()

# Lower-case names of the headers whose checks stay with llhttp: the framing headers, and
# the two llhttp reads for the connection's fate (Proxy-Connection as Connection: after
# "Proxy-Connection: close" llhttp refuses more bytes; the seam's checks do not read it).
cdef bytes _CL = b"content-length"
cdef bytes _TE = b"transfer-encoding"
cdef bytes _UP = b"upgrade"
cdef bytes _PC = b"proxy-connection"


cdef bytes _HOST = b"host"
cdef bytes _CONNECTION = b"connection"
cdef bytes _EXPECT = b"expect"


cdef bint _is_continue(const unsigned char* v, Py_ssize_t n):
    """``v`` is "100-continue" in any case (make_request: value.strip().lower(); the
    value has no surrounding SP/HTAB here, and no other byte ``strip`` removes)."""
    cdef const char* want = b"100-continue"
    cdef Py_ssize_t k
    if n != 12:
        return False
    for k in range(12):
        if LOWER[v[k]] != <unsigned char> want[k]:
            return False
    return True


# SWAR (SIMD within a register; Sean Anderson's "Bit Twiddling Hacks", "Determine if a word
# has a byte less than n" and "... greater than n"): 8 bytes tested at once. A word with
# none below SP and none above "~" is 8 bytes of VALUE; any other word (HTAB, the CR that
# ends the line, obs-text, a control byte) is read byte by byte, against the table.
cdef uint64_t _ONES = 0x0101010101010101ULL
cdef uint64_t _HIGHS = 0x8080808080808080ULL


cdef inline Py_ssize_t _value_end(const unsigned char* p, Py_ssize_t n,
                                  Py_ssize_t i) noexcept:
    """The offset of the first byte from ``i`` that is not in VALUE (``n`` when none)."""
    cdef uint64_t w
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        if ((w - _ONES * 0x20) & ~w & _HIGHS) or (((w + _ONES * (127 - 0x7E)) | w) & _HIGHS):
            break
        i += 8
    while i < n and VALUE[p[i]]:
        i += 1
    return i


cdef inline Py_ssize_t _field(const unsigned char* p, Py_ssize_t n, Py_ssize_t i,
                              Py_ssize_t* at) noexcept:
    """The header line at ``i``, of the subset both splits take: a token, ":", and a
    non-empty value of visible ASCII, SP and HTAB, then CRLF. Its name's bounds into
    ``at[0]``, ``at[1]``, its value's without surrounding SP/HTAB into ``at[2]``,
    ``at[3]``; the offset after its CRLF, or -1 when the line is not of the subset."""
    cdef Py_ssize_t start = i, vstart, vend
    while i < n and TOKEN[p[i]]:
        i += 1
    if i == start or i >= n or p[i] != 58:  # a token, then ":"
        return -1
    at[0] = start
    at[1] = i
    i += 1
    while i < n and (p[i] == 32 or p[i] == 9):
        i += 1
    vstart = i
    i = _value_end(p, n, i)
    if i + 1 >= n or p[i] != 13 or p[i + 1] != 10:
        return -1
    vend = i
    while vend > vstart and (p[vend - 1] == 32 or p[vend - 1] == 9):
        vend -= 1
    if vend == vstart:
        return -1  # an empty value: llhttp's call
    at[2] = vstart
    at[3] = vend
    return i + 2


cdef inline bytes _lower(const unsigned char* p, Py_ssize_t n):
    """A new bytes object of ``p``'s ``n`` bytes, lower-case: written in place before
    anything else sees it (the C API allows this for a fresh object)."""
    cdef Py_ssize_t k
    name = PyBytes_FromStringAndSize(NULL, n)
    cdef char* out = PyBytes_AS_STRING(name)
    for k in range(n):
        out[k] = <char> LOWER[p[k]]
    return name


# The names most requests and responses carry (browsers', API clients', tracing's, servers'),
# lower-case, one object each: a header of one of them gets the object itself instead of a
# new one. The name then costs no allocation, and its hash, computed once, is reused by
# every set and dict look-up of it (the listener's rules, the checks). _KNOWN[n]: those of
# n bytes.
_NAMES = (
    b"host", b"user-agent", b"accept", b"accept-encoding", b"accept-language", b"cookie",
    b"authorization", b"traceparent", b"tracestate", b"baggage", b"x-request-id",
    b"content-type", b"content-length", b"connection", b"referer", b"origin",
    b"cache-control", b"pragma", b"if-none-match", b"if-modified-since", b"x-forwarded-for",
    b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip", b"forwarded", b"expect",
    b"sec-fetch-site", b"sec-fetch-mode", b"sec-fetch-dest", b"sec-ch-ua",
    b"sec-ch-ua-mobile", b"sec-ch-ua-platform", b"upgrade-insecure-requests", b"dnt",
    b"priority", b"te", b"range", b"x-api-key", b"x-correlation-id", b"keep-alive",
    b"date", b"server", b"set-cookie", b"etag", b"last-modified", b"vary", b"expires",
    b"location", b"content-encoding", b"strict-transport-security", b"x-content-type-options",
    b"x-frame-options", b"access-control-allow-origin", b"age", b"via", b"grpc-status",
)
cdef Py_ssize_t _LONGEST = 48
cdef list _KNOWN = [[] for _ in range(_LONGEST + 1)]
for _known_name in _NAMES:
    (<list> _KNOWN[len(_known_name)]).append(_known_name)


cdef inline bytes _name(const unsigned char* p, Py_ssize_t n):
    """``_lower(p, n)``, or the same bytes from ``_NAMES`` when it is one of them."""
    cdef unsigned char buf[48]
    cdef Py_ssize_t k
    if n > _LONGEST:
        return _lower(p, n)
    for k in range(n):
        buf[k] = LOWER[p[k]]
    for known in <list> _KNOWN[n]:
        if memcmp(PyBytes_AS_STRING(<bytes> known), buf, n) == 0:
            return <bytes> known
    return PyBytes_FromStringAndSize(<const char*> buf, n)


def split_request_head(bytes data not None):
    """(method, target, headers, host, connection, expect) of ``data`` when it is one
    whole head of the accepted subset (see the module's rules); None otherwise.
    ``connection``: the Connection headers' values in order, or None when there is none;
    ``expect``: an Expect header says 100-continue."""
    cdef const unsigned char* p = <const unsigned char*> PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i = 0, start
    cdef Py_ssize_t at[4]
    cdef int hosts = 0
    cdef bint expect = False
    host = b""
    connection = None
    if n < 18 or p[n - 1] != 10 or p[n - 2] != 13 or p[n - 3] != 10 or p[n - 4] != 13:
        return None
    # The method: upper-case letters.
    while i < n and 65 <= p[i] <= 90:
        i += 1
    if i == 0 or i >= n or p[i] != 32:
        return None
    method = PyBytes_FromStringAndSize(<const char*> p, i)
    i += 1
    start = i
    if i >= n or p[i] != 47:  # "/": origin-form only
        return None
    while i < n and TARGET[p[i]]:
        i += 1
    if i >= n or p[i] != 32:
        return None
    target = PyBytes_FromStringAndSize(<const char*> p + start, i - start)
    i += 1
    if n - i < 10 or p[i] != 72 or p[i + 1] != 84 or p[i + 2] != 84 or p[i + 3] != 80 \
            or p[i + 4] != 47 or p[i + 5] != 49 or p[i + 6] != 46 or p[i + 7] != 49 \
            or p[i + 8] != 13 or p[i + 9] != 10:  # "HTTP/1.1\r\n"
        return None
    i += 10
    headers = []
    while True:
        if i + 1 >= n:
            return None
        if p[i] == 13:
            # The blank line: it must end the data (one head, nothing after it).
            if p[i + 1] == 10 and i + 2 == n and hosts == 1:
                return method, target, headers, host, connection, expect
            return None
        i = _field(p, n, i, at)
        if i < 0:
            return None
        name = _name(p + at[0], at[1] - at[0])
        if name == _CL or name == _TE or name == _UP or name == _PC:
            return None
        value = PyBytes_FromStringAndSize(<const char*> p + at[2], at[3] - at[2])
        headers.append((name, value))
        if name == _HOST:
            hosts += 1
            host = value
        elif name == _CONNECTION:
            if connection is None:
                connection = [value]
            else:
                connection.append(value)
        elif name == _EXPECT and not expect:
            expect = _is_continue(p + at[2], at[3] - at[2])


# -- the response head's split ----------------------------------------------------------

cdef bytes _STATUS_PREFIX = b"HTTP/1.1 "


cdef Py_ssize_t _digits(const unsigned char* v, Py_ssize_t n):
    """The value of ``v`` when it is 1 to 18 ASCII digits (checks._framing's rule for
    Content-Length); -1 otherwise."""
    cdef Py_ssize_t k, value = 0
    if n < 1 or n > 18:
        return -1
    for k in range(n):
        if not 48 <= v[k] <= 57:
            return -1
        value = value * 10 + (v[k] - 48)
    return value


def split_response_head(bytes data not None):
    """(status, reason, headers, connection, length, end) of ``data`` when it is one whole
    response of the accepted subset and nothing after it: "HTTP/1.1 SP 3DIGIT SP reason
    CRLF" with a status 200-599 other than 204 and 304 and a reason of visible ASCII and
    SP; header lines as split_request_head takes them (``_field``); exactly one Content-Length of 1 to
    18 digits, and exactly that many body bytes after the head (``end``: where they
    start). ``connection``: the Connection values in order, or None. Never
    Transfer-Encoding, Upgrade or Proxy-Connection. None otherwise: llhttp parses it."""
    cdef const unsigned char* p = <const unsigned char*> PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i, length = -1
    cdef Py_ssize_t at[4]
    cdef int status
    connection = None
    if n < 17 or memcmp(p, PyBytes_AS_STRING(_STATUS_PREFIX), 9) != 0:
        return None
    if not (48 <= p[9] <= 57 and 48 <= p[10] <= 57 and 48 <= p[11] <= 57) or p[12] != 32:
        return None
    status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
    if status < 200 or status > 599 or status == 204 or status == 304:
        return None  # interim answers and bodyless statuses: llhttp's
    i = 13
    while i < n and 32 <= p[i] <= 126:
        i += 1
    if i + 1 >= n or p[i] != 13 or p[i + 1] != 10:
        return None
    reason = PyBytes_FromStringAndSize(<const char*> p + 13, i - 13)
    i += 2
    headers = []
    while True:
        if i + 1 >= n:
            return None
        if p[i] == 13:
            # The blank line, then exactly the Content-Length's bytes.
            if p[i + 1] == 10 and length >= 0 and n - (i + 2) == length:
                return status, reason, headers, connection, length, i + 2
            return None
        i = _field(p, n, i, at)
        if i < 0:
            return None
        name = _name(p + at[0], at[1] - at[0])
        if name == _TE or name == _UP or name == _PC:
            return None
        value = PyBytes_FromStringAndSize(<const char*> p + at[2], at[3] - at[2])
        headers.append((name, value))
        if name == _CL:
            if length >= 0:
                return None  # a second one: llhttp refuses it, with its own words
            length = _digits(p + at[2], at[3] - at[2])
            if length < 0:
                return None
        elif name == _CONNECTION:
            if connection is None:
                connection = [value]
            else:
                connection.append(value)


# -- the upstream head -------------------------------------------------------------------
# The actions of http/header_rules.py (KEEP, DROP, XFF, HOST, EXPECT, FORWARDED; 6 and
# above are the counted drops). speedups.py checks at import that they still agree.
cdef enum:
    A_KEEP = 0
    A_DROP = 1
    A_XFF = 2
    A_HOST = 3
    A_EXPECT = 4
    A_FORWARDED = 5
ACTIONS = (A_KEEP, A_DROP, A_XFF, A_HOST, A_EXPECT, A_FORWARDED)
# The version of this module's interface (http/speedups.py uses a module of this one only):
# 2, upstream_head says whether an X-Request-Id line was kept.
API = 2



cdef int _classify(list headers, set plain, dict actions, bint expect_continue,
                   unsigned char* kinds) except -2:
    """Each header's action into ``kinds``; -1 when one is not known yet, is a counted
    drop, or the headers are not (bytes, bytes) pairs (checked here, so that the casts of
    the callers are safe): the caller's Python loop decides and counts."""
    cdef Py_ssize_t i
    cdef tuple header
    cdef int action
    cdef PyObject* found
    for i in range(len(headers)):
        item = headers[i]
        if type(item) is not tuple or len(<tuple> item) != 2:
            return -1
        header = <tuple> item
        if type(header[0]) is not bytes or type(header[1]) is not bytes:
            return -1
        if PySet_Contains(plain, header[0]):
            action = A_KEEP
        else:
            found = PyDict_GetItem(actions, header[0])
            if found == NULL or type(<object> found) is not int:
                return -1
            action = <int> <object> found
            if action < A_KEEP or action > A_FORWARDED:
                return -1
            if action == A_EXPECT:
                # Dropped when the proxy answered 100 Continue itself (as nginx does).
                action = A_DROP if expect_continue else A_KEEP
        kinds[i] = action
    return 0


cdef char* _put(char* out, bytes b):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(out, PyBytes_AS_STRING(b), n)
    return out + n


cdef char* _put_c(char* out, const char* s, Py_ssize_t n):
    memcpy(out, s, n)
    return out + n


def upstream_head(bytes method not None, bytes target not None, list headers not None,
                  set plain not None, dict actions not None, bint expect_continue,
                  bytes client_ip not None, bytes cert_block not None,
                  bytes framing not None):
    """The upstream head ``wire._upstream_head`` builds, for a request whose Connection
    names nothing beyond hop-by-hop and with nothing ``replaced``, in one buffer: the
    request line, the kept header lines in order, Host (localhost when none came),
    X-Forwarded-For (the client's chain, then ``client_ip``), X-Forwarded-Proto,
    X-Forwarded-Host, ``cert_block``, ``framing`` and the blank line; and whether one of
    the kept lines is an X-Request-Id (wire.upstream_request_head adds one otherwise).
    None when a header's action is not known yet or is a counted drop, or a Forwarded
    header came (its chain is checked in Python): the caller's Python loop builds it."""
    cdef Py_ssize_t n = len(headers), i, size, xff_size = 0
    cdef bint request_id = False
    cdef tuple header
    cdef bytes name, value
    cdef int action
    cdef unsigned char* kinds = NULL
    cdef char* out
    host = None
    kinds = <unsigned char*> PyMem_Malloc(n if n else 1)
    if kinds == NULL:
        raise MemoryError()
    try:
        if _classify(headers, plain, actions, expect_continue, kinds) < 0:
            return None
        # "METHOD SP target SP HTTP/1.1 CRLF"
        size = PyBytes_GET_SIZE(method) + PyBytes_GET_SIZE(target) + 12
        for i in range(n):
            action = kinds[i]
            if action == A_DROP:
                continue
            header = <tuple> headers[i]
            value = <bytes> header[1]
            if action == A_FORWARDED:
                return None
            if action == A_XFF:
                xff_size += PyBytes_GET_SIZE(value) + 2
                continue
            if action == A_HOST:
                host = value
            size += PyBytes_GET_SIZE(<bytes> header[0]) + PyBytes_GET_SIZE(value) + 4
        if host is None or PyBytes_GET_SIZE(<bytes> host) == 0:
            # As the Python loop: no Host value (none came, or an empty one) is localhost.
            host = None
            size += 17  # "host: localhost\r\n"
        # "x-forwarded-for: " xff client_ip CRLF, "x-forwarded-proto: https" CRLF,
        # "x-forwarded-host: " host CRLF, the certificate lines, the framing, CRLF.
        size += (17 + xff_size + PyBytes_GET_SIZE(client_ip) + 2 + 26 + 18
                 + (9 if host is None else PyBytes_GET_SIZE(<bytes> host)) + 2
                 + PyBytes_GET_SIZE(cert_block)
                 + PyBytes_GET_SIZE(framing) + 2)
        head = PyBytes_FromStringAndSize(NULL, size)
        out = PyBytes_AS_STRING(head)
        out = _put(out, method)
        out[0] = 32
        out = _put(out + 1, target)
        out = _put_c(out, " HTTP/1.1\r\n", 11)
        for i in range(n):
            action = kinds[i]
            if action == A_DROP or action == A_XFF:
                continue
            header = <tuple> headers[i]
            name = <bytes> header[0]
            if PyBytes_GET_SIZE(name) == 12 and memcmp(PyBytes_AS_STRING(name),
                                                       "x-request-id", 12) == 0:
                request_id = True
            out = _put(out, name)
            out = _put_c(out, ": ", 2)
            out = _put(out, <bytes> header[1])
            out = _put_c(out, "\r\n", 2)
        if host is None:
            out = _put_c(out, "host: localhost\r\n", 17)
        out = _put_c(out, "x-forwarded-for: ", 17)
        for i in range(n):
            if kinds[i] == A_XFF:
                out = _put(out, <bytes> (<tuple> headers[i])[1])
                out = _put_c(out, ", ", 2)
        out = _put(out, client_ip)
        out = _put_c(out, "\r\nx-forwarded-proto: https\r\nx-forwarded-host: ", 46)
        if host is None:
            out = _put_c(out, "localhost", 9)
        else:
            out = _put(out, <bytes> host)
        out = _put_c(out, "\r\n", 2)
        out = _put(out, cert_block)
        out = _put(out, framing)
        out = _put_c(out, "\r\n", 2)
        if out - PyBytes_AS_STRING(head) != size:
            raise AssertionError("upstream_head: size mismatch")
        return head, request_id
    finally:
        PyMem_Free(kinds)


# -- the client's response head ------------------------------------------------------------

def kept_lines(list headers not None, frozenset drop not None):
    """``wire.client_response_head``'s loop: "name: value\r\n" for each header whose name
    is not in ``drop``, in order, in one buffer. None when the headers are not (bytes,
    bytes) pairs: the caller's Python loop joins them."""
    cdef Py_ssize_t n = len(headers), i, size = 0
    cdef tuple header
    cdef char* out
    cdef unsigned char* kept = <unsigned char*> PyMem_Malloc(n if n else 1)
    if kept == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            item = headers[i]
            if type(item) is not tuple or len(<tuple> item) != 2:
                return None
            header = <tuple> item
            if type(header[0]) is not bytes or type(header[1]) is not bytes:
                return None
            kept[i] = not PySet_Contains(drop, header[0])
            if kept[i]:
                size += PyBytes_GET_SIZE(<bytes> header[0]) + PyBytes_GET_SIZE(
                    <bytes> header[1]) + 4
        block = PyBytes_FromStringAndSize(NULL, size)
        out = PyBytes_AS_STRING(block)
        for i in range(n):
            if kept[i]:
                header = <tuple> headers[i]
                out = _put(out, <bytes> header[0])
                out = _put_c(out, ": ", 2)
                out = _put(out, <bytes> header[1])
                out = _put_c(out, "\r\n", 2)
        return block
    finally:
        PyMem_Free(kept)


# -- the target's screen -----------------------------------------------------------------

def may_need_normalising(bytes target not None):
    """``normalize.may_need_normalising`` in one pass: the target holds "%", "/.", "//",
    a backslash or "#"."""
    cdef const unsigned char* p = <const unsigned char*> PyBytes_AS_STRING(target)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(target), i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if c == 37 or c == 92 or c == 35:  # "%", "\\", "#"
            return True
        if c == 47 and i + 1 < n and (p[i + 1] == 46 or p[i + 1] == 47):  # "/." or "//"
            return True
    return False
