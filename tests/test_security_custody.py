"""A database writer without the custody key cannot forge custody (issue 11, item 6).

Over the running service: a scan row written straight into PostgreSQL is never chained, `verify`
names it, and the org's dispatchers get a `tamper_suspected` alert; deleting a chain's newest
records and restoring an older head is caught by the signed checkpoints kept outside PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import orjson

from harness.clients import Dash, Phone, acked, frames_of, now_ms, pos, scan, until_frame
from harness.http import consign, http, pkg_path
from harness.instances import Instance
from harness.tokens import token
from harness.wait import eventually
from tracker.custody import chain
from tracker.custody.checkpoints import Checkpoints

from .schema_check import assert_frame_valid


async def _verify(inst: Instance, org: str, package: str) -> dict[str, Any]:
    _, out = await http(inst, "GET", pkg_path(package, "/verify"), token("dispatcher", "u", org))
    result: dict[str, Any] = out
    return result


async def test_a_scan_row_forged_in_sql_is_never_chained(start_instance: Any, org: str, db: asyncpg.Connection) -> None:
    # The default grace (30 s): the forged row is backdated 40 s so that the very next sweep takes it.
    inst: Instance = await start_instance(custody_sweep_s=0.5)
    await consign(inst, org, "PKG-F", "st-marys")
    disp = await Dash.connect(inst.url, token("dispatcher", "u", org), subscribe={})
    client = await Dash.connect(inst.url, token("client", "c", org, client="st-marys"), subscribe={})
    t = now_ms() - 40_000
    await db.execute(
        "INSERT INTO scans (org, driver_id, seq, ts, received_at, package, event) "
        "VALUES ($1, 'd-mallory', 7, $2, $2, 'PKG-F', 'pickup')",
        org,
        t,
    )
    got: list[dict[str, Any]] = []
    alert = await until_frame(disp, got, "alert", kind="tamper_suspected", timeout=15)
    assert_frame_valid(alert, "alert")
    assert (alert["state"], alert["driver"], alert["package"]) == ("open", "d-mallory", "PKG-F")
    assert "seq 7" in alert["message"]
    # Never chained, never replayed: the package is still waiting for its pickup.
    assert await db.fetchval("SELECT count(*) FROM custody WHERE org = $1", org) == 0
    _, pkg = await http(inst, "GET", pkg_path("PKG-F"), token("dispatcher", "u", org))
    assert (pkg["state"], pkg["driver"], pkg["chain_length"], pkg["custody"]) == ("created", None, 0, [])
    assert [a["kind"] for a in pkg["alerts"]] == ["tamper_suspected"]
    verdict = await _verify(inst, org, "PKG-F")
    assert verdict["ok"] is False and verdict["length"] == 0
    assert [(p["index"], p["driver"], p["seq"]) for p in verdict["problems"]] == [(None, "d-mallory", 7)]
    # A genuine scan still chains next to it; the forged row stays out, and is reported once.
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    await phone.send(scan(1, "PKG-F", "pickup", lat=-1, lon=36, temp_c=5.3))  # sealed as PostgreSQL stores them
    await acked(phone, 1)
    await until_frame(disp, got, "package", state="picked_up", driver="d-1")
    verdict = await _verify(inst, org, "PKG-F")
    assert (verdict["length"], [p["seq"] for p in verdict["problems"]]) == (1, [7])
    assert len(frames_of(got, "alert", kind="tamper_suspected")) == 1
    # For the org's dispatchers only: a client neither receives it live nor in a snapshot.
    seen = await client.collect(lambda fs: frames_of(fs, "package", driver="d-1"))
    assert frames_of(seen, "alert") == []
    fresh = await Dash.connect(inst.url, token("client", "c", org, client="st-marys"), subscribe={})
    assert fresh.snapshot["alerts"] == []
    _, mine = await http(inst, "GET", pkg_path("PKG-F"), token("client", "c", org, client="st-marys"))
    assert mine["alerts"] == []
    again = await Dash.connect(inst.url, token("dispatcher", "u2", org), subscribe={})
    assert [a["kind"] for a in again.snapshot["alerts"]] == ["tamper_suspected"]


async def test_truncating_a_chain_and_restoring_an_older_head_is_caught_by_the_checkpoint(
    start_instance: Any, org: str, db: asyncpg.Connection
) -> None:
    inst: Instance = await start_instance(custody_checkpoint_s=0.2)
    await consign(inst, org, "PKG-T", "st-marys")
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    t = now_ms() - 10_000
    await phone.send(scan(1, "PKG-T", "pickup", ts=t))
    await acked(phone, 1)

    async def head() -> asyncpg.Record:
        row = await db.fetchrow(
            "SELECT chain_len, chain_head, head_tag FROM packages WHERE org = $1 AND package_id = 'PKG-T'", org
        )
        assert row is not None
        return row

    older = await eventually(head, lambda r: r["chain_len"] == 1)
    await phone.send(scan(2, "PKG-T", "deliver", ts=t + 1, lat=-1.3133, lon=36.7876))
    await acked(phone, 2)
    await eventually(head, lambda r: r["chain_len"] == 2)
    assert (await _verify(inst, org, "PKG-T"))["ok"] is True
    # Someone with write access to PostgreSQL (no key) deletes the delivery and restores the head
    # (and its tag) saved before it: every record and the head's tag still verify.
    await db.execute("DELETE FROM custody WHERE org = $1 AND package_id = 'PKG-T' AND idx = 2", org)
    await db.execute("DELETE FROM scans WHERE org = $1 AND driver_id = 'd-1' AND seq = 2", org)
    await db.execute(
        "UPDATE packages SET chain_len = $2, chain_head = $3, head_tag = $4, state = 'picked_up', holder = 'd-1' "
        "WHERE org = $1 AND package_id = 'PKG-T'",
        org,
        older["chain_len"],
        older["chain_head"],
        older["head_tag"],
    )
    verdict = await eventually(lambda: _verify(inst, org, "PKG-T"), lambda v: not v["ok"], timeout=10)
    assert verdict["length"] == 1
    assert [p["index"] for p in verdict["problems"]] == [None]
    assert "checkpoint" in verdict["problems"][0]["problem"] and "2 records" in verdict["problems"][0]["problem"]
    # An instance started afresh (nothing in memory) reads the same checkpoints and agrees.
    await inst.stop()
    other: Instance = await start_instance()
    assert (await _verify(other, org, "PKG-T"))["problems"] == verdict["problems"]


def _forge_lines(root: Path) -> list[tuple[str, ...]]:
    """Append a line written without the key (a longer head for PKG-1) and one cut short."""
    files = sorted(root.rglob("*.jsonl"))
    line = orjson.loads(files[0].read_bytes())
    forged = {**line, "heads": [["PKG-1", 9, "00" * 32]]}
    with files[0].open("ab") as f:
        f.write(orjson.dumps(forged) + b"\n" + orjson.dumps(line)[:40])
    return [p.relative_to(root).parts for p in files]


async def test_checkpoint_lines_without_the_key_or_cut_short_are_ignored(tmp_path: Path) -> None:
    key = b"k" * 32
    cp = Checkpoints(tmp_path, key, "host:1")
    cp.note({("acme/../x", "PKG-1"): (2, b"\x01" * 32), ("acme/../x", "PKG-2"): (5, b"\x02" * 32)})
    assert await cp.flush() == 1
    assert _forge_lines(tmp_path) == [("acme%2F%2E%2E%2Fx", "host%3A1.jsonl")]  # names never leave the folder
    cp.note({("acme/../x", "PKG-1"): (3, b"\x03" * 32)})
    assert await cp.flush() == 1
    assert (await cp.latest("acme/../x", "PKG-1"))[:2] == (3, b"\x03" * 32)  # type: ignore[index]
    assert (await cp.latest("acme/../x", "PKG-2"))[:2] == (5, b"\x02" * 32)  # type: ignore[index]
    assert await cp.latest("acme/../x", "PKG-3") is None and await cp.latest("other", "PKG-1") is None
    # Another key (another deployment, or a forger) vouches for nothing here.
    assert await Checkpoints(tmp_path, b"j" * 32, "host:2").latest("acme/../x", "PKG-1") is None


def test_against_checkpoint() -> None:
    recs = [chain.Record(i, "d", i, 0, False, bytes([i]) * 32, None) for i in (1, 2)]
    assert chain.against_checkpoint(recs, 2, None) == []
    assert chain.against_checkpoint(recs, 2, (2, bytes([2]) * 32, 7)) == []
    assert chain.against_checkpoint(recs, 2, (1, bytes([1]) * 32, 7)) == []  # grew since: fine
    assert [p.index for p in chain.against_checkpoint(recs[:1], 1, (2, bytes([2]) * 32, 7))] == [None]
    assert [p.index for p in chain.against_checkpoint(recs, 2, (2, bytes([9]) * 32, 7))] == [2]


async def test_changing_a_chained_scans_clock_offset_fails_verify(
    instance: Instance, org: str, db: asyncpg.Connection
) -> None:
    # The clock offset stored with a scan orders it in the package's history: it is part of what a
    # record's mac covers, like the scan's ts.
    await consign(instance, org, "PKG-O", "st-marys")
    phone = await Phone.connect(instance.url, token("driver", "d-1", org))
    t = now_ms()
    await phone.send({"type": "batch", "items": [pos(1, ts=t), scan(2, "PKG-O", "pickup", ts=t + 1)]})
    await acked(phone, 1, 2)
    await phone.send(scan(3, "PKG-O", "deliver", ts=t + 2, lat=-1.3133, lon=36.7876))
    await acked(phone, 3)

    async def chained() -> int:
        return int(await db.fetchval("SELECT chain_len FROM packages WHERE org = $1 AND package_id = 'PKG-O'", org))

    await eventually(chained, lambda n: n == 2)
    offsets = await db.fetch("SELECT offset_ms FROM scans WHERE org = $1 ORDER BY seq", org)
    assert all(r["offset_ms"] is not None for r in offsets), offsets
    assert (await _verify(instance, org, "PKG-O"))["ok"] is True
    # Move the pickup after the delivery, as far as the replay's order goes.
    await db.execute("UPDATE scans SET offset_ms = offset_ms + 3600000 WHERE org = $1 AND seq = 2", org)
    verdict = await _verify(instance, org, "PKG-O")
    assert verdict["ok"] is False and [p["index"] for p in verdict["problems"]] == [1], verdict
