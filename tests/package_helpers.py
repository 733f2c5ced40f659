"""Helpers for the package tests: a minimal HTTP/1.1 client over asyncio streams, consignments,
and waiting on an effect with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import orjson

from .client import Dash, Phone
from .conftest import Instance, token

T = TypeVar("T")
DEST = {"name": "St Mary's Hospital", "lat": -1.3, "lon": 36.8}


async def http(
    inst: Instance,
    method: str,
    path: str,
    tok: str | None = None,
    body: Any = None,
    query: dict[str, Any] | None = None,
) -> tuple[int, Any]:
    """One request on its own connection; returns (status, decoded JSON body or None)."""
    if query:
        path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
    data = b"" if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{inst.port}",
        "Connection: close",
        f"Content-Length: {len(data)}",
    ]
    if data:
        head.append("Content-Type: application/json")
    if tok is not None:
        head.append(f"Authorization: Bearer {tok}")
    reader, writer = await asyncio.open_connection("127.0.0.1", inst.port)
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    header, _, payload = raw.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in header.lower():
        payload = _dechunk(payload)
    return status, orjson.loads(payload) if payload else None


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


def pkg_path(package: str, suffix: str = "") -> str:
    return "/v1/packages/" + quote(package, safe="") + suffix


async def consign(inst: Instance, org: str, package: str, client: str, **extra: Any) -> dict[str, Any]:
    body = {"id": package, "client": client, "destination": DEST, "cold_chain": {"min_c": 2, "max_c": 8}, **extra}
    status, out = await http(inst, "POST", "/v1/packages", token("dispatcher", "disp", org), body)
    assert status == 201, out
    result: dict[str, Any] = out
    return result


async def eventually(probe: Callable[[], Awaitable[T]], check: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Poll `probe` until `check(value)` holds; fail after `timeout` with the last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if check(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached in {timeout} s; last value: {value!r}")
        await asyncio.sleep(0.02)


def frames_of(frames: list[dict[str, Any]], ftype: str, /, **match: Any) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == ftype and all(f.get(k) == v for k, v in match.items())]


async def until_frame(
    dash: Dash, got: list[dict[str, Any]], ftype: str, /, timeout: float = 10.0, **match: Any
) -> dict[str, Any]:
    """Read live frames into `got` until one of type `ftype` matching `match` arrives; return it."""
    async with asyncio.timeout(timeout):
        while True:
            found = frames_of(got, ftype, **match)
            if found:
                return found[0]
            got += await dash.live(timeout)


async def acked(phone: Phone, *seqs: int) -> None:
    await phone.until(lambda p: set(seqs) <= p.acked)
