"""POST {base_path}/emit: auth, validation, and every error as JSON with a 4xx."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from .conftest import JwksServer, MakeToken
from .support import BusServer, next_frame, nothing_more, start_bus

API_KEY = "k" * 32


async def emit_server(aiohttp_client: AiohttpClient, jwks_server: JwksServer) -> BusServer:
    return await start_bus(aiohttp_client, jwks_server.url, api_keys=[API_KEY])


async def test_emit_with_api_key_delivers_and_answers_202(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a", "chat:b"])
    response = await server.client.post(
        "/ws/emit",
        json={"channels": ["chat:a", "chat:b"], "data": {"n": 1}},
        headers={"X-API-Key": API_KEY},
    )
    assert response.status == 202
    body = await response.json()
    assert [(p["channel"], p["offset"]) for p in body["published"]] == [
        ("chat:a", 1),
        ("chat:b", 1),
    ]
    frames = [await next_frame(socket), await next_frame(socket)]
    assert {(f["channel"], json.dumps(f["data"])) for f in frames} == {
        ("chat:a", '{"n": 1}'),
        ("chat:b", '{"n": 1}'),
    }


async def test_payload_is_accepted_for_asgi_ws_users(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    response = await server.client.post(
        "/ws/emit", json={"channel": "chat:a", "payload": "old"}, headers={"X-API-Key": API_KEY}
    )
    assert response.status == 202
    assert (await next_frame(socket))["data"] == "old"


async def test_emit_with_bearer_token_needs_publish_grants(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    token = make_token(publish=["chat:lobby"])
    allowed = await server.client.post(
        "/ws/emit",
        json={"channel": "chat:lobby", "data": 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert allowed.status == 202
    refused = await server.client.post(
        "/ws/emit",
        json={"channels": ["chat:lobby", "chat:staff"], "data": 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert refused.status == 403
    assert await refused.json() == {"error": "forbidden", "channels": ["chat:staff"]}


async def test_missing_or_wrong_credentials_get_401(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    body = {"channel": "chat:a", "data": 1}
    for headers in (
        {},
        {"X-API-Key": "x" * 32},
        {"X-API-Key": API_KEY[:-1]},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic " + API_KEY},
        {"Authorization": f"Bearer {make_token(exp_in=-3600)}"},
    ):
        response = await server.client.post("/ws/emit", json=body, headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert await response.json() == {"error": "unauthorized"}
    await nothing_more(socket)


async def test_invalid_bodies_get_400_naming_the_field(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    cases: list[tuple[Any, str]] = [
        ({"data": 1}, "channel"),
        ({"channel": "a", "channels": ["b"], "data": 1}, "channel"),
        ({"channel": "a"}, "data"),
        ({"channel": "a", "data": 1, "payload": 2}, "data"),
        ({"channel": "bad name", "data": 1}, "channels"),
        ({"channels": [], "data": 1}, "channels"),
        ({"channels": [f"c{n}" for n in range(101)], "data": 1}, "channels"),
        ({"channel": 5, "data": 1}, "channel"),
        ({"channel": "a", "data": 1, "extra": True}, "extra"),
        ([1, 2], "_schema"),
    ]
    for body, field in cases:
        response = await server.client.post("/ws/emit", json=body, headers={"X-API-Key": API_KEY})
        assert response.status == 400, body
        answer = await response.json()
        assert answer["error"] == "invalid_request"
        assert field in answer["fields"], (body, answer)


async def test_not_json_gets_415_and_broken_json_400(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    headers = {"X-API-Key": API_KEY}
    plain = await server.client.post("/ws/emit", data="channel=a", headers=headers)
    assert plain.status == 415
    assert (await plain.json())["error"] == "unsupported_media_type"
    broken = await server.client.post(
        "/ws/emit", data="{nope", headers={**headers, "Content-Type": "application/json"}
    )
    assert broken.status == 400
    assert (await broken.json())["error"] == "invalid_request"


async def test_body_over_the_limit_gets_413(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await start_bus(
        aiohttp_client, jwks_server.url, api_keys=[API_KEY], emit_max_size=1000
    )
    response = await server.client.post(
        "/ws/emit", json={"channel": "a", "data": "x" * 2000}, headers={"X-API-Key": API_KEY}
    )
    assert response.status == 413
    assert (await response.json())["error"] == "payload_too_large"

    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 200  # no Content-Length: the limit applies while reading

    streamed = await server.client.post(
        "/ws/emit",
        data=chunks(),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
    )
    assert streamed.status == 413


async def test_other_methods_get_405_json(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    response = await server.client.get("/ws/emit")
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert await response.json() == {"error": "method_not_allowed"}


async def test_same_id_publishes_once(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, make_token: MakeToken
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    socket, _ = await server.open(make_token(channels=["chat:*"]), ["chat:a"])
    answers = []
    for _ in range(2):
        response = await server.client.post(
            "/ws/emit",
            json={"channel": "chat:a", "data": "once", "id": "order-17"},
            headers={"X-API-Key": API_KEY},
        )
        assert response.status == 202
        answers.append(await response.json())
    assert answers[0] == answers[1]
    assert (await next_frame(socket))["data"] == "once"
    await nothing_more(socket)


json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["channel", "channels", "data", "payload", "id", "x"])
            | st.text(max_size=5),
            children,
            max_size=4,
        )
    ),
    max_leaves=10,
)


@settings(
    max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(body=json_bodies)
async def test_no_body_gets_a_server_error(
    aiohttp_client: AiohttpClient, jwks_server: JwksServer, body: Any
) -> None:
    server = await emit_server(aiohttp_client, jwks_server)
    response = await server.client.post(
        "/ws/emit",
        data=json.dumps(body),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
    )
    assert response.status in (202, 400), (body, response.status)
    assert response.content_type == "application/json"
