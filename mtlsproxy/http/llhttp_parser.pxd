# The types of llhttp_parser.py's compiled build (mtlsproxy/compiled.py): each class's
# fields are its __slots__ (tests/unit/test_compiled_exchange.py compares them).
cimport cython
from mtlsproxy.http.checks cimport request_from_split, response_from_split
from mtlsproxy.http.events cimport Request, Response


cdef class _LlhttpHead:
    cdef public object _url, _headers
    cdef public Py_ssize_t max_header_bytes, _bound, _raw_size, _trailer_size
    cdef public bint _in_chunk, _between
    cdef object __weakref__
    cpdef _trailers_too_large(self, Py_ssize_t fed)
    cpdef _take_head(self, int status)
    cpdef _open_head_too_large(self, Py_ssize_t fed, bint head_in_progress)


@cython.final
cdef class HttptoolsRequestParser(_LlhttpHead):
    cdef public object _parser, _held
    cdef public list _events
    cdef public bint _keep


@cython.final
cdef class HttptoolsResponseParser(_LlhttpHead):
    cdef public object _method, _parser, _response
    cdef public list _events
    cdef public bint _stale_parser, _done, _first
    cpdef _feed(self, data)
