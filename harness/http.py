"""HTTP from outside, over a bare asyncio stream (no client library, the request sent as is):
raw requests, JSON calls, /readyz, and consignments on the packages API."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import orjson

from .tokens import token
from .wait import wait_until

Response = tuple[int, dict[str, str], bytes]  # status, lower-cased headers, body (de-chunked)
DEST = {"name": "St Mary's Hospital", "lat": -1.3, "lon": 36.8}


class Listening(Protocol):
    """Anything on a port of 127.0.0.1: an `Instance`, a `TrackerProc`."""

    @property
    def port(self) -> int: ...


def _port(target: Listening | int) -> int:
    return target if isinstance(target, int) else target.port


async def request(
    target: Listening | int,
    method: str,
    path: str,
    tok: str | None = None,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 10.0,
) -> Response:
    """One HTTP/1.1 request on a connection of its own (`Connection: close`), the path sent as is."""
    port = _port(target)
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close", f"Content-Length: {len(body)}"]
    if tok is not None:
        head.append(f"Authorization: Bearer {tok}")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    header, _, payload = raw.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    if fields.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    return int(lines[0].split(" ", 2)[1]), fields, payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


async def http(
    target: Listening | int,
    method: str,
    path: str,
    tok: str | None = None,
    body: Any = None,
    query: dict[str, Any] | None = None,
) -> tuple[int, Any]:
    """A JSON call: `body` encoded (bytes sent as they are), `query` appended (None values left
    out); returns (status, decoded JSON body or None)."""
    if query:
        path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
    data = b"" if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
    status, _, payload = await request(
        target, method, path, tok, data, {"Content-Type": "application/json"} if data else None
    )
    return status, orjson.loads(payload) if payload else None


async def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """GET `path`: (status, body)."""
    status, _, body = await request(port, "GET", path, timeout=timeout)
    return status, body


async def ready(port: int) -> dict[str, Any] | None:
    """/readyz's body, or None when the instance does not answer."""
    try:
        _, body = await http_get(port, "/readyz")
        parsed: dict[str, Any] = orjson.loads(body)
        return parsed
    except (OSError, TimeoutError, ValueError, IndexError):
        return None


async def is_ready(port: int) -> bool:
    body = await ready(port)
    return bool(body and body.get("ready"))


async def wait_ready(
    port: int,
    *,
    proc: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
    timeout: float = 30.0,
    interval: float = 0.05,
) -> dict[str, Any]:
    """Wait until /readyz says ready and return its body; fail at once if `proc` (the process
    meant to answer) exits, quoting the end of its `log`."""
    seen: list[dict[str, Any]] = []

    async def answered() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before it was ready\n{_tail(log)}")
        body = await ready(port)
        if body and body.get("ready"):
            seen.append(body)
            return True
        return False

    await wait_until(answered, timeout, f"the tracker on port {port} to be ready", interval=interval)
    return seen[-1]


def _tail(log: Path | None) -> str:
    try:
        return log.read_text(errors="replace")[-3000:] if log is not None else ""
    except OSError:
        return ""


def pkg_path(package: str, suffix: str = "") -> str:
    return "/v1/packages/" + quote(package, safe="") + suffix


async def consign(target: Listening | int, org: str, package: str, client: str, **extra: Any) -> dict[str, Any]:
    """POST /v1/packages as a dispatcher of `org` (test secret), with a cold chain of 2-8 C."""
    body = {"id": package, "client": client, "destination": DEST, "cold_chain": {"min_c": 2, "max_c": 8}, **extra}
    status, out = await http(target, "POST", "/v1/packages", token("dispatcher", "disp", org), body)
    assert status == 201, out
    result: dict[str, Any] = out
    return result
