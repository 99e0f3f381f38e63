"""The bounded label vocabularies of the refusal metrics, in one place.

Metrics declare every series at zero from these tuples, and the code that refuses or drops
names its reason from them; keeping them here (below both) lets metrics.py know them without
importing the TLS or HTTP layers.
"""

from __future__ import annotations

# mtlsproxy_tls_handshake_failures_total{reason}. Policy-stage reasons (after the
# handshake) share it so one metric explains every rejection.
HANDSHAKE_FAILURE_REASONS = (
    "no_client_certificate", "untrusted", "expired", "not_yet_valid", "bad_signature",
    "weak_algorithm", "chain_too_long", "unsupported_purpose", "protocol", "timeout",
    "client_closed", "server_cert_rejected", "unauthorized", "revoked",
    "revocation_unavailable", "other",
)

# mtlsproxy_headers_dropped_total{reason}: a header name with "_", a forged identity header,
# a listener's strip_headers entry, a header that rewrites the path or method.
HEADER_DROP_REASONS = ("underscore", "identity", "strip_headers", "override")

# mtlsproxy_h2_protocol_errors_total{kind}: why an HTTP/2 client connection got a GOAWAY.
# rapid_reset: streams reset by the client before their answer (CVE-2023-44487); flood:
# SETTINGS, PING, CONTINUATION, PRIORITY, WINDOW_UPDATE or empty frames past their limits
# (CVE-2019-9512/9513/9515/9518, CVE-2024-27316 class); header_size: a header block over
# 4 x limits.max_header_bytes decoded (HPACK bombs; under that, 431 on the stream);
# frame_size: a frame header announcing more than SETTINGS_MAX_FRAME_SIZE; protocol: any
# other protocol error.
H2_ERROR_KINDS = ("rapid_reset", "flood", "header_size", "frame_size", "timeout", "protocol")

# mtlsproxy_tunnels_active{kind}: websocket (an HTTP/1.1 Upgrade after its 101), tcp (a
# TCP-mode listener's connection).
TUNNEL_KINDS = ("websocket", "tcp")

# mtlsproxy_access_tokens_total{result}: what a route's access_token check made of a request
# (admission/tokens.py). A malformed token, an unknown key or a refused algorithm is
# bad_signature (its signature cannot be verified); a token not valid yet is expired.
ACCESS_TOKEN_RESULTS = ("valid", "missing", "expired", "bad_signature", "wrong_issuer",
                        "wrong_audience", "insufficient_scope", "unbound",
                        "binding_mismatch", "jwks_unavailable")
