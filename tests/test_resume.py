"""Session resumption (tracker/protocol/resume.py, docs/PROTOCOL.md "Resuming a session"): tokens
bound to the driver, its negotiated encoding and acks and two expiries, verified by HMAC; the
binary resume hello and welcome in the sans-I/O session; then over real websockets (both transport
paths) against Redis + PostgreSQL: a phone resumes, its batch is stored and acked, a bad token is
refused with a clear error and the JWT hello still works."""

from __future__ import annotations

import base64
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from harness.clients import Phone, now_ms
from harness.tokens import SECRET, token
from tracker import metrics
from tracker.auth import AuthError, Principal
from tracker.protocol import compact2, resume
from tracker.protocol.acks import decode_binary
from tracker.protocol.bucket import TokenBucket
from tracker.protocol.driver import DriverSession
from tracker.protocol.wscodec import OP_BINARY, OP_TEXT, FrameCollector

from .test_compact_ws import PATHS, compact_phone
from .test_sessions import NOW_MS, VERIFIER, hello, sent, tok

NOW_S = NOW_MS / 1000
TOKENS = resume.ResumeTokens(resume.derive_key("session-secret-" + "x" * 40), ttl_s=86_400)
ALICE = Principal("driver", "d-1", "acme", int(NOW_S) + 3600, name="Alice Kamau")


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- tokens -------------------------------------------------------------------------------------------


def test_a_token_names_the_driver_its_encoding_and_acks_and_never_outlives_its_jwt() -> None:
    t = TOKENS.issue(ALICE, "compact-2", "compact", NOW_S)
    assert len(t) < 64
    principal, encoding, acks, until = TOKENS.verify(t, NOW_S + 10)
    assert (principal, encoding, acks) == (ALICE, "compact-2", "compact")
    assert until == ALICE.exp  # the JWT expires before now + ttl: so does the token
    with pytest.raises(AuthError, match="resume: token expired"):
        TOKENS.verify(t, ALICE.exp + 1)
    short = resume.ResumeTokens(resume.derive_key("session-secret-" + "x" * 40), ttl_s=60)
    assert short.verify(short.issue(ALICE, "json", "per-commit", NOW_S), NOW_S)[3] == int(NOW_S + 60)


def test_a_tampered_token_or_one_of_another_key_is_refused() -> None:
    t = bytearray(TOKENS.issue(ALICE, "compact-2", "compact", NOW_S))
    for i in range(len(t)):
        bad = bytearray(t)
        bad[i] ^= 1
        with pytest.raises(AuthError, match=r"^resume: token "):
            TOKENS.verify(bytes(bad), NOW_S)
    other = resume.ResumeTokens(resume.derive_key("another-secret-" + "y" * 40), ttl_s=86_400)
    with pytest.raises(AuthError, match="signature is invalid"):
        other.verify(bytes(t), NOW_S)
    assert resume.derive_key(SECRET) != SECRET.encode()  # the JWT secret itself never signs resume tokens


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000))
def test_any_bytes_as_a_token_are_refused_with_an_auth_error_only(data: bytes) -> None:
    with pytest.raises(AuthError, match=r"^resume: "):
        TOKENS.verify(data, NOW_S)


# -- the session --------------------------------------------------------------------------------------


def _session() -> DriverSession:
    return DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30, resume_tokens=TOKENS)


def test_a_phone_that_asks_gets_a_token_in_welcome_and_resumes_with_it() -> None:
    first = _session()
    assert first.receive_hello(hello(tok(name="Alice"), encodings=["compact-2"], acks="compact", resume=True))
    first.welcome(7, NOW_MS, TokenBucket(10, 100, 0.0))
    [welcome] = sent(first)
    token_bytes = _b64(welcome["resume"])
    again = _session()
    principal = again.receive_hello(bytes([resume.HELLO]) + token_bytes, binary=True, now_s=NOW_S + 60)
    assert principal is not None and (principal.sub, principal.org, principal.name) == ("d-1", "acme", "Alice")
    assert again.expires_at == first.expires_at  # the JWT's expiry: resuming extends nothing
    again.welcome(9, NOW_MS + 60_000, TokenBucket(10, 100, 0.0))
    [binary] = again.data_to_send()
    assert binary[0] == resume.WELCOME and len(binary) < 24  # no new token: the old one is fresh
    got = resume.decode_welcome(binary)
    assert (got["last_seq"], got["server_time"], got["encoding"], got["acks"], got["max_batch"]) == (
        9,
        NOW_MS + 60_000,
        "compact-2",
        "compact",
        300,
    )
    assert "resume" not in got
    # Compact-2 frames and compact acks work on the resumed session as on the first.
    frame = compact2.encode([{"type": "pos", "seq": 10, "ts": NOW_MS, "lat": 1.0, "lon": 2.0}])
    assert [e.seq for e in again.receive_binary(frame, NOW_MS, 1.0)] == [10]
    assert again.acks is not None and again.binary_acks


def test_a_token_is_renewed_in_the_binary_welcome_when_that_gains_half_a_ttl() -> None:
    tokens = resume.ResumeTokens(resume.derive_key("session-secret-" + "x" * 40), ttl_s=600)
    t = tokens.issue(ALICE, "json", "per-commit", NOW_S)
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30, resume_tokens=tokens)
    assert session.receive_hello(bytes([resume.HELLO]) + t, binary=True, now_s=NOW_S + 400)
    session.welcome(0, int((NOW_S + 400) * 1000), TokenBucket(10, 100, 0.0))
    got = resume.decode_welcome(session.data_to_send()[0])
    assert tokens.verify(got["resume"], NOW_S + 900)[3] == int(NOW_S + 1000)
    assert (got["encoding"], got["acks"]) == ("json", "per-commit")
    # Capped by the JWT: a new token would end when the old one does, so none is sent.
    capped = tokens.issue(ALICE, "json", "per-commit", ALICE.exp - 500)
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30, resume_tokens=tokens)
    assert session.receive_hello(bytes([resume.HELLO]) + capped, binary=True, now_s=ALICE.exp - 100)
    session.welcome(0, int((ALICE.exp - 100) * 1000), TokenBucket(10, 100, 0.0))
    assert "resume" not in resume.decode_welcome(session.data_to_send()[0])


@pytest.mark.parametrize(
    ("frame", "tokens", "code", "message"),
    [
        (bytes([resume.HELLO]) + b"\0" * 40, TOKENS, 4000, "resume: token signature is invalid"),
        (bytes([resume.HELLO]) + TOKENS.issue(ALICE, "json", "per-commit", NOW_S), None, 4000, "resume: not enabled"),
        (bytes([resume.HELLO]) + TOKENS.issue(ALICE, "json", "per-commit", NOW_S - 90_000), TOKENS, 4000, "expired"),
    ],
    ids=["forged", "resumption-off", "expired"],
)
def test_a_refused_resume_is_unauthorized_and_closes_4000(
    frame: bytes, tokens: resume.ResumeTokens | None, code: int, message: str
) -> None:
    session = DriverSession(VERIFIER, max_frame=65_536, max_batch=300, leeway_s=30, resume_tokens=tokens)
    assert session.receive_hello(frame, binary=True, now_s=NOW_S) is None
    [error] = sent(session)
    assert error["code"] == "unauthorized" and message in error["message"] and session.close_code == code


def test_another_binary_first_frame_still_closes_1003_and_v1_welcomes_are_unchanged() -> None:
    session = _session()
    assert session.receive_hello(b"\xc3\x01", binary=True, now_s=NOW_S) is None
    assert session.close_code == 1003 and sent(session) == []
    v1 = _session()
    assert v1.receive_hello(hello(tok()))
    v1.welcome(0, NOW_MS, TokenBucket(10, 100, 0.0))
    assert "resume" not in sent(v1)[0]  # not asked for: not given


def first_frame(said: bytes) -> tuple[int, bytes]:
    """The opcode and (unmasked) payload of a client's first websocket frame, from what it sent."""
    _, _, rest = said.partition(b"\r\n\r\n")
    frames = FrameCollector(masked=True).feed(rest)
    return frames[0] if frames else (-1, b"")


# -- over the wire ------------------------------------------------------------------------------------


async def _resumed(url: str, token_bytes: bytes) -> tuple[Any, dict[str, Any]]:
    ws = await connect(url + "/v1/driver", compression=None)
    await ws.send(bytes([resume.HELLO]) + token_bytes)
    reply = await ws.recv()
    assert isinstance(reply, bytes), reply
    return ws, resume.decode_welcome(reply)


@PATHS
async def test_a_phone_resumes_over_a_websocket_and_its_batch_is_stored_and_acked(
    start_instance: Any, org: str, db: asyncpg.Connection, fast: bool
) -> None:
    inst = await start_instance(ws_fast_path=fast)
    resumed = metrics.RESUMES.labels("resumed")._value.get()
    tok_ = token("driver", "d-r", org, name="Rita")
    first = await compact_phone(inst.url, tok_, ["compact-2", "json"])
    assert "resume" not in first.welcome  # not asked
    await first.ws.close()
    phone = Phone(await connect(inst.url + "/v1/driver", compression=None))
    await phone.send(
        {"type": "hello", "token": tok_, "encodings": ["compact-2", "json"], "acks": "compact", "resume": True}
    )
    welcome = await phone.recv()
    token_bytes = _b64(welcome["resume"])
    await phone.ws.close()
    ws, got = await _resumed(inst.url, token_bytes)
    assert (got["encoding"], got["acks"], got["last_seq"]) == ("compact-2", "compact", 0)
    t0 = now_ms() - 10_000
    await ws.send(
        compact2.encode([{"type": "pos", "seq": s, "ts": t0 + 1000 * s, "lat": 1.0, "lon": 2.0} for s in range(1, 6)])
    )
    ack = await ws.recv()
    assert isinstance(ack, bytes) and decode_binary(ack, 0)["through"] == 5
    rows = await db.fetch("SELECT seq FROM positions WHERE org=$1 AND driver_id='d-r' ORDER BY seq", org)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert await db.fetchval("SELECT name FROM drivers WHERE org=$1 AND driver_id='d-r'", org) == "Rita"
    await ws.close()
    ws, got = await _resumed(inst.url, token_bytes)  # again: last_seq from the database
    assert got["last_seq"] == 5
    await ws.close()
    assert metrics.RESUMES.labels("resumed")._value.get() == resumed + 2  # tracker_driver_resumes_total


@PATHS
async def test_a_forged_resume_is_refused_with_a_clear_error_and_the_jwt_hello_still_works(
    start_instance: Any, org: str, fast: bool
) -> None:
    inst = await start_instance(ws_fast_path=fast)
    refused = metrics.RESUMES.labels("refused")._value.get()
    ws = await connect(inst.url + "/v1/driver", compression=None)
    await ws.send(bytes([resume.HELLO]) + b"x" * 50)
    error = await ws.recv()
    assert '"unauthorized"' in str(error) and "resume: token signature is invalid" in str(error)
    await ws.wait_closed()
    assert ws.close_code == 4000
    assert metrics.RESUMES.labels("refused")._value.get() == refused + 1
    phone = await compact_phone(inst.url, token("driver", "d-f", org), ["compact-2"])
    assert phone.welcome["encoding"] == "compact-2"


async def test_simulated_phones_resume_after_their_connections_are_reset_and_lose_nothing(
    start_instance: Any, org: str
) -> None:
    """`tracker simulate --resume on`: the first connection is a JWT hello asking for a token; after
    the network resets every connection, each phone comes back with its resume hello (no JWT)."""
    import asyncio

    from harness.proxy import Proxy
    from tracker.sim import SimOptions
    from tracker.sim.run import simulate

    inst = await start_instance(ack_delay_ms=200)
    proxy = await Proxy(inst.port).start()

    async def reset_once() -> None:
        await asyncio.sleep(2.5)
        proxy.reset()

    try:
        resetter = asyncio.create_task(reset_once())
        report = await simulate(
            SimOptions(
                url=f"ws://127.0.0.1:{proxy.port}",
                drivers=3,
                dashboards=0,
                duration=5.0,
                drain_timeout=20.0,
                secret=SECRET,
                org=org,
                seed=11,
                encoding="compact2",
                acks="compact",
                resume="on",
                progress=False,
                settle=0.0,
            )
        )
        await resetter
        assert report.lost == 0 and report.acked == report.generated > 0
        assert "resume_refused" not in report.counts
        firsts = [first_frame(p.said) for p in proxy.done + list(proxy.pipes) if p.said.startswith(b"GET /v1/driver ")]
        with_jwt = [f for f in firsts if f[0] == OP_TEXT and b'"token":"eyJ' in f[1] and b'"resume":true' in f[1]]
        resumed = [f for f in firsts if f[0] == OP_BINARY and f[1][:1] == bytes((resume.HELLO,))]
        assert len(with_jwt) == 3 and len(resumed) >= 3 and len(firsts) == 3 + len(resumed), firsts
    finally:
        await proxy.close()
