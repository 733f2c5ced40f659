"""Pure tests of the simulated phone (sans-I/O), its link's handshake, and the report's sums.

No network, no event loop, no sleeps: time is a number passed in.
"""

from __future__ import annotations

import math
import random
from typing import Any

import orjson
import pytest

from tracker.sim.dashboard import SeqLog, View
from tracker.sim.link import WsError, accept_value, check_handshake, handshake_request, loopback_sources
from tracker.sim.phone import BATCH_HEAD, Entry, Phone, pack
from tracker.sim.records import Records
from tracker.sim.report import Latency, RunData, build

T0 = 1_764_240_000_000.0
WELCOME: dict[str, Any] = {"type": "welcome", "last_seq": 0, "max_frame": 65536, "max_batch": 300}


def pos(i: int = 0) -> dict[str, Any]:
    return {"type": "pos", "lat": -1.29 + i * 1e-4, "lon": 36.82, "acc": 5.0}


def scan(pkg: str = "PKG-o-1") -> dict[str, Any]:
    return {"type": "scan", "package": pkg, "event": "pickup"}


def frames_items(frames: list[bytes]) -> list[list[dict[str, Any]]]:
    """Each frame as the list of events it carries (a bare event is a list of one)."""
    out = []
    for f in frames:
        msg = orjson.loads(f)
        out.append(msg["items"] if msg["type"] == "batch" else [msg])
    return out


def online_phone(**kw: Any) -> Phone:
    phone = Phone("d-1", records=Records(T0), **kw)
    phone.connected(dict(WELCOME), T0)
    return phone


# --- numbering, acks, buffering -----------------------------------------------------------


def test_events_are_numbered_and_stamped_and_sent_alone_when_online() -> None:
    phone = online_phone()
    assert phone.record(pos(), T0 + 5) == 1
    frames = phone.poll(T0 + 5)
    assert frames_items(frames) == [[{**pos(), "seq": 1, "ts": int(T0 + 5)}]]
    assert phone.poll(T0 + 6) == []  # sent once, not again until an answer or 60 s


def test_numbering_continues_above_welcome_last_seq() -> None:
    phone = Phone("d-1")
    phone.connected({**WELCOME, "last_seq": 1041}, T0)
    assert phone.record(pos(), T0) == 1042
    phone.disconnected()
    phone.connected({**WELCOME, "last_seq": 10}, T0)  # our own counter is higher
    assert phone.record(pos(), T0) == 1043


def test_unsent_events_numbered_at_or_below_last_seq_are_renumbered() -> None:
    phone = Phone("d-1")
    phone.record(pos(1), T0)  # offline: numbered 1 and 2 by our own counter
    phone.record(pos(2), T0)
    phone.connected({**WELCOME, "last_seq": 500}, T0)
    assert sorted(phone.outbox) == [501, 502]
    assert [e.body["seq"] for e in phone.outbox.values()] == [501, 502]


def test_acks_are_ranges_not_cumulative() -> None:
    phone = online_phone()
    for i in range(10):
        phone.record(pos(i), T0)
    phone.poll(T0)
    phone.receive({"type": "ack", "ranges": [[2, 3], [7, 7]]}, T0 + 10)
    assert sorted(phone.outbox) == [1, 4, 5, 6, 8, 9, 10]
    phone.receive({"type": "ack", "ranges": [[1, 999]]}, T0 + 20)  # large range, small outbox
    assert phone.outbox == {} and phone.acked == 10
    phone.receive({"type": "ack", "ranges": [[1, 10]]}, T0 + 30)  # acked again: harmless
    assert phone.acked == 10


def test_offline_events_are_buffered_and_sent_newest_fix_first_then_batches() -> None:
    phone = Phone("d-1", records=Records(T0))
    for i in range(5):
        phone.record(pos(i), T0 + i)
    phone.record(scan(), T0 + 5)
    assert phone.poll(T0 + 6) == []  # offline: nothing goes out
    phone.connected(dict(WELCOME), T0 + 10)
    items = frames_items(phone.poll(T0 + 10))
    assert [e["seq"] for e in items[0]] == [5]  # the newest position, alone
    assert [e["seq"] for f in items[1:] for e in f] == [1, 2, 3, 4, 6]
    assert phone.poll(T0 + 10) == []


def test_backlog_respects_max_batch_and_max_frame() -> None:
    phone = Phone("d-1")
    for i in range(1000):
        phone.record(pos(i), T0)
    phone.connected({**WELCOME, "max_batch": 50, "max_frame": 4000}, T0)
    frames = phone.poll(T0)
    seqs = []
    for raw, items in zip(frames, frames_items(frames), strict=True):
        assert len(raw) <= 4000
        assert len(items) <= 50
        seqs += [e["seq"] for e in items]
    assert sorted(seqs) == list(range(1, 1001)) and len(seqs) == 1000
    assert seqs[0] == 1000


def test_pack_bounds_exact_frame_size() -> None:
    entries = [Entry(i, {"type": "pos", "seq": i, "ts": 1, "lat": 0.0, "lon": 0.0}) for i in range(100, 200)]
    size = len(entries[0].data)
    limit = len(BATCH_HEAD) + 2 + 3 * size + 2  # exactly three items and their two commas
    frames = pack(entries, 300, limit)
    assert all(len(f) <= limit for f in frames)
    assert [len(orjson.loads(f)["items"]) for f in frames[:-1]] == [3] * 33
    assert orjson.loads(frames[-1])["seq"] == 199  # a group of one goes bare, not as a batch
    huge = Entry(1, {"type": "scan", "seq": 1, "ts": 1, "package": "x" * 5000, "event": "pickup"})
    assert pack([huge], 300, 1000) == [huge.data]  # too big for any batch: alone


def test_reorder_shuffles_the_backlog_but_keeps_newest_first() -> None:
    phone = Phone("d-1", reorder=random.Random(3))
    for i in range(50):
        phone.record(pos(i), T0)
    phone.connected(dict(WELCOME), T0)
    items = frames_items(phone.poll(T0))
    assert items[0][0]["seq"] == 50
    rest = [e["seq"] for f in items[1:] for e in f]
    assert sorted(rest) == list(range(1, 50)) and rest != sorted(rest)


def test_everything_unacked_is_resent_after_reconnecting() -> None:
    phone = online_phone()
    for i in range(4):
        phone.record(pos(i), T0)
    phone.poll(T0)
    phone.receive({"type": "ack", "ranges": [[2, 2]]}, T0 + 5)
    phone.disconnected()
    phone.connected(dict(WELCOME), T0 + 1000)
    sent = sorted(e["seq"] for f in frames_items(phone.poll(T0 + 1000)) for e in f)
    assert sent == [1, 3, 4]


def test_resend_on_the_same_connection_after_60_s_without_answer() -> None:
    phone = online_phone()
    phone.record(pos(), T0)
    phone.poll(T0)
    assert phone.poll(T0 + 59_000) == []
    later = [phone.poll(T0 + t) for t in range(59_000, 80_001, 1000)]
    resent = [f for f in later if f]
    assert len(resent) == 1 and orjson.loads(resent[0][0])["seq"] == 1


def test_final_errors_delete_retry_errors_keep_and_wait() -> None:
    phone = online_phone()
    for i in range(4):
        phone.record(pos(i), T0)
    phone.poll(T0)
    phone.receive({"type": "error", "code": "invalid", "seq": 1, "message": "lat"}, T0 + 1)
    phone.receive({"type": "error", "code": "forbidden", "seq": 2}, T0 + 1)
    phone.receive({"type": "error", "code": "unavailable", "ranges": [[3, 4]], "retry_ms": 2000}, T0 + 1)
    assert sorted(phone.outbox) == [3, 4] and phone.refused == 2
    assert phone.poll(T0 + 1500) == []
    again = sorted(e["seq"] for f in frames_items(phone.poll(T0 + 2001)) for e in f)
    assert again == [3, 4]
    assert phone.records is not None and phone.records.refused == {1: "invalid", 2: "forbidden"}


def test_rate_limited_without_retry_ms_waits_a_second() -> None:
    phone = online_phone()
    phone.record(pos(), T0)
    phone.poll(T0)
    phone.receive({"type": "error", "code": "rate_limited", "seq": 1}, T0)
    assert phone.poll(T0 + 999) == []
    assert phone.poll(T0 + 1000) != []


def test_conflict_renumbers_above_the_highest_known_seq_and_resends() -> None:
    phone = online_phone()
    for i in range(3):
        phone.record(pos(i), T0)
    phone.poll(T0)
    phone.receive({"type": "error", "code": "conflict", "seq": 2}, T0 + 1)
    assert sorted(phone.outbox) == [1, 3, 4]
    assert phone.outbox[4].body["lat"] == pos(1)["lat"]  # the same event, new number
    (frame,) = phone.poll(T0 + 2)
    assert orjson.loads(frame)["seq"] == 4
    assert phone.record(pos(), T0 + 3) == 5
    rec = phone.records
    assert rec is not None
    kinds = {seq: kind for seq, kind, *_ in rec.events()}
    assert kinds == {1: 1, 3: 1, 4: 1, 5: 1}  # seq 2 names no event of ours any more


def test_too_large_splits_batches_and_drops_a_single_oversize_event() -> None:
    phone = Phone("d-1")
    for i in range(40):
        phone.record(pos(i), T0)
    phone.connected(dict(WELCOME), T0)
    frames = phone.poll(T0)
    assert [len(f) for f in frames_items(frames)] == [1, 39]
    phone.receive({"type": "error", "code": "too_large", "ranges": [[1, 39]]}, T0 + 1)
    sizes = [len(f) for f in frames_items(phone.poll(T0 + 2))]
    assert sum(sizes) == 39 and max(sizes) <= 150  # halved from 300 items
    phone.receive({"type": "error", "code": "too_large", "seq": 40}, T0 + 3)  # it went alone
    assert 40 not in phone.outbox and phone.refused == 1


def test_disconnect_stops_sending_and_clears_pending_retries() -> None:
    phone = online_phone()
    phone.record(pos(), T0)
    phone.poll(T0)
    phone.receive({"type": "error", "code": "unavailable", "seq": 1, "retry_ms": 10}, T0)
    phone.disconnected()
    phone.record(pos(), T0 + 20)
    assert phone.poll(T0 + 20) == [] and phone.unacked == 2


def test_welcome_server_time_corrects_a_wrong_clock_only() -> None:
    phone = Phone("d-1")
    phone.connected({**WELCOME, "server_time": T0 + 500}, T0)  # round-trip noise: ignored
    phone.record(pos(), T0)
    assert phone.outbox[1].body["ts"] == int(T0)
    phone.connected({**WELCOME, "server_time": T0 + 3_600_000}, T0)  # an hour off: corrected
    phone.record(pos(), T0)
    assert phone.outbox[2].body["ts"] == int(T0 + 3_600_000)


# --- records ------------------------------------------------------------------------------


def test_records_keep_first_last_and_ack_times() -> None:
    phone = online_phone()
    phone.record(pos(), T0 + 1)
    phone.poll(T0 + 2)
    phone.disconnected()
    phone.connected(dict(WELCOME), T0 + 100)
    phone.poll(T0 + 100)
    phone.receive({"type": "ack", "ranges": [[1, 1]]}, T0 + 130)
    assert phone.records is not None
    ((seq, kind, created, first, last, ack),) = list(phone.records.events())
    assert (seq, kind, created, first, last, ack) == (1, 1, 1.0, 2.0, 100.0, 130.0)


def test_records_fill_gaps_and_refuse_going_back() -> None:
    rec = Records(T0)
    rec.add(5, 1, T0)
    rec.add(8, 2, T0)
    assert [s for s, *_ in rec.events()] == [5, 8]
    with pytest.raises(ValueError):
        rec.add(7, 1, T0)


# --- the link: opening handshake, source addresses ------------------------------------------


def test_handshake_request_and_accept_check() -> None:
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    assert accept_value(key) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 section 1.3
    req = handshake_request("localhost:8000", "/v1/driver", key).decode()
    assert req.startswith("GET /v1/driver HTTP/1.1\r\n") and req.endswith("\r\n\r\n")
    assert "Sec-WebSocket-Key: " + key in req and "Sec-WebSocket-Version: 13" in req
    assert "permessage-deflate" not in req  # no compression offered
    ok = f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept_value(key)}"
    check_handshake(ok.encode(), key)
    with pytest.raises(WsError):
        check_handshake(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0", key)
    with pytest.raises(WsError):
        check_handshake(b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope", key)


def test_loopback_targets_get_many_source_addresses_remote_ones_none() -> None:
    sources = loopback_sources("ws://127.0.0.1:8080")
    assert len(sources) == 32 and len(set(sources)) == 32
    assert all(s.startswith("127.0.1.") for s in sources)
    assert loopback_sources("ws://localhost:8080/prefix") == sources
    assert loopback_sources("ws://tracker.example:8080") == []


# --- dashboards and the report's sums --------------------------------------------------------


def test_view_counts_frames_inside_batches_and_duplicates() -> None:
    view = View(T0)
    view.handle({"type": "snapshot", "drivers": [{"driver": "d-1"}], "more": True}, T0)
    assert not view.snapshot_done
    view.handle({"type": "snapshot", "drivers": []}, T0)
    assert view.snapshot_done and view.snapshot_drivers == 1
    view.handle({"type": "pos", "driver": "d-1", "seq": 5}, T0 + 10)
    batch = [
        {"type": "pos", "driver": "d-1", "seq": 6},
        {"type": "scan", "driver": "d-1", "seq": 7, "event": "deliver"},
        {"type": "presence", "driver": "d-2", "online": False},
        {"type": "pos", "driver": "d-1", "seq": 5},
    ]
    view.handle({"type": "batch", "items": batch}, T0 + 20)
    view.handle({"type": "pos", "driver": "d-1", "seq": 3}, T0 + 30)  # older than the first seen
    assert view.frames == 5 and view.events == 5
    assert view.counts["presence"] == 1 and view.duplicates == 1
    assert view.logs["d-1"].items() == [(3, 30.0), (5, 10.0), (6, 20.0), (7, 20.0)]


def test_seqlog_detects_duplicates_below_and_above_base() -> None:
    log = SeqLog(10)
    assert log.put(10, 1.0) and log.put(15, 2.0) and log.put(4, 3.0)
    assert not log.put(15, 9.0) and not log.put(4, 9.0)
    assert [s for s, _ in log.items()] == [4, 10, 15]


def test_latency_percentiles() -> None:
    lat = Latency.of([float(i) for i in range(1, 101)])
    assert (lat.count, lat.p50, lat.p95, lat.p99, lat.max) == (100, 50.0, 95.0, 99.0, 100.0)
    assert Latency.of([]) == Latency()


class _Opts:
    org, url, seed, drivers, dashboards, processes = "o", "ws://x", 1, 2, 1, 1
    interval, duration, flaky, batch_mode = 1.0, 10.0, False, False


def test_report_counts_unacked_and_unstored_as_lost() -> None:
    a, b = online_phone(), Phone("d-2", records=Records(T0))
    b.connected(dict(WELCOME), T0)
    for phone in (a, b):
        for i in range(3):
            phone.record(pos(i), T0)
        phone.poll(T0 + 1)
    a.receive({"type": "ack", "ranges": [[1, 3]]}, T0 + 11)
    b.receive({"type": "ack", "ranges": [[1, 2]]}, T0 + 21)
    assert a.records is not None and b.records is not None
    view = View(T0)
    view.handle({"type": "batch", "items": [{"type": "pos", "driver": "d-1", "seq": s} for s in (1, 2, 3)]}, T0 + 31)
    data = RunData(
        records={"d-1": a.records, "d-2": b.records},
        views=[view],
        dashboard_connects=[1],
        stored={"d-1": [1, 2, 3], "d-2": [1]},
        stats={"bytes_out": 600, "started": 2},
        counts={},
        errors={},
        stopped={},
        samples=[],
        elapsed_s=10.0,
        gen_s=10.0,
        drain_s=0.0,
        cpu_phones_s=0.006,
        cpu_dashboards_s=0.0,
    )
    report = build(_Opts(), data)
    assert (report.generated, report.sent, report.acked) == (6, 6, 5)
    assert (report.lost_unacked, report.lost_unstored, report.lost) == (1, 1, 2)
    assert not report.ok and report.stored == 4
    assert sorted(report.lost_sample) == ["d-2#2(not stored)", "d-2#3"]
    assert report.ack_latency_ms.p50 == 10.0 and report.ack_latency_ms.max == 20.0
    assert report.live_latency_ms.count == 3 and report.live_latency_ms.p50 == 30.0
    assert report.bytes_per_event == 100.0 and report.cpu_us_per_event == 1000.0
    (dash,) = report.dashboard_results
    assert dash.events == 3 and dash.pos_seen == pytest.approx(3 / 5)
    assert "LOST" in report.format_table() and orjson.loads(report.to_json())["lost"] == 2
    assert not math.isnan(report.bytes_per_event)


def test_a_compact_2_phone_sends_its_backlog_scans_included_in_one_compact_2_frame() -> None:
    from tracker.protocol import compact2

    phone = Phone("d-1", records=Records(T0), encoding="compact2", acks="compact")
    assert phone.hello_fields() == {"encodings": ["compact-2", "compact-1", "json"], "acks": "compact"}
    phone.connected({**WELCOME, "encoding": "compact-2", "acks": "compact"}, T0)
    for i, body in enumerate([pos(0), scan(), pos(1), pos(2)]):
        phone.record(body, T0 + 1000 * i)
    [frame] = phone.poll(T0 + 4000)
    assert frame[0] == compact2.MAGIC
    assert [(e["type"], e["seq"]) for e in compact2.decode(frame, 300)] == [
        ("pos", 1),
        ("scan", 2),
        ("pos", 3),
        ("pos", 4),
    ]
    phone.record(pos(3), T0 + 5000)
    [live] = phone.poll(T0 + 5000)
    assert live[0] == 0xC2  # a lone fix still goes as a compact live frame
    uploader = Phone("d-2", encoding="compact2")
    uploader.connected(dict(WELCOME), T0)
    uploader.record(pos(0), T0)
    uploader.record(scan(), T0 + 10)
    [(body, content_type)] = uploader.uploads(T0 + 20)
    assert content_type == compact2.CONTENT_TYPE and len(compact2.decode(body, 300)) == 2
