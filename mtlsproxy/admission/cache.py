"""Validation results per client certificate and truststore generation; bounded LRU.

The key is (SHA-256 of the leaf DER, generation number, ``client_intermediates`` mode): a
truststore swap makes every old entry unreachable, so keep-alive connections re-check on
their next request. The session id is NOT part of the key: it changes on every TLS 1.3
resumption.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from mtlsproxy.admission.policy import validity_reason
from mtlsproxy.identity.headers import Header, header_block
from mtlsproxy.identity.peer import ClientIdentity


@dataclass(frozen=True)
class Verdict:
    """The cached outcome: ``reason`` None means admitted (subject to the clock)."""

    generation: int
    reason: str | None
    identity: ClientIdentity | None
    headers: tuple[Header, ...]
    valid_from: dt.datetime
    valid_until: dt.datetime
    # Per-route authorization results, cached with the verdict (keyed by the route).
    authz: dict[Any, bool] = field(default_factory=dict, compare=False, repr=False)
    # ``headers`` as the lines of a head, rendered once here instead of on every request.
    header_block: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "header_block", header_block(self.headers))  # frozen: once

    def admits(self, now: dt.datetime) -> bool:
        """``reason_at(now) is None``, in one call: the check every request makes."""
        return self.reason is None and self.valid_from <= now <= self.valid_until

    def reason_at(self, now: dt.datetime) -> str | None:
        """The refusal reason at ``now``: the cached one, or the clock's."""
        return self.reason or validity_reason(self.valid_from, self.valid_until, now)


CacheKey = tuple[bytes, int, str]  # leaf SHA-256, generation, client_intermediates mode


class ValidationCache:
    def __init__(self, max_entries: int = 10000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, Verdict] = OrderedDict()

    def get(self, key: CacheKey) -> Verdict | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: CacheKey, verdict: Verdict) -> None:
        self._entries[key] = verdict
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<ValidationCache entries={len(self._entries)} max={self.max_entries}>"
