"""Driver ingest end to end: real websockets, real PostgreSQL, real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest

from harness.clients import Phone, now_ms, pos, scan
from harness.instances import Instance
from harness.tokens import token


async def stored_seqs(db: asyncpg.Connection, org: str, driver: str) -> set[int]:
    rows = await db.fetch(
        "SELECT seq FROM positions WHERE org=$1 AND driver_id=$2 "
        "UNION ALL SELECT seq FROM scans WHERE org=$1 AND driver_id=$2",
        org,
        driver,
    )
    seqs = [r["seq"] for r in rows]
    assert len(seqs) == len(set(seqs)), "an event was stored twice"
    return set(seqs)


async def test_200_positions_acked_only_after_commit(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    assert phone.welcome["last_seq"] == 0
    assert phone.welcome["max_frame"] == 65536 and phone.welcome["max_batch"] == 300
    t0 = now_ms()
    for seq in range(1, 201):
        await phone.send(pos(seq, ts=t0 + seq))
    # Every time an ack arrives, every seq it names must already be committed.
    async with asyncio.timeout(15):
        while len(phone.acked) < 200:
            frame = await phone.pump()
            if frame["type"] == "ack":
                named = {s for a, b in frame["ranges"] for s in range(a, b + 1)}
                assert named <= await stored_seqs(db, org, "d-1")
    assert phone.acked == set(range(1, 201))
    assert phone.errors == []
    row = await db.fetchrow(
        "SELECT ts, lat, lon, received_at FROM positions WHERE org=$1 AND driver_id='d-1' AND seq=7", org
    )
    assert row["ts"] == t0 + 7 and row["lat"] == pytest.approx(-1.29207) and row["received_at"] >= t0


async def test_resending_stored_events_stores_nothing_new_and_acks_again(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    events = [pos(seq, ts=now_ms() - 1000 + seq) for seq in range(1, 201)]
    for ev in events:
        await phone.send(ev)
    await phone.until(lambda p: len(p.acked) == 200)
    before = await db.fetchval("SELECT count(*) FROM positions WHERE org=$1", org)
    phone.acked.clear()
    for start in range(0, 200, 100):  # the resend comes as batches this time
        await phone.send({"type": "batch", "items": events[start : start + 100]})
    await phone.until(lambda p: len(p.acked) == 200)
    assert await db.fetchval("SELECT count(*) FROM positions WHERE org=$1", org) == before == 200
    assert phone.errors == []


async def test_conflicting_seq_is_refused(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    t = now_ms()
    await phone.send(pos(1, ts=t))
    await phone.send(scan(2, "PKG-1", ts=t))
    await phone.until(lambda p: p.acked == {1, 2})
    await phone.send(pos(1, ts=t + 5))  # same seq, another ts
    await phone.send(scan(1, "PKG-1", ts=t))  # a scan cannot take a position's seq
    await phone.send(pos(2, ts=t))  # nor a position a scan's
    await phone.send(pos(3, ts=t))
    await phone.until(lambda p: len(p.refused("conflict")) == 2 and 3 in p.acked)
    assert {e["seq"] for e in phone.errors} == {1, 2} and all(e["code"] == "conflict" for e in phone.errors)
    assert len([e for e in phone.errors if e["seq"] == 1]) == 2
    assert await stored_seqs(db, org, "d-1") == {1, 2, 3}
    assert await db.fetchval("SELECT ts FROM positions WHERE org=$1 AND seq=1", org) == t


async def test_conflict_within_one_batch(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    t = now_ms()
    await phone.send({"type": "batch", "items": [pos(1, ts=t), pos(1, ts=t), pos(1, ts=t + 1), scan(2, "P", ts=t)]})
    await phone.until(lambda p: p.acked == {1, 2} and len(p.errors) == 1)
    assert phone.errors[0]["code"] == "conflict" and phone.errors[0]["seq"] == 1
    assert await stored_seqs(db, org, "d-1") == {1, 2}


async def test_unstorable_strings_refused_alone(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    bad = await Phone.connect(instance.url, token("driver", "d-bad", org))
    good = await Phone.connect(instance.url, token("driver", "d-good", org))
    t = now_ms()
    await bad.send(
        {
            "type": "batch",
            "items": [
                scan(1, "PKG\x00NUL", ts=t),
                scan(2, "P" * 65, ts=t),
                scan(3, "PKG-3", ts=t, note="x\x00y"),
                pos(4, ts=t),
            ],
        }
    )
    await good.send(pos(1, ts=t))
    await good.until(lambda p: p.acked == {1})
    await bad.until(lambda p: len(p.errors) == 2 and p.acked == {3, 4})
    assert bad.refused("invalid") == {1, 2}
    # A bad optional field is stored as null, not refused: the scan is a physical fact.
    assert await db.fetchval("SELECT note FROM scans WHERE org=$1 AND driver_id='d-bad' AND seq=3", org) is None
    assert await stored_seqs(db, org, "d-bad") == {3, 4}


async def test_invalid_event_keeps_connection_and_next_is_acked(instance: Instance, org: str) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    await phone.send(pos(1, lat=91.0))
    frame = await phone.pump()
    assert frame == {"type": "error", "code": "invalid", "seq": 1, "message": frame["message"]}
    assert "lat" in frame["message"]
    await phone.send(pos(2))
    await phone.until(lambda p: p.acked == {2})


async def test_optional_out_of_range_stored_as_null(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    await phone.send(pos(1, bat=1.7, spd=12.5, hdg="north", acc=-3))
    await phone.until(lambda p: p.acked == {1})
    row = await db.fetchrow("SELECT bat, spd, hdg, acc FROM positions WHERE org=$1", org)
    assert row["bat"] is None and row["hdg"] is None and row["acc"] is None and row["spd"] == pytest.approx(12.5)


async def test_batch_out_of_order_is_stored_and_acked(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    t = now_ms() - 60_000
    items = [pos(seq, ts=t + seq * 100) for seq in (7, 3, 9, 1, 2, 8, 4, 6, 5)]
    await phone.send({"type": "batch", "items": items})
    await phone.until(lambda p: p.acked == set(range(1, 10)))
    assert await stored_seqs(db, org, "d-1") == set(range(1, 10))


async def test_too_large_batch(instance: Instance, org: str) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    await phone.send({"type": "batch", "items": [pos(s) for s in range(1, 302)]})
    frame = await phone.pump()
    assert frame["code"] == "too_large" and frame["ranges"] == [[1, 301]]


@pytest.mark.parametrize("payload", ["not json", '["an array"]', '{"no":"type"}', '{"type":"teleport"}'])
async def test_protocol_violation_closes_1008(instance: Instance, org: str, payload: str) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    await phone.send(payload)
    frame = await phone.recv()
    assert frame["type"] == "error" and frame["code"] == "protocol"
    assert await phone.closed() == 1008


async def test_frame_before_hello_closes_1008(instance: Instance, org: str) -> None:
    from websockets.asyncio.client import connect

    from harness.clients import Peer

    peer = Peer(await connect(instance.url + "/v1/driver"))
    await peer.send(pos(1))
    assert (await peer.recv())["code"] == "protocol"
    assert await peer.closed() == 1008


async def test_oversized_frame_closes_1009(instance: Instance, org: str) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org), max_size=None)
    await phone.send(orjson.dumps(pos(1, note="x" * 70_000)).decode())
    assert await phone.closed() == 1009


async def test_reconnect_to_either_instance_gets_last_seq(start_instance: Any, org: str) -> None:
    a, b = await start_instance(), await start_instance()
    phone = await Phone.connect(a.url, token("driver", "d-1", org))
    t = now_ms()
    for seq in (1, 2, 3, 41):
        await phone.send(pos(seq, ts=t + seq))
    await phone.send(scan(42, "PKG-9", ts=t + 50))
    await phone.until(lambda p: p.acked == {1, 2, 3, 41, 42})
    await phone.close()
    for inst in (a, b):
        again = await Phone.connect(inst.url, token("driver", "d-1", org))
        assert again.welcome["last_seq"] == 42
        await again.close()


async def test_new_connection_replaces_old_with_4001(start_instance: Any, org: str) -> None:
    a, b = await start_instance(), await start_instance()
    first = await Phone.connect(a.url, token("driver", "d-1", org))
    second = await Phone.connect(a.url, token("driver", "d-1", org))
    assert await first.closed() == 4001
    third = await Phone.connect(b.url, token("driver", "d-1", org))  # across instances too
    assert await second.closed() == 4001
    await third.send(pos(1))
    await third.until(lambda p: p.acked == {1})


async def test_refresh_token(instance: Instance, org: str) -> None:
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    await phone.send({"type": "refresh", "token": token("driver", "d-1", org, ttl_s=7200)})
    frame = await phone.recv()
    assert frame["type"] == "welcome" and frame["refreshed"] is True
    await phone.send({"type": "refresh", "token": token("driver", "d-2", org)})
    frame = await phone.recv()
    assert frame == {"type": "error", "code": "forbidden", "message": frame["message"]}
    assert await phone.closed() is not None


async def test_token_in_authorization_header(instance: Instance, org: str) -> None:
    from websockets.asyncio.client import connect

    from harness.clients import Peer

    peer = Peer(
        await connect(
            instance.url + "/v1/driver", additional_headers={"Authorization": "Bearer " + token("driver", "d-h", org)}
        )
    )
    await peer.send({"type": "hello", "device": "x"})
    assert (await peer.recv())["driver"] == "d-h"


async def test_rate_limit(start_instance: Any, org: str) -> None:
    inst = await start_instance(rate_per_s=1.0, rate_burst=5)
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    await phone.send({"type": "batch", "items": [pos(s) for s in range(1, 11)]})
    await phone.until(lambda p: len(p.acked) + len(p.errors) >= 10)
    assert phone.acked == set(range(1, 6))
    assert phone.refused("rate_limited") == set(range(6, 11))
    assert all(e["retry_ms"] > 0 for e in phone.errors)


async def test_own_frame_reader_handles_fragments_pings_and_close(instance: Instance, org: str) -> None:
    from tracker.transport.uvicorn_fast import FrameReader

    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    conn = instance.node.drivers.sessions[(org, "d-1")]
    assert isinstance(conn.channel.fast.proto.transport.get_protocol(), FrameReader)
    # A message in three fragments is one frame to the protocol.
    text = orjson.dumps(pos(1)).decode()
    await phone.ws.send(iter([text[:10], text[10:20], text[20:]]))
    await phone.until(lambda p: p.acked == {1})
    pong = await phone.ws.ping(b"are you there")
    await asyncio.wait_for(pong, 5)  # answered by the reader
    await phone.send(pos(2))
    await phone.until(lambda p: p.acked == {1, 2})
    await phone.close()  # the closing handshake completes and the driver goes offline
    async with asyncio.timeout(5):
        while (org, "d-1") in instance.node.drivers.sessions:  # noqa: ASYNC110 - polls server state with a deadline
            await asyncio.sleep(0.01)


async def test_welcomed_driver_lets_go_of_the_upgrade_request_and_response(instance: Instance, org: str) -> None:
    """A phone holds its connection for hours: the upgrade's headers (~3.5 KB of the 25 KB an idle
    connection costs, BENCHMARKS.md issue 13) are dropped once it is welcomed; it works on."""
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    proto = instance.node.drivers.sessions[(org, "d-1")].channel.fast.proto
    assert proto.handshake_complete
    assert proto.request is None and proto.response is None
    assert proto.conn.parser.gi_frame is None  # websockets' parser (and the request in its frame): closed
    await phone.send(pos(1))
    await phone.until(lambda p: p.acked == {1})
    await phone.close()


async def test_welcomed_driver_holds_no_receive_queue_events_or_coroutines(instance: Instance, org: str) -> None:
    """An idle driver's connection once welcomed: uvicorn's asyncio.Queue and Event are the slim
    ones (their five empty deques were ~3.8 KB a connection, BENCHMARKS.md issue 13), the channel
    has no queue, and the endpoint's task waits on one future, not on a chain of receive coroutines.
    Frames, acks, backpressure and the close still work."""
    from tracker.transport.slim import Flag, Inbox

    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    conn = instance.node.drivers.sessions[(org, "d-1")]
    proto = conn.channel.fast.proto
    assert type(proto.queue) is Inbox and type(proto.writable) is Flag and proto.writable.is_set()
    assert conn.channel._queue is None
    [task] = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.endswith("run_asgi")]
    chain, awaited = [], task.get_coro()
    while asyncio.iscoroutine(awaited):
        chain.append(awaited.__qualname__)
        awaited = awaited.cr_await
    assert chain[-1] == "driver_endpoint", chain  # it awaits a future itself (was: _receive -> ... -> Queue.get)
    await phone.send(pos(1))
    await phone.until(lambda p: p.acked == {1})
    await phone.close()
    async with asyncio.timeout(5):
        while (org, "d-1") in instance.node.drivers.sessions:  # noqa: ASYNC110 - polls server state with a deadline
            await asyncio.sleep(0.01)
    await asyncio.wait((task,), timeout=5)
    assert task.done() and task.exception() is None
