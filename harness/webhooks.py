"""A webhook receiver in the test's process: a real HTTP/1.1 server on 127.0.0.1 that records
every request and answers as told (status, delay, body); it can be stopped (connections refused)
and started again on the same port. And a Standard Webhooks verifier written from the
specification, independently of tracker/webhooks/sign.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from .ports import free_port


@dataclass
class Received:
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float  # time.monotonic() when the body was read

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    status: int = 200
    delay_s: float = 0.0
    answer: bytes = b"ok"
    port: int = field(default_factory=free_port)
    got: list[Received] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        self._stopping.clear()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        """Stop listening and cut every open connection: from now on, connections are refused."""
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            self._stopping.set()  # a handler still delaying its answer (the slow receiver) ends now
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    def ids(self) -> list[str]:
        return [r.id for r in self.got]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.got.append(Received(headers, body, time.monotonic()))
            if self.delay_s:  # the slow receiver under test
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.delay_s)
            reply = f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(self.answer)}\r\nConnection: close\r\n\r\n"
            writer.write(reply.encode() + self.answer)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def verify(
    secret: str, headers: dict[str, str], body: bytes, *, now: float | None = None, tolerance_s: int = 300
) -> bool:
    """Standard Webhooks verification: the key is base64 after `whsec_`; the signed content is
    `{webhook-id}.{webhook-timestamp}.{body}`; one of the space-separated `v1,<base64>` in
    webhook-signature must equal base64(HMAC-SHA256); the timestamp within `tolerance_s`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance_s:
        return False
    content = msg_id.encode() + b"." + stamp.encode() + b"." + body
    expected = base64.b64encode(hmac.digest(key, content, "sha256"))
    for candidate in headers["webhook-signature"].split(" "):
        version, _, sig = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(sig.encode(), expected):
            return True
    return False
