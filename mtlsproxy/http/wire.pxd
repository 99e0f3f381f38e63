# The types of wire.py's compiled build (mtlsproxy/compiled.py): the heads of every
# proxied exchange, built from the events' C fields.
from mtlsproxy.http.events cimport Request, Response

cpdef bytes upstream_request_head(Request req, bytes target, str client_ip,
                                  bytes cert_block, object rules=*,
                                  frozenset replaced=*)
cpdef tuple _upstream_head(Request req, bytes target, str client_ip, bytes cert_block,
                           object rules, frozenset replaced)
cpdef tuple client_response_head(Request req, Response resp, bint draining)
