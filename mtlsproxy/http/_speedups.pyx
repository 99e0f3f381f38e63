# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The request head's split, compiled: the common head in one C pass instead of llhttp's
per-header callbacks into Python (issue 26). Optional: ``llhttp_parser.py`` uses it when
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
  CRLF line ends only. Never: obs-fold, bare CR or LF, obs-text or control bytes, an
  empty name or value, or the framing, upgrade and Proxy-Connection headers
  (Content-Length, Transfer-Encoding, Upgrade, Proxy-Connection), which stay llhttp's.
- Pure: no state, nothing kept between calls.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_GET_SIZE, PyBytes_AS_STRING
from cpython.mem cimport PyMem_Free, PyMem_Malloc

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


def split_request_head(bytes data not None):
    """(method, target, headers) of ``data`` when it is one whole head of the accepted
    subset (see the module's rules); None otherwise."""
    cdef const unsigned char* p = <const unsigned char*> PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i = 0, k, start, name_end, vstart, vend
    cdef char* out
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
            if p[i + 1] == 10 and i + 2 == n:
                return method, target, headers
            return None
        start = i
        while i < n and TOKEN[p[i]]:
            i += 1
        if i == start or i >= n or p[i] != 58:  # a token, then ":"
            return None
        name_end = i
        i += 1
        while i < n and (p[i] == 32 or p[i] == 9):
            i += 1
        vstart = i
        while i < n and VALUE[p[i]]:
            i += 1
        if i + 1 >= n or p[i] != 13 or p[i + 1] != 10:
            return None
        vend = i
        while vend > vstart and (p[vend - 1] == 32 or p[vend - 1] == 9):
            vend -= 1
        if vend == vstart:
            return None  # an empty value: llhttp's call
        i += 2
        # A new bytes object written in place before anything else sees it (the C API
        # allows this for a fresh object).
        name = PyBytes_FromStringAndSize(NULL, name_end - start)
        out = PyBytes_AS_STRING(name)
        for k in range(name_end - start):
            out[k] = <char> LOWER[p[start + k]]
        if name == _CL or name == _TE or name == _UP or name == _PC:
            return None
        headers.append((name, PyBytes_FromStringAndSize(<const char*> p + vstart,
                                                         vend - vstart)))


# -- the upstream head's header lines ---------------------------------------------------
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

from cpython.dict cimport PyDict_GetItem
from cpython.set cimport PySet_Contains
from cpython.object cimport PyObject
from libc.string cimport memcpy


def header_lines(list headers not None, set plain not None, dict actions not None,
                 bint expect_continue):
    """``wire._upstream_head``'s loop over a request's headers, for a request whose
    Connection names nothing beyond hop-by-hop and with nothing ``replaced``: (the kept
    lines, each "name: value\\r\\n", in order; the X-Forwarded-For values, each followed
    by ", "; the Forwarded values, the same; the Host value). None when a header's action
    is not known yet or is a counted drop: the caller's Python loop decides and counts."""
    cdef Py_ssize_t n = len(headers), i, size = 0, xff_size = 0, fwd_size = 0, pos
    cdef Py_ssize_t ln, lv
    cdef tuple header
    cdef bytes name, value
    cdef int action
    cdef PyObject* found
    cdef unsigned char* kinds = NULL
    cdef char* out
    host = b""
    if n == 0:
        return b"", b"", b"", host
    kinds = <unsigned char*> PyMem_Malloc(n)
    if kinds == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            # Checked here, so that the casts below are safe: (bytes, bytes) pairs only,
            # anything else is the Python loop's.
            item = headers[i]
            if type(item) is not tuple or len(<tuple> item) != 2:
                return None
            header = <tuple> item
            if type(header[0]) is not bytes or type(header[1]) is not bytes:
                return None
            name = <bytes> header[0]
            if PySet_Contains(plain, name):
                action = A_KEEP
            else:
                found = PyDict_GetItem(actions, name)
                if found == NULL:
                    return None
                if type(<object> found) is not int:
                    return None
                action = <int> <object> found
                if action < A_KEEP or action > A_FORWARDED:
                    return None
                if action == A_EXPECT and expect_continue:
                    action = A_DROP  # the proxy answered 100 Continue itself
                elif action == A_EXPECT:
                    action = A_KEEP
            kinds[i] = action
            value = <bytes> header[1]
            if action == A_KEEP or action == A_HOST:
                size += len(name) + len(value) + 4
                if action == A_HOST:
                    host = value
            elif action == A_XFF:
                xff_size += len(value) + 2
            elif action == A_FORWARDED:
                fwd_size += len(value) + 2
        block = PyBytes_FromStringAndSize(NULL, size)
        xff = PyBytes_FromStringAndSize(NULL, xff_size)
        fwd = PyBytes_FromStringAndSize(NULL, fwd_size)
        pos = 0
        for i in range(n):
            action = kinds[i]
            if action == A_DROP:
                continue
            header = <tuple> headers[i]
            value = <bytes> header[1]
            lv = len(value)
            if action == A_XFF or action == A_FORWARDED:
                continue  # written by _fill below
            name = <bytes> header[0]
            ln = len(name)
            out = PyBytes_AS_STRING(block) + pos
            memcpy(out, PyBytes_AS_STRING(name), ln)
            out[ln] = 58  # ":"
            out[ln + 1] = 32
            memcpy(out + ln + 2, PyBytes_AS_STRING(value), lv)
            out[ln + 2 + lv] = 13
            out[ln + 3 + lv] = 10
            pos += ln + lv + 4
        _fill(headers, kinds, n, A_XFF, xff)
        _fill(headers, kinds, n, A_FORWARDED, fwd)
        return block, xff, fwd, host
    finally:
        PyMem_Free(kinds)


cdef void _fill(list headers, unsigned char* kinds, Py_ssize_t n, int which, bytes dest):
    """Each value of the headers of action ``which``, followed by ", ", into ``dest``."""
    cdef Py_ssize_t i, pos = 0, lv
    cdef char* out = PyBytes_AS_STRING(dest)
    cdef bytes value
    for i in range(n):
        if kinds[i] != which:
            continue
        value = <bytes> (<tuple> headers[i])[1]
        lv = len(value)
        memcpy(out + pos, PyBytes_AS_STRING(value), lv)
        out[pos + lv] = 44  # ","
        out[pos + lv + 1] = 32
        pos += lv + 2
