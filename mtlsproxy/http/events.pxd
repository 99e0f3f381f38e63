# The events as extension types (events.py's "rules of this module"); each field's type is
# the one its annotation there names, so the compiled build refuses what mypy would.
cimport cython

@cython.final
cdef class Request:
    cdef public bytes method, target, http_version
    cdef public list headers
    cdef public bint keep_alive, chunked
    cdef public object content_length
    cdef public bint expect_continue
    cdef public frozenset connection
    cdef public bytes host, request_id, upgrade

@cython.final
cdef class Response:
    cdef public int status
    cdef public bytes reason, http_version
    cdef public list headers
    cdef public bint keep_alive, chunked
    cdef public object content_length
    cdef public bint close_delimited
    cdef public frozenset connection

@cython.final
cdef class Informational:
    cdef public int status

@cython.final
cdef class Data:
    cdef public object data

@cython.final
cdef class EndOfMessage:
    cdef public tuple trailers
