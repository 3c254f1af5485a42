"""aiohttp_wsbus.testing: docs/testing.md's sample application passes its own suite with
only the plugin's fixtures (and a broken one fails readably), and each tool of the kit
does what it says against a real server."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

import aiohttp_wsbus
from aiohttp_wsbus.testing import (
    ClientFactory,
    IdentityProvider,
    broker_outage,
    capture,
    shared_key,
)

from .support import WAIT, BusServer, start_bus

ROOT = Path(__file__).parent.parent
API_KEY = "test-key-for-the-kit-0123456789"


def blocks_of_testing_page(language: str) -> list[str]:
    text = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def sample_application(pytester: pytest.Pytester, *, break_it: bool = False) -> None:
    """docs/testing.md's app.py, test_app.py and pytest.ini, written as an application's own."""
    (ini,) = blocks_of_testing_page("ini")
    app, tests = blocks_of_testing_page("python")
    if break_it:  # publishes to the wrong channel
        assert 'f"orders:{order}"' in app
        app = app.replace('f"orders:{order}"', 'f"order:{order}"')
    pytester.makefile(".ini", pytest=ini)
    pytester.makepyfile(app=app, test_app=tests)


def test_sample_application_suite_passes_with_only_the_plugin(pytester: pytest.Pytester) -> None:
    sample_application(pytester)
    # -p as well as the installed entry point: the plugin is registered once.
    result = pytester.runpytest_subprocess("-p", "aiohttp_wsbus.testing", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_broken_sample_application_fails_saying_what_was_published(
    pytester: pytest.Pytester,
) -> None:
    sample_application(pytester, break_it=True)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    (expected_failure,) = [
        block for block in blocks_of_testing_page("text") if block.startswith("AssertionError")
    ]
    result.stdout.fnmatch_lines([f"E  *{line.strip()}" for line in expected_failure.splitlines()])


# -- each tool of the kit, against a real server --------------------------------


async def serving(
    aiohttp_client: AiohttpClient, idp: IdentityProvider, **settings: Any
) -> BusServer:
    return await start_bus(
        aiohttp_client,
        idp.jwks_url,
        issuer=idp.issuer,
        audience=idp.audience,
        api_keys=[API_KEY],
        **settings,
    )


async def test_capture_records_in_process_and_emitted_publishes_in_order(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider
) -> None:
    server = await serving(aiohttp_client, wsbus_idp)
    with capture(server.bus) as published:
        await server.bus.publish("chat:lobby", {"text": "in process"})
        emitted = await server.client.post(
            "/ws/emit",
            json={"channel": "chat:lobby", "data": "over http"},
            headers={"X-API-Key": API_KEY},
        )
        assert emitted.status == 202
    await server.bus.publish("chat:lobby", "after the capture")
    assert published.on("chat:lobby") == [{"text": "in process"}, "over http"]
    assert published.assert_published("chat:lobby", "over http").offset == 2
    published.assert_published("chat:lobby")
    published.assert_nothing_published("chat:other")
    assert server.bus.broker is not None and type(server.bus.broker) is aiohttp_wsbus.MemoryBroker


async def test_capture_failures_say_what_was_published(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider
) -> None:
    server = await serving(aiohttp_client, wsbus_idp)
    with capture(server.bus) as published:
        with pytest.raises(AssertionError, match="nothing was published at all"):
            published.assert_published("chat:lobby")
        await server.bus.publish("chat:lobby", {"text": "hi"})
    with pytest.raises(AssertionError) as wrong:
        published.assert_published("chat:lobby", {"text": "bye"})
    assert str(wrong.value) == (
        "expected {'text': 'bye'} on 'chat:lobby'; published:\n  chat:lobby: {'text': 'hi'}"
    )
    with pytest.raises(
        AssertionError, match=r"expected nothing on 'chat:lobby', but it got \[\{'text': 'hi'\}\]"
    ):
        published.assert_nothing_published("chat:lobby")


async def test_capture_waits_for_a_publish_made_in_the_background(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider
) -> None:
    server = await serving(aiohttp_client, wsbus_idp)
    with capture(server.bus) as published:
        later = asyncio.create_task(server.bus.publish("jobs:1", "done"))
        assert (await published.wait_published("jobs:1", "done", timeout=WAIT)).offset == 1
        await later


async def test_broker_outage_refuses_publish_and_sockets_until_it_ends(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await serving(aiohttp_client, wsbus_idp)
    outage = broker_outage(server.bus, seconds=0.5)
    with pytest.raises(aiohttp_wsbus.BrokerUnavailable):
        await server.bus.publish("chat:lobby", "lost")
    health = await server.client.get("/ws/health")
    assert health.status == 503
    # The client is refused (1013) and backs off until the broker is back.
    client = await wsbus_client(server.client, "alice", min_reconnect_delay=0.05, timeout=WAIT * 2)
    assert outage.ended.is_set()
    assert client.attempt == 0
    assert type(server.bus.broker) is aiohttp_wsbus.MemoryBroker, "the real broker is back"
    await server.bus.publish("chat:lobby", "delivered")


async def test_broker_outage_denies_subscriptions_unavailable_and_the_client_asks_again(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await serving(aiohttp_client, wsbus_idp)
    client = await wsbus_client(server.client, "alice", min_reconnect_delay=0.05)
    denied: list[tuple[str, str]] = []
    was_denied = asyncio.Event()

    def on_denied(channel: str, reason: str) -> None:
        denied.append((channel, reason))
        was_denied.set()

    client.on("denied", on_denied)
    with broker_outage(server.bus) as outage:
        entering = asyncio.create_task(client.subscribe("chat:lobby").__aenter__())
        async with asyncio.timeout(WAIT):
            await was_denied.wait()
    assert outage.ended.is_set()
    async with asyncio.timeout(WAIT):
        lobby = await entering
    await server.bus.publish("chat:lobby", "back")
    assert (await lobby.receive(WAIT)).data == "back"
    assert denied == [("chat:lobby", "unavailable")]
    await lobby.__aexit__(None, None, None)


async def test_wsbus_client_names_the_servers_reason_when_it_cannot_connect(
    aiohttp_client: AiohttpClient, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    server = await serving(aiohttp_client, wsbus_idp)
    with pytest.raises(
        AssertionError,
        match=r"could not connect to ws://.*: connection closed by server: 4401 token expired",
    ):
        await wsbus_client(server.client, "alice", ttl=-3600)


def test_identity_provider_settings_need_it_started() -> None:
    idp = IdentityProvider(key=shared_key())
    with pytest.raises(RuntimeError, match=r"await idp.start\(\)"):
        _ = idp.settings


async def test_issued_tokens_carry_the_claims_asked_for(wsbus_idp: IdentityProvider) -> None:
    token = wsbus_idp.issue("alice", channels=["a"], publish="b c", ttl=60, role="admin", iat=None)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["channels"] == ["a"] and claims["publish"] == "b c"
    assert claims["role"] == "admin" and "iat" not in claims
    assert 59 < claims["exp"] - time.time() <= 60
    async with aiohttp.ClientSession() as session, session.get(wsbus_idp.jwks_url) as response:
        (key,) = (await response.json())["keys"]
    assert key["kid"] == wsbus_idp.key_id
    await wsbus_idp.jwks.wait_for_requests(1)


# Run first in a fresh interpreter: as if only the runtime install were there.
WITHOUT_PYTEST = """
import sys

class NoPytest:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("pytest", "pytest_asyncio", "pytest_aiohttp", "_pytest"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoPytest())
import aiohttp_wsbus.testing as kit
assert kit.capture and kit.broker_outage and kit.IdentityProvider and kit.ClientFactory
assert not hasattr(kit, "wsbus_idp"), "fixtures without pytest"
print("ok")
"""


def test_the_kit_imports_without_pytest_and_leaves_the_fixtures_out() -> None:
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", WITHOUT_PYTEST], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


async def test_wsbus_client_takes_an_aiohttp_server_and_reads_the_bus_path_from_its_app(
    aiohttp_server: AiohttpServer, wsbus_idp: IdentityProvider, wsbus_client: ClientFactory
) -> None:
    app = web.Application()
    bus = aiohttp_wsbus.setup(app, base_path="/bus", **wsbus_idp.settings)
    server = await aiohttp_server(app)
    client = await wsbus_client(server, "carol", channels=["team:*"])
    assert client.url.endswith("/bus") and client.user == "carol"
    async with client.subscribe("team:red") as team:
        await bus.publish("team:red", "go")
        assert (await team.receive(WAIT)).data == "go"
