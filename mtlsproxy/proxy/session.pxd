cimport cython
from mtlsproxy.http.events cimport Request, Response
from mtlsproxy.tls.bio cimport TLSConnection
from mtlsproxy.proxy.upstream cimport UpstreamConnection
from mtlsproxy.proxy.pool cimport UpstreamPool
from mtlsproxy.runtime.series cimport RequestSeries

@cython.final
cdef class _Fast:
    cdef public Request req
    cdef public object upstream, route_name, head
    cdef public UpstreamConnection up
    cdef public double start

@cython.final
cdef class ProxySession:
    cdef public object rt, domain, generation, verdict, parser, inbox, task, state
    cdef public _Fast fast
    cdef public TLSConnection conn
    cdef public object waiting_on
    cdef public Py_ssize_t served, received
    cdef public double deadline
    cdef public bint _head_bytes_seen, _refusal_counted, _parse_failed
    cdef public str _series_route
    cdef public RequestSeries _series
    cdef object __weakref__
    cpdef _wake(self)
    cpdef _start_task(self, fast)
    cpdef _park(self)
    @cython.locals(pool=UpstreamPool, up=UpstreamConnection)
    cpdef bint _try_fast(self, Request req)
    @cython.locals(up=UpstreamConnection, fast=_Fast, pool=UpstreamPool, req=Request,
                   resp=Response)
    cpdef upstream_events(self, list events)
    cpdef _count_fast(self, _Fast fast, status, sent)
