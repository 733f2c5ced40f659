"""HTTP: security headers on the dashboard page, JSON errors everywhere (404, 405, 401/403, 400, 413,
500) without stack traces or internals, malformed bodies on POST /v1/packages."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harness.clients import Peer
from harness.http import Response, request
from harness.instances import Instance
from harness.tokens import token


def assert_json_error(resp: Response, status: int, code: str | None = None) -> dict[str, Any]:
    got, headers, body = resp
    assert got == status, (got, body[:300])
    assert headers["content-type"].startswith("application/json"), headers
    assert b"Traceback" not in body and b'File "' not in body and b"tracker/" not in body
    obj = orjson.loads(body)
    assert set(obj) == {"error"} and set(obj["error"]) == {"code", "message"}, obj
    assert isinstance(obj["error"]["message"], str)
    if code is not None:
        assert obj["error"]["code"] == code, obj
    return obj  # type: ignore[no-any-return]


def csp(headers: dict[str, str]) -> dict[str, list[str]]:
    directives = [d.strip().split() for d in headers["content-security-policy"].split(";") if d.strip()]
    return {d[0]: d[1:] for d in directives}


class _Inline(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {k for k, _ in attrs}
        self.problems += [f"<{tag} {k}=...> (inline handler)" for k in names if k.startswith("on")]
        if "style" in names:
            self.problems.append(f"<{tag} style=...> (inline style)")
        if tag == "style":
            self.problems.append("<style> (inline style sheet)")
        if tag == "script":
            if "src" not in names:
                self.problems.append("<script> without src (inline script)")
            self._in_script = True

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.problems.append("<script> with a body (inline script)")


async def test_dashboard_page_security_headers_and_no_inline_code(start_instance: Any) -> None:
    inst = await start_instance(map_tiles="https://tiles.example.org/{z}/{x}/{y}.png")
    status, headers, body = await request(inst, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    policy = csp(headers)
    assert policy["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval', no other host
    assert policy["style-src"] == ["'self'"]
    assert policy["default-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"] and policy["base-uri"] == ["'none'"]
    assert policy["img-src"] == ["'self'", "data:", "https://tiles.example.org"]  # the tile origin, no path
    assert policy["connect-src"] == ["'self'"]  # the page's own origin (ws/wss included), no other host
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    parser = _Inline()
    parser.feed(body.decode())
    assert parser.problems == []  # the CSP would block them: the page must not need any
    for target in ("/static/js/main.js", "/healthz", "/nope"):  # on every response, not only the page
        _, headers, _ = await request(inst, "GET", target)
        assert csp(headers)["frame-ancestors"] == ["'none'"] and headers["referrer-policy"] == "no-referrer"


ERRORS = [  # method, target, who, status, code
    ("GET", "/nope", None, 404, "not_found"),
    ("GET", "/v1/nope", "dispatcher", 404, "not_found"),
    ("GET", "/static/../tracker/auth.py", None, 404, "not_found"),
    ("GET", "/static/%2e%2e/auth.py", None, 404, "not_found"),
    ("GET", "/static/%2e%2e%2f%2e%2e%2fpyproject.toml", None, 404, "not_found"),
    ("DELETE", "/v1/packages", "dispatcher", 405, "method_not_allowed"),
    ("PUT", "/v1/drivers", "dispatcher", 405, "method_not_allowed"),
    ("POST", "/healthz", None, 405, "method_not_allowed"),
    ("GET", "/v1/drivers", None, 401, "unauthorized"),
    ("GET", "/v1/drivers", "garbage", 401, "unauthorized"),
    ("GET", "/v1/packages", "driver", 403, "forbidden"),
    ("POST", "/v1/packages", "client", 403, "forbidden"),
    ("GET", "/v1/drivers/d-1/trail?from=abc", "dispatcher", 400, "invalid"),
    ("GET", "/v1/packages?state=lost", "dispatcher", 400, "invalid"),
    ("GET", "/v1/packages?limit=1e3", "dispatcher", 400, "invalid"),
    # Values PostgreSQL cannot take were answered 503 "storage unavailable" (clients retried); now 400.
    ("GET", "/v1/drivers/d-1/trail?from=99999999999999999999&to=99999999999999999999", "dispatcher", 400, None),
    ("GET", "/v1/drivers/d-1/trail?from=99999999999999999990&to=99999999999999999999", "dispatcher", 400, "invalid"),
    ("GET", "/v1/drivers/%00/trail", "dispatcher", 400, "invalid"),
    ("GET", "/v1/packages/%00", "dispatcher", 400, "invalid"),
    ("GET", "/v1/packages/%00/verify", "client", 400, "invalid"),
    ("GET", "/v1/packages?after=%00", "dispatcher", 400, "invalid"),
    ("GET", "/v1/packages?driver=a%00b", "dispatcher", 400, "invalid"),
]


async def test_errors_are_json_without_internals(instance: Instance, org: str) -> None:
    for method, target, who, status, code in ERRORS:
        tok = None
        if who == "garbage":
            tok = "not.a.token"
        elif who is not None:
            tok = token(who, "u-1", org, client="c-1" if who == "client" else None)
        resp = await request(instance, method, target, tok, body=b"{}" if method in ("POST", "PUT") else b"")
        try:
            assert_json_error(resp, status, code)
            assert status != 405 or "allow" in resp[1]
        except AssertionError as exc:
            raise AssertionError(f"{method} {target} as {who}: {exc}") from None


async def test_an_internal_error_is_a_json_500_with_no_details(
    instance: Instance, org: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracker import store
    from tracker.protocol import viewer

    async def boom(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("password=hunter2 in /srv/tracker/secret.py")

    def boom_sync(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("password=hunter2 in /srv/tracker/secret.py")

    monkeypatch.setattr(store, "driver_names", boom)
    resp = await request(instance, "GET", "/v1/drivers", token("dispatcher", "u-1", org))
    assert_json_error(resp, 500, "internal")
    assert b"hunter2" not in resp[2] and b"RuntimeError" not in resp[2]
    # On a websocket, the same failure is a bare 1011: no reason that names the internals.
    monkeypatch.setattr(viewer, "parse_subscribe", boom_sync)
    dash = Peer(await connect(instance.url + "/v1/live"))
    await dash.send({"type": "hello", "token": token("dispatcher", "u-1", org)})
    assert (await dash.recv())["type"] == "welcome"
    await dash.send({"type": "subscribe"})
    with pytest.raises(ConnectionClosed) as closed:
        await dash.recv()
    assert closed.value.rcvd is not None  # a close frame, not a dropped connection (1006)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1011, "internal error")
    # The instance is fine afterwards.
    assert (await request(instance, "GET", "/healthz"))[0] == 200


BAD_BODIES = [
    b"",
    b"{",
    b"{not json",
    b"[]",
    b"null",
    b'"a string"',
    b"\xff\xfe{}",
    b'{"id": "P\\ud800"}',
    b"[" * 5000 + b"]" * 5000,
    b'{"id": 1, "client": "c", "destination": {"lat": 0, "lon": 0}}',
    b'{"id": "P\\u0000", "client": "c", "destination": {"lat": 0, "lon": 0}}',
    b'{"id": "P", "client": "c\\u0000", "destination": {"lat": 0, "lon": 0}}',
    b'{"id": "P", "client": "c", "destination": {"lat": NaN, "lon": 0}}',
    b'{"id": "P", "client": "c", "destination": {"lat": 1e999, "lon": 0}}',
    b'{"id": "P", "client": "c", "destination": {"lat": true, "lon": 0}}',
    b'{"id": "P", "client": "c", "destination": [0, 0]}',
    b'{"id": "P", "client": "c", "destination": {"lat": 0, "lon": 0}, "window": {"from": 9223372036854775808}}',
    b'{"id": "P", "client": "c", "destination": {"lat": 0, "lon": 0}, "window": {"to": 18446744073709551616}}',
    b'{"id": "P", "client": "c", "destination": {"lat": 0, "lon": 0}, "window": {"from": 1.5}}',
    b'{"id": "P", "client": "c", "destination": {"lat": 0, "lon": 0}, "cold_chain": {"min_c": "2"}}',
    b'{"id": "P", "client": "c", "destination": {"lat": 0, "lon": 0}, "notes": "a\\u0000b"}',
    b'{"id": "P", "client": "c", "destination": {"lat": 0, "lon": 0, "name": ["x"]}}',
]


async def test_malformed_consignments_are_400_and_store_nothing(instance: Instance, org: str) -> None:
    tok = token("dispatcher", "u-1", org)
    for body in BAD_BODIES:
        try:
            assert_json_error(await request(instance, "POST", "/v1/packages", tok, body), 400, "invalid")
        except AssertionError as exc:
            raise AssertionError(f"{body[:120]!r}: {exc}") from None
    status, _, listed = await request(instance, "GET", "/v1/packages", tok)
    assert status == 200 and orjson.loads(listed)["packages"] == []


async def test_oversized_consignment_is_413(instance: Instance, org: str) -> None:
    body = orjson.dumps({"id": "P", "client": "c", "destination": {"lat": 0, "lon": 0}, "notes": "x" * 20_000})
    resp = await request(instance, "POST", "/v1/packages", token("dispatcher", "u-1", org), body)
    assert_json_error(resp, 413, "too_large")


def test_error_codes_of_the_http_api_are_documented() -> None:
    """Every code our HTTP errors use is one a client can look up (PROTOCOL.md's table + HTTP's own)."""
    from pathlib import Path

    from tracker.app import HTTP_CODES

    source = "".join(p.read_text() for p in Path("tracker").glob("*.py"))
    used = set(re.findall(r'ApiError\(\d+, "([a-z_]+)"', source)) | set(HTTP_CODES.values())
    known = {
        "invalid",
        "forbidden",
        "conflict",
        "unavailable",
        "too_large",
        "unauthorized",
        "not_found",
        "method_not_allowed",
        "internal",
    }
    assert used <= known, used - known


def test_dashboard_script_never_turns_data_into_html_or_code() -> None:
    """Driver-supplied text (scan notes, recipients, package ids, names) reaches the dashboard: it must
    be rendered as text. With the CSP above, no sink parses strings as HTML or code. Every script
    module under tracker/static is scanned (the page is split into ES modules; only a vendor/ folder
    of third-party code would be left out)."""
    from pathlib import Path

    static = Path(__file__).resolve().parent.parent / "tracker" / "static"
    scripts = {
        p.relative_to(static).as_posix(): p
        for p in static.rglob("*")
        if p.suffix in (".js", ".mjs") and "vendor" not in p.relative_to(static).parts
    }
    # The scan must not pass by finding nothing: the page's own module scripts are among those scanned.
    entries = re.findall(r'<script[^>]*\bsrc="/static/([^"]+)"', (static / "index.html").read_text())
    assert entries and set(entries) <= set(scripts), (entries, sorted(scripts))
    sinks = (
        r"\.innerHTML\b|\.outerHTML\b|insertAdjacentHTML|document\.write|\beval\(|new Function\(|setTimeout\(\s*['\"`]"
        r"|setInterval\(\s*['\"`]|createContextualFragment|parseFromString|\.srcdoc\b"
    )
    found = {name: hits for name, path in sorted(scripts.items()) if (hits := re.findall(sinks, path.read_text()))}
    assert found == {}
