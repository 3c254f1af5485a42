"""The Python client's requests: publish, rpc and history frames, each answered by ref.

As in the JS client: a request made while disconnected waits for the next
welcome (within its timeout); at most MAX_IN_FLIGHT wait for their answer; a
socket lost with requests unanswered resends those that are safe to repeat
(a publish with an idempotency `id`, a history read) after the next welcome
and fails the others with `disconnected`, since the server may have run them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["MAX_IN_FLIGHT", "RequestError", "Requests"]

MAX_IN_FLIGHT: Final = 16  # the server's cap per socket (a 17th is answered `limit`)
ANSWERS: Final = frozenset({"published", "rpc_result", "history_result", "error"})

Send = Callable[[dict[str, Any]], Awaitable[None]]


class RequestError(Exception):
    """A request failed: `code` is the server's (forbidden, invalid, limit, disabled,
    unavailable, not_found, timeout, internal) or the client's (timeout,
    disconnected, closed)."""

    def __init__(self, code: str, reason: str = "") -> None:
        super().__init__(f"{code}: {reason}" if reason else code)
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class _Pending:
    frame: dict[str, Any]
    answer: asyncio.Future[dict[str, Any]]
    is_repeatable: bool
    is_sent: bool = False


class Requests:
    """One client's requests in flight, matched to their answers by ref."""

    def __init__(self) -> None:
        self._refs = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._send: Send | None = None  # set while a welcomed socket is up
        self._connected = asyncio.Event()
        self._is_closed = False

    async def request(
        self, frame: dict[str, Any], *, timeout: float, is_repeatable: bool
    ) -> dict[str, Any]:
        """Send `frame` with a new ref once connected; its answer (RequestError if it failed)."""
        if self._is_closed:
            raise RequestError("closed")
        try:
            async with asyncio.timeout(timeout), self._slots:
                ref = next(self._refs)
                answer = asyncio.get_running_loop().create_future()
                pending = _Pending({**frame, "ref": ref}, answer, is_repeatable)
                self._pending[ref] = pending
                try:
                    await self._connected.wait()
                    if not pending.is_sent and self._send is not None:
                        pending.is_sent = True
                        await self._send(pending.frame)
                    answered: dict[str, Any] = await answer
                    return answered
                finally:
                    self._pending.pop(ref, None)
        except TimeoutError:
            raise RequestError("timeout", f"no answer within {timeout} s") from None

    def answer(self, frame: dict[str, Any]) -> None:
        """Settle the request an answer frame names (an unknown ref is ignored)."""
        ref = frame.get("ref")
        pending = self._pending.get(ref) if isinstance(ref, int) else None
        if pending is None or pending.answer.done():
            return
        if frame.get("type") == "error":
            error = RequestError(str(frame.get("error")), str(frame.get("reason") or ""))
            pending.answer.set_exception(error)
        else:
            pending.answer.set_result(frame)

    async def welcomed(self, send: Send) -> None:
        """A socket is up: resend what may be repeated, let waiting requests go."""
        self._send = send
        for pending in list(self._pending.values()):
            if pending.is_sent and not pending.answer.done():
                await send(pending.frame)
        self._connected.set()

    def disconnected(self) -> None:
        """The socket is gone: requests it may have run fail, the others wait."""
        self._send = None
        self._connected.clear()
        for pending in self._pending.values():
            if pending.is_sent and not pending.is_repeatable and not pending.answer.done():
                pending.answer.set_exception(RequestError("disconnected"))

    def close(self) -> None:
        """Stopped for good: every request fails."""
        self._is_closed = True
        self.disconnected()
        for pending in self._pending.values():
            if not pending.answer.done():
                pending.answer.set_exception(RequestError("closed"))
        self._connected.set()  # wake the waiters: their answers are settled
