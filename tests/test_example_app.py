"""The example chat in headless Chromium: alice (staff), bob and carol, each in a context."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, Page, WebSocket, expect

import aiohttp_wsbus

from .browser import ARTIFACTS
from .example_server import ExampleServer, login, open_socket, post, running_example
from .support import WAIT, eventually, next_frame

pytestmark = pytest.mark.browser

WAIT_MS = 5000
RECONNECT_WAIT_MS = 20000  # jittered backoff after a restart: a few seconds at most
# README's picture of the example; WSBUS_UPDATE_SCREENSHOT=1 writes it anew.
README_SCREENSHOT = Path(__file__).parent.parent / "docs" / "example-app.png"


@dataclass
class Person:
    """One signed-in browser context, and every bus message its sockets received."""

    name: str
    page: Page
    frames: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)  # frames the page sent
    sockets: list[WebSocket] = field(default_factory=list)
    responses: list[tuple[int, str]] = field(default_factory=list)  # (status, URL), in order

    def record(self, socket: WebSocket) -> None:
        self.sockets.append(socket)
        socket.on("framereceived", lambda payload: self.frames.append(json.loads(payload)))
        socket.on("framesent", lambda payload: self.sent.append(json.loads(payload)))

    @property
    def received(self) -> list[dict[str, Any]]:
        """The stored messages' frames (no typing indicators), from every socket the page opened."""
        return [f for f in self.frames if f["type"] == "message" and not f.get("ephemeral")]

    @property
    def published(self) -> list[dict[str, Any]]:
        """The messages the page published on its sockets (not typing indicators)."""
        return [f for f in self.sent if f["type"] == "publish" and not f.get("ephemeral")]

    def texts_on(self, channel: str) -> list[str]:
        return [str(f["data"].get("text")) for f in self.received if f["channel"] == channel]

    def channels_received(self) -> set[str]:
        return {frame["channel"] for frame in self.received}

    def view(self, name: str) -> Any:
        return self.page.locator(f'ol.messages[data-view="{name}"]')

    def room_status(self, channel: str) -> Any:
        return self.page.locator(f'.nav-item[data-channel="{channel}"] .status')

    @property
    def online(self) -> Any:
        """The names in the open room's "online" list."""
        return self.page.locator("#online .online-name")

    @property
    def badge(self) -> Any:
        return self.page.locator("#badge")

    @property
    def send_button(self) -> Any:
        return self.page.locator("#composer-send")

    @property
    def signed_out(self) -> Any:
        return self.page.locator("#signed-out")

    async def client_state(self) -> str | None:
        """The page's WsBus state, as the client names it."""
        return await self.page.locator("body").get_attribute("data-bus")

    async def open_view(self, name: str) -> None:
        await self.page.locator(f'.nav-item[data-view="{name}"]').click()

    async def create_room(self, name: str) -> None:
        await self.page.locator("#room-name").fill(name)
        await self.page.locator("#room-create").click()

    async def join_room(self, name: str) -> None:
        await self.page.locator("#room-name").fill(name)
        await self.page.locator("#room-join").click()

    async def invite(self, user: str) -> None:
        await self.page.locator("#invite-user").fill(user)
        await self.page.locator("#invite-user").press("Enter")
        await expect(self.page.locator("#invite-user")).to_have_value("", timeout=WAIT_MS)

    def logins(self) -> int:
        """How many tokens the page asked for."""
        return sum(1 for _, url in self.responses if url.endswith("/login"))

    async def say(self, text: str, *, to: str | None = None) -> None:
        if to is not None:
            await self.page.locator("#composer-to").fill(to)
        await self.page.locator("#composer-text").fill(text)
        await self.page.locator("#composer-text").press("Enter")
        await expect(self.page.locator("#composer-text")).to_have_value("", timeout=WAIT_MS)


@pytest.fixture
async def example() -> AsyncIterator[ExampleServer]:
    async with running_example() as server:
        yield server


async def sign_in(
    browser: Browser, example: ExampleServer, name: str, *, width: int = 1200, height: int = 760
) -> Person:
    """A new browser context, signed in as `name` and connected."""
    context = await browser.new_context(viewport={"width": width, "height": height})
    return await sign_in_window(context, example, name)


async def sign_in_window(context: BrowserContext, example: ExampleServer, name: str) -> Person:
    """Another window of `context`, signed in as `name` and connected."""
    page = await context.new_page()
    person = Person(name, page)
    page.on("websocket", person.record)
    page.on("response", lambda response: person.responses.append((response.status, response.url)))
    await page.goto(example.url + "/")
    await sign_in_again(person)
    await expect(person.badge).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    await expect(person.room_status("chat:lobby")).to_have_text("joined", timeout=WAIT_MS)
    return person


async def sign_in_again(person: Person) -> None:
    """Submit the sign-in form of `person`'s page with their name."""
    await person.page.locator("#signin-name").fill(person.name)
    await person.page.locator("#signin-button").click()


@pytest.fixture
async def people(browser: Browser, example: ExampleServer) -> tuple[Person, Person]:
    """alice (staff) and bob, each in a browser context of their own."""
    return await sign_in(browser, example, "alice"), await sign_in(browser, example, "bob")


async def test_alice_and_bob_see_each_others_lobby_messages(
    people: tuple[Person, Person],
) -> None:
    alice, bob = people
    await alice.say("Morning, bob!")
    await expect(bob.view("chat:lobby")).to_contain_text("Morning, bob!", timeout=WAIT_MS)
    await bob.say("Hi alice, shipping today?")
    await expect(alice.view("chat:lobby")).to_contain_text("Hi alice, shipping", timeout=WAIT_MS)
    await expect(alice.view("chat:lobby").locator(".message.mine")).to_contain_text("Morning")
    ARTIFACTS.mkdir(exist_ok=True)
    await alice.page.screenshot(path=ARTIFACTS / "example-app-alice.png")
    await bob.page.screenshot(path=ARTIFACTS / "example-app-bob.png")


async def test_a_page_loads_the_last_messages_then_follows_live_and_shows_who_is_typing(
    browser: Browser, example: ExampleServer
) -> None:
    alice = await sign_in(browser, example, "alice")
    for n in range(3):
        await alice.say(f"earlier {n}")
    bob = await sign_in(browser, example, "bob")
    # Loaded over HTTP before the page subscribed: no socket of bob's carried them.
    for n in range(3):
        await expect(bob.view("chat:lobby")).to_contain_text(f"earlier {n}", timeout=WAIT_MS)
    assert bob.texts_on("chat:lobby") == []
    await expect(bob.view("chat:lobby").locator(".message")).to_have_count(3)
    await alice.page.locator("#composer-text").fill("half a thou")
    await expect(bob.page.locator("#typing")).to_have_text("alice is typing…", timeout=WAIT_MS)
    await alice.page.locator("#composer-text").press("Enter")
    await expect(bob.view("chat:lobby")).to_contain_text("half a thou", timeout=WAIT_MS)
    await expect(bob.page.locator("#typing")).to_be_empty()
    assert bob.texts_on("chat:lobby") == ["half a thou"]
    typing = [f for f in bob.frames if f["type"] == "message" and f.get("ephemeral")]
    assert typing
    assert all(f["data"] == {"from": "alice", "room": "chat:lobby", "typing": True} for f in typing)
    assert all("offset" not in f for f in typing)


async def test_bob_is_shown_the_staff_room_as_denied_and_never_gets_its_messages(
    people: tuple[Person, Person],
) -> None:
    alice, bob = people
    await expect(alice.room_status("chat:staff")).to_have_text("joined", timeout=WAIT_MS)
    await expect(bob.room_status("chat:staff")).to_have_text("denied", timeout=WAIT_MS)
    await bob.open_view("chat:staff")
    await expect(bob.page.locator("#denied-panel")).to_be_visible()
    await expect(bob.page.locator("#denied-reason")).to_have_text("forbidden")
    await expect(bob.page.locator("#composer")).to_be_hidden()

    await alice.open_view("chat:staff")
    await alice.say("Staff only: the bonus list")
    await alice.page.locator("#notify").click()  # a back end emits to chat:staff too
    await expect(alice.view("chat:staff")).to_contain_text("bonus list", timeout=WAIT_MS)
    await expect(alice.view("chat:staff").locator(".notice")).to_have_count(1, timeout=WAIT_MS)
    # Published after the staff messages: once bob has it, he would have had those.
    await alice.open_view("chat:lobby")
    await alice.say("after the staff messages")
    await expect(bob.view("chat:lobby")).to_contain_text("after the staff", timeout=WAIT_MS)
    assert bob.channels_received() == {"chat:lobby"}
    assert "chat:staff" in alice.channels_received()
    await expect(bob.page.locator("body")).not_to_contain_text("bonus list")


async def test_a_direct_message_to_alice_reaches_only_alice(
    people: tuple[Person, Person],
) -> None:
    alice, bob = people
    await bob.open_view("direct")
    await bob.say("Just between us", to="alice")
    await expect(alice.page.locator('.nav-item[data-view="direct"] .unread')).to_have_text(
        "1", timeout=WAIT_MS
    )
    await expect(alice.view("direct")).to_contain_text("Just between us")
    await expect(alice.view("direct")).to_contain_text("to you")
    # Bob's page shows his own copy, but no socket of his carried it.
    await expect(bob.view("direct").locator(".message.mine")).to_contain_text("to alice")
    await alice.say("lobby marker after the direct message")
    await expect(bob.view("chat:lobby")).to_contain_text("lobby marker", timeout=WAIT_MS)
    assert alice.texts_on("user:alice") == ["Just between us"]
    assert all(frame["data"]["text"] != "Just between us" for frame in bob.received)


async def test_after_a_server_restart_the_page_reconnects_and_messages_flow_again(
    example: ExampleServer, people: tuple[Person, Person]
) -> None:
    alice, bob = people
    await alice.say("before the restart")
    await expect(bob.view("chat:lobby")).to_contain_text("before the restart", timeout=WAIT_MS)

    await example.stop()
    for person in (alice, bob):
        await expect(person.badge).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
        await expect(person.badge).to_have_text("Reconnecting")
    await example.start()  # same port, a new identity provider: new signing keys
    for person in (alice, bob):
        await expect(person.badge).to_have_attribute(
            "data-state", "connected", timeout=RECONNECT_WAIT_MS
        )
        await expect(person.badge).to_have_text("Connected")

    await bob.say("after the restart")
    await expect(alice.view("chat:lobby")).to_contain_text("after the restart", timeout=WAIT_MS)
    # The new server has no history from before: the page says so instead of hiding it.
    await expect(alice.view("chat:lobby").locator(".note")).to_contain_text("could not be replayed")
    await expect(bob.room_status("chat:staff")).to_have_text("denied")
    ARTIFACTS.mkdir(exist_ok=True)
    await alice.page.screenshot(path=ARTIFACTS / "example-app-after-restart.png")


async def test_the_page_renews_its_short_lived_token_on_the_live_socket(browser: Browser) -> None:
    async with running_example(token_lifetime=4) as example:
        bob = await sign_in(browser, example, "bob")
        issued = await bob.page.locator("#token-issued").text_content()
        await eventually(lambda: any(f["type"] == "refreshed" for f in bob.frames), timeout=10)
        assert len(bob.sockets) == 1  # renewed in place, not by reconnecting
        refreshed = next(f for f in bob.frames if f["type"] == "refreshed")
        assert refreshed["revoked"] == []
        await expect(bob.page.locator("#token-issued")).not_to_have_text(issued or "")
        await bob.say("still here after the renewal")
        await expect(bob.view("chat:lobby")).to_contain_text("still here", timeout=WAIT_MS)


# -- who is online ----------------------------------------------------------------


async def test_each_room_lists_who_is_online_and_a_closed_window_drops_off_the_list(
    browser: Browser, example: ExampleServer
) -> None:
    alice = await sign_in(browser, example, "alice")
    await expect(alice.online).to_have_text(["alice (you)"], timeout=WAIT_MS)
    bob_context = await browser.new_context(viewport={"width": 1200, "height": 760})
    bob = await sign_in_window(bob_context, example, "bob")
    await expect(alice.online).to_have_text(["alice (you)", "bob"], timeout=WAIT_MS)
    await expect(bob.online).to_have_text(["alice", "bob (you)"], timeout=WAIT_MS)
    await expect(alice.page.locator("#online-count")).to_have_text("2")
    await alice.open_view("chat:staff")  # bob may not join it: not there
    await expect(alice.online).to_have_text(["alice (you)"], timeout=WAIT_MS)
    await bob.open_view("direct")  # no channel anyone else joins: no list
    await expect(bob.page.locator("#online-bar")).to_be_hidden()

    # A private room lists its members who have joined it, as they join.
    await alice.create_room("plans")
    await expect(alice.online).to_have_text(["alice (you)"], timeout=WAIT_MS)
    await alice.invite("bob")
    await bob.open_view("room:plans")
    await bob.page.locator("#join-room").click()
    await expect(bob.online).to_have_text(["alice", "bob (you)"], timeout=WAIT_MS)
    await expect(alice.online).to_have_text(["alice (you)", "bob"], timeout=WAIT_MS)

    await bob_context.close()  # his only window: he leaves every room
    await expect(alice.online).to_have_text(["alice (you)"], timeout=WAIT_MS)
    await alice.open_view("chat:lobby")
    await expect(alice.online).to_have_text(["alice (you)"], timeout=WAIT_MS)
    await expect(alice.page.locator("#online-count")).to_have_text("1")


# -- private rooms ----------------------------------------------------------------


async def test_a_private_room_admits_whom_alice_invites_and_the_bus_denies_carol(
    browser: Browser, example: ExampleServer
) -> None:
    alice = await sign_in(browser, example, "alice")
    bob = await sign_in(browser, example, "bob", height=800)  # README's screenshot
    carol = await sign_in(browser, example, "carol")
    await alice.create_room("plans")
    await expect(alice.room_status("room:plans")).to_have_text("joined", timeout=WAIT_MS)
    await expect(alice.page.locator("#view-title")).to_have_text("# plans")
    await expect(alice.page.locator("#room-members")).to_have_text("alice")

    # carol is no member: the bus asks the app's authorizer, which says no.
    await carol.join_room("plans")
    await expect(carol.room_status("room:plans")).to_have_text("denied", timeout=WAIT_MS)
    await expect(carol.page.locator("#denied-panel")).to_be_visible()
    await expect(carol.page.locator("#denied-reason")).to_have_text("forbidden")
    await expect(carol.page.locator("#denied-explanation")).to_contain_text("not a member")
    await expect(carol.page.locator("#composer")).to_be_hidden()

    await alice.invite("bob")
    await expect(alice.page.locator("#room-members")).to_have_text("alice, bob")
    await expect(alice.view("room:plans").locator(".event")).to_contain_text(
        "alice invited bob", timeout=WAIT_MS
    )
    # bob hears of it on his own channel, and joins with the socket and token he has.
    await expect(bob.room_status("room:plans")).to_have_text("invited", timeout=WAIT_MS)
    await bob.open_view("room:plans")
    await expect(bob.page.locator("#invited-panel")).to_contain_text("alice invited you")
    await bob.page.locator("#join-room").click()
    await expect(bob.room_status("room:plans")).to_have_text("joined", timeout=WAIT_MS)
    await expect(bob.page.locator("#room-members")).to_have_text("alice, bob", timeout=WAIT_MS)
    assert (len(bob.sockets), bob.logins()) == (1, 1)

    await bob.say("Thanks for the invite, alice")
    await expect(alice.view("room:plans")).to_contain_text("Thanks for the invite", timeout=WAIT_MS)
    await alice.say("Welcome to plans, bob")
    await expect(bob.view("room:plans")).to_contain_text("Welcome to plans", timeout=WAIT_MS)
    await expect(bob.view("room:plans").locator(".message.mine")).to_contain_text("Thanks")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
        # carol again, over a raw socket: denied by the bus, whatever a page would show.
        token = (await login(http, example, "carol"))["token"]
        socket, welcome = await open_socket(http, example, token, ["chat:lobby", "room:plans"])
        assert (welcome["subscribed"], welcome["denied"]) == (
            ["chat:lobby"],
            {"room:plans": "forbidden"},
        )
        await alice.say("One more for the room")
        await expect(bob.view("room:plans")).to_contain_text("One more", timeout=WAIT_MS)
        # Published after the room's messages: once carol has it, she would have had those.
        await alice.open_view("chat:lobby")
        await alice.say("lobby marker after the private room")
        while (frame := await next_frame(socket))["type"] != "message" or (
            frame["data"].get("text") != "lobby marker after the private room"
        ):
            assert frame.get("channel") != "room:plans", frame
        await socket.close()
    await expect(carol.view("chat:lobby")).to_contain_text("lobby marker", timeout=WAIT_MS)
    assert "room:plans" not in carol.channels_received()
    assert "room:plans" in bob.channels_received()
    await expect(carol.page.locator("body")).not_to_contain_text("Welcome to plans")

    ARTIFACTS.mkdir(exist_ok=True)
    await bob.page.screenshot(path=ARTIFACTS / "example-app-rooms.png")
    if os.environ.get("WSBUS_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(ARTIFACTS / "example-app-rooms.png", README_SCREENSHOT)


async def test_a_renewed_token_keeps_the_private_room_the_authorizer_allowed(
    browser: Browser,
) -> None:
    async with running_example(token_lifetime=4) as example:
        bob = await sign_in(browser, example, "bob")
        await bob.create_room("mine")
        await expect(bob.room_status("room:mine")).to_have_text("joined", timeout=WAIT_MS)

        def since_join() -> list[dict[str, Any]]:
            """bob's frames from the one that subscribed him to room:mine on."""
            for at, frame in enumerate(bob.frames):
                if frame["type"] == "subscribed" and "room:mine" in frame["subscribed"]:
                    return bob.frames[at:]
            return []

        await eventually(lambda: bool(since_join()))
        # A refresh after the join: the bus asks the authorizer again, which still says yes.
        await eventually(lambda: any(f["type"] == "refreshed" for f in since_join()), timeout=10)
        refreshed = next(f for f in since_join() if f["type"] == "refreshed")
        assert refreshed["revoked"] == []
        assert len(bob.sockets) == 1
        await bob.say("still in my room after the renewal")
        await expect(bob.view("room:mine")).to_contain_text("still in my room", timeout=WAIT_MS)
        await expect(bob.room_status("room:mine")).to_have_text("joined")


# -- sessions the app ends --------------------------------------------------------

SIGNED_OUT_WITHIN = 1.0  # seconds from the app's answer to every window showing it


async def expect_signed_out_within(windows: list[Person], since: float, reason: str) -> None:
    """Each window shows "signed out" within SIGNED_OUT_WITHIN s of `since` (monotonic),
    with `reason`, and its client has stopped."""
    for window in windows:
        left_ms = (since + SIGNED_OUT_WITHIN - time.monotonic()) * 1000
        # Playwright reads a timeout of 0 as none at all: a spent budget still fails.
        await expect(window.signed_out).to_be_visible(timeout=max(left_ms, 1))
    for window in windows:
        await expect(window.page.locator("#signed-out-reason")).to_have_text(reason)
        assert await window.client_state() == "closed"
        await expect(window.page.locator("#chat")).to_be_hidden()


async def test_a_staff_ban_signs_bob_out_in_every_window_and_refuses_his_sign_in(
    browser: Browser, example: ExampleServer
) -> None:
    alice = await sign_in(browser, example, "alice")
    bob = await sign_in(browser, example, "bob")
    bob_again = await sign_in_window(bob.page.context, example, "bob")
    await expect(bob.page.locator("#moderation")).to_be_hidden()  # staff only

    await alice.page.locator("#ban-user").fill("bob")
    async with alice.page.expect_response(lambda r: r.url.endswith("/admin/bans")) as answer:
        await alice.page.locator("#ban-button").click()
    assert (await answer.value).status == 202
    await expect_signed_out_within([bob, bob_again], time.monotonic(), "banned by alice")
    await expect(alice.page.locator("#ban-status")).to_contain_text("bob is banned until")

    await alice.say("carrying on without bob")
    await expect(alice.view("chat:lobby")).to_contain_text("carrying on", timeout=WAIT_MS)
    await bob.page.locator("#signed-out-again").click()
    await sign_in_again(bob)
    await expect(bob.page.locator("#signin-error")).to_contain_text(
        "bob is banned until", timeout=WAIT_MS
    )
    # Neither window came back: one socket each, ever, and no token asked for since.
    assert [len(window.sockets) for window in (bob, bob_again)] == [1, 1]
    assert (bob.logins(), bob_again.logins()) == (2, 1)  # bob's second: the refused sign-in
    assert await alice.client_state() == "connected"
    ARTIFACTS.mkdir(exist_ok=True)
    await bob_again.page.screenshot(path=ARTIFACTS / "example-app-banned.png")


async def test_a_window_offline_during_the_ban_signs_out_when_it_is_back(
    browser: Browser, example: ExampleServer
) -> None:
    bob = await sign_in(browser, example, "bob")
    await bob.page.context.set_offline(True)  # the page drops its socket on `offline`
    await expect(bob.badge).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
    assert example.app is not None
    bus = aiohttp_wsbus.get_bus(example.app)
    await eventually(lambda: not bus.connections)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
        alice = await login(http, example, "alice")
        status, _ = await post(http, example.url + "/admin/bans", {"user": "bob"}, alice["token"])
        assert status == 202
    await bob.page.context.set_offline(False)  # `online`: the client reconnects, asks a token
    await expect(bob.signed_out).to_be_visible(timeout=WAIT_MS)
    await expect(bob.page.locator("#signed-out-reason")).to_contain_text("bob is banned until")
    assert await bob.client_state() == "closed"
    assert len(bob.sockets) == 1
    assert not bus.connections


async def test_sign_out_everywhere_in_one_window_signs_out_the_other_and_bob_may_come_back(
    browser: Browser, example: ExampleServer
) -> None:
    bob = await sign_in(browser, example, "bob")
    bob_again = await sign_in_window(bob.page.context, example, "bob")
    alice = await sign_in(browser, example, "alice")

    async with bob.page.expect_response(lambda r: r.url.endswith("/sign-out-everywhere")) as answer:
        await bob.page.locator("#signout-everywhere").click()
    assert (await answer.value).status == 202
    await expect_signed_out_within([bob_again, bob], time.monotonic(), "signed out everywhere")
    assert await alice.client_state() == "connected"

    # Not a ban: bob signs in again at once, with a fresh token the bus accepts.
    await bob_again.page.locator("#signed-out-again").click()
    await sign_in_again(bob_again)
    await expect(bob_again.badge).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    await bob_again.say("back after signing out everywhere")
    await expect(alice.view("chat:lobby")).to_contain_text("back after signing", timeout=WAIT_MS)
    assert [len(window.sockets) for window in (bob, bob_again)] == [1, 2]


# -- what the page asks the server ------------------------------------------------


async def test_signing_in_and_chatting_meets_no_404_or_other_error(
    browser: Browser, example: ExampleServer
) -> None:
    bob = await sign_in(browser, example, "bob")
    await bob.say("everything loaded")
    await expect(bob.view("chat:lobby")).to_contain_text("everything loaded", timeout=WAIT_MS)
    await bob.page.close()  # the socket's line is logged when it closes
    # Its request line carries nothing but the path: the token travels in the connect frame.
    await eventually(lambda: any("GET /ws HTTP" in line for line in example.access_log))
    # Chromium asks for an icon on its own: the page names one that exists.
    await eventually(lambda: any("favicon" in line for line in example.access_log))
    answered = [line.rsplit(" ", 1) for line in example.access_log]
    assert {status for _, status in answered} <= {"101", "200", "202"}, example.access_log
    assert [(status, url) for status, url in bob.responses if status >= 400] == []


# -- not connected ---------------------------------------------------------------


async def test_send_is_disabled_while_disconnected_and_a_failed_send_is_cleared_on_reconnect(
    example: ExampleServer, browser: Browser
) -> None:
    bob = await sign_in(browser, example, "bob")
    await expect(bob.send_button).to_be_enabled()
    await bob.open_view("direct")
    await bob.page.locator("#composer-to").fill("no body")
    await bob.page.locator("#composer-text").fill("this one fails")
    await bob.page.locator("#composer-text").press("Enter")
    error = bob.page.locator("#composer-error")
    await expect(error).to_contain_text("user names are", timeout=WAIT_MS)  # as the app says

    await example.stop()
    await expect(bob.badge).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
    await expect(bob.send_button).to_be_disabled()
    await bob.page.locator("#composer-to").fill("alice")
    await bob.page.locator("#composer-text").press("Enter")  # no send while disconnected
    await example.start()
    await expect(bob.badge).to_have_attribute("data-state", "connected", timeout=RECONNECT_WAIT_MS)
    await expect(bob.send_button).to_be_enabled()
    await expect(error).to_be_empty()
    assert bob.published == []  # neither the bad name nor Enter while disconnected sent anything
    await bob.say("this one arrives", to="alice")
    await expect(bob.view("direct").locator(".message.mine")).to_contain_text("this one arrives")
    assert [frame["channel"] for frame in bob.published] == ["user:alice"]


# -- a narrow window --------------------------------------------------------------

# Every control a person uses: each must be fully on screen at 400 px.
CONTROLS = "button:visible, input:visible"
NARROW = 400


async def assert_fits(page: Page, what: str) -> None:
    """No sideways scrolling, and every visible control inside the viewport."""
    overflow = await page.evaluate(
        """() => {
            const root = document.scrollingElement;
            return [root.scrollWidth, root.clientWidth];
        }"""
    )
    assert overflow[0] <= overflow[1], f"{what}: the page scrolls sideways ({overflow})"
    viewport = page.viewport_size
    assert viewport is not None
    for control in await page.locator(CONTROLS).all():
        box = await control.bounding_box()
        assert box is not None
        name = await control.evaluate("(e) => e.id || e.textContent.trim() || e.outerHTML")
        assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], (what, name, box)
        assert box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"], (what, name, box)


async def test_at_400_px_wide_nothing_scrolls_sideways_and_every_control_is_reachable(
    browser: Browser, example: ExampleServer
) -> None:
    context = await browser.new_context(viewport={"width": NARROW, "height": 760})
    page = await context.new_page()
    await page.goto(example.url + "/")
    await assert_fits(page, "sign-in")
    await context.close()

    alice = await sign_in(browser, example, "alice", width=NARROW)
    bob = await sign_in(browser, example, "bob", width=NARROW)
    await assert_fits(bob.page, "lobby")
    await alice.say("A long line that a narrow window has to wrap: " + "wrap " * 40)
    await alice.page.locator("#notify").click()
    await expect(bob.view("chat:lobby").locator(".notice")).to_have_count(1, timeout=WAIT_MS)
    await expect(bob.view("chat:lobby")).to_contain_text("narrow window", timeout=WAIT_MS)
    await assert_fits(bob.page, "lobby with messages")

    await bob.open_view("chat:staff")
    await expect(bob.page.locator("#denied-panel")).to_be_visible()
    await assert_fits(bob.page, "denied room")
    await bob.open_view("direct")
    await expect(bob.page.locator("#composer-to")).to_be_visible()
    await assert_fits(bob.page, "direct messages")
    await bob.say("Reached you from 400 px", to="alice")
    await expect(alice.view("direct")).to_contain_text("Reached you from 400 px", timeout=WAIT_MS)

    await alice.create_room("narrow")
    await expect(alice.page.locator("#room-bar")).to_be_visible(timeout=WAIT_MS)
    await alice.invite("bob")
    await assert_fits(alice.page, "private room")
    await bob.open_view("room:narrow")
    await expect(bob.page.locator("#invited-panel")).to_be_visible(timeout=WAIT_MS)
    await assert_fits(bob.page, "invited")
    await bob.page.locator("#join-room").click()
    await expect(bob.room_status("room:narrow")).to_have_text("joined", timeout=WAIT_MS)
    await bob.join_room("nowhere")
    await expect(bob.room_status("room:nowhere")).to_have_text("denied", timeout=WAIT_MS)
    await assert_fits(bob.page, "a private room denied")
    ARTIFACTS.mkdir(exist_ok=True)
    await bob.page.screenshot(path=ARTIFACTS / "example-app-400px.png")

    await bob.page.locator("#signout-everywhere").click()
    await expect(bob.signed_out).to_be_visible(timeout=WAIT_MS)
    await assert_fits(bob.page, "signed out")
