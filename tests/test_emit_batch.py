"""The batch form of POST {base_path}/emit: checked whole before anything is published,
answered in order, partial on a broker failure; and Bus.publish_many."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from aiohttp_wsbus import BrokerUnavailable, Bus, Claims, InvalidChannel
from aiohttp_wsbus.emit_batch import (
    _BATCH_SCHEMA,
    MAX_BATCH_MESSAGES,
    _simple_batch,
    simple_message,
)

from .conftest import JwksServer, MakeToken
from .support import BusServer, FlakyBroker, next_frames, nothing_more, start_bus

API_KEY = "b" * 32
KEY = {"X-API-Key": API_KEY}


async def batch_server(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, **settings: Any
) -> BusServer:
    return await start_bus(aiohttp_client, jwks_server.url, api_keys=[API_KEY], **settings)


async def offsets(server: BusServer, *channels: str) -> list[int]:
    return [(await server.bus.position(channel)).offset for channel in channels]


async def test_a_batch_is_published_in_order_and_answered_one_entry_per_message(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await batch_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a", "chat:b"])
    messages = [
        {"channel": "chat:a", "data": 1},
        {"channel": "chat:b", "data": {"n": 2}},
        {"channel": "chat:a", "data": None},
        {"channel": "chat:b", "data": "typing", "ephemeral": True},
        {"channel": "chat:a", "data": [4]},
    ]
    response = await server.client.post("/ws/emit", json={"messages": messages}, headers=KEY)
    assert response.status == 202
    published = (await response.json())["published"]
    epoch_a, epoch_b = published[0]["epoch"], published[1]["epoch"]
    assert published == [
        {"channel": "chat:a", "offset": 1, "epoch": epoch_a},
        {"channel": "chat:b", "offset": 1, "epoch": epoch_b},
        {"channel": "chat:a", "offset": 2, "epoch": epoch_a},
        {"channel": "chat:b", "ephemeral": True},
        {"channel": "chat:a", "offset": 3, "epoch": epoch_a},
    ]
    frames = await next_frames(socket, 5)
    assert [(f["channel"], f["data"], f.get("offset")) for f in frames] == [
        ("chat:a", 1, 1),
        ("chat:b", {"n": 2}, 1),
        ("chat:a", None, 2),
        ("chat:b", "typing", None),
        ("chat:a", [4], 3),
    ]
    await nothing_more(socket)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"channel": "bad name", "data": 1}, "channel"),
        ({"data": 1}, "channel"),
        ({"channel": "chat:a"}, "data"),
        ({"channel": "chat:a", "data": 1, "id": ""}, "id"),
        ({"channel": "chat:a", "data": 1, "id": "x", "ephemeral": True}, "id"),
        ({"channel": "chat:a", "data": 1, "extra": True}, "extra"),
        ({"channel": "chat:a", "data": "\ud800"}, "data"),
    ],
)
async def test_a_bad_message_is_400_naming_its_index_and_publishes_nothing(
    aiohttp_client: AiohttpClient,
    jwks_server: JwksServer,
    make_token: MakeToken,
    message: dict[str, Any],
    field: str,
) -> None:
    server = await batch_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    good = {"channel": "chat:a", "data": "fine"}
    body = {"messages": [good, good, good, message, good]}
    response = await server.client.post("/ws/emit", json=body, headers=KEY)
    assert response.status == 400
    answer = await response.json()
    assert answer["error"] == "invalid_request"
    assert list(answer["fields"]["messages"]) == ["3"]
    assert list(answer["fields"]["messages"]["3"]) == [field]
    assert await offsets(server, "chat:a") == [0]
    await nothing_more(socket)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"channel": "chat:a", "data": n} for n in range(MAX_BATCH_MESSAGES + 1)]},
        {"messages": "chat:a"},
        {"messages": None},
        {"messages": [{"channel": "chat:a", "data": 1}], "channel": "chat:b"},
    ],
)
async def test_a_batch_of_the_wrong_shape_or_size_is_400(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, body: dict[str, Any]
) -> None:
    server = await batch_server(aiohttp_client, jwks_server, emit_max_size=1 << 22)
    response = await server.client.post("/ws/emit", json=body, headers=KEY)
    assert response.status == 400
    answer = await response.json()
    assert answer["error"] == "invalid_request"
    assert set(answer["fields"]) <= {"messages", "channel"}
    assert await offsets(server, "chat:a", "chat:b") == [0, 0]


json_values = st.none() | st.booleans() | st.integers() | st.text(max_size=6)
batch_messages = st.lists(
    st.dictionaries(
        st.sampled_from(["channel", "data", "id", "ephemeral", "payload"]),
        json_values | st.sampled_from(["chat:a", "chat:b"]) | st.lists(json_values, max_size=2),
        max_size=4,
    )
    | json_values,
    max_size=4,
)


@settings(
    max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(messages=batch_messages)
async def test_no_batch_gets_a_server_error_and_a_refused_one_publishes_nothing(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, messages: list[Any]
) -> None:
    server = await batch_server(aiohttp_client, jwks_server)
    response = await server.client.post("/ws/emit", json={"messages": messages}, headers=KEY)
    assert response.status in (202, 400), (messages, response.status)
    answer = await response.json()
    if response.status == 202:
        assert len(answer["published"]) == len(messages)
    else:
        assert await offsets(server, "chat:a", "chat:b") == [0, 0]


message_fields = st.sampled_from(["channel", "data", "id", "ephemeral", "payload", "x"])
message_values = (
    json_values
    | st.floats(allow_nan=False)
    | st.sampled_from(["chat:a", "no spaces", "", "x" * 300, "m-1", "\x7f"])
    | st.lists(json_values, max_size=2)
    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)
)
# Few values, so that nearly well-formed messages (a field missing, wrong or one too many)
# come often.
near_values = st.sampled_from(["chat:a", "no spaces", "m-1", "", "x" * 129, True, False, None, 1])
good_messages = st.fixed_dictionaries(
    {"channel": st.sampled_from(["chat:a", "chat:b"]), "data": json_values},
    optional={"id": st.sampled_from(["m-1", "m-2"]), "ephemeral": st.just(False)},
)
near_messages = (
    st.builds(
        lambda good, changed, dropped: {k: v for k, v in (good | changed).items() if k != dropped},
        good_messages,
        st.dictionaries(message_fields, near_values, max_size=2),
        st.sampled_from(["channel", "data", "none"]),
    )
    | st.dictionaries(message_fields, near_values)
    | near_values
)
batch_bodies = (
    st.fixed_dictionaries(
        {"messages": st.lists(good_messages, max_size=3) | near_values},
        optional={"channel": st.just("chat:a"), "data": json_values},
    )
    | st.builds(
        lambda good, near: {"messages": [*good, near]}, st.lists(good_messages), near_messages
    )
    | st.builds(
        lambda count, message: {"messages": [message] * count},
        st.sampled_from([MAX_BATCH_MESSAGES, MAX_BATCH_MESSAGES + 1]),
        good_messages,
    )
    | message_values
)


@settings(max_examples=300)
@example(message={"channel": "chat:a", "data": 1, "id": "m-1", "ephemeral": True})
@given(message=near_messages | st.dictionaries(message_fields, message_values))
def test_a_common_message_loads_as_the_schema_loads_it(message: Any) -> None:
    fast = simple_message(message)
    # The fast path only accepts, and only what the schema accepts, as the schema has it;
    # every refusal (and its wording) is the schema's.
    if fast is not None:
        assert [fast] == _BATCH_SCHEMA.load({"messages": [message]})["messages"]


@settings(max_examples=300)
@given(body=batch_bodies)
def test_the_common_batch_loads_as_the_schema_loads_it(body: Any) -> None:
    fast = _simple_batch(body)
    if fast is not None:
        assert fast == _BATCH_SCHEMA.load(body)["messages"]


def test_the_common_batch_skips_the_schema() -> None:
    body = {
        "messages": [
            {"channel": "chat:a", "data": {"t": 1}},
            {"channel": "chat:b", "data": None, "id": "m-1"},
            {"channel": "chat:a", "data": 1, "ephemeral": True},
            {"channel": "chat:a", "data": [], "ephemeral": False, "id": "m-2"},
        ]
    }
    assert _simple_batch(body) == _BATCH_SCHEMA.load(body)["messages"]


async def test_a_forbidden_channel_in_a_bearer_batch_is_403_and_publishes_nothing(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await batch_server(aiohttp_client, jwks_server)
    token = make_token(publish=["chat:lobby"])
    bearer = {"Authorization": f"Bearer {token}"}
    body = {
        "messages": [
            {"channel": "chat:lobby", "data": 1},
            {"channel": "chat:staff", "data": 2},
            {"channel": "chat:lobby", "data": 3},
        ]
    }
    refused = await server.client.post("/ws/emit", json=body, headers=bearer)
    assert refused.status == 403
    assert await refused.json() == {"error": "forbidden", "channels": ["chat:staff"]}
    assert await offsets(server, "chat:lobby", "chat:staff") == [0, 0]
    allowed = {"messages": [body["messages"][0], body["messages"][2]]}
    response = await server.client.post("/ws/emit", json=allowed, headers=bearer)
    assert response.status == 202
    assert [p["offset"] for p in (await response.json())["published"]] == [1, 2]


async def test_ids_are_idempotent_within_and_across_batches(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await batch_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a", "chat:b"])
    first = [
        {"channel": "chat:a", "data": "one", "id": "m-1"},
        {"channel": "chat:a", "data": "one again", "id": "m-1"},
        {"channel": "chat:b", "data": "other channel", "id": "m-1"},
        {"channel": "chat:a", "data": "two", "id": "m-2"},
    ]
    response = await server.client.post("/ws/emit", json={"messages": first}, headers=KEY)
    assert response.status == 202
    answer = (await response.json())["published"]
    assert [(p["channel"], p["offset"]) for p in answer] == [
        ("chat:a", 1),
        ("chat:a", 1),
        ("chat:b", 1),
        ("chat:a", 2),
    ]
    second = [
        {"channel": "chat:a", "data": "two", "id": "m-2"},
        {"channel": "chat:a", "data": "three", "id": "m-3"},
    ]
    response = await server.client.post("/ws/emit", json={"messages": second}, headers=KEY)
    assert [p["offset"] for p in (await response.json())["published"]] == [2, 3]
    frames = await next_frames(socket, 4)
    assert [(f["channel"], f["data"]) for f in frames] == [
        ("chat:a", "one"),
        ("chat:b", "other channel"),
        ("chat:a", "two"),
        ("chat:a", "three"),
    ]
    await nothing_more(socket)


async def test_a_broker_failure_midway_is_503_with_what_was_published(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    broker = FlakyBroker("chat:b", down_for=1)
    server = await batch_server(aiohttp_client, jwks_server, broker=broker)
    messages = [
        {"channel": "chat:a", "data": 1, "id": "m-1"},
        {"channel": "chat:a", "data": 2, "id": "m-2"},
        {"channel": "chat:b", "data": 3, "id": "m-3"},
        {"channel": "chat:a", "data": 4, "id": "m-4"},
    ]
    response = await server.client.post("/ws/emit", json={"messages": messages}, headers=KEY)
    assert response.status == 503
    answer = await response.json()
    assert answer["error"] == "broker_unavailable"
    assert [(p["channel"], p["offset"]) for p in answer["published"]] == [
        ("chat:a", 1),
        ("chat:a", 2),
    ]
    # The same batch again: the ids keep what landed from landing twice.
    response = await server.client.post("/ws/emit", json={"messages": messages}, headers=KEY)
    assert response.status == 202
    answer = await response.json()
    assert [(p["channel"], p["offset"]) for p in answer["published"]] == [
        ("chat:a", 1),
        ("chat:a", 2),
        ("chat:b", 1),
        ("chat:a", 3),
    ]


async def test_on_publish_hooks_rewrite_each_message_and_a_refusal_names_its_index(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    def prepare(bus: Bus) -> None:
        @bus.on_publish("chat:{room}")
        async def stamp(claims: Claims, data: Any, room: str) -> Any:
            if data == "refuse":
                raise ValueError("no refusals here")
            return {"from": claims.subject, "said": data}

    server = await batch_server(aiohttp_client, jwks_server, prepare=prepare)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    bearer = {"Authorization": f"Bearer {make_token(sub='alice', publish=['chat:*'])}"}
    good = {"channel": "chat:a", "data": "hi"}
    body = {"messages": [good, {"channel": "chat:a", "data": "refuse"}]}
    response = await server.client.post("/ws/emit", json=body, headers=bearer)
    assert response.status == 400
    assert list((await response.json())["fields"]["messages"]["1"]) == ["data"]
    assert await offsets(server, "chat:a") == [0]
    response = await server.client.post("/ws/emit", json={"messages": [good]}, headers=bearer)
    assert response.status == 202
    (frame,) = await next_frames(socket, 1)
    assert frame["data"] == {"from": "alice", "said": "hi"}


async def test_bus_publish_many_checks_every_message_first(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await batch_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    with pytest.raises(InvalidChannel):
        await server.bus.publish_many([("chat:a", 1), ("bad name", 2)])
    with pytest.raises(ValueError, match="JSON"):
        await server.bus.publish_many([("chat:a", 1), ("chat:a", float("nan"))])
    assert await offsets(server, "chat:a") == [0]
    published = await server.bus.publish_many(
        [("chat:a", 1), ("chat:a", 2, "x"), ("chat:a", 3, "x")]
    )
    assert [(p.offset, p.is_repeat) for p in published] == [(1, False), (2, False), (2, True)]
    frames = await next_frames(socket, 2)
    assert [f["data"] for f in frames] == [1, 2]
    await nothing_more(socket)


async def test_bus_publish_many_says_what_landed_before_the_broker_failed(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await batch_server(aiohttp_client, jwks_server, broker=FlakyBroker("chat:b", 1))
    with pytest.raises(BrokerUnavailable) as failed:
        await server.bus.publish_many([("chat:a", 1), ("chat:b", 2), ("chat:a", 3)])
    assert [(p.channel, p.offset) for p in failed.value.published] == [("chat:a", 1)]
