"""Tamper evidence of the chain of custody: pure (tracker/chain.py), then against the real database
through `GET /v1/packages/{id}/verify`, and with two instances chaining one package at once."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from typing import Any

import asyncpg
import orjson

from harness.clients import Dash, Phone, acked, now_ms, scan, until_frame
from harness.http import consign, http, pkg_path
from harness.instances import Instance
from harness.tokens import token
from harness.wait import eventually
from tracker.custody.chain import GENESIS, Consignment, Content, Record, extend, head_tag, verify

KEY = b"k" * 32
ORG, PKG = "acme", "PKG-1"
TERMS = Consignment("st-marys", 1_764_000_000_000, "St Mary's", -1.3, 36.8, None, None, 2.0, 8.0, "insulin")


def contents(n: int) -> list[Content]:
    return [
        Content(
            PKG,
            f"d-{i % 2}",
            i + 1,
            1_764_240_000_000 + i,
            1_764_240_000_500 + i,
            "pickup" if i == 0 else "handover",
            -1.29,
            36.82,
            5.4 + i,
            None,
            None,
            None,
        )
        for i in range(n)
    ]


def build(n: int) -> tuple[list[Record], int, bytes, bytes]:
    links = extend(KEY, ORG, PKG, 0, GENESIS, contents(n), 1_764_240_001_000, [False] * n)
    records = [
        Record(i, c.driver, c.seq, 1_764_240_001_000, False, mac, c)
        for c, (i, mac) in zip(contents(n), links, strict=True)
    ]
    head = links[-1][1] if links else GENESIS
    return records, n, head, head_tag(KEY, ORG, PKG, n, head, TERMS)


def check(records: list[Record], length: int, head: bytes, tag: bytes, terms: Consignment = TERMS) -> list[str]:
    return [p.problem for p in verify(KEY, ORG, PKG, records, length, head, tag, terms)]


def plain_chain(records: list[Record], key: bytes | None = None) -> list[Record]:
    """What an attacker without the key can do: recompute every hash from the first altered one,
    with a plain SHA-256 (or a guessed key)."""
    out, prev = [], GENESIS
    for rec in records:
        assert rec.content is not None
        data = orjson.dumps([ORG, PKG, rec.index, prev.hex(), rec.content.as_list(), rec.chained_at, rec.recovered])
        mac = hashlib.sha256((key or b"") + prev + data).digest()
        out.append(dataclasses.replace(rec, mac=mac))
        prev = mac
    return out


def test_an_intact_chain_verifies() -> None:
    records, n, head, tag = build(5)
    assert check(records, n, head, tag) == []
    assert check([], 0, GENESIS, head_tag(KEY, ORG, PKG, 0, GENESIS, TERMS)) == []
    # Extending continues from the head.
    more = extend(KEY, ORG, PKG, n, head, contents(6)[5:], 1_764_240_002_000, [True])
    c = contents(6)[5]
    records.append(Record(6, c.driver, c.seq, 1_764_240_002_000, True, more[0][1], c))
    assert check(records, 6, more[0][1], head_tag(KEY, ORG, PKG, 6, more[0][1], TERMS)) == []


def test_altering_a_record_is_detected_even_when_later_hashes_are_recomputed() -> None:
    records, n, head, tag = build(5)
    assert records[2].content is not None
    altered = dataclasses.replace(records[2], content=dataclasses.replace(records[2].content, temp_c=5.0))
    assert check([*records[:2], altered, *records[3:]], n, head, tag) != []
    for key in (None, b"guessed-key"):
        forged = plain_chain([*records[:2], altered, *records[3:]], key)
        problems = check(forged, n, forged[-1].mac, tag)
        assert problems and all(p for p in problems)
    # Other fields: the driver, the time, the package, the recovered flag, the chaining time.
    for change in ({"recovered": True}, {"chained_at": 1}):
        assert check([*records[:2], dataclasses.replace(records[2], **change), *records[3:]], n, head, tag)
    for field, value in (("ts", 1), ("received_at", 1), ("package", "PKG-2"), ("event", "deliver")):
        content = dataclasses.replace(records[2].content, **{field: value})
        assert check([*records[:2], dataclasses.replace(records[2], content=content), *records[3:]], n, head, tag)


def test_inserting_deleting_or_reordering_records_is_detected() -> None:
    records, n, head, tag = build(5)
    c = contents(6)[5]
    extra = Record(3, c.driver, c.seq, 1_764_240_001_000, False, b"\0" * 32, c)
    renumbered = [dataclasses.replace(r, index=r.index + 1) if r.index >= 3 else r for r in records]
    assert check(sorted([*renumbered, extra], key=lambda r: r.index), n + 1, head, tag)
    forged = plain_chain(sorted([*renumbered, extra], key=lambda r: r.index))
    assert check(forged, n + 1, forged[-1].mac, tag)
    # Deleting in the middle, with or without renumbering and recomputing.
    assert check([r for r in records if r.index != 3], n, head, tag)
    closed = [dataclasses.replace(r, index=r.index - 1) if r.index > 3 else r for r in records if r.index != 3]
    assert check(plain_chain(closed), n - 1, plain_chain(closed)[-1].mac, tag)
    # Deleting the tail: the head no longer matches; moving the head back needs the key for its tag.
    assert check(records[:4], n, head, tag)
    assert check(records[:4], 4, records[3].mac, tag)
    assert check(records[:4], 4, records[3].mac, head_tag(b"guessed", ORG, PKG, 4, records[3].mac, TERMS))
    # Swapping two records.
    swapped = [
        records[0],
        dataclasses.replace(records[2], index=2),
        dataclasses.replace(records[1], index=3),
        *records[3:],
    ]
    assert check(swapped, n, head, tag)
    # A missing scan row, a record naming another scan.
    assert check([*records[:2], dataclasses.replace(records[2], content=None), *records[3:]], n, head, tag)
    assert check([*records[:2], dataclasses.replace(records[2], seq=99), *records[3:]], n, head, tag)


def test_altering_the_consignment_or_the_head_is_detected() -> None:
    records, n, head, tag = build(3)
    assert check(records, n, head, tag, dataclasses.replace(TERMS, temp_max=30.0))
    assert check(records, n, head, tag, dataclasses.replace(TERMS, client="someone-else"))
    assert check(records, n, head, None)  # type: ignore[arg-type]
    assert check(records, n + 1, head, tag)


# -- against the database ------------------------------------------------------------------------


async def _journey(inst: Instance, org: str) -> None:
    disp = await Dash.connect(inst.url, token("dispatcher", "u", org), subscribe={})
    await consign(inst, org, "PKG-1", "st-marys")
    a = await Phone.connect(inst.url, token("driver", "d-a", org))
    b = await Phone.connect(inst.url, token("driver", "d-b", org))
    t = now_ms() - 10_000
    await a.send(scan(1, "PKG-1", "pickup", ts=t, temp_c=5.4))
    await acked(a, 1)
    await b.send(scan(1, "PKG-1", "handover", ts=t + 1, temp_c=5.5, lat=-1.2, lon=36.7))
    await acked(b, 1)
    await b.send(scan(2, "PKG-1", "deliver", ts=t + 2, lat=-1.3, lon=36.8, recipient="Dr. K", pod="pod/1"))
    await until_frame(disp, [], "package", state="delivered")


async def _verify(inst: Instance, org: str) -> dict[str, Any]:
    status, out = await http(inst, "GET", pkg_path("PKG-1", "/verify"), token("dispatcher", "u", org))
    assert status == 200
    result: dict[str, Any] = out
    return result


async def test_tampering_in_the_database_fails_verify(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    await _journey(instance, org)
    assert (await _verify(instance, org))["ok"] is True
    set_temp = "UPDATE scans SET temp_c = $2 WHERE org = $1 AND driver_id = 'd-b' AND seq = 1"
    # Alter a scan (a temperature), then put it back exactly: the mac covers what is stored.
    await db.execute(set_temp, org, 4.0)
    out = await _verify(instance, org)
    assert (out["ok"], [p["index"] for p in out["problems"]]) == (False, [2])
    await db.execute(set_temp, org, 5.5)
    assert (await _verify(instance, org))["ok"] is True
    # Alter the last one and recompute its hash and the head without the key: still detected.
    await db.execute("UPDATE scans SET recipient = 'Mallory' WHERE org = $1 AND driver_id = 'd-b' AND seq = 2", org)
    rows = await db.fetch("SELECT idx, mac FROM custody WHERE org = $1 AND package_id = 'PKG-1' ORDER BY idx", org)
    prev = bytes(rows[1]["mac"])
    forged = hashlib.sha256(prev + b"Mallory").digest()
    await db.execute("UPDATE custody SET mac = $2 WHERE org = $1 AND package_id = 'PKG-1' AND idx = 3", org, forged)
    await db.execute("UPDATE packages SET chain_head = $2 WHERE org = $1 AND package_id = 'PKG-1'", org, forged)
    out = await _verify(instance, org)
    assert out["ok"] is False and {p["index"] for p in out["problems"]} == {3, None}
    # Delete the tail record (its custody row and its scan) and move the head back: the tag catches it.
    await db.execute("DELETE FROM custody WHERE org = $1 AND package_id = 'PKG-1' AND idx = 3", org)
    await db.execute("DELETE FROM scans WHERE org = $1 AND driver_id = 'd-b' AND seq = 2", org)
    await db.execute(
        "UPDATE packages SET chain_len = 2, chain_head = $2 WHERE org = $1 AND package_id = 'PKG-1'", org, prev
    )
    out = await _verify(instance, org)
    assert out["ok"] is False and out["length"] == 2
    assert [p["problem"] for p in out["problems"]] == ["the chain head or the consignment was altered"]
    # Insert a record in the middle (renumbering the rest).
    await db.execute("UPDATE custody SET idx = 3 WHERE org = $1 AND package_id = 'PKG-1' AND idx = 2", org)
    await db.execute(
        "INSERT INTO scans (org, driver_id, seq, ts, received_at, package, event) "
        "VALUES ($1, 'd-x', 1, $2, $2, 'PKG-1', 'handover')",
        org,
        now_ms(),
    )
    await db.execute(
        "INSERT INTO custody (org, package_id, idx, driver_id, seq, chained_at, mac) "
        "VALUES ($1, 'PKG-1', 2, 'd-x', 1, 0, $2)",
        org,
        hashlib.sha256(b"x").digest(),
    )
    out = await _verify(instance, org)
    assert out["ok"] is False and 2 in {p["index"] for p in out["problems"]}
    # Change the cold-chain range on the package row.
    await db.execute("UPDATE packages SET temp_max = 40 WHERE org = $1 AND package_id = 'PKG-1'", org)
    assert (await _verify(instance, org))["ok"] is False


async def test_deleting_a_middle_record_fails_verify(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    await _journey(instance, org)
    await db.execute("DELETE FROM custody WHERE org = $1 AND package_id = 'PKG-1' AND idx = 2", org)
    out = await _verify(instance, org)
    assert out["ok"] is False and out["length"] == 2
    await db.execute("UPDATE custody SET idx = 2 WHERE org = $1 AND package_id = 'PKG-1' AND idx = 3", org)
    assert (await _verify(instance, org))["ok"] is False


async def test_two_instances_never_fork_a_chain(start_instance: Any, org: str, db: asyncpg.Connection) -> None:
    a, b = await start_instance(), await start_instance()
    await consign(a, org, "PKG-1", "st-marys")
    pa = await Phone.connect(a.url, token("driver", "d-a", org))
    pb = await Phone.connect(b.url, token("driver", "d-b", org))
    t = now_ms() - 100_000
    n = 60
    # Both drivers scan the same package at once, through two instances: handovers back and forth.
    await asyncio.gather(
        *(
            p.send(
                {
                    "type": "batch",
                    "items": [scan(i + 1, "PKG-1", "handover", ts=t + 2 * i + k) for i in range(j, j + 10)],
                }
            )
            for j in range(0, n, 10)
            for k, p in ((0, pa), (1, pb))
        )
    )
    await acked(pa, *range(1, n + 1))
    await acked(pb, *range(1, n + 1))

    async def chained() -> int:
        return int(await db.fetchval("SELECT chain_len FROM packages WHERE org = $1 AND package_id = 'PKG-1'", org))

    await eventually(chained, lambda length: length == 2 * n, timeout=20)
    rows = await db.fetch("SELECT idx FROM custody WHERE org = $1 ORDER BY idx", org)
    assert [r["idx"] for r in rows] == list(range(1, 2 * n + 1))
    for inst in (a, b):
        out = await _verify(inst, org)
        assert (out["ok"], out["length"], out["unchained"]) == (True, 2 * n, 0), out
