# The types of checks.py's compiled build (mtlsproxy/compiled.py): the checks of the heads
# the compiled split accepts, made on every request and response of the fast exchange.
from mtlsproxy.http.events cimport Request, Response

cpdef frozenset _tokens_of(list values)
cpdef check_status_line(bytes version, bytes reason)
cpdef Request request_from_split(bytes method, bytes target, list headers, bytes host,
                                 list connection_values, bint expect)
cpdef Response response_from_split(int status, bytes reason, list headers,
                                   list connection_values, object length)
