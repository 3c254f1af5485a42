"""The aiohttp-wsbus example: a chat whose rooms are granted by JWT claims,
private rooms that the app's own authorizer opens to their members, and each
room's live "online" list (the bus's presence).

Run it with `python -m example_app` (or README's `bash .ci/example`) and open
http://127.0.0.1:8080 in two browser windows.
"""

from .app import ExampleSettings, make_app

__all__ = ["ExampleSettings", "make_app"]
