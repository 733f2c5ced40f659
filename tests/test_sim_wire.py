"""`tracker simulate`'s bytes on the wire are real: what its phones count at their sockets equals
what a byte-counting TCP proxy between them and the service carried (harness/proxy.py), each
way, handshakes, hello, welcome, acks and closes included; for every encoding and ack form."""

from __future__ import annotations

from typing import Any

import pytest

from harness.proxy import Proxy
from harness.tokens import SECRET
from tests.test_resume import first_frame
from tracker.protocol.wscodec import OP_BINARY, OP_TEXT
from tracker.sim import SimOptions
from tracker.sim.run import simulate


@pytest.mark.parametrize(
    ("encoding", "acks", "transport", "resume"),
    [
        ("json", "per-commit", "ws", "off"),
        ("compact", "cumulative", "ws", "off"),
        ("json", "per-commit", "http", "off"),
        ("compact", "per-commit", "http", "off"),
        ("compact2", "compact", "ws", "off"),
        ("compact2", "per-commit", "http", "off"),
        ("compact2", "compact", "ws", "warm"),  # phones that connected before: a resume hello, no JWT
    ],
)
async def test_the_simulators_byte_counts_are_what_crossed_the_wire(
    start_instance: Any, org: str, encoding: str, acks: str, transport: str, resume: str
) -> None:
    inst = await start_instance(ack_delay_ms=500)
    proxy = await Proxy(inst.port).start()
    try:
        report = await simulate(
            SimOptions(
                url=f"ws://127.0.0.1:{proxy.port}",
                drivers=3,
                dashboards=0,
                duration=4.0,
                drain_timeout=15.0,
                secret=SECRET,
                org=org,
                seed=7,
                encoding=encoding,
                acks=acks,
                transport=transport,
                resume=resume,
                batch_mode=transport == "http",
                batch_window=1.0,
                progress=False,
                settle=0.0,
            )
        )
        assert report.lost == 0 and report.acked == report.generated > 0
        assert "resume_refused" not in report.counts
        await proxy.close()
        first = b"GET /v1/driver " if transport == "ws" else b"POST /v1/driver/events "
        phones = [p for p in proxy.done if p.said.startswith(first)]
        assert len(phones) >= 3  # the probe's /v1/live connection is not a phone's
        firsts = [first_frame(p.said) for p in phones] if transport == "ws" else []
        if resume == "warm":  # no JWT crossed the wire: each phone's first frame was its resume hello
            assert firsts and all(op == OP_BINARY and data[:1] == b"\xa3" for op, data in firsts), firsts
        elif transport == "ws":
            assert all(op == OP_TEXT and b'"token":"eyJ' in data for op, data in firsts), firsts
        up, down = sum(p.up for p in phones), sum(p.down for p in phones)
        # The phone closes without waiting for the server's close frame (4 bytes) to be read.
        assert report.bytes_out == up, (report.bytes_out, up)
        assert 0 <= down - report.bytes_in <= 3 * 4 if transport == "ws" else down == report.bytes_in
        positions = round(report.bytes_out / report.up_per_position)
        assert report.down_per_position == round(report.bytes_in / positions, 2)
    finally:
        await proxy.close()
