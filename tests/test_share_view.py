"""The tracking link's pure rules (tracker/share/view.py, limits.py): no loop, no I/O."""

from __future__ import annotations

import dataclasses

import orjson

from tracker.share.limits import MAX_KEYS, Buckets, Limits
from tracker.share.view import Link, expiry, gone, in_window, position, render

NEEDLE = orjson.dumps("\x01P-1")
LINK = Link(
    "acme", "P-1", 10_000_000, None, "picked_up", "d-1", 1_000, True, {"name": "C", "lat": 1.0, "lon": 2.0}, None
)


def test_the_window_needs_custody_an_open_view_and_the_mark_in_the_stamp() -> None:
    stamp = orjson.dumps(sorted(["c1", "\x01P-1"]))
    assert in_window(LINK, stamp, NEEDLE)
    assert not in_window(LINK, b'["c1"]', NEEDLE)  # the holder's newest position came after it let go
    assert not in_window(LINK, b'["c1","\\u0001P-10"]', NEEDLE)  # another package's mark is not this one
    assert not in_window(LINK, b"", NEEDLE)  # fail closed: no stamp at all
    for other in ({"state": "delivered"}, {"holder": None}, {"live_view": False}, {"state": "created"}):
        assert not in_window(dataclasses.replace(LINK, **other), stamp, NEEDLE), other


def test_a_client_id_never_matches_a_mark() -> None:
    # A client admin's needle is its JSON-quoted id; a mark starts with a control character no id has.
    assert orjson.dumps("P-1") not in orjson.dumps(["\x01P-1"])
    assert b'"\\u0001P-1"' == NEEDLE


def test_expiry_is_the_delivery_plus_the_grace_if_sooner() -> None:
    assert expiry(LINK, 3_600_000) == 10_000_000
    delivered = dataclasses.replace(LINK, state="delivered", state_ts=2_000_000)
    assert expiry(delivered, 3_600_000) == 5_600_000
    assert expiry(delivered, 9_000_000) == 10_000_000  # never past the link's own expiry
    assert gone(delivered, 3_600_000, 5_599_999) is None
    assert gone(delivered, 3_600_000, 5_600_000) == "this tracking link has expired"
    assert gone(dataclasses.replace(LINK, revoked_at=5), 0, 0) == "this tracking link was revoked"


def test_the_view_shows_no_driver_or_eta_outside_custody() -> None:
    driver = {"lat": 1.0, "lon": 2.0, "ts": 5}
    shown = render(LINK, 0, driver=driver, eta_ts=99)
    assert shown["driver"] == driver and shown["eta"] == {"ts": 99}
    assert set(shown) == {"package", "state", "ts", "destination", "window", "eta", "driver", "expires_at"}
    for state in ("created", "delivered", "failed", "returned"):
        view = render(dataclasses.replace(LINK, state=state), 0, driver=driver, eta_ts=99)
        assert view["driver"] is None and view["eta"] is None, state
    assert render(LINK, 0, driver=None, eta_ts=99)["eta"] is None  # no ETA without the driver


def test_position_keeps_where_and_when_only() -> None:
    frame = orjson.dumps({"type": "pos", "driver": "d-1", "seq": 4, "ts": 7, "lat": 1.5, "lon": 2.5, "bat": 0.3})
    assert position(frame) == {"lat": 1.5, "lon": 2.5, "ts": 7}
    assert position(b"{") is None and position(b'{"lat":1}') is None


def test_limits_per_address_first_then_per_link() -> None:
    limits = Limits(rate=1.0, ip_rate=2.0, burst=2)
    # One link read from three addresses: its own burst (2) is spent at the third.
    assert [limits.take("L", ip, 0.0) for ip in ("ip-1", "ip-2", "ip-3")] == [0.0, 0.0, 1.0]
    # One address reading other links (guessing tokens): its burst (2) is spent too, whatever the link.
    assert [limits.take(link, "ip-1", 0.0) for link in ("M", "N")] == [0.0, 0.5]
    assert limits.take("N", "ip-1", 0.5) == 0.0  # refilled at 2 per second


def test_buckets_are_bounded() -> None:
    b = Buckets(1.0, 1)
    for i in range(MAX_KEYS + 10):
        b.take(str(i), 0.0)
    assert len(b.buckets) == MAX_KEYS and "0" not in b.buckets
