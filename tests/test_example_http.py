"""The example app over plain HTTP: the demo identity provider, /send, private rooms,
ending sessions (sign out everywhere, bans), /api/notify, the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from jwt.algorithms import RSAAlgorithm

import aiohttp_wsbus
from example_app.__main__ import parse_arguments
from example_app.app import BANS_KEY, PRIVATE_ROOMS_KEY
from example_app.bans import MAX_BAN_MINUTES, MAX_BANS, BanLimit, Bans
from example_app.rooms import MAX_MEMBERS, MAX_ROOMS

from .example_server import (
    ExampleServer,
    free_port,
    login,
    next_frame_skipping_presence,
    nothing_more_but_presence,
    open_socket,
    post,
    running_example,
)
from .support import WAIT, SwitchableBroker, close_frame, eventually, next_frame

ROOT = Path(__file__).parent.parent


@pytest.fixture
async def example() -> AsyncIterator[ExampleServer]:
    async with running_example() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


# -- the identity provider ---------------------------------------------------


async def test_login_token_is_rs256_signed_by_the_served_jwks(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    answer = await login(http, example, "bob")
    async with http.get(example.url + "/.well-known/jwks.json") as response:
        (jwk,) = (await response.json())["keys"]
    assert jwt.get_unverified_header(answer["token"])["kid"] == jwk["kid"]
    claims = jwt.decode(
        answer["token"],
        RSAAlgorithm.from_jwk(jwk),  # type: ignore[arg-type]
        algorithms=["RS256"],
        audience="wsbus",
        issuer=example.url + "/",
    )
    assert claims["sub"] == "bob"
    assert claims["exp"] == int(claims["iat"]) + 120
    assert claims["exp"] == answer["expires_at"]
    assert claims["channels"] == answer["channels"] == ["chat:lobby", "user:bob"]
    assert claims["publish"] == ["chat:lobby", "user:*"]  # stamped by the app's hooks
    assert claims["roles"] == []
    assert claims["presence"] == ["chat:*", "room:*"]  # every room's "online" list
    assert claims["info"] == {"name": "bob"}


async def test_staff_tokens_also_grant_the_staff_room(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    answer = await login(http, example, "alice")
    assert answer["is_staff"] is True
    assert answer["channels"] == ["chat:lobby", "user:alice", "chat:staff"]
    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert claims["publish"] == ["chat:lobby", "chat:staff", "user:*"]
    assert jwt.decode(answer["token"], options={"verify_signature": False})["roles"] == ["staff"]
    assert [room["channel"] for room in answer["rooms"]] == ["chat:lobby", "chat:staff"]


@pytest.mark.parametrize(
    "body",
    [
        {"user": ""},
        {"user": "Alice"},
        {"user": "a" * 33},
        {"user": "bob smith"},
        {"user": "user:bob"},
        {"user": "chat:*"},
        {"user": 7},
        {},
    ],
)
async def test_login_refuses_names_that_cannot_be_channel_names(
    example: ExampleServer, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    status, answer = await post(http, example.url + "/login", body)
    assert status == 400
    assert answer["error"] == "invalid_request"
    assert list(answer["fields"]) == ["user"]


async def test_login_wants_a_json_body(example: ExampleServer, http: aiohttp.ClientSession) -> None:
    async with http.post(example.url + "/login", data="user=bob") as response:
        assert response.status == 415
        assert await response.json() == {
            "error": "unsupported_media_type",
            "expected": "application/json",
        }
    async with http.post(
        example.url + "/login", data="{", headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
        assert (await response.json())["fields"] == {"_body": ["body is not valid JSON"]}


async def test_bus_gets_the_apps_own_keys_soon_after_it_listens(
    example: ExampleServer,
) -> None:
    assert example.app is not None
    verifier = aiohttp_wsbus.get_bus(example.app).verifier
    # The first fetch ran before the app listened; the startup retry finds it.
    await eventually(lambda: verifier.key_status == "fresh")


# -- /send -------------------------------------------------------------------


@pytest.mark.parametrize(("room", "recipient"), [("chat:lobby", None), ("user:alice", "alice")])
async def test_send_publishes_the_verified_sender_to_the_room_or_user(
    example: ExampleServer, http: aiohttp.ClientSession, room: str, recipient: str | None
) -> None:
    alice = await login(http, example, "alice")
    bob = await login(http, example, "bob")
    socket, welcome = await open_socket(http, example, alice["token"], [room])
    assert welcome["subscribed"] == [room]
    status, answer = await post(
        http, example.url + "/send", {"room": room, "text": "hi"}, bob["token"]
    )
    assert status == 202
    assert answer["published"] == {"channel": room, "offset": 1}
    frame = await next_frame_skipping_presence(socket)
    assert frame["channel"] == room
    assert frame["data"] == answer["message"]
    assert (frame["data"]["from"], frame["data"]["text"]) == ("bob", "hi")
    assert frame["data"].get("to") == recipient


async def publish(
    socket: aiohttp.ClientWebSocketResponse, ref: int, channel: str, data: Any, **extra: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A publish frame's answer, and the frames that came before it."""
    frame = {"type": "publish", "ref": ref, "channel": channel, "data": data, **extra}
    await socket.send_json(frame)
    before: list[dict[str, Any]] = []
    while (frame := await next_frame(socket)).get("ref") != ref:
        before.append(frame)
    return frame, before


@pytest.mark.parametrize(("room", "recipient"), [("chat:lobby", None), ("user:alice", "alice")])
async def test_a_page_publishes_on_its_socket_stamped_with_its_verified_sender(
    example: ExampleServer, http: aiohttp.ClientSession, room: str, recipient: str | None
) -> None:
    alice = await login(http, example, "alice")
    bob = await login(http, example, "bob")
    alice_socket, _ = await open_socket(http, example, alice["token"], [room])
    bob_socket, _ = await open_socket(http, example, bob["token"], [])
    answer, _ = await publish(bob_socket, 1, room, {"text": "hi"}, id="page-1")
    assert (answer["type"], answer["offset"]) == ("published", 1)
    frame = await next_frame_skipping_presence(alice_socket)
    assert frame["data"] | {"sent_at": 0} == {
        "from": "bob",
        "text": "hi",
        "room": room,
        "sent_at": 0,
    } | ({"to": recipient} if recipient else {})
    spoofed, _ = await publish(bob_socket, 2, room, {"text": "hi", "from": "alice"})
    assert spoofed["error"] == "invalid"
    blank, _ = await publish(bob_socket, 3, room, {"text": "  "})
    assert (blank["error"], blank["reason"]) == ("invalid", "text must not be blank")
    staff, _ = await publish(bob_socket, 4, "chat:staff", {"text": "let me in"})
    assert staff["error"] == "forbidden"
    # The same grant over HTTP (Bearer emit) is stamped the same way.
    async with http.post(
        example.url + "/ws/emit",
        json={"channel": room, "data": {"text": "by emit"}},
        headers={"Authorization": f"Bearer {bob['token']}"},
    ) as response:
        assert response.status == 202
    assert (await next_frame_skipping_presence(alice_socket))["data"]["from"] == "bob"


async def test_typing_is_ephemeral_and_a_page_loads_the_last_messages_over_http(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    bob = await login(http, example, "bob")
    alice_socket, _ = await open_socket(http, example, alice["token"], ["chat:lobby"])
    bob_socket, _ = await open_socket(http, example, bob["token"], [])
    for n in range(52):
        await publish(bob_socket, n, "chat:lobby", {"text": f"message {n}"})
    typing, _ = await publish(bob_socket, 99, "chat:lobby", {"typing": True}, ephemeral=True)
    assert typing == {"type": "published", "ref": 99}
    frames = [await next_frame_skipping_presence(alice_socket) for _ in range(53)]
    assert frames[-1] == {
        "type": "message",
        "channel": "chat:lobby",
        "ephemeral": True,
        "data": {"from": "bob", "room": "chat:lobby", "typing": True},
    }
    async with http.get(
        example.url + "/ws/channels/chat:lobby/history?limit=50",
        headers={"Authorization": f"Bearer {bob['token']}"},
    ) as response:
        page = await response.json()
    assert [m["data"]["text"] for m in page["messages"]] == [f"message {n}" for n in range(2, 52)]
    assert page["position"] == {"offset": 52, "epoch": frames[0]["epoch"]}
    async with http.get(
        example.url + "/ws/channels/chat:staff/history",
        headers={"Authorization": f"Bearer {bob['token']}"},
    ) as response:
        assert response.status == 403


async def test_a_private_room_takes_publishes_from_its_members_only(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    carol = await login(http, example, "carol")
    await create_room(http, example, alice["token"], "secret")
    alice_socket, _ = await open_socket(http, example, alice["token"], ["room:secret"])
    carol_socket, _ = await open_socket(http, example, carol["token"], [])
    refused, _ = await publish(carol_socket, 1, "room:secret", {"text": "knock knock"})
    assert refused["error"] == "forbidden"
    said, _ = await publish(alice_socket, 2, "room:secret", {"text": "only us"})
    assert said["type"] == "published"


async def test_send_to_a_room_the_token_does_not_grant_is_forbidden(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    bob = await login(http, example, "bob")
    status, answer = await post(
        http, example.url + "/send", {"room": "chat:staff", "text": "let me in"}, bob["token"]
    )
    assert (status, answer) == (403, {"error": "forbidden", "room": "chat:staff"})


async def test_send_without_a_valid_token_is_unauthorized(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    body = {"room": "chat:lobby", "text": "hi"}
    async with running_example() as other_server:
        foreign = await login(http, other_server, "bob")  # signed by another key
    for token in (None, "not-a-jwt", foreign["token"]):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with http.post(example.url + "/send", json=body, headers=headers) as response:
            assert response.status == 401, token
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert await response.json() == {"error": "unauthorized"}


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"text": "hi"}, ["room"]),
        ({"room": "chat:lobby"}, ["text"]),
        ({"room": "chat:nowhere", "text": "hi"}, ["room"]),
        ({"room": "user:Bob", "text": "hi"}, ["room"]),
        ({"room": "user:", "text": "hi"}, ["room"]),
        ({"room": "room:", "text": "hi"}, ["room"]),
        ({"room": "room:Plans", "text": "hi"}, ["room"]),
        ({"room": "chat:lobby", "text": "   "}, ["text"]),
        ({"room": "chat:lobby", "text": "x" * 2001}, ["text"]),
        ({"room": "chat:lobby", "text": 5}, ["text"]),
        ({"room": "chat:lobby", "text": "hi", "from": "carol"}, ["from"]),
        (["chat:lobby", "hi"], ["_schema"]),
    ],
)
async def test_send_refuses_bad_input_with_the_fields_named(
    example: ExampleServer, http: aiohttp.ClientSession, body: object, fields: list[str]
) -> None:
    bob = await login(http, example, "bob")
    status, answer = await post(http, example.url + "/send", body, bob["token"])
    assert status == 400
    assert answer["error"] == "invalid_request"
    assert sorted(answer["fields"]) == fields


# -- private rooms ---------------------------------------------------------------


async def rooms_of(http: aiohttp.ClientSession, example: ExampleServer, token: str) -> Any:
    async with http.get(
        example.url + "/rooms", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["rooms"]


async def create_room(
    http: aiohttp.ClientSession, example: ExampleServer, token: str, name: str
) -> dict[str, Any]:
    status, answer = await post(http, example.url + "/rooms", {"name": name}, token)
    assert status == 201, answer
    room: dict[str, Any] = answer["room"]
    return room


async def invite(
    http: aiohttp.ClientSession, example: ExampleServer, token: str, room: str, user: str
) -> tuple[int, dict[str, Any]]:
    return await post(http, f"{example.url}/rooms/{room}/invite", {"user": user}, token)


async def test_creating_a_room_makes_the_creator_its_first_member(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    bob = await login(http, example, "bob")
    room = await create_room(http, example, alice["token"], "plans")
    assert room == {
        "name": "plans",
        "channel": "room:plans",
        "created_by": "alice",
        "members": ["alice"],
    }
    assert await rooms_of(http, example, alice["token"]) == [room]
    assert await rooms_of(http, example, bob["token"]) == []
    # No token lists it: alice's socket gets it from the app's authorizer.
    assert "room:plans" not in alice["channels"]
    _, welcome = await open_socket(http, example, alice["token"], ["room:plans"])
    assert (welcome["subscribed"], welcome["denied"]) == (["room:plans"], {})


async def test_a_room_name_is_taken_once(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    bob = await login(http, example, "bob")
    await create_room(http, example, alice["token"], "plans")
    status, answer = await post(http, example.url + "/rooms", {"name": "plans"}, bob["token"])
    assert (status, answer) == (409, {"error": "room_exists", "room": "room:plans"})
    assert await rooms_of(http, example, bob["token"]) == []


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        *[("/rooms", {"name": name}, "name") for name in ["", "Plans", "a" * 33, "room:x", 5]],
        ("/rooms", {}, "name"),
        *[("/rooms/plans/invite", {"user": user}, "user") for user in ["Bob", "user:bob", 7]],
        ("/rooms/plans/invite", {}, "user"),
    ],
)
async def test_room_requests_refuse_names_that_cannot_be_in_a_channel_name(
    example: ExampleServer, http: aiohttp.ClientSession, path: str, body: object, field: str
) -> None:
    alice = await login(http, example, "alice")
    await create_room(http, example, alice["token"], "plans")
    status, answer = await post(http, example.url + path, body, alice["token"])
    assert status == 400
    assert list(answer["fields"]) == [field]


async def test_room_requests_need_a_valid_token(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    await create_room(http, example, alice["token"], "plans")
    for method, path, body in [
        ("GET", "/rooms", None),
        ("POST", "/rooms", {"name": "mine"}),
        ("POST", "/rooms/plans/invite", {"user": "carol"}),
    ]:
        async with http.request(
            method, example.url + path, json=body, headers={"Authorization": "Bearer nope"}
        ) as response:
            assert response.status == 401, path
    assert (await rooms_of(http, example, alice["token"]))[0]["members"] == ["alice"]


async def test_an_invited_user_joins_on_the_same_socket_and_token(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    bob = await login(http, example, "bob")
    await create_room(http, example, alice["token"], "plans")
    alice_socket, _ = await open_socket(http, example, alice["token"], ["room:plans"])
    bob_socket, welcome = await open_socket(http, example, bob["token"], ["user:bob", "room:plans"])
    assert (welcome["subscribed"], welcome["denied"]) == (["user:bob"], {"room:plans": "forbidden"})

    status, answer = await invite(http, example, alice["token"], "plans", "bob")
    assert status == 200
    assert (answer["added"], answer["room"]["members"]) == (True, ["alice", "bob"])
    told_room = await next_frame_skipping_presence(alice_socket)
    assert told_room["channel"] == "room:plans"
    assert told_room["data"] | {"sent_at": 0} == {
        "kind": "member",
        "from": "alice",
        "member": "bob",
        "members": ["alice", "bob"],
        "room": "room:plans",
        "text": "alice invited bob",
        "sent_at": 0,
    }
    told_bob = await next_frame_skipping_presence(bob_socket)
    assert told_bob["channel"] == "user:bob"
    assert told_bob["data"] | {"sent_at": 0} == {
        "kind": "invite",
        "from": "alice",
        "name": "plans",
        "room": "room:plans",
        "text": "alice invited you",
        "sent_at": 0,
    }
    assert await rooms_of(http, example, bob["token"]) == [answer["room"]]

    # The same socket, the same token: the authorizer now finds bob among the members.
    await bob_socket.send_json({"type": "subscribe", "channels": ["room:plans"]})
    subscribed = await next_frame_skipping_presence(bob_socket)
    assert (subscribed["type"], subscribed["subscribed"], subscribed["denied"]) == (
        "subscribed",
        ["room:plans"],
        {},
    )
    status, sent = await post(
        http, example.url + "/send", {"room": "room:plans", "text": "thanks!"}, bob["token"]
    )
    assert status == 202
    for socket in (alice_socket, bob_socket):
        frame = await next_frame_skipping_presence(socket)
        assert (frame["channel"], frame["data"]) == ("room:plans", sent["message"])


async def test_only_members_invite_and_strangers_cannot_tell_which_rooms_exist(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    carol = await login(http, example, "carol")
    await create_room(http, example, alice["token"], "plans")
    for room in ("plans", "nowhere"):
        status, answer = await invite(http, example, carol["token"], room, "carol")
        assert (status, answer) == (403, {"error": "forbidden", "room": f"room:{room}"})
    assert await rooms_of(http, example, carol["token"]) == []
    _, welcome = await open_socket(http, example, carol["token"], ["room:plans"])
    assert welcome["denied"] == {"room:plans": "forbidden"}
    async with http.post(
        example.url + "/rooms/No Such/invite",
        json={"user": "carol"},
        headers={"Authorization": f"Bearer {alice['token']}"},
    ) as response:
        assert response.status == 404  # not a room name at all


async def test_inviting_a_member_again_changes_nothing_and_tells_nobody(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    bob = await login(http, example, "bob")
    await create_room(http, example, alice["token"], "plans")
    alice_socket, _ = await open_socket(http, example, alice["token"], ["room:plans"])
    bob_socket, _ = await open_socket(http, example, bob["token"], ["user:bob"])
    await invite(http, example, alice["token"], "plans", "bob")
    await next_frame_skipping_presence(alice_socket)
    await next_frame_skipping_presence(bob_socket)
    for inviter in (alice, bob):
        status, answer = await invite(http, example, inviter["token"], "plans", "bob")
        assert (status, answer["added"], answer["room"]["members"]) == (
            200,
            False,
            ["alice", "bob"],
        )
    await nothing_more_but_presence(alice_socket)
    await nothing_more_but_presence(bob_socket)


async def test_send_to_a_private_room_is_for_its_members_only(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    bob = await login(http, example, "bob")
    carol = await login(http, example, "carol")
    await create_room(http, example, alice["token"], "plans")
    for room in ("room:plans", "room:nowhere"):
        status, answer = await post(
            http, example.url + "/send", {"room": room, "text": "let me in"}, carol["token"]
        )
        assert (status, answer) == (403, {"error": "forbidden", "room": room})
    await invite(http, example, alice["token"], "plans", "bob")  # offset 1: its notice
    status, answer = await post(
        http, example.url + "/send", {"room": "room:plans", "text": "hi"}, bob["token"]
    )
    assert status == 202
    # Offset 2: carol's refused sends published nothing.
    assert answer["published"] == {"channel": "room:plans", "offset": 2}


async def test_the_room_store_is_bounded(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    assert example.app is not None
    rooms = example.app[PRIVATE_ROOMS_KEY]
    for n in range(MAX_ROOMS):
        rooms.create(f"room{n}", "alice")
    status, answer = await post(http, example.url + "/rooms", {"name": "more"}, alice["token"])
    assert (status, answer["error"], answer["room"]) == (409, "room_limit", "room:more")
    for n in range(1, MAX_MEMBERS):
        rooms.invite("room0", "alice", f"user{n}")
    status, answer = await invite(http, example, alice["token"], "room0", "bob")
    assert (status, answer["error"], answer["room"]) == (409, "room_limit", "room:room0")
    assert len((await rooms_of(http, example, alice["token"]))[0]["members"]) == MAX_MEMBERS


# -- ending sessions: sign out everywhere, bans ------------------------------------


async def refused(
    http: aiohttp.ClientSession, example: ExampleServer, token: str
) -> tuple[int, str]:
    """The close code and reason a new bus socket with `token` is answered with."""
    socket = await http.ws_connect(example.url.replace("http", "ws") + "/ws")
    await socket.send_json({"type": "connect", "token": token, "channels": ["chat:lobby"]})
    return await close_frame(socket)


async def send_status(http: aiohttp.ClientSession, example: ExampleServer, token: str) -> int:
    """The status /send answers a lobby message posted with `token`."""
    status, _ = await post(http, example.url + "/send", {"room": "chat:lobby", "text": "hi"}, token)
    return status


async def test_sign_out_everywhere_closes_every_socket_of_the_user_and_refuses_old_tokens(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    first = await login(http, example, "bob")
    second = await login(http, example, "bob")  # another window or device
    alice = await login(http, example, "alice")
    window_one, _ = await open_socket(http, example, first["token"], ["chat:lobby"])
    window_two, _ = await open_socket(http, example, second["token"], ["chat:lobby"])
    bystander, _ = await open_socket(http, example, alice["token"], ["chat:lobby"])

    status, answer = await post(http, example.url + "/sign-out-everywhere", None, first["token"])
    assert status == 202
    assert answer["user"] == "bob"
    # Old tokens would have expired by then anyway: lifetime plus the bus's leeway.
    assert example.app is not None
    leeway = aiohttp_wsbus.get_bus(example.app).settings.leeway
    assert answer["refused_until"] - answer["issued_before"] == pytest.approx(120 + leeway)
    for socket in (window_one, window_two):
        assert await close_frame(socket) == (4410, "signed out everywhere")
    await nothing_more_but_presence(bystander)
    # Neither token comes back: not on the bus, not at the app's own endpoints.
    for old in (first, second):
        assert await refused(http, example, old["token"]) == (4401, "token revoked")
        assert await send_status(http, example, old["token"]) == 401


async def test_a_token_issued_right_after_sign_out_everywhere_works(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    # Within the same second as the sign-out, as a quick new sign-in is: `iat` keeps
    # the fraction of a second, so only the tokens from before are refused.
    before = await login(http, example, "bob")
    status, _ = await post(http, example.url + "/sign-out-everywhere", None, before["token"])
    assert status == 202
    after = await login(http, example, "bob")
    socket, welcome = await open_socket(http, example, after["token"], ["chat:lobby"])
    assert welcome["subscribed"] == ["chat:lobby"]
    assert await send_status(http, example, after["token"]) == 202
    assert (await next_frame_skipping_presence(socket))["data"]["from"] == "bob"
    assert await refused(http, example, before["token"]) == (4401, "token revoked")


async def test_a_ban_ends_the_users_sessions_refuses_their_tokens_and_their_login(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    bob = await login(http, example, "bob")
    carol = await login(http, example, "carol")
    bob_socket, _ = await open_socket(http, example, bob["token"], ["chat:lobby"])
    carol_socket, _ = await open_socket(http, example, carol["token"], ["chat:lobby"])

    started = time.time()
    status, answer = await post(
        http, example.url + "/admin/bans", {"user": "bob", "minutes": 5}, alice["token"]
    )
    assert status == 202
    assert answer["banned"] == "bob"
    assert started + 300 <= answer["until"] <= time.time() + 300
    assert await close_frame(bob_socket) == (4410, "banned by alice")
    await nothing_more_but_presence(carol_socket)
    assert await refused(http, example, bob["token"]) == (4401, "token revoked")
    assert await send_status(http, example, bob["token"]) == 401
    status, refusal = await post(http, example.url + "/login", {"user": "bob"})
    assert (status, refusal) == (403, {"error": "banned", "user": "bob", "until": answer["until"]})
    assert await send_status(http, example, carol["token"]) == 202


async def test_a_ban_lasts_an_hour_unless_staff_say_how_many_minutes(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    carol = await login(http, example, "carol")  # staff too
    started = time.time()
    status, answer = await post(http, example.url + "/admin/bans", {"user": "dave"}, carol["token"])
    assert status == 202
    assert started + 3600 <= answer["until"] <= time.time() + 3600
    assert example.app is not None
    assert example.app[BANS_KEY].banned_until("dave") == answer["until"]


async def test_only_staff_may_ban_and_a_refused_ban_changes_nothing(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    bob = await login(http, example, "bob")
    carol = await login(http, example, "carol")
    carol_socket, _ = await open_socket(http, example, carol["token"], ["chat:lobby"])
    status, answer = await post(http, example.url + "/admin/bans", {"user": "carol"}, bob["token"])
    assert (status, answer) == (403, {"error": "forbidden", "detail": "staff only"})
    # Checked before the body: a non-staff token learns nothing about the input.
    status, _ = await post(http, example.url + "/admin/bans", {"user": "Carol"}, bob["token"])
    assert status == 403
    await nothing_more_but_presence(carol_socket)
    await login(http, example, "carol")


async def test_ending_sessions_needs_a_valid_token(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    bob = await login(http, example, "bob")
    bob_socket, _ = await open_socket(http, example, bob["token"], ["chat:lobby"])
    for path, body in [("/sign-out-everywhere", None), ("/admin/bans", {"user": "bob"})]:
        for token in (None, "not-a-jwt"):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.post(example.url + path, json=body, headers=headers) as response:
                assert response.status == 401, (path, token)
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert await response.json() == {"error": "unauthorized"}
    await nothing_more_but_presence(bob_socket)


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, ["user"]),
        ({"user": "Bob"}, ["user"]),
        ({"user": "user:bob"}, ["user"]),
        ({"user": 7}, ["user"]),
        ({"user": "alice"}, ["user"]),  # herself
        ({"user": "bob", "minutes": 0}, ["minutes"]),
        ({"user": "bob", "minutes": MAX_BAN_MINUTES + 1}, ["minutes"]),
        ({"user": "bob", "minutes": 1.5}, ["minutes"]),
        ({"user": "bob", "minutes": "60"}, ["minutes"]),
        ({"user": "bob", "until": 0}, ["until"]),
        (["bob"], ["_schema"]),
    ],
)
async def test_a_ban_refuses_bad_input_with_the_fields_named(
    example: ExampleServer, http: aiohttp.ClientSession, body: object, fields: list[str]
) -> None:
    alice = await login(http, example, "alice")
    status, answer = await post(http, example.url + "/admin/bans", body, alice["token"])
    assert status == 400
    assert answer["error"] == "invalid_request"
    assert sorted(answer["fields"]) == fields
    await login(http, example, "bob")  # nobody was banned


async def test_with_the_broker_down_ending_sessions_answers_503(
    http: aiohttp.ClientSession,
) -> None:
    broker = SwitchableBroker()
    async with running_example(broker=broker) as example:
        alice = await login(http, example, "alice")
        bob = await login(http, example, "bob")
        socket, _ = await open_socket(http, example, bob["token"], ["chat:lobby"])
        broker.is_up = False
        for path, body, token in [
            ("/sign-out-everywhere", None, bob["token"]),
            ("/admin/bans", {"user": "bob"}, alice["token"]),
        ]:
            status, answer = await post(http, example.url + path, body, token)
            assert (status, answer) == (503, {"error": "broker_unavailable"}), path
        broker.is_up = True
        await nothing_more_but_presence(socket)
        # The app's own ban holds even so: staff may simply ask again.
        status, _ = await post(http, example.url + "/login", {"user": "bob"})
        assert status == 403


def test_the_ban_store_is_bounded_and_forgets_ended_bans() -> None:
    now = [1000.0]
    bans = Bans(max_bans=2, clock=lambda: now[0])
    bans.ban("bob", 1060)
    bans.ban("carol", 1010)
    bans.ban("bob", 1030)  # a shorter ban does not cut a longer one short
    assert (bans.banned_until("bob"), bans.banned_until("carol")) == (1060, 1010)
    with pytest.raises(BanLimit):
        bans.ban("dave", 1100)
    now[0] = 1010  # carol's ban has ended: her place is free again
    assert bans.banned_until("carol") is None
    bans.ban("dave", 1100)
    assert bans.banned_until("dave") == 1100


async def test_the_apps_ban_store_full_answers_409(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    assert example.app is not None
    bans = example.app[BANS_KEY]
    for n in range(MAX_BANS):
        bans.ban(f"user{n}", time.time() + 60)
    status, answer = await post(http, example.url + "/admin/bans", {"user": "bob"}, alice["token"])
    assert (status, answer["error"]) == (409, "ban_limit")
    await login(http, example, "bob")


# -- who is online -------------------------------------------------------------


async def test_a_room_lists_who_is_in_it_with_their_name_and_tells_when_they_leave(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    bob = await login(http, example, "bob")
    alice_socket, welcome = await open_socket(http, example, alice["token"], ["chat:lobby"])
    assert welcome["presence"] == {
        "chat:lobby": {"alice": {"info": {"name": "alice"}, "connections": 1}}
    }
    assert (await next_frame(alice_socket))["user"] == "alice"  # her own join
    bob_socket, welcome = await open_socket(http, example, bob["token"], ["chat:lobby", "user:bob"])
    assert set(welcome["presence"]) == {"chat:lobby"}  # user:bob keeps no presence
    assert set(welcome["presence"]["chat:lobby"]) == {"alice", "bob"}
    assert await next_frame(alice_socket) == {
        "type": "join",
        "channel": "chat:lobby",
        "user": "bob",
        "info": {"name": "bob"},
    }
    await bob_socket.close()
    assert await next_frame(alice_socket) == {
        "type": "leave",
        "channel": "chat:lobby",
        "user": "bob",
    }


# -- /api/notify ---------------------------------------------------------------


async def test_notify_emits_through_the_emit_endpoint(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    alice = await login(http, example, "alice")
    socket, welcome = await open_socket(http, example, alice["token"], ["chat:staff"])
    assert welcome["subscribed"] == ["chat:staff"]
    status, answer = await post(
        http, example.url + "/api/notify", {"channel": "chat:staff", "text": "deployed"}
    )
    assert status == 202
    # The emit endpoint's own answer, relayed: channel, offset and epoch.
    (published,) = answer["published"]
    frame = await next_frame_skipping_presence(socket)
    assert (frame["channel"], frame["offset"], frame["epoch"]) == (
        published["channel"],
        published["offset"],
        published["epoch"],
    )
    assert frame["data"]["from"] == "backend"
    assert frame["data"]["kind"] == "notice"
    assert frame["data"]["text"] == "deployed"


async def test_notify_goes_to_the_lobby_by_default(
    example: ExampleServer, http: aiohttp.ClientSession
) -> None:
    status, answer = await post(http, example.url + "/api/notify", {"text": "hello"})
    assert status == 202
    assert answer["published"][0]["channel"] == "chat:lobby"


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, ["text"]),
        ({"text": ""}, ["text"]),
        ({"text": "hi", "channel": "chat:*"}, ["channel"]),
        ({"text": "hi", "channel": "user:no body"}, ["channel"]),
    ],
)
async def test_notify_refuses_bad_input(
    example: ExampleServer, http: aiohttp.ClientSession, body: object, fields: list[str]
) -> None:
    status, answer = await post(http, example.url + "/api/notify", body)
    assert status == 400
    assert sorted(answer["fields"]) == fields


# -- the command line ----------------------------------------------------------


def test_command_line_defaults() -> None:
    settings = parse_arguments([])
    assert (settings.host, settings.port, settings.staff, settings.token_lifetime) == (
        "127.0.0.1",
        8080,
        ("alice", "carol"),
        120,
    )
    assert parse_arguments(["--staff", "dave, erin"]).staff == ("dave", "erin")


@pytest.mark.parametrize(
    "arguments",
    [["--port", "0"], ["--port", "http"], ["--staff", "Dave"], ["--token-lifetime", "1"]],
)
def test_command_line_refuses_bad_values(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(arguments)
    assert exit_info.value.code == 2
    assert f"argument {arguments[0]}: '" in capsys.readouterr().err


async def read_line(process: asyncio.subprocess.Process) -> str:
    """The process's next output line; fails if the output has ended."""
    assert process.stdout is not None
    line = await process.stdout.readline()
    assert line, "the process's output ended"
    return line.decode()


def test_command_line_help_says_to_run_from_the_repository_root(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--help"])
    assert exit_info.value.code == 0
    assert "Run it from the repository root" in " ".join(capsys.readouterr().out.split())


def test_ci_install_skips_pip_when_setup_py_is_unchanged() -> None:
    """`bash .ci/example` starts at once: the install it runs first is a no-op the second time."""
    stamp = ROOT / ".venv" / ".installed-test"
    setup_hash = hashlib.sha256((ROOT / "setup.py").read_bytes()).hexdigest()
    assert stamp.read_text().strip() == setup_hash, "run bash .ci/install first"
    bash = shutil.which("bash")
    assert bash is not None
    for arguments in (["--runtime"], []):
        traced = subprocess.run(  # noqa: S603 (a fixed command line)
            [bash, "-x", ".ci/install", *arguments],
            cwd=ROOT,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=True,
            timeout=60,
            env={**os.environ, "CI": "true"},
        )
        assert "-m pip" not in traced.stderr, traced.stderr


async def test_python_dash_m_serves_the_page_and_the_client(http: aiohttp.ClientSession) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "example_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        before_banner: list[str] = []
        async with asyncio.timeout(15):  # an interpreter start and an RSA key
            while f"on http://127.0.0.1:{port}" not in (line := await read_line(process)):
                before_banner.append(line)
        # The bus's first key fetch comes before the app listens: the app says that is fine.
        fetch_line = next(at for at, line in enumerate(before_banner) if "JWKS" in line)
        assert "aiohttp_wsbus.jwks: JWKS not reachable at startup" in before_banner[fetch_line]
        assert "example_app: the JWKS line above is expected" in before_banner[fetch_line + 1]
        base = f"http://127.0.0.1:{port}"
        async with http.get(base + "/") as response:
            assert response.status == 200
            assert 'src="/static/chat.js"' in await response.text()
        async with http.get(base + "/static/chat.js") as response:
            assert 'from "/ws/wsbus.js"' in await response.text()
        async with http.get(base + "/ws/wsbus.js") as response:
            assert response.status == 200
        status, answer = await post(http, base + "/login", {"user": "carol"})
        assert status == 200
        assert "chat:staff" in answer["channels"]
    finally:
        process.terminate()
        output, _ = await process.communicate()
    everything = "".join(before_banner) + output.decode()
    assert process.returncode == 0, everything
    assert "Traceback" not in everything and "WARNING" not in everything, everything
