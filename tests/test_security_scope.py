"""Every frame is authorised, not only the connection: an event cannot choose whom it is stored as,
a hello cannot choose its identity, and a subscription only narrows the token's scope (ids of other
orgs and clients are ignored and never leak, live, in snapshots or over HTTP)."""

from __future__ import annotations

from typing import Any

import asyncpg

from harness.clients import Dash, Peer, Phone, acked, frames_of, now_ms, pos, scan, until_frame
from harness.http import consign, http, pkg_path
from harness.instances import Instance
from harness.tokens import token

# Fields an attacker could hope the server reads from an event instead of from the token.
SPOOF = {
    "driver": "d-victim",
    "driver_id": "d-victim",
    "sub": "d-victim",
    "org": "VICTIM",
    "role": "dispatcher",
    "client": "c-victim",
    "name": "Victim",
    "received_at": 1,
    "owner": "d-victim",
}


async def test_an_event_cannot_choose_whom_it_is_stored_as(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    victim_org = org + "-victim"
    spoof = {**SPOOF, "org": victim_org}
    mine = await Dash.connect(instance.url, token("dispatcher", "u-1", org), subscribe={})
    theirs = await Dash.connect(instance.url, token("dispatcher", "u-9", victim_org), subscribe={})
    rogue = await Phone.connect(instance.url, token("driver", "d-rogue", org))
    t = now_ms()
    await rogue.send(pos(1, ts=t, **spoof))
    await rogue.send(scan(2, "PKG-1", ts=t + 1, **spoof))
    await rogue.send({"type": "batch", **spoof, "items": [pos(3, ts=t + 2, lat=-1.3, **spoof)]})
    await rogue.until(lambda p: p.acked == {1, 2, 3})
    stored = await db.fetch(
        "SELECT org, driver_id, seq FROM positions WHERE org = ANY($1) "
        "UNION ALL SELECT org, driver_id, seq FROM scans WHERE org = ANY($1) ORDER BY 3",
        [org, victim_org],
    )
    assert [tuple(r) for r in stored] == [(org, "d-rogue", 1), (org, "d-rogue", 2), (org, "d-rogue", 3)]
    drivers = await db.fetch("SELECT org, driver_id, name FROM drivers WHERE org = ANY($1)", [org, victim_org])
    assert [tuple(r) for r in drivers] == [(org, "d-rogue", None)]
    got: list[dict[str, Any]] = []
    await until_frame(mine, got, "pos", seq=3)
    assert {f["driver"] for f in got if "driver" in f} == {"d-rogue"}
    assert "Victim" not in repr(got) and victim_org not in repr(got)
    # The victim org saw none of it: its next frame is its own driver's.
    victim = await Phone.connect(instance.url, token("driver", "d-victim", victim_org))
    await victim.send(pos(1, lat=5.0))
    seen = await theirs.collect(lambda fs: any(f["type"] == "pos" for f in fs))
    assert [(f["driver"], f.get("lat")) for f in seen if f["type"] in ("pos", "scan")] == [("d-victim", 5.0)]


async def test_hello_fields_cannot_choose_the_identity(instance: Instance, org: str) -> None:
    phone = Phone(await _raw(instance, "/v1/driver"))
    await phone.send({"type": "hello", "token": token("driver", "d-1", org), **SPOOF})
    welcome = await phone.recv()
    assert welcome["type"] == "welcome" and welcome["driver"] == "d-1"
    dash = Peer(await _raw(instance, "/v1/live"))  # a bare socket: the test writes its own hello
    await dash.send({"type": "hello", "token": token("client", "u-1", org, client="c-1"), **SPOOF})
    assert await dash.recv() == {"type": "welcome", "role": "client", "org": org, "client": "c-1"}


async def _raw(inst: Instance, path: str) -> Any:
    from websockets.asyncio.client import connect

    return await connect(inst.url + path, compression=None)


async def test_a_dispatcher_naming_another_orgs_ids_gets_nothing(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    """Org B's dispatcher subscribes to org A's driver and package ids (B has a driver of the same id):
    A's frames never reach it, its snapshot and HTTP reads hold only B's."""
    org_b = org + "-b"
    await consign(instance, org, "PKG-A", "clinic-a")
    a_dash = await Dash.connect(instance.url, token("dispatcher", "u-a", org), subscribe={})
    a_phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    await a_phone.send(pos(1, lat=-1.0))
    await a_phone.send(scan(2, "PKG-A", "pickup"))
    await acked(a_phone, 1, 2)
    b_dash = await Dash.connect(instance.url, token("dispatcher", "u-b", org_b))
    snap = await b_dash.subscribe({"drivers": ["d-1"], "packages": ["PKG-A"]})
    assert snap == {"drivers": [], "packages": [], "alerts": []}
    await a_phone.send(pos(3, lat=-1.1))
    await a_phone.send(scan(4, "PKG-A", "deliver"))
    a_got: list[dict[str, Any]] = []
    await until_frame(a_dash, a_got, "package", state="delivered")  # A's frames were fanned out
    b_phone = await Phone.connect(instance.url, token("driver", "d-1", org_b))
    await b_phone.send(pos(1, lat=7.0))
    b_got = await b_dash.collect(lambda fs: any(f["type"] == "pos" for f in fs))
    assert [f.get("lat") for f in b_got if f["type"] in ("pos", "scan", "package")] == [7.0]
    assert "PKG-A" not in repr(b_got)
    b_tok = token("dispatcher", "u-b", org_b)
    assert (await http(instance, "GET", pkg_path("PKG-A"), b_tok))[0] == 404
    _, listed = await http(instance, "GET", "/v1/packages", b_tok, query={"client": "clinic-a"})
    assert listed["packages"] == []
    _, trail = await http(instance, "GET", "/v1/drivers/d-1/trail", b_tok)
    assert trail["geometry"]["coordinates"] == [[36.82195, 7.0]]  # B's own d-1, none of A's points


async def test_a_client_cannot_widen_its_scope(instance: Instance, org: str) -> None:
    """A client admin subscribes to a driver carrying another client's package, and to that package:
    it sees nothing of them, live or over HTTP; its own package's carrier it does see."""
    await consign(instance, org, "PKG-THEIRS", "clinic-b")
    await consign(instance, org, "PKG-MINE", "clinic-a")
    carrier = await Phone.connect(instance.url, token("driver", "d-b", org))
    await carrier.send(scan(1, "PKG-THEIRS", "pickup"))
    await acked(carrier, 1)
    client_tok = token("client", "u-a", org, client="clinic-a")
    dash = await Dash.connect(instance.url, client_tok)
    snap = await dash.subscribe({"drivers": ["d-b"], "packages": ["PKG-THEIRS", "PKG-MINE"]})
    assert [p["package"] for p in snap["packages"]] == ["PKG-MINE"] and snap["drivers"] == []
    await carrier.send(pos(2, lat=-1.5))
    await acked(carrier, 2)
    mine = await Phone.connect(instance.url, token("driver", "d-a", org))
    await mine.send(scan(1, "PKG-MINE", "pickup"))
    got: list[dict[str, Any]] = []
    await until_frame(dash, got, "package", package="PKG-MINE", state="picked_up")
    await mine.send(pos(2, lat=-1.7))
    await until_frame(dash, got, "pos", driver="d-a")
    assert not frames_of(got, "pos", driver="d-b") and "PKG-THEIRS" not in repr(got) and "d-b" not in repr(got)
    for path in (pkg_path("PKG-THEIRS"), pkg_path("PKG-THEIRS", "/verify"), "/v1/drivers/d-b/trail"):
        status, out = await http(instance, "GET", path, client_tok)
        assert (status, out["error"]["code"]) == (404, "not_found"), path
    _, drivers = await http(instance, "GET", "/v1/drivers", client_tok)
    assert [d["driver"] for d in drivers["drivers"]] == ["d-a"]
