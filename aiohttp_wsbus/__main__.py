"""`python -m aiohttp_wsbus`: the standalone server (see aiohttp_wsbus.cli)."""

from .cli import main

raise SystemExit(main(prog="python -m aiohttp_wsbus"))
