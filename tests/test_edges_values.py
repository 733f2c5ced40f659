"""Odd values and small protocol edges over real sockets (issue 11, items 4, 5 and 9).

A frame that is valid JSON is never called "not JSON": a number that overflows a double or a lone
surrogate escape costs only the field (optional: stored as null) or the event (required: `invalid`
naming its seq), never the batch or the connection. Token claims, package ids and consignment ids
with bidi overrides, zero-width characters or lone surrogates are refused. Binary frames close 1003,
pings over 125 bytes 1002, on the uvicorn fast path and on the portable ASGI path alike.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import pytest
from websockets.asyncio.client import connect

from harness.clients import Dash, Peer, Phone, now_ms, pos, scan
from harness.http import DEST, consign, http
from harness.instances import Instance
from harness.tokens import token
from tracker.protocol.wscodec import OP_PING, OP_TEXT, apply_mask, encode_frame

# Valid JSON that orjson refuses: a number beyond a double, and half a surrogate pair (an emoji cut in two).
HUGE = "1e400"
HALF_EMOJI = '"ok \\ud83d"'
BIDI = ["PKG\u202e1", "PKG\u2066x\u2069", "PKG\u200b1", "PKG\u2060", "\ufeffPKG", "PKG\u200d1"]


def raw(obj: dict[str, Any], **fields: str) -> str:
    """`obj` as JSON text with `fields` spliced in as raw JSON (values orjson cannot produce)."""
    text = orjson.dumps(obj).decode()[:-1]
    return text + "".join(f',"{k}":{v}' for k, v in fields.items()) + "}"


def batch(items: list[str]) -> str:
    return '{"type":"batch","items":[' + ",".join(items) + "]}"


async def still_open(phone: Phone, seq: int) -> None:
    await phone.send(pos(seq))
    await phone.until(lambda p: seq in p.acked)


# -- item 4: one odd value costs nothing else ----------------------------------------------------


async def test_overflowing_optional_number_is_stored_as_null_and_the_batch_acked(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    t = now_ms() - 10_000
    items = [orjson.dumps(pos(s, ts=t + s, bat=0.5)).decode() for s in range(1, 11)]
    items[4] = raw(pos(5, ts=t + 5), bat=HUGE, spd="-1e400")
    await phone.send(batch(items))
    await phone.until(lambda p: p.acked == set(range(1, 11)))
    assert phone.errors == []
    rows = dict(await db.fetch("SELECT seq, bat FROM positions WHERE org=$1 AND driver_id='d-1'", org))
    assert rows[5] is None and rows[4] == pytest.approx(0.5) and len(rows) == 10
    await still_open(phone, 11)


async def test_lone_surrogate_in_a_note_is_stored_as_null_and_the_batch_acked(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    t = now_ms() - 10_000
    items = [orjson.dumps(pos(s, ts=t + s)).decode() for s in range(1, 10)]
    items.append(raw(scan(10, "PKG-1", ts=t + 10), note=HALF_EMOJI))
    await phone.send(batch(items))
    await phone.until(lambda p: p.acked == set(range(1, 11)))
    assert phone.errors == []
    row = await db.fetchrow("SELECT package, note FROM scans WHERE org=$1 AND driver_id='d-1' AND seq=10", org)
    assert row is not None and row["package"] == "PKG-1" and row["note"] is None
    await still_open(phone, 11)


async def test_bad_required_values_refuse_their_event_alone(instance: Instance, org: str) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    t = now_ms() - 10_000
    items = [orjson.dumps(pos(s, ts=t + s)).decode() for s in range(1, 11)]
    items[1] = raw({k: v for k, v in pos(2, ts=t).items() if k != "lat"}, lat=HUGE)
    items[2] = raw({k: v for k, v in scan(3, "x", ts=t).items() if k != "package"}, package='"PKG-\\udc00"')
    items[3] = orjson.dumps(scan(4, BIDI[0], ts=t)).decode()
    items[4] = orjson.dumps(scan(5, BIDI[2], ts=t)).decode()
    items[5] = raw({k: v for k, v in pos(6, ts=t).items() if k != "ts"}, ts="1e400")
    await phone.send(batch(items))
    await phone.until(lambda p: len(p.acked) + len(p.errors) == 10)
    assert p_refused(phone) == {2: "invalid", 3: "invalid", 4: "invalid", 5: "invalid", 6: "invalid"}
    assert phone.acked == {1, 7, 8, 9, 10}
    assert all("JSON" not in e.get("message", "") for e in phone.errors)
    await still_open(phone, 11)


def p_refused(phone: Phone) -> dict[int, str]:
    return {e["seq"]: e["code"] for e in phone.errors}


async def test_hello_with_odd_values_is_welcomed(instance: Instance, org: str) -> None:
    peer = Peer(await connect(instance.url + "/v1/driver", compression=None))
    await peer.send(raw({"type": "hello", "token": token("driver", "d-1", org)}, device=HALF_EMOJI, x=HUGE))
    assert (await peer.recv())["type"] == "welcome"
    dash = Peer(await connect(instance.url + "/v1/live", compression=None))
    await dash.send(raw({"type": "hello", "token": token("dispatcher", "u-1", org)}, app=HALF_EMOJI, x=HUGE))
    assert (await dash.recv())["type"] == "welcome"
    await dash.send(raw({"type": "subscribe"}, note=HALF_EMOJI, zoom=HUGE))
    assert (await dash.recv())["type"] == "snapshot"


async def test_token_with_a_lone_surrogate_is_unauthorized_not_a_crash(instance: Instance, org: str) -> None:
    good = token("driver", "d-1", org)
    peer = Peer(await connect(instance.url + "/v1/driver", compression=None))
    await peer.send('{"type":"hello","token":"' + good[:20] + "\\ud83d" + good[21:] + '"}')
    frame = await peer.recv()
    assert frame["code"] == "unauthorized" and frame["message"] == "token is malformed", frame
    assert await peer.closed() == 4000


async def test_subscribe_with_an_overflowing_bbox_is_a_protocol_error_not_not_json(
    instance: Instance, org: str
) -> None:
    dash = Peer(await connect(instance.url + "/v1/live", compression=None))
    await dash.send({"type": "hello", "token": token("dispatcher", "u-1", org)})
    assert (await dash.recv())["type"] == "welcome"
    await dash.send('{"type":"subscribe","bbox":[-1e400,-10,10,10]}')
    frame = await dash.recv()
    assert frame["code"] == "protocol" and "bbox" in frame["message"], frame


@pytest.mark.parametrize("odd", ['"PKG-\\ud83d"', '"PKG-\\u0000"'])
async def test_an_odd_id_in_a_subscribe_costs_the_snapshot_nothing(instance: Instance, org: str, odd: str) -> None:
    await consign(instance, org, "PKG-1", "st-marys")
    dash = Peer(await connect(instance.url + "/v1/live", compression=None))
    await dash.send({"type": "hello", "token": token("dispatcher", "u-1", org)})
    assert (await dash.recv())["type"] == "welcome"
    await dash.send('{"type":"subscribe","packages":["PKG-1",' + odd + "]}")
    snap = await dash.recv()
    while snap["type"] != "snapshot":
        snap = await dash.recv()
    assert [p["package"] for p in snap["packages"]] == ["PKG-1"]


# -- item 5 / 9: claims and ids ------------------------------------------------------------------

BAD_CLAIMS = [
    {"name": "Amina \ud83d"},
    {"name": "Amina\u202e"},
    {"name": 42},
    {"name": "x" * 101},
    {"sub": "d-1\u200b"},
    {"sub": "d\u2066-1"},
    {"org_suffix": "\u202d"},
]


@pytest.mark.parametrize("claims", BAD_CLAIMS, ids=[repr(c) for c in BAD_CLAIMS])
@pytest.mark.parametrize("path", ["/v1/driver", "/v1/live"])
async def test_bad_string_claims_are_unauthorized(
    instance: Instance, org: str, path: str, claims: dict[str, Any]
) -> None:
    claims = dict(claims)
    role = "driver" if path == "/v1/driver" else "dispatcher"
    tok = token(role, claims.pop("sub", "d-1"), org + claims.pop("org_suffix", ""), **claims)
    peer = Peer(await connect(instance.url + path, compression=None))
    await peer.send({"type": "hello", "token": tok})
    frame = await peer.recv()
    assert frame["type"] == "error" and frame["code"] == "unauthorized", frame
    assert "must be" in frame["message"], frame
    assert await peer.closed() == 4000


async def test_client_claim_with_bidi_override_is_unauthorized(instance: Instance, org: str) -> None:
    peer = Peer(await connect(instance.url + "/v1/live", compression=None))
    await peer.send({"type": "hello", "token": token("client", "u-1", org, client="st-marys\u202e")})
    frame = await peer.recv()
    assert frame["code"] == "unauthorized" and "client" in frame["message"], frame
    assert await peer.closed() == 4000


@pytest.mark.parametrize("package", BIDI)
async def test_consignment_ids_with_invisible_or_bidi_characters_are_refused(
    instance: Instance, org: str, package: str
) -> None:
    body = {"id": package, "client": "st-marys", "destination": DEST}
    status, out = await http(instance, "POST", "/v1/packages", token("dispatcher", "disp", org), body)
    assert status == 400 and out["error"]["code"] == "invalid" and out["error"]["message"].startswith("id:"), out


async def test_consignment_client_with_bidi_override_is_refused(instance: Instance, org: str) -> None:
    body = {"id": "PKG-1", "client": "st-marys\u202e", "destination": DEST}
    status, out = await http(instance, "POST", "/v1/packages", token("dispatcher", "disp", org), body)
    assert status == 400 and out["error"]["message"].startswith("client:"), out  # held by the client id regex


# -- item 9: error messages are the service's own words -----------------------------------------


async def test_a_badly_signed_token_is_answered_in_the_services_words(instance: Instance, org: str) -> None:
    tok = token("driver", "d-1", org, secret="another-secret-" + "y" * 40)
    peer = Peer(await connect(instance.url + "/v1/driver", compression=None))
    await peer.send({"type": "hello", "token": tok})
    frame = await peer.recv()
    assert frame == {"type": "error", "code": "unauthorized", "message": "token signature is invalid"}
    assert await peer.closed() == 4000


# -- item 9: control and binary frames, on both transport paths ---------------------------------

PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "portable"])


@PATHS
async def test_ping_over_125_bytes_closes_1002(start_instance: Any, org: str, fast: bool) -> None:
    inst = await start_instance(ws_fast_path=fast)
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    # encode_frame (and every websockets client) refuses to build it: the bytes are written by hand.
    mask = b"\x01\x02\x03\x04"
    frame = bytes([0x80 | OP_PING, 0x80 | 126]) + (126).to_bytes(2, "big") + mask + apply_mask(b"p" * 126, mask)
    phone.ws.transport.write(frame)
    assert await phone.closed() == 1002


@PATHS
async def test_binary_frames_close_1003_on_both_endpoints(start_instance: Any, org: str, fast: bool) -> None:
    inst = await start_instance(ws_fast_path=fast)
    hello = orjson.dumps({"type": "hello", "token": token("driver", "d-1", org)})
    peer = Peer(await connect(inst.url + "/v1/driver", compression=None))
    await peer.send(hello)  # a binary hello
    assert await peer.closed() == 1003

    phone = await Phone.connect(inst.url, token("driver", "d-2", org))
    await phone.send(orjson.dumps(pos(1)))  # a binary pos after welcome
    assert await phone.closed() == 1003
    assert 1 not in phone.acked

    dash = await Dash.connect(inst.url, token("dispatcher", "u-1", org))
    await dash.send(orjson.dumps({"type": "subscribe"}))
    assert await dash.closed() == 1003
    peer = Peer(await connect(inst.url + "/v1/live", compression=None))
    await peer.send(orjson.dumps({"type": "hello", "token": token("dispatcher", "u-1", org)}))
    assert await peer.closed() == 1003


@PATHS
async def test_a_text_frame_that_is_not_utf8_before_hello_closes_1007(start_instance: Any, fast: bool) -> None:
    """The fast path queues pre-hello frames as the ASGI text messages they are (so that a binary one
    can be told apart): one that is not UTF-8 closes 1007, as on the portable path."""
    inst = await start_instance(ws_fast_path=fast)
    peer = Peer(await connect(inst.url + "/v1/driver", compression=None))
    peer.ws.transport.write(encode_frame(OP_TEXT, b'{"type":"hello","token":"\xff"}', mask=b"\x01\x02\x03\x04"))
    assert await peer.closed() == 1007
