"""One webhook POST: the host resolved once, every address checked (policy.check), the connection
made to the checked address itself (a DNS answer that changes between the check and the connect,
DNS rebinding, cannot redirect it), TLS verified against the URL's host name.

HTTP/1.1 with `Connection: close` on a bare asyncio stream: the request is ours to the byte, no
redirect is followed (a 3xx is a failure), and of the answer only the status line and a short
prefix of the body are read; the connection is closed without waiting for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Final

from . import policy

PREFIX_MAX: Final = 256  # bytes of a response body kept in the delivery log
HEAD_MAX: Final = 16_384  # bytes of status line and headers read at most


@dataclass(frozen=True, slots=True)
class Answer:
    status: int | None  # None: no HTTP answer
    latency_ms: int
    error: str | None = None
    response: str | None = None  # at most PREFIX_MAX bytes of the body, decoded leniently


class Client:
    def __init__(self, allow: policy.AllowList, *, connect_s: float, response_s: float) -> None:
        self.allow, self.connect_s, self.response_s = allow, connect_s, response_s
        self._tls = ssl.create_default_context()

    async def resolve(self, target: policy.Target) -> list[str]:
        """The checked addresses of the target's host (policy.Refused if any is not allowed)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM), self.connect_s
            )
        except (OSError, TimeoutError) as exc:
            raise policy.Refused(f"{target.host} does not resolve ({exc})") from None
        return policy.check(target.host, dict.fromkeys(str(info[4][0]) for info in infos), self.allow)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        started = time.monotonic()

        def answer(status: int | None, error: str | None = None, response: str | None = None) -> Answer:
            return Answer(status, int((time.monotonic() - started) * 1000), error, response)

        try:
            target = policy.parse_url(url)
            address = (await self.resolve(target))[0]
        except policy.Refused as exc:
            return answer(None, f"refused: {exc}")
        writer: asyncio.StreamWriter | None = None
        try:
            tls = self._tls if target.scheme == "https" else None
            reader, stream = await asyncio.wait_for(
                asyncio.open_connection(address, target.port, ssl=tls, server_hostname=target.host if tls else None),
                self.connect_s,
            )
            writer = stream
            head = [
                f"POST {target.path} HTTP/1.1",
                f"Host: {target.host_header}",
                "User-Agent: tracker-webhooks/1",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                "Connection: close",
                *(f"{k}: {v}" for k, v in headers.items()),
            ]
            stream.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            async with asyncio.timeout(self.response_s):
                await stream.drain()
                status, prefix = await _read_answer(reader)
            return answer(status, None if 200 <= status < 300 else f"HTTP {status}", prefix)
        except TimeoutError:
            return answer(None, "timed out")
        except (OSError, ssl.SSLError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            return answer(None, f"{type(exc).__name__}: {exc}"[:200])
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, str]:
    """The status and up to PREFIX_MAX bytes of the body (what arrives until the end of the body,
    the connection's end, or PREFIX_MAX)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await reader.read(HEAD_MAX - len(head))
        if not chunk:
            break
        head += chunk
        if len(head) >= HEAD_MAX:
            break
    first, _, rest = head.partition(b"\r\n")
    parts = first.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise ValueError("not an HTTP/1.x response")
    fields, _, body = rest.partition(b"\r\n\r\n")
    want = PREFIX_MAX
    for line in fields.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            want = min(want, int(value.strip()))
    if len(body) < want:
        with contextlib.suppress(TimeoutError):  # a body slower than this is not worth waiting for
            async with asyncio.timeout(0.2):
                while len(body) < want and (more := await reader.read(want - len(body))):
                    body += more
    return int(parts[1]), body[:PREFIX_MAX].decode("utf-8", "replace")
