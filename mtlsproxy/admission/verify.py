"""From what the handshake established to a cached ``Verdict``; pure (no sockets).

Called once per connection, then once per request with the cached verdict and the clock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mtlsproxy.admission.cache import ValidationCache, Verdict
from mtlsproxy.admission.policy import build_path, check_chain
from mtlsproxy.config import MutualTLSConfig
from mtlsproxy.identity.headers import render
from mtlsproxy.identity.peer import read_identity
from mtlsproxy.revocation.crl import RevocationState
from mtlsproxy.truststore.bundle import TrustBundle

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_FOREVER = dt.datetime(9999, 12, 31, tzinfo=dt.UTC)


def refused(generation: int, reason: str) -> Verdict:
    return Verdict(generation, reason, None, (), _EPOCH, _FOREVER)


def anonymous(generation: int) -> Verdict:
    """Mutual TLS off: nobody to identify, nothing to forward."""
    return Verdict(generation, None, None, (), _EPOCH, _FOREVER)


def evaluate(leaf_der: bytes, chain_der: list[bytes] | None, bundle: TrustBundle,
             generation: int, mtls: MutualTLSConfig,
             revocation: RevocationState | None = None) -> Verdict:
    """Policy verdict for a leaf OpenSSL accepted; ``chain_der`` is leaf-first or None."""
    leaf = x509.load_der_x509_certificate(leaf_der)
    if (chain_der is not None and mtls.client_intermediates == "ignore"
            and not bundle.ders.issuperset(chain_der[1:])):
        # OpenSSL built the chain with a certificate the client sent (a sub-CA of a trusted
        # root, or a cross-certificate named like one of ours): with the model's truststore
        # ("the whole chain from each issuing CA up to its root") only the truststore's
        # usable CAs may link the leaf to a root, so the chain is built from them alone.
        if bundle.all_ders.issuperset(chain_der[1:]):
            # All of them are the truststore's, one left out as unusable: refused, with
            # the policy's reason when it has one (a CA too deep for max_chain_length).
            identity = read_identity(leaf_der, chain_der[1:])
            reason = check_chain(identity.leaf, identity.chain, mtls.max_chain_length)
            return Verdict(generation, reason or "untrusted", identity, (),
                           identity.valid_from, identity.valid_until)
        chain_der = None
    if chain_der is not None:
        chain = chain_der[1:]
    else:
        # Resumed session (OpenSSL kept no chain) or a client-sent intermediate ignored:
        # rebuild the chain from the truststore; no path there is untrusted.
        path = build_path(leaf, bundle)
        if path is None:
            return refused(generation, "untrusted")
        chain = [c.public_bytes(Encoding.DER) for c in path]
    identity = read_identity(leaf_der, chain)
    reason = check_chain(identity.leaf, identity.chain, mtls.max_chain_length)
    if reason is None and revocation is not None:
        reason = revocation.reason(identity, dt.datetime.now(dt.UTC))
    if reason is not None:
        return Verdict(generation, reason, identity, (), identity.valid_from,
                       identity.valid_until)
    headers = tuple(render(identity, mtls.forward_client_cert))
    return Verdict(generation, None, identity, headers, identity.valid_from,
                   identity.valid_until)


def cached_verdict(cache: ValidationCache, leaf_der: bytes,
                   chain_der: Callable[[], list[bytes] | None] | None,
                   bundle: TrustBundle, generation: int, mtls: MutualTLSConfig,
                   revocation: RevocationState | None = None) -> tuple[Verdict, bool]:
    """(verdict, cache hit). ``chain_der`` gives the verified chain, asked for on a miss
    only (copying it out of OpenSSL is work a cache hit does not need)."""
    # The mode is in the key as well as behind the generation number (a reload changing
    # it renumbers the generation): a handshake still on the old generation's snapshot
    # finds no verdict decided under the other mode.
    key = (hashlib.sha256(leaf_der).digest(), generation, mtls.client_intermediates)
    verdict = cache.get(key)
    if verdict is not None:
        return verdict, True
    chain = chain_der() if chain_der is not None else None
    verdict = evaluate(leaf_der, chain, bundle, generation, mtls, revocation)
    if chain is None and verdict.identity is None and mtls.client_intermediates == "use":
        # No chain to go on (a resumed session, a re-check after a swap) and no path in the
        # truststore: with "use" the client's own intermediates may be the missing link,
        # which only a full handshake shows. Cached, this refusal would refuse that
        # handshake too, for the rest of the generation.
        return verdict, False
    cache.put(key, verdict)
    return verdict, False

