cimport cython
from mtlsproxy.runtime.writes cimport WriteBatch

@cython.final
cdef class UpstreamConnection:
    cdef public object key, pool_key, parser, state, transport, inbox, requests, idle_since
    cdef public object _drain_waiter, direct
    cdef object __weakref__
    cdef public bint answered, _write_paused
    cdef public WriteBatch _writes
    cdef public list _out
    cpdef expect(self, method)
    cpdef write(self, data)
    cpdef flush_deferred(self)
    cpdef close(self)
