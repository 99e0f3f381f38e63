"""The access-token check and its key sets, sans-IO (admission/tokens.py, jwks.py): time
at an injected clock, exact issuer, audiences, scopes, bearer spellings, the cache, and
when key sets are fetched."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mtlsproxy.admission.jwks import KeySets, parse_jwks
from mtlsproxy.admission.tokens import (
    Checked,
    TokenCache,
    UnknownKey,
    bearer_token,
    cache_key,
    challenge,
    thumbprint,
    verify,
)
from mtlsproxy.config.model import AccessTokenConfig

LEAF = b"\x30\x82leaf certificate DER"
NOW = 1_800_000_000.0
KEY = ec.generate_private_key(ec.SECP256R1())
CFG = AccessTokenConfig(jwks_uri="/keys.json", issuer="https://issuer.test",
                        audiences=("api", "api2"), claims_to_headers=(("sub", "X-Sub"),))


def sign(key: Any = KEY, alg: str = "ES256", kid: str | None = "k1", **claims: Any) -> bytes:
    body: dict[str, Any] = {"iss": "https://issuer.test", "aud": "api", "sub": "me",
                            "exp": NOW + 300, "cnf": {"x5t#S256": thumbprint(LEAF).decode()}}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    # Signed as JWS so that any claim can be written (PyJWT's encode refuses a non-string
    # iss, which a hostile issuer need not).
    return jwt.PyJWS().encode(json.dumps(body).encode(), key, algorithm=alg,
                              headers=headers).encode()


def keys(kid: str | None, alg: str) -> Any:
    if kid not in ("k1", None):
        raise UnknownKey()
    return KEY.public_key()


def check(token: bytes, cfg: AccessTokenConfig = CFG, now: float = NOW) -> Checked:
    return verify(token, keys, cfg, LEAF, now)


def test_the_thumbprint_is_base64url_sha256_of_the_der_without_padding() -> None:
    # RFC 8705 section 3.1.
    expected = base64.urlsafe_b64encode(hashlib.sha256(LEAF).digest()).rstrip(b"=")
    assert thumbprint(LEAF) == expected and b"=" not in thumbprint(LEAF)


def test_a_bound_token_is_valid_and_yields_its_claim_headers() -> None:
    checked = check(sign())
    assert checked.ok and checked.headers == ((b"X-Sub", b"me"),)
    assert checked.expires == NOW + 300


@pytest.mark.parametrize("now, result", [
    (NOW + 300 + 60, "valid"),  # exp plus the leeway: still valid
    (NOW + 300 + 61, "expired"),
])
def test_exp_is_checked_at_the_injected_clock_with_the_leeway(now: float,
                                                             result: str) -> None:
    assert check(sign(), now=now).result == result


def test_a_token_without_exp_is_refused() -> None:
    assert check(sign(exp=None)).result == "expired"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400", '"1"', "true"])
def test_time_claims_that_are_not_finite_numbers_are_refused(claim: str, value: str) -> None:
    # Python's JSON reads NaN, Infinity and 1e400 (inf): a token that never expires.
    token = sign(**{claim: 12345})
    body = token.split(b".")[1]
    claims = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
    raw = json.dumps(claims).replace(f'"{claim}": 12345', f'"{claim}": {value}')
    forged = jwt.PyJWS().encode(raw.encode(), KEY, algorithm="ES256",
                                headers={"kid": "k1"}).encode()
    assert check(forged).result == "expired"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_a_token_from_the_future_is_refused(claim: str) -> None:
    assert check(sign(**{claim: NOW + 61})).result == "expired"
    assert check(sign(**{claim: NOW + 59})).result == "valid"


@pytest.mark.parametrize("iss", ["https://issuer.test/", "https://issuer.test.evil",
                                 "https://issuer.tes", ["https://issuer.test"], 1])
def test_the_issuer_must_match_exactly(iss: Any) -> None:
    # PyJWT before 2.10.1 took a substring as a match (CVE-2024-53861).
    assert check(sign(iss=iss)).result == "wrong_issuer"


@pytest.mark.parametrize("aud, result", [
    ("api2", "valid"), (["other", "api"], "valid"), ("API", "wrong_audience"),
    ([], "wrong_audience"), (None, "wrong_audience"), ({"api": 1}, "wrong_audience"),
])
def test_one_of_the_audiences_must_be_named(aud: Any, result: str) -> None:
    assert check(sign(aud=aud)).result == result


@pytest.mark.parametrize("cnf, result", [
    (None, "unbound"),  # no cnf claim at all
    # A confirmation the proxy cannot check is a binding it cannot satisfy (RFC 7800).
    ({}, "binding_mismatch"), ("x", "binding_mismatch"), ([], "binding_mismatch"),
    ({"jkt": "A" * 43}, "binding_mismatch"), ({"x5t#S256": None}, "binding_mismatch"),
    ([{"x5t#S256": thumbprint(LEAF).decode()}], "binding_mismatch"),
    ({"x5t#S256": "A" * 43}, "binding_mismatch"),
    ({"x5t#S256": thumbprint(LEAF).decode() + "="}, "binding_mismatch"),
    ({"x5t#S256": 5}, "binding_mismatch"),
])
def test_the_binding(cnf: Any, result: str) -> None:
    assert check(sign(cnf=cnf)).result == result


def test_a_bound_token_is_checked_even_when_binding_is_not_required() -> None:
    loose = AccessTokenConfig(jwks_uri="/k", issuer="https://issuer.test", audiences=("api",),
                              require_binding=False)
    assert check(sign(cnf=None), loose).ok
    for cnf in ({"x5t#S256": "A" * 43}, {"jkt": "A" * 43}, {}, "x", [], {"x5t": "A"}):
        assert check(sign(cnf=cnf), loose).result == "binding_mismatch", cnf


@pytest.mark.parametrize("claims, result", [
    ({"scope": "a b"}, "valid"), ({"scp": ["b", "a"]}, "valid"), ({"scp": "a b"}, "valid"),
    ({"scope": "a"}, "insufficient_scope"), ({"scope": "ab"}, "insufficient_scope"),
    ({}, "insufficient_scope"),
])
def test_every_scope_is_required(claims: dict[str, Any], result: str) -> None:
    scoped = AccessTokenConfig(jwks_uri="/k", issuer="https://issuer.test",
                               audiences=("api",), scopes=("a", "b"))
    assert check(sign(**claims), scoped).result == result


def test_algorithms_outside_the_list_and_none_are_refused() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert check(sign(rsa_key, "RS256", kid=None)).result == "bad_signature"  # wrong key
    es_only = AccessTokenConfig(jwks_uri="/k", issuer="https://issuer.test",
                                audiences=("api",), algorithms=("ES256",))
    assert check(sign(rsa_key, "RS256"), es_only).result == "bad_signature"
    # HS256 with the public key's bytes as the secret: the key-confusion attack.
    pem = KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    body = base64.urlsafe_b64encode(json.dumps({"iss": "https://issuer.test"}).encode())
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","kid":"k1"}')
    signing = header.rstrip(b"=") + b"." + body.rstrip(b"=")
    mac = base64.urlsafe_b64encode(hmac.new(pem, signing, "sha256").digest()).rstrip(b"=")
    assert check(signing + b"." + mac).result == "bad_signature"
    with pytest.raises(UnknownKey):
        check(sign(kid="k2"))


@pytest.mark.parametrize("token", [b"abc", b"a.b.c", b"e30.e30.", b"..", b"x" * 40])
def test_garbage_is_bad_signature(token: bytes) -> None:
    assert check(token).result == "bad_signature"


@pytest.mark.parametrize("headers, expected", [
    ([], None),
    ([(b"authorization", b"Basic dTpw")], None),
    ([(b"authorization", b"Bearer abc.def.ghi")], b"abc.def.ghi"),
    ([(b"authorization", b"bearer abc")], b"abc"),
    ([(b"authorization", b"BEARER   abc==")], b"abc=="),
    ([(b"authorization", b"Bearer")], "bad_signature"),
    ([(b"authorization", b"Bearer a b")], "bad_signature"),
    ([(b"authorization", b"Bearer a=b")], "bad_signature"),
    # Starts like a bearer token: read as one, or refused; never "no token".
    ([(b"authorization", b"Bearer\tabc")], "bad_signature"),
    ([(b"authorization", b"bearer:abc")], "bad_signature"),
    ([(b"authorization", b"Bearer,abc")], "bad_signature"),
    ([(b"authorization", b"Bearerabc")], "bad_signature"),
    ([(b"authorization", b"Bearer\xa0abc")], "bad_signature"),
    ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer a")], "bad_signature"),
    ([(b"authorization", b"Bearer " + b"a" * 20000)], "bad_signature"),
])
def test_bearer_credentials_spellings(headers: list[tuple[bytes, bytes]],
                                      expected: Any) -> None:
    got = bearer_token(headers)
    if isinstance(expected, str):
        assert isinstance(got, Checked) and got.result == expected
    else:
        assert got == expected


def test_challenges_follow_rfc6750() -> None:
    assert challenge(Checked("missing")) == (401, b'Bearer realm="mtlsproxy"')
    status, value = challenge(Checked("insufficient_scope", "lacks a scope"))
    assert status == 403 and b'error="insufficient_scope"' in value
    status, value = challenge(Checked("expired", "token expired"))
    assert status == 401 and value.endswith(b'error="invalid_token", '
                                            b'error_description="token expired"')


def test_the_cache_keeps_a_token_per_certificate_and_key_set_until_its_exp() -> None:
    cache = TokenCache(size=2)
    valid = Checked("valid", expires=NOW + 10)
    key = cache_key(CFG, 1, b"tok", "fp1")
    cache.put(key, valid)
    assert cache.get(key, NOW) is valid
    assert cache.get(cache_key(CFG, 1, b"tok", "fp2"), NOW) is None  # another certificate
    assert cache.get(cache_key(CFG, 2, b"tok", "fp1"), NOW) is None  # another key set
    assert cache.get(key, NOW + 11) is None and len(cache) == 0  # past exp: gone
    for i in range(3):
        cache.put(cache_key(CFG, 1, b"t%d" % i, "fp"), valid)
    assert len(cache) <= 2  # bounded


# -- key sets ---------------------------------------------------------------------------------

def jwks(*kids: str) -> bytes:
    out = []
    for kid in kids:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key()))
        out.append({**jwk, "kid": kid})
    return json.dumps({"keys": out}).encode()


class Fetcher:
    def __init__(self, *answers: bytes | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, cfg: AccessTokenConfig) -> bytes:
        self.calls += 1
        answer = self.answers[min(self.calls - 1, len(self.answers) - 1)]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_parse_jwks_skips_encryption_keys_and_refuses_an_empty_set() -> None:
    doc = json.loads(jwks("a", "b"))
    doc["keys"][1]["use"] = "enc"
    assert list(parse_jwks(json.dumps(doc).encode())) == ["a"]
    for bad in (b"{}", b'{"keys": []}', b"not json", b'{"keys": [{"kty": "nope"}]}'):
        with pytest.raises(ValueError):
            parse_jwks(bad)


def test_key_sets_fetch_once_then_on_refresh_interval_and_once_per_min_refresh() -> None:
    now = [0.0]
    fetch = Fetcher(jwks("k1"), jwks("k1", "k2"), b"broken", jwks("k3"))
    sets = KeySets(fetch, clock=lambda: now[0])
    cfg = AccessTokenConfig(jwks_uri="/k", issuer="i", audiences=("a",), min_refresh=30,
                            refresh_interval=300)

    async def go() -> None:
        assert list(await sets.keys(cfg) or {}) == ["k1"]
        assert list(await sets.keys(cfg) or {}) == ["k1"] and fetch.calls == 1
        now[0] = 10
        assert sorted(await sets.keys(cfg, unknown_kid=True) or {}) == ["k1", "k2"]
        now[0] = 20  # within min_refresh of the forced fetch: none
        await sets.keys(cfg, unknown_kid=True)
        assert fetch.calls == 2
        now[0] = 45  # a forced fetch again: the set is broken, the old keys stay
        assert sorted(await sets.keys(cfg, unknown_kid=True) or {}) == ["k1", "k2"]
        assert fetch.calls == 3
        now[0] = 400  # refresh_interval since the last good fetch: fetched beside the
        # request, which goes on with the keys held
        assert sorted(await sets.keys(cfg) or {}) == ["k1", "k2"]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if fetch.calls == 4:
                break
        assert list(await sets.keys(cfg) or {}) == ["k3"] and fetch.calls == 4
    asyncio.run(go())


def test_concurrent_needs_share_one_fetch_and_no_set_is_none() -> None:
    fetch = Fetcher(OSError("refused"))
    sets = KeySets(fetch, clock=lambda: 0.0)
    cfg = AccessTokenConfig(jwks_uri="/k", issuer="i", audiences=("a",))

    async def go() -> None:
        results = await asyncio.gather(*(sets.keys(cfg) for _ in range(5)))
        assert results == [None] * 5
        assert fetch.calls == 1
    asyncio.run(go())


@pytest.mark.parametrize("target, found, logged", [
    (b"/a?access_token=eyJx.y.z", True, b"/a?access_token=REDACTED"),
    (b"/a?x=1&ACCESS_TOKEN=eyJ&y=2", True, b"/a?x=1&ACCESS_TOKEN=REDACTED&y=2"),
    # Names as frameworks decode them (parse_qs: "access%5Ftoken" is access_token).
    (b"/a?access%5Ftoken=eyJ", True, b"/a?access%5Ftoken=REDACTED"),
    (b"/a?x=1;%61ccess_token=eyJ", True, b"/a?x=1;%61ccess_token=REDACTED"),
    (b"/a?access_token", True, b"/a?access_token=REDACTED"),
    (b"/access_token=x", False, b"/access_token=x"),
    (b"/a?my_access_token=x", False, b"/a?my_access_token=x"),
    (b"/a?x=access_token=1", False, b"/a?x=access_token=1"),
])
def test_a_token_in_the_query_is_found_and_never_logged(target: bytes, found: bool,
                                                       logged: bytes) -> None:
    from mtlsproxy.admission.tokens import query_token, redact_query
    assert query_token(target) is found
    assert redact_query(target) == logged


def test_a_request_that_goes_away_does_not_cancel_the_shared_fetch() -> None:
    # A client's disconnect cancels its request's task; the fetch other requests wait for
    # must go on (found in review: the first waiter owned the fetch).
    import threading
    release = threading.Event()

    def slow(cfg: AccessTokenConfig) -> bytes:
        release.wait(5)
        return jwks("k1")
    sets = KeySets(slow, clock=lambda: 0.0)
    cfg = AccessTokenConfig(jwks_uri="/k", issuer="i", audiences=("a",))

    async def go() -> None:
        first = asyncio.ensure_future(sets.keys(cfg))
        second = asyncio.ensure_future(sets.keys(cfg))
        await asyncio.sleep(0.05)
        first.cancel()
        await asyncio.sleep(0.05)
        release.set()
        assert list(await second or {}) == ["k1"]
        with pytest.raises(asyncio.CancelledError):
            await first
    asyncio.run(go())
