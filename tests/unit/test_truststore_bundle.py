"""Truststore analysis, without sockets: each problem becomes a warning naming the
certificate's subject; unusable CAs stay out of the context; no usable CA is an error."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mtlsproxy.errors import TruststoreError
from mtlsproxy.truststore.bundle import analyse, next_change, parse_bundle
from tests.support.pki import PKI, UTC, Cert, make_cert, make_sha1_cert, make_sha1_root

NOW = dt.datetime.now(UTC)


def pem(*certs: Cert) -> bytes:
    return b"".join(c.cert_pem() for c in certs)


def problems(bundle_bytes: bytes, **kw: object) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for w in parse_bundle(bundle_bytes, **kw).warnings:  # type: ignore[arg-type]
        out.setdefault(w.subject, []).append(w.problem)
    return out


def usable_subjects(bundle_bytes: bytes, **kw: object) -> set[str]:
    return {c.subject for c in parse_bundle(bundle_bytes, **kw).certs}  # type: ignore[arg-type]


def test_a_whole_chain_has_no_warnings(pki: PKI) -> None:
    bundle = parse_bundle(pki.truststore.read_bytes())
    assert bundle.warnings == () and len(bundle.certs) == 2 and len(bundle.sha256) == 64


def test_expired_ca_is_left_out_and_its_children_lose_their_path() -> None:
    root = make_cert("Old Root", ca=True, not_before=NOW - dt.timedelta(days=9),
                     not_after=NOW - dt.timedelta(days=1))
    child = make_cert("Child CA", root, ca=True)
    good = make_cert("Good Root", ca=True)
    found = problems(pem(root, child, good))
    assert any(p.startswith("expired on") for p in found["CN=Old Root,O=mtlsproxy tests"])
    assert any("no usable path" in p for p in found["CN=Child CA,O=mtlsproxy tests"])
    assert usable_subjects(pem(root, child, good)) == {"CN=Good Root,O=mtlsproxy tests"}


def test_ca_expiring_within_30_days_warns_but_is_used() -> None:
    soon = make_cert("Soon Root", ca=True, not_after=NOW + dt.timedelta(days=10))
    found = problems(pem(soon))
    assert any(p.startswith("expires in 9 days") or p.startswith("expires in 10 days")
               for p in found["CN=Soon Root,O=mtlsproxy tests"])
    assert usable_subjects(pem(soon)) == {"CN=Soon Root,O=mtlsproxy tests"}


def test_not_yet_valid_ca_warns_and_stays() -> None:
    future = make_cert("Future Root", ca=True, not_before=NOW + dt.timedelta(days=1),
                       not_after=NOW + dt.timedelta(days=400))
    found = problems(pem(future))
    assert any(p.startswith("not yet valid") for p in found["CN=Future Root,O=mtlsproxy tests"])


@pytest.mark.parametrize("key, text", [
    (lambda: rsa.generate_private_key(65537, 1024), "RSA key of 1024 bits"),
    (lambda: ec.generate_private_key(ec.SECP521R1()), "ECDSA curve secp521r1"),
])
def test_weak_ca_keys_warn_and_are_left_out(key: object, text: str) -> None:
    weak = make_cert("Weak Root", ca=True, key=key())  # type: ignore[operator]
    good = make_cert("Good Root", ca=True)
    found = problems(pem(weak, good))
    assert any(text in p for p in found["CN=Weak Root,O=mtlsproxy tests"])
    assert usable_subjects(pem(weak, good)) == {"CN=Good Root,O=mtlsproxy tests"}


def test_a_sha1_signed_ca_warns_and_is_left_out(pki: PKI, tmp_path: Path) -> None:
    weak = make_sha1_cert("SHA1 Intermediate", pki.root, tmp_path, ca=True)
    data = pki.truststore.read_bytes() + pem(weak)
    found = problems(data)
    assert any("signature hash sha1" in p
               for p in found["CN=SHA1 Intermediate"])
    assert "CN=SHA1 Intermediate" not in usable_subjects(data)


def test_a_leaf_is_not_a_ca(pki: PKI) -> None:
    found = problems(pki.truststore.read_bytes() + pki.client.cert_pem()[:0] +
                     pem(make_cert("a-leaf", pki.root)))
    assert any(p.startswith("not a CA") for p in found["CN=a-leaf,O=mtlsproxy tests"])


def test_missing_issuer_is_a_chain_incomplete_warning(pki: PKI) -> None:
    lonely = make_cert("Lonely Intermediate", make_cert("Absent Root", ca=True), ca=True)
    found = problems(pki.truststore.read_bytes() + pem(lonely))
    assert any("chain incomplete" in p
               for p in found["CN=Lonely Intermediate,O=mtlsproxy tests"])


def test_ca_too_deep_for_max_chain_length_is_left_out() -> None:
    root = make_cert("R", ca=True)
    i1 = make_cert("I1", root, ca=True)
    i2 = make_cert("I2", i1, ca=True)
    i3 = make_cert("I3", i2, ca=True)
    found = problems(pem(root, i1, i2, i3))
    assert any("chain longer than max_chain_length" in p
               for p in found["CN=I3,O=mtlsproxy tests"])
    assert "CN=I3,O=mtlsproxy tests" not in usable_subjects(pem(root, i1, i2, i3))
    assert "CN=I3,O=mtlsproxy tests" in usable_subjects(pem(root, i1, i2, i3),
                                                        max_chain_length=5)


def test_same_subject_from_two_issuers_conflicts() -> None:
    r1, r2 = make_cert("Root One", ca=True), make_cert("Root Two", ca=True)
    a = make_cert("Shared Name", r1, ca=True)
    b = make_cert("Shared Name", r2, ca=True)
    found = problems(pem(r1, r2, a, b))
    assert any("conflicts with an existing certificate from a different issuer" in p
               for p in found["CN=Shared Name,O=mtlsproxy tests"])


def test_duplicates_and_garbage_blocks_warn(pki: PKI) -> None:
    data = pki.truststore.read_bytes()
    garbage = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    found = problems(data + data + garbage)
    assert any(p == "duplicate" for ps in found.values() for p in ps)
    assert any(p.startswith("not parseable") for p in found["certificate #5"])


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nx\n"
                                  b"-----END CERTIFICATE-----\n"])
def test_a_bundle_without_a_usable_ca_is_an_error(data: bytes) -> None:
    with pytest.raises(TruststoreError):
        parse_bundle(data)


def test_a_bundle_of_only_unusable_cas_is_an_error(pki: PKI) -> None:
    with pytest.raises(TruststoreError, match="no usable CA"):
        parse_bundle(pem(make_cert("leaf-only", pki.root)))


# -- when re-analysing can change anything (the watcher skips the work until then) --------

def _at(cert: Cert, now: dt.datetime) -> dt.datetime | None:
    return next_change(parse_bundle(pem(cert), now=now), now)


def _exact(t: dt.datetime) -> dt.datetime:
    return t.replace(microsecond=0)  # certificates carry whole seconds


def test_nothing_changes_before_a_ca_enters_the_30_day_expiry_window() -> None:
    na = _exact(NOW + dt.timedelta(days=40))
    root = make_cert("Far Root", ca=True, not_before=NOW - dt.timedelta(days=1), not_after=na)
    assert _at(root, NOW) == na - dt.timedelta(days=30)


def test_inside_the_window_the_next_change_is_when_the_day_count_drops() -> None:
    na = _exact(NOW + dt.timedelta(days=10, hours=6))
    root = make_cert("Soon Root", ca=True, not_before=NOW - dt.timedelta(days=1), not_after=na)
    change = _at(root, NOW)
    assert change == na - dt.timedelta(days=10)
    before = parse_bundle(pem(root), now=change - dt.timedelta(seconds=1)).warnings
    after = parse_bundle(pem(root), now=change + dt.timedelta(seconds=1)).warnings
    assert "expires in 10 days" in before[0].problem
    assert "expires in 9 days" in after[0].problem


def test_a_not_yet_valid_ca_changes_when_it_becomes_valid() -> None:
    nb = _exact(NOW + dt.timedelta(hours=3))
    root = make_cert("Later Root", ca=True, not_before=nb, not_after=NOW + dt.timedelta(days=400))
    assert _at(root, NOW) == nb


# -- cheap to build and to drop (a swap must not stall the event loop) ---------------------

def test_text_around_and_between_blocks_is_ignored_and_an_unterminated_block_is_dropped(
        pki: PKI) -> None:
    data = pki.truststore.read_bytes()
    blocks = data.split(b"-----END CERTIFICATE-----\n")
    mixed = (b"# comment line\n" + blocks[0] + b"-----END CERTIFICATE-----\n"
             + b"subject=CN=something\n" + blocks[1] + b"-----END CERTIFICATE-----\n"
             + b"-----BEGIN CERTIFICATE-----\nMIIB")  # truncated at the end
    assert usable_subjects(mixed) == usable_subjects(data)
    assert len(parse_bundle(mixed).all_certs) == 2


def test_an_analysed_bundle_is_freed_by_reference_counting_not_by_the_cycle_collector(
        pki: PKI) -> None:
    # A reference cycle kept all certificates of a replaced bundle alive until a full
    # collection, which then held the GIL for ~37 ms with 1,000 CAs (bundle.py).
    import gc
    import weakref
    gc.collect()
    gc.disable()
    try:
        bundle = parse_bundle(pki.truststore.read_bytes())
        refs = [weakref.ref(bundle)] + [weakref.ref(c) for c in bundle.all_certs]
        del bundle
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()


def test_a_sha1_self_signed_root_is_left_out_with_a_warning_naming_it(tmp_path: Path) -> None:
    root = make_sha1_root("SHA1 Root", tmp_path)
    bundle = analyse(root.public_bytes(serialization.Encoding.PEM))
    assert bundle.certs == ()
    assert [(w.subject, w.problem) for w in bundle.warnings if "SHA-1" in w.problem] == [
        ("CN=SHA1 Root", "unsupported signature algorithm SHA-1 on a self-signed root "
                         "(SHA-256 or stronger required): not used")]


def test_a_bundle_of_only_a_sha1_root_is_refused_with_its_reason(tmp_path: Path) -> None:
    root = make_sha1_root("SHA1 Root", tmp_path)
    with pytest.raises(TruststoreError, match=r"no usable CA in the bundle: CN=SHA1 Root: "
                                              r"unsupported signature algorithm SHA-1"):
        parse_bundle(root.public_bytes(serialization.Encoding.PEM))


TRUNCATED = b"MIIBkTCB+wIJAKHBfpegPjMCMA0GCSqGSIb3DQEBCwUAMBExDzANBgNVBAMMBnRl"


@pytest.mark.parametrize("body", [TRUNCATED, b"not base64 at all!", b""])
def test_an_unparseable_block_is_warned_in_words_not_a_library_debug_string(
        body: bytes) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\n" + body + b"\n-----END CERTIFICATE-----\n"
    (warning,) = analyse(pem).warnings
    assert warning.subject == "certificate #1"
    assert warning.problem == ("not parseable: not a valid X.509 certificate (truncated or "
                               "corrupt base64 or DER)")
    assert "Error" not in warning.problem and "{" not in warning.problem
