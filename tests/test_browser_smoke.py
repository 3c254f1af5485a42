"""The served JS client loads in a real browser as an ES module."""

from __future__ import annotations

from playwright.async_api import Browser
from pytest_aiohttp import AiohttpClient

from .conftest import JwksServer
from .support import start_bus


async def test_served_module_imports_in_chromium(
    browser: Browser, aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(aiohttp_client, jwks_server.url)
    page = await browser.new_page()
    await page.goto(str(server.client.make_url("/ws/wsbus.js")))
    exported = await page.evaluate(
        "async (url) => Object.keys(await import(url)).sort()",
        str(server.client.make_url("/ws/wsbus.js")),
    )
    assert "WsBus" in exported
