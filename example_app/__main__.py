"""`python -m example_app`: serve the example chat (see --help)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from aiohttp import web

from .app import ExampleSettings, local_url, make_app
from .identity import check_user_name

API_KEY_VARIABLE = "WSBUS_EXAMPLE_API_KEY"


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1 to 65535)")
    return int(value)


def _staff(value: str) -> tuple[str, ...]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    for name in names:
        try:
            check_user_name(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{name!r}: {error}") from None
    return tuple(names)


def _lifetime(value: str) -> int:
    if not value.isdigit() or int(value) < 10:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds (10 or more)")
    return int(value)


def parse_arguments(argv: list[str] | None = None) -> ExampleSettings:
    parser = argparse.ArgumentParser(
        prog="python -m example_app",
        description=(
            "The aiohttp-wsbus example chat: rooms granted by JWT claims, and private "
            "rooms the app's authorizer opens to their members."
        ),
        epilog=(
            "Run it from the repository root: example_app is a folder of the clone, "
            "not part of the installed package. `bash .ci/example` does that for you "
            "(and installs what is missing first)."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8080, help="port to listen on (8080)")
    parser.add_argument(
        "--staff",
        type=_staff,
        default=("alice", "carol"),
        help="users whose tokens grant chat:staff (alice,carol)",
    )
    parser.add_argument(
        "--token-lifetime",
        type=_lifetime,
        default=120,
        help="seconds a token lives; short, so refreshes show (120)",
    )
    arguments = parser.parse_args(argv)
    settings = ExampleSettings(
        host=arguments.host,
        port=arguments.port,
        staff=arguments.staff,
        token_lifetime=arguments.token_lifetime,
    )
    api_key = os.environ.get(API_KEY_VARIABLE)
    if api_key is not None:
        if len(api_key) < 16:
            parser.error(f"{API_KEY_VARIABLE} must be at least 16 characters")
        settings = dataclasses.replace(settings, api_key=api_key)
    return settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_arguments(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    url = local_url(settings.host, settings.port)
    if API_KEY_VARIABLE in os.environ:
        key_note = f"the /ws/emit API key comes from {API_KEY_VARIABLE}"
    else:
        key_note = (
            f"the /ws/emit API key is generated at start; set {API_KEY_VARIABLE} to choose it"
        )
    banner = (
        f"aiohttp-wsbus example chat on {url}  (Ctrl+C to stop)\n"
        f"  staff, who may join chat:staff: {', '.join(settings.staff) or 'nobody'}\n"
        f"  tokens live {settings.token_lifetime} s; the bus checks them against "
        f"{url}/.well-known/jwks.json\n"
        f"  a back end emits: curl -X POST {url}/api/notify "
        "-H 'Content-Type: application/json' -d '{\"text\": \"Deploy finished\"}'\n"
        f"  ({key_note})"
    )
    try:
        web.run_app(
            make_app(settings),
            host=settings.host,
            port=settings.port,
            access_log=None,
            print=lambda _: print(banner, flush=True),
        )
    except OSError as error:
        print(
            f"example_app: cannot listen on {settings.host}:{settings.port}: {error}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
