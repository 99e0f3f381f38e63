"""The API Gateway authorizer format's policy (admission/apigateway.py) as plain functions:
method ARNs, ``*``/``?`` wildcards as the gateway matches them (an Allow narrowly, a Deny
broadly), Deny over Allow, context headers, malformed answers, and the event's formats."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from mtlsproxy.admission.apigateway import (
    gateway_serial,
    gateway_time,
    method_arn,
    parse_policy,
)
from mtlsproxy.admission.authorizer import Policy

PREFIX = "arn:aws:execute-api:eu-west-1:123456789012:abcdef123/prod"


def policy(*statements: dict[str, Any], context: dict[str, Any] | None = None,
           principal: Any = "client-1") -> Policy:
    """The answer as AuthorizerClient holds it: a Policy with deny statements."""
    doc: dict[str, Any] = {"principalId": principal, "policyDocument": {
        "Version": "2012-10-17", "Statement": list(statements)}}
    if context is not None:
        doc["context"] = context
    gp = parse_policy(200, json.dumps(doc).encode(), PREFIX)
    return Policy((gp.allow,), gp.headers, (gp.deny,))


def allow(*resources: str, action: Any = "execute-api:Invoke") -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": list(resources)}


def deny(*resources: str, action: Any = "execute-api:Invoke") -> dict[str, Any]:
    return {"Effect": "Deny", "Action": action, "Resource": list(resources)}


def admits(p: Policy, method: str, path: str) -> bool:
    return p.decide(method.encode(), path.encode()).allow


def test_the_method_arn_is_the_prefix_the_method_and_the_path_without_its_slash() -> None:
    assert method_arn(PREFIX, b"GET", b"/orders/1") == f"{PREFIX}/GET/orders/1"
    assert method_arn(PREFIX, b"GET", b"/") == f"{PREFIX}/GET/"


def test_an_exact_resource_admits_that_method_and_path_only() -> None:
    p = policy(allow(f"{PREFIX}/GET/orders"))
    assert admits(p, "GET", "/orders")
    assert not admits(p, "POST", "/orders")
    assert not admits(p, "GET", "/orders/1")
    assert not admits(p, "get", "/orders")  # methods are case-sensitive


def test_a_final_star_matches_everything_to_its_right() -> None:
    p = policy(allow(f"{PREFIX}/GET/orders/*"))
    for path in ["/orders/1", "/orders/1/items", "/orders/"]:
        assert admits(p, "GET", path), path
    assert not admits(p, "GET", "/orders")  # the / before * is part of the pattern
    assert not admits(p, "GET", "/ordersx")
    assert not admits(p, "DELETE", "/orders/1")


def test_a_star_inside_an_allow_stays_within_one_path_segment() -> None:
    p = policy(allow(f"{PREFIX}/*/orders/*/items"))
    assert admits(p, "GET", "/orders/1/items") and admits(p, "PUT", "/orders/1/items")
    assert not admits(p, "GET", "/orders/1/2/items")
    # The client chooses the path: it must not make a * cross into it.
    assert not admits(p, "DELETE", "/x/prod/GET/orders/1/items")


def test_a_star_inside_an_allow_stays_within_one_arn_field() -> None:
    p = policy(allow("arn:aws:execute-api:*:123456789012:abcdef123/prod/GET/public/*"))
    assert admits(p, "GET", "/public/a")
    # "*" must not run over "eu-west-1:123456789012:abcdef123/prod/DELETE/x" to meet a
    # look-alike the client put in its own path.
    assert not admits(p, "DELETE", "/x:123456789012:abcdef123/prod/GET/public/y")


def test_question_mark_is_one_character() -> None:
    p = policy(allow(f"{PREFIX}/GET/v?/items"))
    assert admits(p, "GET", "/v1/items") and not admits(p, "GET", "/v10/items")
    assert not admits(p, "GET", "/v//items")


def test_a_lone_star_and_wildcard_fields_match_everything() -> None:
    assert admits(policy(allow("*")), "PATCH", "/any/thing")
    everything = policy(allow("arn:aws:execute-api:*:*:abcdef123/*"))
    assert admits(everything, "GET", "/a/b") and admits(everything, "DELETE", "/")
    other_api = policy(allow("arn:aws:execute-api:*:*:zzz/*"))
    assert not admits(other_api, "GET", "/a")


def test_an_explicit_deny_wins_over_an_allow() -> None:
    p = policy(allow(f"{PREFIX}/*/orders/*"), deny(f"{PREFIX}/DELETE/orders/*"))
    assert admits(p, "GET", "/orders/1") and admits(p, "PUT", "/orders/1")
    assert not admits(p, "DELETE", "/orders/1")
    # Statement order does not matter.
    q = policy(deny(f"{PREFIX}/DELETE/orders/*"), allow(f"{PREFIX}/*/orders/*"))
    assert not admits(q, "DELETE", "/orders/1") and admits(q, "GET", "/orders/1")


def test_a_deny_matches_broadly() -> None:
    p = policy(allow(f"{PREFIX}/*"), deny(f"{PREFIX}/DELETE/orders/*/items"))
    assert not admits(p, "DELETE", "/orders/1/items")
    assert not admits(p, "DELETE", "/orders/1/2/items")  # a * in a Deny crosses /
    assert not admits(p, "DELETE", "/Orders/1/items")  # and case (lenient upstreams)
    assert admits(p, "DELETE", "/orders/1")


def test_no_matching_allow_is_a_deny_and_an_empty_policy_admits_nothing() -> None:
    p = policy(allow(f"{PREFIX}/GET/orders/*"))
    decision = p.decide(b"GET", b"/admin")
    assert not decision.allow and decision.result == "deny" and decision.headers == ()
    assert not admits(policy(), "GET", "/")
    assert not admits(policy(deny("*")), "GET", "/")


def test_an_allow_must_also_admit_the_path_as_lenient_upstreams_read_it() -> None:
    p = policy(allow(f"{PREFIX}/GET/orders/*"))
    assert not admits(p, "GET", "/orders/..%2F..%2Fadmin")  # /admin to some upstreams
    assert admits(p, "GET", "/orders/a%2Fb")  # /orders/a/b: still under /orders/
    d = policy(allow(f"{PREFIX}/*"), deny(f"{PREFIX}/GET/admin"))
    assert not admits(d, "GET", "/public/..%2Fadmin")  # a Deny matches either reading


@pytest.mark.parametrize("action", ["execute-api:Invoke", ["execute-api:Invoke"],
                                    "execute-api:*", "*", "EXECUTE-API:invoke",
                                    ["s3:GetObject", "execute-api:Inv*"]])
def test_actions_that_cover_invoke(action: Any) -> None:
    assert admits(policy(allow("*", action=action)), "GET", "/")
    assert not admits(policy(allow("*"), deny("*", action=action)), "GET", "/")


def test_statements_for_other_actions_decide_nothing() -> None:
    p = policy(allow("*", action="execute-api:ManageConnections"))
    assert not admits(p, "GET", "/")
    q = policy(allow("*"), deny("*", action=["s3:*"]))
    assert admits(q, "GET", "/")


def test_a_single_statement_object_is_taken_as_iam_takes_it() -> None:
    doc = {"principalId": "p", "policyDocument": {"Statement": allow(f"{PREFIX}/GET/*")}}
    gp = parse_policy(200, json.dumps(doc).encode(), PREFIX)
    assert gp.allow.matches(b"GET", b"/x")


def test_context_goes_upstream_as_x_authorizer_headers() -> None:
    p = policy(allow("*"), principal="client-1\r\nX-Evil: 1", context={
        "tenant": "acme", "level": 3, "ratio": 1.5, "admin": False, "bad key": "dropped",
        "Tenant": "second spelling dropped", "principalId": "not the principal",
        "crlf": "a\r\nX-Injected: 1"})
    decision = p.decide(b"GET", b"/")
    assert decision.allow
    assert dict(decision.headers) == {
        b"X-Authorizer-PrincipalId": b"client-1\\0D\\0AX-Evil: 1",
        b"X-Authorizer-tenant": b"acme", b"X-Authorizer-level": b"3",
        b"X-Authorizer-ratio": b"1.5", b"X-Authorizer-admin": b"false",
        b"X-Authorizer-crlf": b"a\\0D\\0AX-Injected: 1"}


@pytest.mark.parametrize("answer", [
    [],                                                        # not an object
    {"policyDocument": {"Statement": []}},                     # no principalId
    {"principalId": 7, "policyDocument": {"Statement": []}},   # not a string
    {"principalId": "p"},                                      # no policyDocument
    {"principalId": "p", "policyDocument": []},
    {"principalId": "p", "policyDocument": {"Version": 2012, "Statement": []}},
    {"principalId": "p", "policyDocument": {"Statement": "Allow"}},
    {"principalId": "p", "policyDocument": {"Statement": ["Allow"]}},
    {"principalId": "p", "policyDocument": {"Statement": [
        {"Effect": "allow", "Action": "execute-api:Invoke", "Resource": "*"}]}},
    {"principalId": "p", "policyDocument": {"Statement": [
        {"Effect": "Allow", "Resource": "*"}]}},               # no Action
    {"principalId": "p", "policyDocument": {"Statement": [
        {"Effect": "Allow", "Action": "execute-api:Invoke"}]}},  # no Resource
    {"principalId": "p", "policyDocument": {"Statement": [
        {"Effect": "Allow", "Action": "execute-api:Invoke", "Resource": []}]}},
    {"principalId": "p", "policyDocument": {"Statement": [
        {"Effect": "Allow", "Action": "execute-api:Invoke", "Resource": [7]}]}},
    {"principalId": "p", "policyDocument": {"Statement": [
        {"Effect": "Allow", "Action": "execute-api:Invoke", "Resource": "orders/*"}]}},
    {"principalId": "p", "policyDocument": {"Statement": [      # a condition we would drop
        {"Effect": "Deny", "Action": "execute-api:Invoke", "Resource": "*",
         "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}]}},
    {"principalId": "p", "policyDocument": {"Statement": [
        {"Effect": "Allow", "NotAction": "execute-api:Invoke", "Resource": "*"}]}},
    {"principalId": "p", "policyDocument": {"Statement": []}, "context": []},
    {"principalId": "p", "policyDocument": {"Statement": []}, "context": {"a": {"b": 1}}},
    {"principalId": "p", "policyDocument": {"Statement": []}, "context": {"a": [1]}},
    {"principalId": "p", "policyDocument": {"Statement": []}, "context": {"a": None}},
], ids=lambda a: json.dumps(a)[:60])
def test_a_malformed_answer_is_refused(answer: Any) -> None:
    with pytest.raises(ValueError):
        parse_policy(200, json.dumps(answer).encode(), PREFIX)


def test_a_non_2xx_or_non_json_answer_is_refused() -> None:
    good = json.dumps({"principalId": "p", "policyDocument": {"Statement": []}}).encode()
    with pytest.raises(ValueError):
        parse_policy(401, good, PREFIX)
    with pytest.raises(ValueError):
        parse_policy(200, b"{not json", PREFIX)


def test_certificate_fields_are_written_as_the_gateway_writes_them() -> None:
    assert gateway_time(dt.datetime(2021, 8, 5, 9, 36, 4, tzinfo=dt.UTC)) == \
        "Aug  5 09:36:04 2021 GMT"
    assert gateway_time(dt.datetime(2019, 5, 28, 12, 30, 2, tzinfo=dt.UTC)) == \
        "May 28 12:30:02 2019 GMT"
    assert gateway_serial("a1b2c3") == "a1:b2:c3"
    assert gateway_serial("1F3") == "01:f3"


def test_several_stars_find_their_text_wherever_it_first_fits() -> None:
    p = policy(allow(f"{PREFIX}/GET/x*ab*c"))
    assert admits(p, "GET", "/xaabqabc") and admits(p, "GET", "/xabc")
    assert not admits(p, "GET", "/xab/c") and not admits(p, "GET", "/xaabqab")
    d = policy(allow("*"), deny(f"{PREFIX}/*/a*b*/c"))
    assert not admits(d, "GET", "/a1b2b3/x/c") and admits(d, "GET", "/a1b2b3/x/d")


def test_no_pattern_backtracks_badly_over_a_path_the_client_chose() -> None:
    import time
    stars = "*a" * 12 + "*b"
    p = policy(allow(f"{PREFIX}/GET/{stars}"), deny(f"{PREFIX}/{stars}"))
    path = "/" + "a" * 4000
    started = time.perf_counter()
    assert not admits(p, "GET", path)
    assert time.perf_counter() - started < 1.0


# -- an attack round (the spellings Windows, Express, Rails and Tomcat read alike) ---------

@pytest.mark.parametrize("path", ["/orders/1/", "/orders/1.", "/orders/1%20", "/orders/1./",
                                  "/orders/1::$DATA", "/ORDERS/1/"])
def test_a_deny_refuses_the_spellings_a_lenient_upstream_reads_as_its_resource(
        path: str) -> None:
    p = policy(allow(f"{PREFIX}/*/orders/*"), deny(f"{PREFIX}/DELETE/orders/1"))
    assert not admits(p, "DELETE", path), path
    assert admits(p, "DELETE", "/orders/2")


def test_an_allow_with_a_final_star_still_admits_the_collection_with_its_slash() -> None:
    p = policy(allow(f"{PREFIX}/GET/orders/*"))
    assert admits(p, "GET", "/orders/") and admits(p, "GET", "/orders/1/")


@pytest.mark.parametrize("key", ["tenant\n", "tenant\r", "ten ant", ""])
def test_context_keys_that_are_not_header_tokens_are_dropped(key: str) -> None:
    p = policy(allow(f"{PREFIX}/*"), context={key: "a", "ok": "b"})
    names = [n for n, _ in p.headers]
    assert all(b"\n" not in n and b"\r" not in n and b" " not in n for n in names)
    assert any(n.lower() == b"x-authorizer-ok" for n in names)


@pytest.mark.parametrize("body", [
    b'{"principalId": "p", "policyDocument": {"Version": "2012-10-17", "Statement": []},'
    b' "context": {"n": NaN}}',
    b'{"principalId": "p", "policyDocument": {"Version": "2012-10-17", "Statement": []},'
    b' "context": {"n": Infinity}}',
])
def test_answers_with_nan_or_infinity_are_not_json_and_fail(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_policy(200, body, PREFIX)


def test_the_native_format_refuses_a_header_name_with_a_newline() -> None:
    # "$" in the name check matched before a final newline: such an answer is malformed.
    from mtlsproxy.admission.authorizer import parse_answer
    with pytest.raises(ValueError):
        parse_answer(200, b'{"allow": true, "headers": {"X-Tenant\\n": "a"}}')
