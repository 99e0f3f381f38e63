cimport cython
from mtlsproxy.proxy.upstream cimport UpstreamConnection

@cython.final
cdef class UpstreamPool:
    cdef public object parser_kind, writes, connect_timeout, idle_timeout, clock
    cdef public object tls, h2, opened
    cdef public Py_ssize_t max_idle
    cdef public dict _idle
    cpdef UpstreamConnection take_idle(self, key)
    cpdef release(self, conn, bint reusable)
