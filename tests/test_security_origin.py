"""Cross-site websocket hijacking: /v1/live refuses browser pages from other origins (Origin checked
against the host and TRACKER_ALLOWED_ORIGINS; clients without Origin, like phones, pass).

/v1/driver does not check Origin, by decision (SECURITY.md): nothing there is ambient, so there is
nothing to hijack. Its only credential is the token a client sends itself (cookies and HTTP auth
are never read), and hybrid driver apps send Origins of their own (`capacitor://localhost`, `null`)."""

from __future__ import annotations

from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from harness.clients import Peer
from harness.instances import Instance
from harness.tokens import token


async def live_hello(inst: Instance, org: str, origin: str | None) -> dict[str, Any]:
    headers = {"Origin": origin} if origin is not None else {}
    peer = Peer(await connect(inst.url + "/v1/live", additional_headers=headers))
    await peer.send({"type": "hello", "token": token("dispatcher", "u-1", org)})
    return await peer.recv()


FOREIGN = [
    "https://evil.example",
    "null",  # sandboxed iframes, file: pages
    "http://127.0.0.1.evil.example",
    "http://127.0.0.1:{port}.evil.example",
    "http://evil.example:{port}",
    "https://dispatch.example.evil.example",
    "https://dispatch.example:8443",
    "http://dispatch.example",
    "",
]


async def test_cross_site_origins_are_refused_on_live(start_instance: Any) -> None:
    inst = await start_instance(allowed_origins=("https://dispatch.example",))
    for origin in FOREIGN:
        with pytest.raises(InvalidStatus) as refused:
            await connect(inst.url + "/v1/live", additional_headers={"Origin": origin.format(port=inst.port)})
        assert refused.value.response.status_code == 403, origin  # at the handshake: no socket, no hello


async def test_same_origin_allow_listed_and_originless_clients_are_accepted(start_instance: Any, org: str) -> None:
    inst = await start_instance(allowed_origins=("https://dispatch.example",))
    for origin in (f"http://127.0.0.1:{inst.port}", "https://dispatch.example", None):
        welcome = await live_hello(inst, org, origin)
        assert welcome["type"] == "welcome", origin


async def test_without_an_allow_list_only_same_origin_pages_and_originless_clients_pass(
    instance: Instance, org: str
) -> None:
    assert (await live_hello(instance, org, f"http://127.0.0.1:{instance.port}"))["type"] == "welcome"
    assert (await live_hello(instance, org, None))["type"] == "welcome"
    with pytest.raises(InvalidStatus):
        await connect(instance.url + "/v1/live", additional_headers={"Origin": "https://dispatch.example"})


async def test_driver_endpoint_has_no_ambient_credential_to_hijack(instance: Instance, org: str) -> None:
    """A foreign page reaches /v1/driver (by decision), but the browser's ambient credentials are
    worth nothing there: cookies and Basic auth are not read, so without a token of its own it is
    refused (4000); with one, it only ever acts as that driver."""
    foreign = {
        "Origin": "https://evil.example",
        "Cookie": "session=" + token("driver", "d-1", org),
        "Authorization": "Basic ZC0xOnNlY3JldA==",
    }
    peer = Peer(await connect(instance.url + "/v1/driver", additional_headers=foreign))
    await peer.send({"type": "hello", "device": "x"})
    assert (await peer.recv())["code"] == "unauthorized"
    assert await peer.closed() == 4000
    app = Peer(await connect(instance.url + "/v1/driver", additional_headers={"Origin": "capacitor://localhost"}))
    await app.send({"type": "hello", "token": token("driver", "d-2", org)})
    assert (await app.recv())["driver"] == "d-2"
