"""syntax.py: paths, domains, address literals, ESMTP parameters, xtext."""

from __future__ import annotations

import pytest

from gannet.smtp import replies as R
from gannet.smtp.syntax import (
    SyntaxProblem,
    is_address_literal,
    is_domain,
    parse_domain_arg,
    parse_forward_path,
    parse_params,
    parse_reverse_path,
    parse_size,
    split_path,
    xtext_decode,
)


@pytest.mark.parametrize(
    ("arg", "path", "params"),
    [
        ("FROM:<a@b.c>", "a@b.c", ""),
        ("from:<a@b.c>", "a@b.c", ""),
        ("FROM: <a@b.c>", "a@b.c", ""),  # lenient: space after the colon
        ("FROM:  <a@b.c> SIZE=1", "a@b.c", " SIZE=1"),
        ("FROM:<>", "", ""),
        ("FROM:a@b.c SIZE=1", "a@b.c", "SIZE=1"),  # lenient: no brackets
        ('FROM:<"a>b"@c.d> X=1', '"a>b"@c.d', " X=1"),  # ">" inside quotes
        ('FROM:<"a\\"b>"@c.d>', '"a\\"b>"@c.d', ""),
    ],
)
def test_split_path(arg: str, path: str, params: str) -> None:
    assert split_path(arg, "FROM:") == (path, params)


@pytest.mark.parametrize(
    ("arg", "reply"),
    [
        ("TO:<a@b.c>", R.R501_SYNTAX_PARAMS),  # wrong keyword
        ("FROM <a@b.c>", R.R501_SYNTAX_PARAMS),
        ("FROM:<a@b.c", R.R501_BAD_ADDRESS),
        ("FROM:<a@b.c>SIZE=1", R.R501_SYNTAX_PARAMS),
        ("FROM:", R.R501_BAD_ADDRESS),
        ('FROM:<"a@b.c>', R.R501_BAD_ADDRESS),
    ],
)
def test_split_path_refusals(arg: str, reply: R.Reply) -> None:
    with pytest.raises(SyntaxProblem) as info:
        split_path(arg, "FROM:")
    assert info.value.reply == reply


@pytest.mark.parametrize(
    ("path", "address"),
    [
        ("", ""),
        ("alice@example.org", "alice@example.org"),
        ("Alice.Smith@Example.ORG", "Alice.Smith@Example.ORG"),  # case preserved
        ("a+tag@example.org", "a+tag@example.org"),
        ("!#$%&'*+-/=?^_`{|}~@x.y", "!#$%&'*+-/=?^_`{|}~@x.y"),
        ('"john doe"@example.org', '"john doe"@example.org'),
        ('"a\\"b"@example.org', '"a\\"b"@example.org'),
        ('"a@b"@example.org', '"a@b"@example.org'),
        ("a..b@example.org", "a..b@example.org"),  # lenient
        ("user@[192.0.2.1]", "user@[192.0.2.1]"),
        ("user@[IPv6:2001:db8::1]", "user@[IPv6:2001:db8::1]"),
        ("user@[ipv6:::1]", "user@[ipv6:::1]"),
        ("user@[x-tag:abc]", "user@[x-tag:abc]"),
        ("@relay.example:user@example.org", "user@example.org"),  # RFC 5321 §C source route
        ("@r1.example,@[192.0.2.1]:user@example.org", "user@example.org"),
        ("jöran@bücher.example", "jöran@bücher.example"),  # UTF-8 (caller checks SMTPUTF8)
        ("a@xn--bcher-kva.example", "a@xn--bcher-kva.example"),
    ],
)
def test_reverse_path(path: str, address: str) -> None:
    assert parse_reverse_path(path) == address


@pytest.mark.parametrize(
    "path",
    [
        "alice",
        "@example.org",
        "alice@",
        "alice@-example.org",
        "alice@example-.org",
        "alice@exa_mple.org",
        "alice@example..org",
        "alice@example.org.",
        "al ice@example.org",
        "alice@[192.0.2.256]",
        "alice@[192.0.2]",
        "alice@[IPv6:2001:db8::g]",
        "alice@[]",
        "alice@[x-tag]",
        '"unterminated@example.org',
        '"bad"quote"@example.org',
        "@relay.example",
        "@bad_relay:user@example.org",
        "relay:user@example.org",
        "a@" + "x" * 64 + ".org",  # label > 63
        "a@" + ".".join(["abcdefgh"] * 30),  # domain > 255
    ],
)
def test_bad_paths(path: str) -> None:
    with pytest.raises(SyntaxProblem) as info:
        parse_reverse_path(path)
    assert info.value.reply == R.R501_BAD_ADDRESS


def test_forward_path() -> None:
    assert parse_forward_path("bob@example.net") == "bob@example.net"
    assert parse_forward_path("Postmaster") == "Postmaster"  # RFC 5321 §4.5.1
    assert parse_forward_path("postmaster") == "postmaster"
    assert parse_forward_path("@a.example:bob@example.net") == "bob@example.net"
    for bad in ("", "bob", "bob@"):
        with pytest.raises(SyntaxProblem) as info:
            parse_forward_path(bad)
        assert info.value.reply == R.R501_BAD_ADDRESS


def test_domains_and_literals() -> None:
    assert is_domain("example.org")
    assert is_domain("a")
    assert is_domain("1.2.3.4")  # syntactically a domain
    assert not is_domain("")
    assert not is_domain("-a.org")
    assert is_address_literal("[127.0.0.1]")
    assert not is_address_literal("127.0.0.1")
    assert not is_address_literal("[IPv6:1.2.3.4]")
    assert not is_address_literal("[1.2.3.4.5]")


def test_params() -> None:
    assert parse_params("") == {}
    assert parse_params(" SIZE=10  body=8BITMIME SMTPUTF8 ") == {
        "SIZE": "10",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }
    assert parse_params("X-FOO=bar") == {"X-FOO": "bar"}
    for bad in ("SIZE=1 SIZE=2", "=1", "-X=1", "X=", "X=a=b", "X_Y=1"):
        with pytest.raises(SyntaxProblem) as info:
            parse_params(bad)
        assert info.value.reply == R.R501_SYNTAX_PARAMS


@pytest.mark.parametrize(
    ("text", "decoded"),
    [("abc", "abc"), ("a+2Bb", "a+b"), ("+3D", "="), ("x+2bx", "x+x"), ("", ""), ("<>", "<>")],
)
def test_xtext(text: str, decoded: str) -> None:
    assert xtext_decode(text) == decoded


@pytest.mark.parametrize("text", ["a+", "a+2", "a+GG", "a=b", "a b", "é"])
def test_bad_xtext(text: str) -> None:
    with pytest.raises(SyntaxProblem):
        xtext_decode(text)


def test_size_and_helo_argument() -> None:
    assert parse_size("0") == 0
    assert parse_size("12345") == 12345
    for bad in (None, "", "-1", "1e3", "١٢", "1" * 21):
        with pytest.raises(SyntaxProblem):
            parse_size(bad)
    assert parse_domain_arg("client.example") == "client.example"
    assert parse_domain_arg("  [192.0.2.1] extra words") == "[192.0.2.1]"
    assert parse_domain_arg("my_host") == "my_host"  # judged by policy, not the grammar
    with pytest.raises(SyntaxProblem):
        parse_domain_arg("   ")
