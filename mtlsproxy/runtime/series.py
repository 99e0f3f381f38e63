"""One request series of the request metrics: counts by status and a latency histogram,
in plain numbers, counted on every request (metrics.py's RequestCounts exposes them).

Rules of this module: setup.py compiles it with the fast exchange (mtlsproxy/compiled.py),
typed by series.pxd; a field added here is added there too.
"""

from __future__ import annotations

# The request duration histogram's bounds, in seconds (prometheus-client's defaults and
# nginx-style sub-millisecond ones below them).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class RequestSeries:
    """One (listener, route): requests by status code, and the duration histogram's
    bucket counts (the last one +Inf) and sum. Plain ints and floats; one object per
    series so that counting a request builds no label tuple."""

    __slots__ = ("codes", "buckets", "sum")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, status: int, duration: float) -> None:
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1
        # le is inclusive: a duration equal to a bound belongs to that bound's bucket (the
        # first bound not below it: bisect_left's answer). Most requests end in the first
        # bucket, so the walk usually stops at once.
        i = 0
        for bound in LATENCY_BUCKETS:
            if duration <= bound:
                break
            i += 1
        self.buckets[i] += 1
        self.sum += duration
