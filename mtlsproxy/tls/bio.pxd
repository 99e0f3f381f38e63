cimport cython
from mtlsproxy.runtime.writes cimport WriteBatch

@cython.final
cdef class TLSConnection:
    cdef public object _handler_factory, state, _proxy_buf, _proxy_sources, transport
    cdef public object _hello_buf, _hello_need, server_name, handler, sslobj, _tls
    cdef public object peername, sockname, _incoming, _outgoing, _drain_waiter, _linger
    cdef public WriteBatch _writes
    cdef public bint write_paused, _reading_paused, write_shut
    cdef object __weakref__
    cpdef _set_state(self, new)
    cpdef _read_plaintext(self)
    cpdef _flush(self)
    cpdef bint _encrypt(self, data)
    cpdef write(self, data)
    cpdef write_and_close(self, data)
    cpdef flush_deferred(self)
    cpdef close(self, bint linger=*)
    cpdef abort(self)
