# The types of series.py's compiled build (mtlsproxy/compiled.py): each class's fields
# are its __slots__ (tests/unit/test_compiled_exchange.py compares them).
cimport cython

@cython.final
cdef class RequestSeries:
    cdef public dict codes
    cdef public list buckets
    cdef public double sum
    @cython.locals(i=Py_ssize_t, bound=double)
    cpdef observe(self, int status, double duration)
