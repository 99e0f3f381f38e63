"""The admission step (admission/admit.py) as a plain object: no sockets, an injected
clock and generation. Each protocol's tests check that it asks this step; these check what
the step decides."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

from mtlsproxy.admission.admit import ADMITTED, PENDING, Admission, Refusal, Scope
from mtlsproxy.admission.authorizer import AuthorizerClient
from mtlsproxy.admission.cache import ValidationCache, Verdict
from mtlsproxy.admission.verify import anonymous, refused
from mtlsproxy.config import AuthorizerConfig, MutualTLSConfig, RouteConfig, parse_upstream
from mtlsproxy.config.rules import parse_rule
from mtlsproxy.identity.peer import read_identity
from mtlsproxy.revocation.crl import RevocationState
from mtlsproxy.truststore.bundle import TrustBundle, parse_bundle
from tests.support.pki import PKI, make_cert

# Inside the validity of the fixtures' certificates (made from the real clock: a day back,
# a year on), whatever day the suite runs.
NOW = dt.datetime.now(dt.UTC)


@dataclass
class Gen:
    number: int
    bundle: TrustBundle | None = None
    revocation: RevocationState | None = None


@dataclass
class Holder:
    current: Gen


def admission(gen: Gen, now: dt.datetime = NOW) -> Admission:
    return Admission("public", Holder(gen), ValidationCache(), lambda: now,
                     MutualTLSConfig(truststore_uri="x"),
                     AuthorizerClient(lambda route, result: None), lambda hit: None)


def admitted_verdict(pki: PKI, generation: int = 1, cn: str = "good-client") -> Verdict:
    cert = pki.client if cn == "good-client" else make_cert(cn, pki.inter)
    identity = read_identity(cert.der, [pki.inter.der])
    return Verdict(generation, None, identity, (), identity.valid_from, identity.valid_until)


def route(**kw: object) -> RouteConfig:
    return RouteConfig("/", parse_upstream("http://127.0.0.1:1"), **kw)  # type: ignore[arg-type]


def test_a_valid_client_on_an_open_route_is_admitted_without_an_await(pki: PKI) -> None:
    verdict = admitted_verdict(pki)
    assert admission(Gen(1)).admit_now(verdict, route()) == (verdict, ADMITTED)


def test_a_refused_certificate_is_refused_for_the_client_whatever_the_route(pki: PKI) -> None:
    for r in (route(), None):
        _, outcome = admission(Gen(1)).admit_now(refused(1, "expired"), r)
        assert outcome == Refusal(403, "expired", Scope.CLIENT)


def test_an_expired_certificate_is_refused_by_the_clock_not_the_cache(pki: PKI) -> None:
    verdict = admitted_verdict(pki)
    later = verdict.valid_until + dt.timedelta(seconds=1)
    _, outcome = admission(Gen(1), now=later).admit_now(verdict, route())
    assert outcome == Refusal(403, "expired", Scope.CLIENT)


def test_no_route_judges_the_client_only(pki: PKI) -> None:
    assert admission(Gen(1)).admit_now(admitted_verdict(pki), None)[1] is ADMITTED


def test_allow_rules_refuse_another_client_on_that_route_only(pki: PKI) -> None:
    only_good = route(allow=(parse_rule({"subject": {"CN": "good-client"}}),))
    step = admission(Gen(1))
    assert step.admit_now(admitted_verdict(pki), only_good)[1] is ADMITTED
    _, outcome = step.admit_now(admitted_verdict(pki, cn="other"), only_good)
    assert isinstance(outcome, Refusal)
    assert (outcome.status, outcome.reason, outcome.scope) == (403, "unauthorized", Scope.ROUTE)
    assert "good-client" in outcome.detail


def test_allow_rules_refuse_a_connection_without_a_certificate() -> None:
    rules = route(allow=(parse_rule({"subject": {"CN": "*"}}),))
    _, outcome = admission(Gen(1)).admit_now(anonymous(1), rules)
    assert isinstance(outcome, Refusal) and outcome.scope is Scope.ROUTE


def test_a_route_with_an_authorizer_needs_an_await(pki: PKI) -> None:
    asked = route(authorizer=AuthorizerConfig(url="http://127.0.0.1:1/"))
    assert admission(Gen(1)).admit_now(admitted_verdict(pki), asked)[1] is PENDING


def test_the_authorizer_fails_closed_for_a_client_without_a_certificate() -> None:
    asked = route(authorizer=AuthorizerConfig(url="http://127.0.0.1:1/"))
    _, outcome = asyncio.run(admission(Gen(1)).admit(anonymous(1), asked, None))
    assert outcome == Refusal(403, "unauthorized", Scope.ROUTE)


def test_a_verdict_of_an_older_generation_is_decided_again(pki: PKI) -> None:
    # Mutual TLS was turned off meanwhile (no bundle): the client is anonymous now.
    kept, outcome = admission(Gen(2)).admit_now(admitted_verdict(pki, generation=1), route())
    assert kept.generation == 2 and kept.identity is None and outcome is ADMITTED


def test_a_connection_without_a_certificate_stays_refused_when_mutual_tls_comes_on(
        pki: PKI) -> None:
    bundle = parse_bundle(pki.truststore.read_bytes(), 4)
    kept, outcome = admission(Gen(2, bundle)).admit_now(refused(1, "no_client_certificate"),
                                                         route())
    assert kept.generation == 2
    assert outcome == Refusal(403, "no_client_certificate", Scope.CLIENT)

