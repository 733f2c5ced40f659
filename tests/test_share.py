"""Recipient tracking links (tracker/share; PROTOCOL.md "Tracking links"), used as their users do.

A dispatcher (or the package's client admin) makes a link; the recipient reads it by polling and
by its live feed (server-sent events): the package's state, its ETA and the carrying driver's
position only while that driver holds this package, nothing after the delivery, nothing once
revoked or expired; who may make links; rate limits; the page's strict CSP.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from harness.clients import Phone, acked, now_ms, pos, scan
from harness.http import consign, http, pkg_path, request
from harness.instances import Instance
from harness.sse import EventStream
from harness.tokens import token
from harness.wait import eventually

DEST = {"name": "Langata Clinic", "lat": -1.30, "lon": 36.80}


async def share(inst: Instance, org: str, package: str, tok: str | None = None) -> tuple[int, Any]:
    return await http(inst, "POST", pkg_path(package, "/share"), tok or token("dispatcher", "disp", org))


def link_token(url: str) -> str:
    return urlsplit(url).fragment


async def view(inst: Instance, link: str) -> tuple[int, Any]:
    status, _, body = await request(inst, "GET", "/v1/share", link)
    return status, orjson.loads(body) if body else None


async def test_a_link_shows_its_package_and_its_driver_only_while_it_carries_it(start_instance: Any, org: str) -> None:
    inst = await start_instance()
    await consign(inst, org, "P-1", "c1", destination=DEST)
    await consign(inst, org, "P-2", "c1", destination={**DEST, "lat": -1.29})
    status, made = await share(inst, org, "P-1")
    assert status == 201, made
    assert made["package"] == "P-1" and made["expires_at"] > now_ms() + 86_400_000
    url = urlsplit(made["url"])
    assert url.path == "/share" and url.netloc == f"127.0.0.1:{inst.port}" and len(url.fragment) >= 40
    link = url.fragment

    phone = await Phone.connect(inst.url, token("driver", "d-1", org, name="Amina Otieno"))
    await phone.send(pos(1, lat=-1.35, lon=36.80, spd=10.0))
    await acked(phone, 1)
    status, before = await view(inst, link)
    assert status == 200
    assert before["state"] == "created" and before["driver"] is None and before["eta"] is None
    assert before["destination"] == DEST and "client" not in before

    await phone.send(scan(2, "P-1"))
    await phone.send(scan(3, "P-2"))
    await acked(phone, 2, 3)
    await eventually(lambda: view(inst, link), lambda v: v[1]["state"] == "picked_up")
    ts = now_ms()
    await phone.send(pos(4, ts=ts, lat=-1.34, lon=36.80, spd=10.0))
    await acked(phone, 4)
    _, during = await eventually(lambda: view(inst, link), lambda v: v[1]["driver"] is not None)
    assert during["driver"] == {"lat": -1.34, "lon": 36.80, "ts": ts}  # where and when: no id, no name
    assert during["eta"]["ts"] > now_ms() and set(during["eta"]) == {"ts"}

    # The other package's delivery changes nothing here: the driver still holds P-1.
    await phone.send(scan(5, "P-2", "deliver", recipient="Dr K"))
    await phone.send(pos(6, lat=-1.33, lon=36.80, spd=10.0))
    await acked(phone, 5, 6)
    await eventually(lambda: view(inst, link), lambda v: v[1]["driver"] and v[1]["driver"]["lat"] == -1.33)

    # Delivered: a position sent right behind the delivery never shows, nor anything after.
    await phone.send(scan(7, "P-1", "deliver", recipient="Dr K"))
    await phone.send(pos(8, lat=-1.31, lon=36.80, spd=10.0))
    await acked(phone, 7, 8)
    _, after = await eventually(lambda: view(inst, link), lambda v: v[1]["state"] == "delivered")
    assert after["driver"] is None and after["eta"] is None
    assert after["expires_at"] == after["ts"] + 3_600_000  # the delivery plus the grace

    status, revoked = await http(inst, "DELETE", pkg_path("P-1", "/share"), token("dispatcher", "disp", org))
    assert (status, revoked) == (200, {"package": "P-1", "revoked": 1})
    status, gone = await view(inst, link)
    assert status == 410 and gone["error"]["code"] == "gone"
    assert (await view(inst, "x" * 43))[0] == 404


async def test_who_may_make_a_link(start_instance: Any, org: str) -> None:
    inst = await start_instance()
    await consign(inst, org, "P-1", "c1", destination=DEST)
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    await phone.send(scan(1, "P-9"))  # scanned, never consigned
    await acked(phone, 1)
    assert (await share(inst, org, "P-1", token("client", "a", org, client="c1")))[0] == 201
    assert (await share(inst, org, "P-1", token("client", "a", org, client="c2")))[0] == 404
    assert (await share(inst, org, "P-1", token("dispatcher", "a", "other-" + org)))[0] == 404
    assert (await share(inst, org, "P-1", token("driver", "d-1", org)))[0] == 403
    assert (await share(inst, org, "NOPE"))[0] == 404
    await eventually(lambda: http(inst, "GET", pkg_path("P-9"), token("dispatcher", "d", org)), lambda r: r[0] == 200)
    assert (await share(inst, org, "P-9"))[0] == 409  # not consigned: no destination to show
    assert (await share(inst, org, "P-9", token("client", "a", org, client="c1")))[0] == 404
    status, _ = await http(inst, "DELETE", pkg_path("P-1", "/share"), token("client", "a", org, client="c2"))
    assert status == 404


async def test_expiry_at_delivery_plus_grace(start_instance: Any, org: str) -> None:
    inst = await start_instance(share_grace_s=0)
    await consign(inst, org, "P-1", "c1", destination=DEST)
    _, made = await share(inst, org, "P-1")
    link = link_token(made["url"])
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    await phone.send(scan(1, "P-1"))
    await phone.send(scan(2, "P-1", "deliver", recipient="Dr K"))
    await acked(phone, 1, 2)
    _, body = await eventually(lambda: view(inst, link), lambda v: v[0] == 410)
    assert body["error"]["message"] == "this tracking link has expired"
    assert (await share(inst, org, "P-1"))[0] == 409  # delivered longer ago than a link lives


async def test_rate_limited_per_link_and_per_address(start_instance: Any, org: str) -> None:
    inst = await start_instance(share_rate_per_s=0.01, share_ip_rate_per_s=0.01, share_burst=3)
    await consign(inst, org, "P-1", "c1", destination=DEST)
    _, made = await share(inst, org, "P-1")
    link = link_token(made["url"])
    assert [(await view(inst, link))[0] for _ in range(4)] == [200, 200, 200, 429]
    status, body = await view(inst, "guess" * 9)  # the address's budget is spent too
    assert status == 429 and body["error"]["code"] == "rate_limited"


async def test_live_feed_follows_the_package_and_ends_when_revoked(start_instance: Any, org: str) -> None:
    inst = await start_instance(share_live_s=0.1)
    await consign(inst, org, "P-1", "c1", destination=DEST)
    _, made = await share(inst, org, "P-1")
    link = link_token(made["url"])
    feed = await EventStream.open(inst.port, "/v1/share/events", link)
    assert feed.status == 200 and feed.headers["content-type"].startswith("text/event-stream")
    name, first = await feed.next()
    assert name == "view" and first["state"] == "created"
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    await phone.send(scan(1, "P-1"))
    await phone.send(pos(2, lat=-1.34, lon=36.8, spd=9.0))
    await acked(phone, 1, 2)
    while True:
        name, v = await feed.next()
        assert name == "view"
        if v["driver"] is not None:
            break
    assert v["driver"]["lat"] == -1.34 and v["state"] == "picked_up"
    await http(inst, "DELETE", pkg_path("P-1", "/share"), token("dispatcher", "disp", org))
    while (event := await feed.next()) is not None and event[0] == "view":
        pass
    assert event is not None and event[0] == "gone"
    assert await feed.next() is None  # and the feed ends
    await feed.close()
    refused = await EventStream.open(inst.port, "/v1/share/events", link)
    assert refused.status == 410


async def test_the_page_has_its_own_strict_csp(instance: Instance) -> None:
    status, headers, body = await request(instance, "GET", "/share")
    assert status == 200 and b'src="/static/share.js"' in body
    csp = headers["content-security-policy"]
    assert csp.startswith("default-src 'none'; script-src 'self'") and "connect-src 'self'" in csp
    assert "unsafe" not in csp and headers["referrer-policy"] == "no-referrer"
    status, headers, _ = await request(instance, "GET", "/static/share.js")
    assert status == 200 and "javascript" in headers["content-type"]


@pytest.mark.parametrize("header", ["", "Basic abc", "Bearer "])
async def test_a_view_needs_a_link_token(instance: Instance, header: str) -> None:
    status, _, _ = await request(instance, "GET", "/v1/share", headers={"Authorization": header} if header else None)
    assert status == 401


async def test_live_feeds_end_when_the_instance_drains(start_instance: Any, org: str) -> None:
    """A rolling deploy is not held up by recipients' open feeds: they end once draining starts
    (the page falls back to polling, then follows another instance)."""
    inst = await start_instance(share_live_s=0.1, shutdown_grace_s=10)
    await consign(inst, org, "P-1", "c1", destination=DEST)
    _, made = await share(inst, org, "P-1")
    feed = await EventStream.open(inst.port, "/v1/share/events", link_token(made["url"]))
    assert (await feed.next())[0] == "view"  # type: ignore[index]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await inst.stop()
    assert loop.time() - started < 5, "the instance waited for the feed to end (uvicorn's graceful timeout)"
    assert await feed.next() is None
    await feed.close()


async def test_the_driver_name_only_where_the_org_allows_it(start_instance: Any, org: str) -> None:
    inst = await start_instance(share_driver_name_orgs=(org,))
    await consign(inst, org, "P-1", "c1", destination=DEST)
    _, made = await share(inst, org, "P-1")
    phone = await Phone.connect(inst.url, token("driver", "d-1", org, name="Amina Otieno"))
    await phone.send(scan(1, "P-1"))
    await phone.send(pos(2, lat=-1.34, lon=36.8, spd=9.0))
    await acked(phone, 1, 2)
    _, v = await eventually(lambda: view(inst, link_token(made["url"])), lambda r: r[1]["driver"] is not None)
    assert v["driver"]["name"] == "Amina Otieno" and "d-1" not in orjson.dumps(v).decode()
