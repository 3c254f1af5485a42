"""Token verification against a real JWKS server on loopback, with an injected clock."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from pytest_aiohttp import AiohttpServer

from aiohttp_wsbus.errors import InvalidSettings, InvalidToken, KeysUnavailable
from aiohttp_wsbus.jwks import MAX_JWKS_BYTES
from aiohttp_wsbus.tokens import (
    MAX_SHARED_LENGTH,
    Claims,
    ClaimsCache,
    JwksVerifier,
    RepeatedValues,
    SecretVerifier,
)

from .conftest import AUDIENCE, ISSUER, KEY_ID, JwksServer, MakeToken, public_jwk
from .support import eventually

SECRET = "a-development-secret-that-is-long-enough-for-hs512-signatures-0123456789abcdef"


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        # A few seconds ahead of the wall clock, so a token stamped "iat: now"
        # by make_token is never in this clock's future, however slow the test.
        self.now = time.time() + 5

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


StartVerifier = Callable[..., Awaitable[JwksVerifier]]


@pytest.fixture(scope="session")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def start_verifier(
    jwks_server: JwksServer, session: aiohttp.ClientSession, clock: FakeClock
) -> AsyncIterator[StartVerifier]:
    """Build and start a JwksVerifier for jwks_server; every setting can be overridden."""
    started: list[JwksVerifier] = []

    async def start(**overrides: Any) -> JwksVerifier:
        settings: dict[str, Any] = {
            "algorithms": ("RS256",),
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "leeway": 0,
            "clock": clock,
            "startup_retry": 600,  # out of the way unless a test is about it
        }
        settings.update(overrides)
        jwks_url = settings.pop("jwks_url", jwks_server.url)
        verifier = JwksVerifier(jwks_url, **settings)
        await verifier.start(session)
        started.append(verifier)
        return verifier

    yield start
    for verifier in started:
        await verifier.stop()


async def rejection(verifier: JwksVerifier | SecretVerifier, token: str) -> str:
    """The InvalidToken reason verify() gives for `token`."""
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token)
    return caught.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A JWT built without PyJWT, so that it can be as wrong as an attacker likes."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b""
    if secret is not None:
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def valid_claims(**overrides: Any) -> dict[str, Any]:
    claims = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300}
    return claims | overrides


# Happy paths, one per algorithm family


async def test_rs256_token_verifies_with_key_from_jwks(
    start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    verifier = await start_verifier()
    token = make_token(channels=["chat:*", "news"], publish=["chat:lobby"])
    claims = await verifier.verify(token)
    assert claims.subject == "alice"
    assert claims.subscribe == ("chat:*", "news")
    assert claims.publish == ("chat:lobby",)
    assert claims.token_hash == hashlib.sha256(token.encode()).digest()
    assert abs(claims.expires_at - (time.time() + 300)) < 5
    assert verifier.key_status == "fresh"
    assert (verifier.fetch_count, verifier.fetch_failures) == (1, 0)


async def test_es256_token_verifies_when_listed(
    jwks_server: JwksServer, start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwks_server.keys.append(public_jwk(key, "ec-key", ECAlgorithm))
    verifier = await start_verifier(algorithms=("ES256",))
    claims = await verifier.verify(make_token(alg="ES256", key=key, kid="ec-key"))
    assert claims.subject == "alice"


async def test_eddsa_token_verifies_when_listed(
    jwks_server: JwksServer, start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    jwks_server.keys.append(public_jwk(key, "ed-key", OKPAlgorithm))
    verifier = await start_verifier(algorithms=("RS256", "EdDSA"))
    claims = await verifier.verify(make_token(alg="EdDSA", key=key, kid="ed-key"))
    assert claims.subject == "alice"


# Algorithms


async def test_algorithm_not_on_allow_list_is_rejected(
    jwks_server: JwksServer, start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwks_server.keys.append(public_jwk(key, "ec-key", ECAlgorithm))
    verifier = await start_verifier(algorithms=("RS256",))
    assert await rejection(verifier, make_token(alg="ES256", key=key, kid="ec-key")) == "algorithm"


async def test_algorithm_must_match_the_type_of_the_named_key(
    start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    verifier = await start_verifier(algorithms=("RS256", "ES256"))
    ec_key = ec.generate_private_key(ec.SECP256R1())
    token = make_token(alg="ES256", key=ec_key, kid=KEY_ID)  # KEY_ID names the RSA key
    assert await rejection(verifier, token) == "algorithm"


async def test_algorithm_must_match_the_alg_the_key_declares(
    jwks_server: JwksServer, start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    jwks_server.keys[0]["alg"] = "RS256"
    verifier = await start_verifier(algorithms=("RS256", "PS256"))
    assert await rejection(verifier, make_token(alg="PS256")) == "algorithm"
    assert (await verifier.verify(make_token(alg="RS256"))).subject == "alice"


async def test_rsa_key_without_declared_alg_serves_every_listed_rsa_algorithm(
    start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    verifier = await start_verifier(algorithms=("RS256", "PS256"))
    assert (await verifier.verify(make_token(alg="PS256"))).subject == "alice"


async def test_hs256_signed_with_rsa_public_key_pem_is_rejected(
    start_verifier: StartVerifier, rsa_private_key: rsa.RSAPrivateKey
) -> None:
    verifier = await start_verifier()
    public_pem = rsa_private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": KEY_ID}
    token = hand_made_token(header, valid_claims(), secret=public_pem)
    assert await rejection(verifier, token) == "algorithm"


async def test_alg_none_is_rejected(start_verifier: StartVerifier) -> None:
    verifier = await start_verifier()
    for alg in ("none", "None", "NONE"):
        token = hand_made_token({"alg": alg, "kid": KEY_ID}, valid_claims(), secret=None)
        assert await rejection(verifier, token) == "algorithm"


@pytest.mark.parametrize("algorithms", [("HS256",), ("RS256", "none"), ()])
def test_jwks_verifier_refuses_symmetric_none_or_no_algorithms(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(InvalidSettings, match="algorithms"):
        JwksVerifier(
            "http://127.0.0.1/jwks.json",
            algorithms=algorithms,
            issuer=None,
            audience=None,
            leeway=0,
        )


# Time, issuer, audience, claims


async def test_expired_token_is_rejected(
    start_verifier: StartVerifier, make_token: MakeToken, clock: FakeClock
) -> None:
    verifier = await start_verifier()
    assert await rejection(verifier, make_token(exp=int(clock.now) - 1)) == "expired"


async def test_leeway_accepts_recently_expired_token(
    start_verifier: StartVerifier, make_token: MakeToken, clock: FakeClock
) -> None:
    token = make_token(exp=int(clock.now) - 10)
    lenient = await start_verifier(leeway=30)
    assert (await lenient.verify(token)).expires_at == int(clock.now) - 10
    strict = await start_verifier(leeway=5)
    assert await rejection(strict, token) == "expired"


async def test_token_not_yet_valid_is_rejected_beyond_leeway(
    start_verifier: StartVerifier, make_token: MakeToken, clock: FakeClock
) -> None:
    verifier = await start_verifier(leeway=30)
    assert await rejection(verifier, make_token(nbf=int(clock.now) + 60)) == "not_yet_valid"
    assert await rejection(verifier, make_token(iat=int(clock.now) + 60)) == "not_yet_valid"
    assert (await verifier.verify(make_token(nbf=int(clock.now) + 20))).subject == "alice"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": None}, "claims"),
        ({"exp": "tomorrow"}, "claims"),
        ({"iss": "https://evil.test/"}, "issuer"),
        ({"iss": None}, "issuer"),
        ({"aud": "another-service"}, "audience"),
        ({"aud": None}, "audience"),
        ({"sub": None}, "claims"),
        ({"sub": ""}, "claims"),
        ({"sub": 42}, "claims"),
    ],
)
async def test_token_with_wrong_or_missing_claim_is_rejected(
    start_verifier: StartVerifier, make_token: MakeToken, claims: dict[str, Any], reason: str
) -> None:
    verifier = await start_verifier()
    assert await rejection(verifier, make_token(**claims)) == reason


async def test_issuer_and_audience_are_not_checked_when_not_configured(
    start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    verifier = await start_verifier(issuer=None, audience=None)
    claims = await verifier.verify(make_token(iss="https://anyone.test/", aud="anything"))
    assert claims.subject == "alice"


@pytest.mark.parametrize(
    ("channels", "expected"),
    [
        (["a", "b:*"], ("a", "b:*")),
        ("a  b:*\tc", ("a", "b:*", "c")),
        (None, ()),
        ({"a": True}, ()),
        (7, ()),
        (["a", 7, None, ["b"], "c"], ("a", "c")),
    ],
)
async def test_grant_claims_are_read_leniently(
    start_verifier: StartVerifier,
    make_token: MakeToken,
    channels: object,
    expected: tuple[str, ...],
) -> None:
    verifier = await start_verifier()
    claims = await verifier.verify(make_token(channels=channels, publish=channels))
    assert claims.subscribe == expected
    assert claims.publish == expected


async def test_grant_claim_names_are_configurable(
    start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    verifier = await start_verifier(channels_claim="subs", publish_claim="pubs")
    claims = await verifier.verify(make_token(subs=["x"], pubs="y z"))
    assert (claims.subscribe, claims.publish) == (("x",), ("y", "z"))


async def test_malformed_and_tampered_tokens_are_rejected(
    start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    verifier = await start_verifier()
    assert await rejection(verifier, "not-a-token") == "malformed"
    header, _, signature = make_token().split(".")
    forged_payload = b64(json.dumps(valid_claims(sub="mallory")).encode())
    assert await rejection(verifier, f"{header}.{forged_payload}.{signature}") == "signature"



@pytest.mark.parametrize(
    "header_segment",
    [
        "",  # nothing before the first dot
        "eyJhbGciOiJSUzI1NiJ9!",  # not base64url
        b64(b"not json"),
        b64(b'["alg", "RS256"]'),  # JSON, but not an object
        b64(b'{"alg": 256}'),
        b64(b'{"alg": "RS256", "kid": 7}'),
        "A" * 5000,  # absurdly long
    ],
)
async def test_bad_headers_are_malformed_or_refused(
    start_verifier: StartVerifier, make_token: MakeToken, header_segment: str
) -> None:
    verifier = await start_verifier()
    _, payload, signature = make_token().split(".")
    reason = await rejection(verifier, f"{header_segment}.{payload}.{signature}")
    assert reason in {"malformed", "algorithm"}


# Keys: rotation, refetch limits, failures


async def test_token_without_kid_is_tried_against_each_fitting_key(
    jwks_server: JwksServer,
    start_verifier: StartVerifier,
    make_token: MakeToken,
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    jwks_server.keys.append(public_jwk(other_rsa_key, "key-2", RSAAlgorithm))
    verifier = await start_verifier()
    assert (await verifier.verify(make_token(kid=None, key=other_rsa_key))).subject == "alice"
    assert (await verifier.verify(make_token(kid=None, sub="bob"))).subject == "bob"
    unknown = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert await rejection(verifier, make_token(kid=None, key=unknown)) == "signature"


async def test_new_kid_verifies_after_one_refetch(
    jwks_server: JwksServer,
    start_verifier: StartVerifier,
    make_token: MakeToken,
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    verifier = await start_verifier()
    jwks_server.keys.append(public_jwk(other_rsa_key, "key-2", RSAAlgorithm))
    claims = await verifier.verify(make_token(kid="key-2", key=other_rsa_key))
    assert claims.subject == "alice"
    assert jwks_server.requests == 2


async def test_unknown_kid_refetches_at_most_once_per_interval(
    jwks_server: JwksServer, start_verifier: StartVerifier, make_token: MakeToken, clock: FakeClock
) -> None:
    verifier = await start_verifier(refetch_interval=30)
    token = make_token(kid="nobody")
    assert await rejection(verifier, token) == "unknown_key"
    assert await rejection(verifier, token) == "unknown_key"
    results = await asyncio.gather(
        *(verifier.verify(make_token(kid=f"nobody-{n}")) for n in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(result, InvalidToken) for result in results)
    assert jwks_server.requests == 2
    clock.advance(31)
    assert await rejection(verifier, token) == "unknown_key"
    assert jwks_server.requests == 3


async def test_concurrent_unknown_kids_share_one_refetch(
    jwks_server: JwksServer,
    start_verifier: StartVerifier,
    make_token: MakeToken,
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    # No rate limit at all: only the shared fetch keeps this to one request.
    verifier = await start_verifier(refetch_interval=0)
    jwks_server.keys.append(public_jwk(other_rsa_key, "key-2", RSAAlgorithm))
    tokens = [make_token(kid="key-2", key=other_rsa_key, sub=f"user-{n}") for n in range(10)]
    claims = await asyncio.gather(*(verifier.verify(token) for token in tokens))
    assert [c.subject for c in claims] == [f"user-{n}" for n in range(10)]
    assert jwks_server.requests == 2


async def test_failed_refetch_keeps_the_last_good_keys(
    jwks_server: JwksServer, start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    verifier = await start_verifier()
    jwks_server.fail = True
    assert await rejection(verifier, make_token(kid="nobody")) == "unknown_key"
    assert verifier.key_status == "stale"
    assert (verifier.fetch_count, verifier.fetch_failures) == (2, 1)
    assert (await verifier.verify(make_token())).subject == "alice"


async def test_jwks_down_from_start_then_up(
    jwks_server: JwksServer, start_verifier: StartVerifier, make_token: MakeToken, clock: FakeClock
) -> None:
    jwks_server.fail = True
    verifier = await start_verifier(refetch_interval=30)
    assert verifier.key_status == "unavailable"
    token = make_token()
    with pytest.raises(KeysUnavailable):
        await verifier.verify(token)
    jwks_server.fail = False
    with pytest.raises(KeysUnavailable):
        await verifier.verify(token)  # still inside refetch_interval: no new fetch
    assert jwks_server.requests == 2
    clock.advance(31)
    assert (await verifier.verify(token)).subject == "alice"
    assert verifier.key_status == "fresh"


async def test_a_failed_first_fetch_is_retried_soon_and_logged_quietly(
    jwks_server: JwksServer,
    start_verifier: StartVerifier,
    make_token: MakeToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp_wsbus")
    jwks_server.fail = True  # as when the identity provider is this app, still starting
    verifier = await start_verifier(startup_retry=0.05)
    jwks_server.fail = False
    await jwks_server.wait_for_requests(2)
    assert (await verifier.verify(make_token())).subject == "alice"
    assert verifier.key_status == "fresh"
    ours = [r for r in caplog.records if r.name.startswith("aiohttp_wsbus")]
    assert [r.levelname for r in ours] == ["INFO"]
    assert "retrying" in ours[0].getMessage()


async def test_a_first_fetch_that_fails_again_is_a_warning(
    jwks_server: JwksServer, start_verifier: StartVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp_wsbus")
    jwks_server.fail = True
    verifier = await start_verifier(startup_retry=0.05)
    await jwks_server.wait_for_requests(2)
    await eventually(lambda: verifier.fetch_failures == 2)
    ours = [r for r in caplog.records if r.name.startswith("aiohttp_wsbus")]
    assert [r.levelname for r in ours] == ["INFO", "WARNING"]
    assert verifier.key_status == "unavailable"


async def test_key_set_is_refreshed_in_the_background(
    jwks_server: JwksServer,
    start_verifier: StartVerifier,
    make_token: MakeToken,
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    verifier = await start_verifier(refresh_interval=0.05, refetch_interval=30)
    # Use up the on-demand refetch, so only the background refresh can bring key-2.
    assert await rejection(verifier, make_token(kid="nobody")) == "unknown_key"
    jwks_server.keys.append(public_jwk(other_rsa_key, "key-2", RSAAlgorithm))
    await jwks_server.wait_for_requests(3)
    assert (await verifier.verify(make_token(kid="key-2", key=other_rsa_key))).subject == "alice"
    await verifier.stop()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "wsbus-jwks-refresh"]


async def test_keys_not_for_signing_or_not_allowed_or_broken_are_skipped(
    jwks_server: JwksServer,
    start_verifier: StartVerifier,
    make_token: MakeToken,
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    jwks_server.keys += [
        public_jwk(other_rsa_key, "enc-key", RSAAlgorithm) | {"use": "enc"},
        public_jwk(other_rsa_key, "rs512-key", RSAAlgorithm) | {"alg": "RS512"},
        {"kty": "RSA", "kid": "broken", "n": "@@@", "e": "AQAB"},
        {"kty": "oct", "kid": "secret", "k": b64(SECRET.encode())},
    ]
    verifier = await start_verifier()
    assert verifier.key_status == "fresh"
    assert (await verifier.verify(make_token())).subject == "alice"
    for kid in ("enc-key", "rs512-key", "broken", "secret"):
        assert await rejection(verifier, make_token(kid=kid, key=other_rsa_key)) == "unknown_key"


async def test_oversized_jwks_is_refused(
    jwks_server: JwksServer, start_verifier: StartVerifier
) -> None:
    jwks_server.keys.append({"kty": "oct", "kid": "padding", "k": "A" * MAX_JWKS_BYTES})
    verifier = await start_verifier()
    assert verifier.key_status == "unavailable"
    assert verifier.fetch_failures == 1


async def test_oversized_chunked_jwks_is_refused(
    aiohttp_server: AiohttpServer, start_verifier: StartVerifier, rsa_private_key: rsa.RSAPrivateKey
) -> None:
    """Without Content-Length the size is counted while reading."""
    document = {
        "keys": [public_jwk(rsa_private_key, KEY_ID, RSAAlgorithm)],
        "padding": "A" * MAX_JWKS_BYTES,
    }

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(json.dumps(document).encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/jwks.json", chunked)
    server = await aiohttp_server(app)
    verifier = await start_verifier(jwks_url=str(server.make_url("/jwks.json")))
    assert verifier.key_status == "unavailable"
    assert verifier.fetch_failures == 1


async def test_jwks_fetch_is_bounded_by_fetch_timeout(
    aiohttp_server: AiohttpServer, start_verifier: StartVerifier
) -> None:
    release = asyncio.Event()

    async def never_answers(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/jwks.json", never_answers)
    server = await aiohttp_server(app)
    verifier = await start_verifier(jwks_url=str(server.make_url("/jwks.json")), fetch_timeout=0.1)
    release.set()
    assert verifier.key_status == "unavailable"
    assert verifier.fetch_failures == 1


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk"])
async def test_key_location_headers_are_ignored(
    aiohttp_server: AiohttpServer,
    start_verifier: StartVerifier,
    other_rsa_key: rsa.RSAPrivateKey,
    header: str,
) -> None:
    attacker = JwksServer([public_jwk(other_rsa_key, "attacker", RSAAlgorithm)])
    app = web.Application()
    app.router.add_get("/jwks.json", attacker.handle)
    attacker_url = str((await aiohttp_server(app)).make_url("/jwks.json"))
    verifier = await start_verifier()
    value = attacker.keys[0] if header == "jwk" else attacker_url
    token = jwt.encode(
        valid_claims(), other_rsa_key, algorithm="RS256", headers={"kid": "attacker", header: value}
    )
    assert await rejection(verifier, token) == "unknown_key"
    assert attacker.requests == 0


# The claims cache


async def test_cache_hit_skips_verification_but_still_expires(
    start_verifier: StartVerifier, make_token: MakeToken, clock: FakeClock
) -> None:
    verifier = await start_verifier(leeway=5)
    token = make_token(exp=int(clock.now) + 60)
    first = await verifier.verify(token)
    assert await verifier.verify(token) is first  # a fresh verification builds a new Claims
    clock.advance(64)
    assert await verifier.verify(token) is first
    clock.advance(2)
    assert await rejection(verifier, token) == "expired"


async def test_cache_is_bounded(start_verifier: StartVerifier, make_token: MakeToken) -> None:
    verifier = await start_verifier(cache_size=2)
    tokens = [make_token(sub=f"user-{n}") for n in range(3)]
    claims = [await verifier.verify(token) for token in tokens]
    assert await verifier.verify(tokens[2]) is claims[2]
    again = await verifier.verify(tokens[0])
    assert again == claims[0]
    assert again is not claims[0]


def test_a_full_cache_drops_its_least_recently_used_sixteenth() -> None:
    cache = ClaimsCache(32)
    claims = [Claims(f"user-{n}", 0, (), (), bytes([n])) for n in range(33)]
    for held in claims[:32]:
        cache.put(held)
    assert cache.get(claims[0].token_hash) is claims[0]  # used: now the most recent
    cache.put(claims[32])
    kept = [held for held in claims if cache.get(held.token_hash) is not None]
    assert kept == [claims[0], *claims[4:]]  # 1, 2 and 3 were the oldest: 33 - 32 + 32 // 16


async def test_removing_a_key_from_the_jwks_revokes_its_cached_tokens(
    jwks_server: JwksServer,
    start_verifier: StartVerifier,
    make_token: MakeToken,
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    verifier = await start_verifier()
    token = make_token()
    await verifier.verify(token)
    jwks_server.keys[:] = [public_jwk(other_rsa_key, "key-2", RSAAlgorithm)]
    await verifier.verify(make_token(kid="key-2", key=other_rsa_key))  # triggers the refetch
    assert await rejection(verifier, token) == "unknown_key"


# Secrets never leak


async def test_token_never_appears_in_errors_or_logs(
    jwks_server: JwksServer,
    start_verifier: StartVerifier,
    make_token: MakeToken,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    verifier = await start_verifier()
    jwks_server.fail = True
    good = make_token()
    header, payload, signature = good.split(".")
    tokens = [
        make_token(kid="nobody"),
        make_token(exp=int(clock.now) - 1),
        make_token(iss="https://evil.test/"),
        f"{header}.{b64(b'{}')}.{signature}",
        f"{header}.{payload}",
        good[:-4] + "AAAA",
    ]
    for token in tokens:
        with pytest.raises(InvalidToken) as caught:
            await verifier.verify(token)
        for part in [token, *token.split(".")]:
            assert part not in str(caught.value)
            assert part not in repr(caught.value)
            assert part not in caplog.text
    assert "JWKS fetch" in caplog.text  # the failed refetch was logged, without the token


# The shared-secret verifier


def secret_verifier(**overrides: Any) -> SecretVerifier:
    settings: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "leeway": 0}
    settings.update(overrides)
    return SecretVerifier(SECRET, **settings)


async def test_secret_verifier_accepts_hs256(make_token: MakeToken) -> None:
    verifier = secret_verifier()
    await verifier.start(None)
    claims = await verifier.verify(make_token(alg="HS256", key=SECRET, kid=None))
    assert isinstance(claims, Claims)
    assert claims.subscribe == ("chat:*",)
    assert verifier.key_status == "fresh"
    await verifier.stop()


async def test_secret_verifier_rejects_other_algorithms_and_secrets(make_token: MakeToken) -> None:
    verifier = secret_verifier()
    assert await rejection(verifier, make_token(alg="HS512", key=SECRET)) == "algorithm"
    assert await rejection(verifier, make_token()) == "algorithm"
    other = make_token(alg="HS256", key=SECRET[::-1])
    assert await rejection(verifier, other) == "signature"
    unsigned = hand_made_token({"alg": "none"}, valid_claims(), secret=None)
    assert await rejection(verifier, unsigned) == "algorithm"


async def test_secret_verifier_checks_time_with_the_clock(
    make_token: MakeToken, clock: FakeClock
) -> None:
    verifier = secret_verifier(clock=clock, leeway=10)
    token = make_token(alg="HS256", key=SECRET, exp=int(clock.now) + 60)
    assert (await verifier.verify(token)).subject == "alice"
    clock.advance(71)
    assert await rejection(verifier, token) == "expired"


@pytest.mark.parametrize("algorithms", [("RS256",), ("HS256", "none"), ()])
def test_secret_verifier_refuses_non_hmac_algorithms(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(InvalidSettings, match="algorithms"):
        secret_verifier(algorithms=algorithms)


# What many tokens repeat is held once


async def test_tokens_of_different_users_share_their_grants(
    start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    verifier = await start_verifier()
    grants: dict[str, Any] = {"channels": ["chat:*", "news"], "publish": ["chat:lobby"]}
    alice = await verifier.verify(make_token(sub="alice", **grants))
    bob = await verifier.verify(make_token(sub="bob", **grants))
    # Every socket keeps its token's claims: the grants are one copy.
    assert alice.subscribe is bob.subscribe and alice.publish is bob.publish


async def test_extra_is_every_claim_as_the_token_said_it(
    start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    verifier = await start_verifier()
    said: dict[str, Any] = {
        "channels": ["chat:*", "news"],
        "team": "blue",
        "profile": {"name": "Zoë 😀", "age": 7, "ratio": 0.1, "admin": False, "none": None},
        "lone": "\ud800",  # a lone surrogate, which JSON allows
    }
    claims = await verifier.verify(make_token(sub="alice", **said))
    extra = claims.extra
    assert {name: extra[name] for name in said} == said
    assert extra["sub"] == "alice" and extra["exp"] == claims.expires_at
    assert set(extra) >= {"sub", "exp", "iss", "aud", *said}
    assert "payload" not in repr(claims) and "blue" not in repr(claims)


@pytest.mark.parametrize(
    "said",
    [
        {"jti": "order-7", "iat": 1_700_000_000},
        {"jti": 7, "iat": 1_700_000_000.5},  # a jti that is no string, a fractional iat
        {"jti": None, "iat": None, "exp": 4_000_000_000.5},  # none, a fractional exp
        {"iat": -(2**60 + 1)},  # an integer a float cannot hold
        {"jti": ["a"], "iat": 0},
    ],
)
async def test_extra_keeps_each_claim_and_its_type_whatever_the_fields_hold(
    start_verifier: StartVerifier, make_token: MakeToken, said: dict[str, Any]
) -> None:
    verifier = await start_verifier()
    token = make_token(sub="alice", **said)
    as_signed = jwt.decode(token, options={"verify_signature": False})
    extra = (await verifier.verify(token)).extra
    assert extra == as_signed
    assert {name: type(value) for name, value in extra.items()} == {
        name: type(value) for name, value in as_signed.items()
    }


def test_extra_of_claims_made_by_hand_holds_their_fields() -> None:
    claims = Claims("alice", 100, (), (), b"", token_id="j", issued_at=1.5)
    assert claims.extra == {"sub": "alice", "exp": 100, "jti": "j", "iat": 1.5}
    assert type(Claims("bob", 100, (), (), b"", issued_at=7.0).extra["iat"]) is int


async def test_tokens_of_different_users_share_the_claims_they_both_say(
    start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    verifier = await start_verifier()
    alice = await verifier.verify(make_token(sub="alice", jti="a", exp_in=60))
    bob = await verifier.verify(make_token(sub="bob", jti="b", exp_in=90))
    # Issuer, audience and grants are one copy; subject, id and times are their own.
    assert alice.payload is bob.payload
    assert (alice.extra["sub"], alice.extra["jti"]) == ("alice", "a")
    assert (bob.extra["sub"], bob.extra["jti"]) == ("bob", "b")


async def test_extra_is_read_only_and_each_read_is_a_fresh_copy(
    start_verifier: StartVerifier, make_token: MakeToken
) -> None:
    verifier = await start_verifier()
    claims = await verifier.verify(make_token(sub="alice", roles=["staff"]))
    with pytest.raises(TypeError):
        claims.extra["roles"] = ["admin"]  # type: ignore[index]
    claims.extra["roles"].append("admin")  # a caller changing its copy changes nobody's
    assert claims.extra["roles"] == ["staff"]
    assert (await verifier.verify(make_token(sub="alice", roles=["staff"]))).extra["roles"] == [
        "staff"
    ]


def test_repeated_values_hold_only_short_values_and_a_bounded_number() -> None:
    repeated = RepeatedValues(size=3)
    first = "".join(["chat:", "*"])
    assert repeated.one(first) is first
    assert repeated.one("".join(["chat:", "*"])) is first
    long = "x" * (MAX_SHARED_LENGTH + 1)
    assert repeated.one("".join(long)) is not repeated.one(long)  # too long to hold
    for value in ("a", "b", "c"):  # past the bound: emptied, then held again
        repeated.one(value)
    assert repeated.one("".join(["chat:", "*"])) is not first
