"""One bus server process on a RedisBroker, for the multi-node tests.

    python -m tests.redis_node REDIS_URL PREFIX JWT_SECRET [SETTINGS_JSON]

Listens on a free loopback port, prints it on one line, and serves until its
stdin closes. Emit accepts the API key API_KEY. SETTINGS_JSON adds setup() settings.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiohttp import web

import aiohttp_wsbus

API_KEY = "node-key-for-tests-only"
ISSUER = "https://idp.test/"
AUDIENCE = "wsbus"


async def serve(redis_url: str, prefix: str, secret: str, settings: dict[str, Any]) -> None:
    app = web.Application()
    aiohttp_wsbus.setup(
        app,
        jwt_secret=secret,
        issuer=ISSUER,
        audience=AUDIENCE,
        api_keys=[API_KEY],
        broker=aiohttp_wsbus.RedisBroker(redis_url, prefix=prefix),
        **settings,
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    try:
        await asyncio.to_thread(sys.stdin.read)  # until the test closes our stdin
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    redis_url, prefix, secret = sys.argv[1:4]
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    asyncio.run(serve(redis_url, prefix, secret, extra))
