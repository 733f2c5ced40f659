"""Bytes per position on the wire (WebSocket frames, without TCP/IP headers), tracker vs Socket.IO,
for the position the benchmarks send. Exact, not sampled: each frame is built the way the sender
builds it (tracker's own decoder and encoders; Socket.IO's packet format: ``42<ack id>[...]`` up,
``43<ack id>[true]`` back, ``42["pos",{...}]`` to each dashboard).

    .venv/bin/python bench/wire.py [--batch 100]

``--batch`` is the number of positions in one dashboard `batch` frame (tracker groups a
dashboard's frames per 25 ms flush: at 10,000 positions/s, about 250 per frame).
"""

from __future__ import annotations

import argparse
import json
import time

from tracker.protocol import frames
from tracker.protocol.events import check_event
from tracker.protocol.live import pos_frame


def ws_frame(payload: int, masked: bool) -> int:
    """Size of one WebSocket frame carrying ``payload`` bytes (RFC 6455 section 5.2)."""
    head = 2 if payload < 126 else 4 if payload < 65536 else 10
    return head + (4 if masked else 0) + payload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=100)
    args = p.parse_args()
    seq, ts = 1234, int(time.time() * 1000)
    body = {
        "seq": seq,
        "ts": ts,
        "lat": -1.292071,
        "lon": 36.821946,
        "acc": 6.5,
        "spd": 11.2,
        "hdg": 274,
        "alt": 1661,
        "bat": 0.81,
    }
    # tracker: what bench/load/load.js sends, what the server answers and fans out
    up = json.dumps({"type": "pos", **body}, separators=(",", ":")).encode()
    ack = frames.ack([seq])
    ev = check_event(frames.decode(up), ts)
    item = pos_frame("d-1234", ev)  # type: ignore[arg-type]
    head = len(b'{"type":"batch","items":[]}')
    n = args.batch
    batch_payload = head + n * len(item) + (n - 1)
    t_dash = ws_frame(batch_payload, False) / n
    # Socket.IO: emit("pos", body, ack) with ack id 1234; the ack; the broadcast to a dashboard
    sio_up = b"421234" + json.dumps(["pos", body], separators=(",", ":")).encode()
    sio_ack = b"431234[true]"
    sio_dash = b"42" + json.dumps(["pos", {"driver": "d-1234", **body}], separators=(",", ":")).encode()
    rows = [
        ("tracker", ws_frame(len(up), True), ws_frame(len(ack), False), t_dash),
        ("Socket.IO", ws_frame(len(sio_up), True), ws_frame(len(sio_ack), False), ws_frame(len(sio_dash), False)),
    ]
    print("| protocol | phone -> server | server -> phone (ack) | server -> each dashboard | total, 1 dashboard |")
    print("|---|---|---|---|---|")
    for name, a, b, c in rows:
        print(f"| {name} | {a} | {b} | {c:.1f} | {a + b + c:.1f} |")
    print(
        f"\n(tracker's dashboard figure: one `batch` frame of {n} positions, divided by {n}; a lone position is "
        f"{ws_frame(len(item), False)} bytes; the ack is per driver per commit, so it covers every event of that "
        f"driver in the commit)"
    )


if __name__ == "__main__":
    main()
