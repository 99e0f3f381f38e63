"""Reading the SNI name of a ClientHello before OpenSSL does (tls/client_hello.py), and
choosing a listener's domain by name (proxy/routing.py ``DomainNames``)."""

from __future__ import annotations

import random
import ssl

import pytest

from mtlsproxy.proxy.routing import DomainNames
from mtlsproxy.tls.client_hello import MAX_HELLO, MAX_RECORDS, NO_NAME, Hello, read_hello


def client_hello(server_name: str | None) -> bytes:
    """The bytes a real client (Python's ssl, OpenSSL) sends first."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = server_name is not None
    if server_name is None:
        ctx.verify_mode = ssl.CERT_NONE
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def refragment(hello: bytes, size: int) -> bytes:
    """The same handshake message in records of ``size`` bytes (RFC 8446 section 5.1
    lets a sender split it anywhere)."""
    body = hello[5:]
    records = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        records += hello[:3] + len(part).to_bytes(2, "big") + part
    return records


def test_the_sni_name_of_a_real_hello_is_read_lower_case() -> None:
    assert read_hello(client_hello("API.Example.test")) == Hello("api.example.test")


def test_a_hello_without_sni_has_no_name() -> None:
    assert read_hello(client_hello(None)) == NO_NAME


def test_a_partial_hello_asks_for_more_bytes_until_it_is_whole() -> None:
    hello = client_hello("a.test")
    for end in range(len(hello)):
        need = read_hello(hello[:end])
        assert isinstance(need, int) and end < need <= len(hello), end
    assert read_hello(hello) == Hello("a.test")


def test_a_hello_sent_a_byte_at_a_time_is_parsed_a_few_times_not_once_per_byte() -> None:
    """Every call copies what arrived: once per byte, a 64 KiB hello would cost 2 GB."""
    hello = refragment(client_hello("a.test"), 16)  # small records: many headers
    calls, need = 0, 0
    for end in range(1, len(hello) + 1):
        if end < need:
            continue
        calls += 1
        result = read_hello(hello[:end])
        if not isinstance(result, int):
            assert result == Hello("a.test")
            break
        need = result
    assert calls < 60, calls


def test_a_hello_split_over_several_records_is_read() -> None:
    hello = client_hello("b.test")
    for size in (16, 100, 1000):
        records = refragment(hello, size)
        assert read_hello(records) == Hello("b.test"), size
        assert isinstance(read_hello(records[:-1]), int)


def test_a_hello_in_more_records_than_any_client_sends_is_given_up() -> None:
    hello = client_hello("b.test")
    assert len(hello) - 5 > MAX_RECORDS  # in 1-byte records: more than MAX_RECORDS
    assert read_hello(refragment(hello, 1)) == NO_NAME
    assert read_hello(refragment(hello, 1)[:6 * (MAX_RECORDS + 1)]) == NO_NAME


def test_a_hello_that_another_record_interrupts_is_given_up_at_once() -> None:
    """It can never be whole: waiting for more bytes only invites a byte-at-a-time flood
    of re-parses (found by an attacker's run)."""
    whole = client_hello("b.test")
    hello = refragment(whole, 16)
    short = refragment(whole[:-10], 16)  # whole records, a message 10 bytes short
    application_data = b"\x17\x03\x03\x00\x01x"
    assert isinstance(read_hello(short), int)
    assert read_hello(short + application_data) == NO_NAME
    # Inside the message's own header: a 2-byte record, then another kind.
    assert read_hello(b"\x16\x03\x01\x00\x02\x01\x00" + application_data) == NO_NAME
    # A whole hello followed by other records is still read.
    assert read_hello(hello + application_data) == Hello("b.test")


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x00",
                                  b"\x15\x03\x03\x00\x02\x02\x28",
                                  b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"])
def test_bytes_that_are_not_a_client_hello_choose_nothing_at_once(data: bytes) -> None:
    assert read_hello(data) == NO_NAME


def test_an_oversized_hello_chooses_nothing() -> None:
    record = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff" + b"\x00" * 16380
    assert read_hello(record * 5) == NO_NAME
    assert read_hello(b"\x16\x03\x01\x40\x00" + b"\x00" * MAX_HELLO) == NO_NAME


def test_no_mutation_of_a_hello_raises() -> None:
    """Whatever a client sends, the reader answers (a name, none, or more bytes): OpenSSL
    then judges the same bytes."""
    hello = bytearray(client_hello("fuzz.test"))
    rng = random.Random(22)
    for _ in range(3000):
        mutated = bytearray(hello)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        cut = rng.choice([len(mutated), rng.randrange(len(mutated))])
        result = read_hello(bytes(mutated[:cut]))
        assert isinstance(result, int | Hello)


def test_a_name_that_is_not_ascii_matches_no_domain() -> None:
    hello = client_hello("a.test").replace(b"a.test", b"\xe4.test")
    assert read_hello(hello) == NO_NAME


# -- DomainNames ----------------------------------------------------------------------------

def test_exact_names_win_over_wildcards() -> None:
    names = DomainNames((("a.test",), ("*.a.test", "b.test"), ("x.a.test",)))
    assert names.index("a.test") == 0
    assert names.index("y.a.test") == 1
    assert names.index("x.a.test") == 2
    assert names.index("b.test") == 1


def test_a_wildcard_covers_one_label_only() -> None:
    names = DomainNames((("*.a.test",),))
    assert names.index("a.test") is None
    assert names.index("x.y.a.test") is None
    assert names.index("x.a.test") == 0


def test_a_name_with_an_empty_label_matches_no_wildcard() -> None:
    names = DomainNames((("a.test",), ("*.b.test",)))
    for name in (".b.test", "x..b.test", "..b.test"):
        assert names.index(name) is None, name


def test_no_name_and_unknown_names_have_no_domain() -> None:
    names = DomainNames((("a.test",),))
    assert names.index(None) is None
    assert names.index("") is None
    assert names.index("c.test") is None
    assert DomainNames(()).index("a.test") is None


def test_a_server_certificate_wildcard_needs_a_non_empty_label() -> None:
    from mtlsproxy.tls.contexts import ServerContexts
    default, star = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) for _ in range(2))
    contexts = ServerContexts(default, {}, {"b.test": star})
    assert contexts.select("x.b.test") is star
    for name in (".b.test", "x..b.test"):
        assert contexts.select(name) is None, name
