"""The custody report for auditors (GET /v1/packages/{id}/report): the chain, verify's result and the
latest checkpoint, signed Ed25519; verified here exactly as docs/PROTOCOL.md tells an auditor to;
and the printable page the dashboard's package view links to, in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import asyncpg
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from harness.browser import ARTIFACTS, PageWatch, launch, require_browser
from harness.clients import Phone, acked, now_ms, scan
from harness.http import DEST, consign, http, pkg_path
from harness.instances import Instance
from harness.tokens import token


def _disp(org: str) -> str:
    return token("dispatcher", "u", org)


def verify(body: dict[str, Any], public_key_b64: str) -> bool:
    """The auditor's check, as documented: Ed25519 over the report's canonical JSON."""
    signed = json.dumps(body["report"], sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
    try:
        key.verify(base64.b64decode(body["signature"]["value"]), signed)
    except InvalidSignature:
        return False
    return True


async def _journey(inst: Instance, org: str, package: str = "PKG-1") -> None:
    await consign(inst, org, package, "st-marys")
    phone = await Phone.connect(inst.url, token("driver", "d-1", org))
    t = now_ms() - 60_000
    await phone.send(scan(1, package, "pickup", ts=t, temp_c=5.0))
    await phone.send(scan(2, package, "pickup", ts=t + 1000))  # a scan anomaly: dispatchers only
    await phone.send(scan(3, package, "deliver", ts=t + 2000, lat=DEST["lat"], lon=DEST["lon"], recipient="Ward 3"))
    await acked(phone, 1, 2, 3)


async def _report(inst: Instance, org: str, tok: str, package: str = "PKG-1", **until: Any) -> dict[str, Any]:
    """The report once the chain holds 3 records (and whatever `until` asks of it)."""
    for _ in range(200):
        status, body = await http(inst, "GET", pkg_path(package, "/report"), tok)
        assert status == 200, body
        r = body["report"]
        if r["verify"]["length"] == 3 and all(r.get(k) is not None for k in until):
            return body  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError(body)


async def test_signed_report_verifies_and_tampering_shows(start_instance: Any, org: str) -> None:
    inst = await start_instance(custody_checkpoint_s=0.2)
    await _journey(inst, org)
    status, key = await http(inst, "GET", "/v1/custody/report-key", _disp(org))
    assert status == 200 and key["alg"] == "Ed25519"
    body = await _report(inst, org, _disp(org), checkpoint=True)
    r, sig = body["report"], body["signature"]
    assert (sig["alg"], sig["key_id"], sig["public_key"]) == ("Ed25519", key["key_id"], key["public_key"])
    assert verify(body, key["public_key"])
    assert r["kind"] == "tracker.custody-report" and r["org"] == org and r["package"]["state"] == "delivered"
    assert [c["event"] for c in r["custody"]] == ["pickup", "pickup", "deliver"]
    assert r["verify"] == {"package": "PKG-1", "ok": True, "length": 3, "problems": [], "recovered": 0, "unchained": 0}
    assert r["checkpoint"]["length"] == 3 and r["checkpoint"]["head"] == r["head"]["head"]
    assert {a["kind"] for a in r["alerts"]} == {"scan_anomaly"}
    # Any change to the report breaks the signature.
    for change in (("verify", "ok", False), ("package", "client", "westside")):
        forged = json.loads(json.dumps(body))
        forged["report"][change[0]][change[1]] = change[2]
        assert not verify(forged, key["public_key"])
    forged = json.loads(json.dumps(body))
    forged["report"]["custody"][0]["temp_c"] = 4.0
    assert not verify(forged, key["public_key"])
    # Another instance (the same custody key) signs with the same key.
    other = await start_instance()
    assert (await http(other, "GET", "/v1/custody/report-key", _disp(org)))[1] == key


async def test_report_of_a_tampered_chain_says_so(instance: Instance, org: str, db: asyncpg.Connection) -> None:
    await _journey(instance, org)
    await _report(instance, org, _disp(org))
    await db.execute("UPDATE scans SET temp_c = 4.0 WHERE org = $1 AND driver_id = 'd-1' AND seq = 1", org)
    body = (await http(instance, "GET", pkg_path("PKG-1", "/report"), _disp(org)))[1]
    key = (await http(instance, "GET", "/v1/custody/report-key", _disp(org)))[1]
    assert verify(body, key["public_key"])  # signed as it is: the service does not hide a broken chain
    assert body["report"]["verify"]["ok"] is False and body["report"]["verify"]["problems"][0]["index"] == 1


async def test_report_scope(instance: Instance, org: str) -> None:
    await _journey(instance, org)
    client = token("client", "c", org, client="st-marys")
    body = await _report(instance, org, client)
    assert body["report"]["alerts"] == []  # the scan anomaly is for dispatchers
    assert body["report"]["generated_for"] == {"sub": "c", "role": "client"}
    other = token("client", "c", org, client="westside")
    assert (await http(instance, "GET", pkg_path("PKG-1", "/report"), other))[0] == 404
    assert (await http(instance, "GET", pkg_path("PKG-1", "/report"), token("driver", "d-1", org)))[0] == 403
    assert (await http(instance, "GET", pkg_path("PKG-1", "/report"), _disp(org + "-b")))[0] == 404
    assert (await http(instance, "GET", pkg_path("NOPE", "/report"), _disp(org)))[0] == 404
    assert (await http(instance, "GET", "/v1/custody/report-key", None))[0] == 401
    assert (await http(instance, "GET", "/v1/custody/report-key", token("driver", "d-1", org)))[0] == 403


@pytest.mark.browser
async def test_printable_report_opens_from_the_package_view(instance: Instance, org: str) -> None:
    async_playwright = require_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    await _journey(instance, org, "PKG/7")  # an id with a slash: percent-encoded all the way
    await _report(instance, org, _disp(org), "PKG/7")
    async with async_playwright() as pw:
        browser = await launch(pw)
        try:
            ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
            dash = PageWatch(await ctx.new_page(), "dashboard", t0)
            await dash.goto(f"{instance.http}/#token={_disp(org)}")
            await dash.page.evaluate("() => window.trackerDebug.openPackage('PKG/7')")
            link = dash.page.get_by_test_id("package-report")
            await link.wait_for(state="visible", timeout=15_000)
            async with ctx.expect_page() as opened:
                await link.click()
            page = PageWatch(await opened.value, "report", t0)
            await page.page.wait_for_selector("[data-loaded=true]", timeout=15_000)
            assert "token" not in page.page.url  # wiped from the address bar
            verdict = page.page.get_by_test_id("report-verdict")
            assert await verdict.get_attribute("data-ok") == "true"
            assert await verdict.inner_text() == "Chain of custody intact"
            rows = page.page.locator("[data-testid=report-record]")
            assert [await r.get_attribute("data-event") for r in await rows.all()] == ["pickup", "pickup", "deliver"]
            assert "Ward 3" in await page.page.get_by_test_id("report-custody").inner_text()
            sig = await page.page.get_by_test_id("report-signature").inner_text()
            key = (await http(instance, "GET", "/v1/custody/report-key", _disp(org)))[1]
            assert key["key_id"] in sig and key["public_key"] in sig
            pdf = await page.page.pdf(format="A4")  # what "Print" produces
            (ARTIFACTS / "custody-report.pdf").write_bytes(pdf)
            assert pdf[:5] == b"%PDF-" and len(pdf) > 5_000
            await page.page.reload()  # the token stays in the tab: a reload renders again
            await page.page.wait_for_selector("[data-loaded=true]", timeout=15_000)
            page.assert_clean()
            dash.assert_clean()
        finally:
            await browser.close()
