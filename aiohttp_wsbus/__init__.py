"""aiohttp_wsbus: a real-time channel bus for aiohttp."""
