cimport cython
@cython.final
cdef class WriteBatch:
    cdef list _pending
    cpdef add(self, conn)
    cpdef _flush(self)
