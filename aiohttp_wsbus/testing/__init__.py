"""aiohttp_wsbus.testing: what an application needs to test its real-time behaviour.

A pytest plugin (enabled on install through the `pytest11` entry point, or
with `pytest -p aiohttp_wsbus.testing`) with two fixtures:

- `wsbus_idp`: an IdentityProvider (RSA key, JWKS on loopback, `issue(...)`);
- `wsbus_client`: a factory of connected Clients against the app under test.

And, usable without pytest: `capture(bus)` (what the application published),
`broker_outage(bus, seconds)`, `drop_sockets(bus, user)`, `expire_tokens(bus, user)`.
The fixtures need pytest and pytest-aiohttp (`pip install 'aiohttp-wsbus[testing]'`);
without them this module still imports, without fixtures. See docs/testing.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient
from cryptography.hazmat.primitives.asymmetric import rsa

from ..client import Client, ClientClosed
from ..web import BUS_KEY
from .capture import ANY, BrokerOutage, Capture, CapturedMessage, broker_outage, capture
from .faults import drop_sockets, expire_tokens
from .identity import IdentityProvider, JwksServer, public_jwk

__all__ = [
    "ANY",
    "BrokerOutage",
    "Capture",
    "CapturedMessage",
    "ClientFactory",
    "IdentityProvider",
    "JwksServer",
    "broker_outage",
    "capture",
    "drop_sockets",
    "expire_tokens",
    "public_jwk",
    "shared_key",
]

_key: rsa.RSAPrivateKey | None = None


def shared_key() -> rsa.RSAPrivateKey:
    """One RSA key per test process: making one takes a noticeable moment."""
    global _key
    if _key is None:
        _key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _key


Target = TestClient[web.Request, web.Application] | BaseTestServer | str


class ClientFactory:
    """`await wsbus_client(target, "alice", channels=[...])`: a Client, connected.

    `target` is pytest-aiohttp's `aiohttp_client(app)` or `aiohttp_server(app)`
    (the bus's WebSocket path is read from the app), or a ws:// URL. The token
    comes from the identity provider, fresh for every connect and refresh.
    Every client is closed when the test ends.
    """

    def __init__(self, idp: IdentityProvider) -> None:
        self.idp = idp
        self.clients: list[Client] = []

    async def __call__(
        self,
        target: Target,
        user: str = "alice",
        *,
        channels: Sequence[str] = ("*",),
        publish: Sequence[str] = (),
        ttl: float = 300.0,
        get_token: Callable[[], Any] | None = None,
        timeout: float = 5.0,
        **options: Any,
    ) -> Client:
        if get_token is None:

            def get_token() -> str:
                return self.idp.issue(user, channels=list(channels), publish=list(publish), ttl=ttl)

        client = Client(_url(target), get_token=get_token, **options)
        self.clients.append(client)
        client.start()
        try:
            await client.wait_connected(timeout)
        except (ClientClosed, TimeoutError) as error:
            await client.close()
            why = str(error) or f"no welcome within {timeout} s"
            raise AssertionError(
                f"wsbus client for {user!r} could not connect to {client.url}: {why}"
            ) from None
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


def _url(target: Target) -> str:
    if isinstance(target, str):
        return target
    server = target.server if isinstance(target, TestClient) else target
    app = getattr(server, "app", None)
    bus = app.get(BUS_KEY) if isinstance(app, web.Application) else None
    path = bus.settings.base_path if bus is not None else "/ws"
    return str(server.make_url(path)).replace("http", "ws", 1)


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the runtime install has no pytest: no fixtures
    pass
else:

    @pytest_asyncio.fixture
    async def wsbus_idp() -> AsyncIterator[IdentityProvider]:
        """An identity provider on loopback: `setup(app, **wsbus_idp.settings)`, `issue(...)`."""
        idp = IdentityProvider(key=shared_key())
        await idp.start()
        try:
            yield idp
        finally:
            await idp.stop()

    @pytest_asyncio.fixture
    async def wsbus_client(wsbus_idp: IdentityProvider) -> AsyncIterator[ClientFactory]:
        """`await wsbus_client(aiohttp_client(app), user, channels=...)`: a connected Client."""
        factory = ClientFactory(wsbus_idp)
        try:
            yield factory
        finally:
            await factory.close()

    __all__ += ["wsbus_client", "wsbus_idp"]
