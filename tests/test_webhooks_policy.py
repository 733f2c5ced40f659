"""The webhooks' pure parts: which addresses a delivery may reach, the retry schedule, signatures."""

from __future__ import annotations

import ipaddress

import pytest

from tracker.webhooks import policy, sign

NOW = 1_796_027_400_000
DAY_MS = 86_400_000


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.9.9.9", "::1", "10.0.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1",
        "169.254.169.254", "168.63.129.16", "fd00:ec2::254", "fe80::1", "fc00::1", "0.0.0.0", "::",
        "224.0.0.1", "ff02::1", "240.0.0.1", "255.255.255.255", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "192.0.0.192", "198.18.0.1",
    ],
)  # fmt: skip
def test_internal_addresses_are_blocked(address: str) -> None:
    assert policy.blocked(ipaddress.ip_address(address)) is not None
    with pytest.raises(policy.Refused):
        policy.check("h.example", [address], policy.AllowList())


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_public_addresses_pass(address: str) -> None:
    assert policy.blocked(ipaddress.ip_address(address)) is None
    assert policy.check("h.example", [address], policy.AllowList()) == [address]


def test_one_internal_address_refuses_the_whole_name() -> None:
    with pytest.raises(policy.Refused, match="private"):
        policy.check("h.example", ["93.184.215.14", "10.0.0.5"], policy.AllowList())
    with pytest.raises(policy.Refused, match="no address"):
        policy.check("h.example", [], policy.AllowList())


def test_the_allow_list_names_networks_and_hosts() -> None:
    allow = policy.AllowList.parse(["127.0.0.1", "10.20.0.0/16", "hooks.internal", " "])
    assert policy.check("x", ["127.0.0.1"], allow) == ["127.0.0.1"]
    assert policy.check("x", ["10.20.3.4"], allow) == ["10.20.3.4"]
    assert policy.check("hooks.internal", ["192.168.7.7"], allow) == ["192.168.7.7"]
    for host, address in (("x", "127.0.0.2"), ("x", "10.21.0.1"), ("other.internal", "192.168.7.7"), ("x", "::1")):
        with pytest.raises(policy.Refused):
            policy.check(host, [address], allow)


@pytest.mark.parametrize(
    "url",
    ["ftp://a.example/", "http:///x", "http://u:p@a.example/", "http://a.example/#f", "http://a.example/ x",
     "http://a.example:99999/", "//a.example/", "", "http://a.example/\r\nX: y", "x" * 3000],
)  # fmt: skip
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(policy.Refused):
        policy.parse_url(url)


def test_urls_are_parsed_for_the_request() -> None:
    t = policy.parse_url("https://Hooks.Example.com/a/b?x=1")
    assert (t.scheme, t.host, t.port, t.path, t.host_header) == (
        "https",
        "hooks.example.com",
        443,
        "/a/b?x=1",
        "hooks.example.com",
    )
    t = policy.parse_url("http://[2606:4700::1]:8080")
    assert (t.host, t.port, t.path, t.host_header) == ("2606:4700::1", 8080, "/", "[2606:4700::1]:8080")


def _delays(u: float, attempts: int = 40) -> list[int | None]:
    return [
        policy.next_attempt(n, NOW, NOW, base_s=5, cap_s=6 * 3600, window_s=3 * 86400, u=u) for n in range(1, attempts)
    ]


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    low, high = _delays(0.0), _delays(0.999999)
    for n, (lo, hi) in enumerate(zip(low, high, strict=True), start=1):
        assert lo is not None and hi is not None
        step = min(6 * 3600, 5 * 2 ** (n - 1)) * 1000
        assert lo - NOW == step // 2 and step // 2 <= hi - NOW <= step
    assert low[0] - NOW == 2_500 and high[-1] - NOW <= 6 * 3600 * 1000  # type: ignore[operator]


def test_retries_stop_at_the_end_of_the_window() -> None:
    created = NOW - 3 * DAY_MS + 1_000  # one second left
    last = policy.next_attempt(20, NOW, created, base_s=5, cap_s=6 * 3600, window_s=3 * 86400, u=0.5)
    assert last == created + 3 * DAY_MS  # one last attempt at the window's end, not after
    assert policy.next_attempt(21, last, created, base_s=5, cap_s=6 * 3600, window_s=3 * 86400, u=0.5) is None


def test_three_days_of_retries_with_the_defaults() -> None:
    """With the defaults, a delivery to an endpoint that never answers is attempted about 20 times
    over 3 days, then dead-lettered."""
    created = t = NOW
    attempts = 0
    while True:
        attempts += 1
        due = policy.next_attempt(attempts, t, created, base_s=5, cap_s=6 * 3600, window_s=3 * 86400, u=0.5)
        if due is None:
            break
        assert due > t
        t = due
    assert t == created + 3 * DAY_MS and 15 <= attempts <= 30


def test_signatures_follow_the_secret() -> None:
    a, b = sign.new_secret(), sign.new_secret()
    assert a != b and a.startswith("whsec_") and len(sign.key_of(a)) == 32
    one = sign.header([a], "msg_1", 1, b"{}")
    two = sign.header([a, b], "msg_1", 1, b"{}")
    assert two.split(" ")[0] == one and len(two.split(" ")) == 2
    assert sign.header([a], "msg_1", 2, b"{}") != one and sign.header([a], "msg_2", 1, b"{}") != one
    with pytest.raises(ValueError):
        sign.key_of("sk_nope")
