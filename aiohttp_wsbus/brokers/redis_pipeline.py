"""Automatic pipelining of RedisBroker's script calls.

Script calls made while a round trip is in flight wait and leave together, in
one pipeline, on the next: a connect storm's position reads or a burst of
concurrent publishes cost a few round trips, not one each. Each call is sent
after it was made (a read never answers from before its caller's
subscription), calls keep their order (a pipeline keeps it on each node's
connection), and each caller gets its own answer. Scripts travel by SHA
(EVALSHA); their text only when Redis answers NOSCRIPT.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

__all__ = ["Autopipeline", "Script", "ScriptCall", "run_scripts"]


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1. `is_shared`: equal calls in one batch may run once
    and share the answer (a read; a publish never is)."""

    text: str
    is_shared: bool = False
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.text.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", digest)


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One run of a script: what EVALSHA takes."""

    script: Script
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


async def run_scripts(redis: Redis | RedisCluster, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run `calls` in one pipeline, in order; each one's answer, or the error it got.

    A call Redis answers NOSCRIPT (restarted, failed over, scripts flushed) did
    not run: it runs again after the others, with the text (EVAL, which leaves
    the script in that node's cache for the next EVALSHA).
    """
    answers = await _pipelined(redis, calls, lambda call: ("EVALSHA", call.script.sha))
    missing = [n for n, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
    if missing:
        again = await _pipelined(
            redis, [calls[n] for n in missing], lambda call: ("EVAL", call.script.text)
        )
        for n, answer in zip(missing, again, strict=True):
            answers[n] = answer
    return answers


async def _pipelined(
    redis: Redis | RedisCluster,
    calls: Sequence[ScriptCall],
    command: Callable[[ScriptCall], tuple[str, str]],
) -> list[Any]:
    pipe = redis.pipeline(transaction=False)
    for call in calls:
        pipe.execute_command(*command(call), len(call.keys), *call.keys, *call.args)
    return list(await pipe.execute(raise_on_error=False))


@dataclass(slots=True)
class _Waiting:
    calls: Sequence[ScriptCall]
    answers: asyncio.Future[list[Any]]


class Autopipeline:
    """Sends script calls made while a round trip is in flight together, on the next.

    `run` takes one batch of calls and answers each (run_scripts, within the
    broker's connection slots). One batch is in flight at a time.
    """

    def __init__(self, run: Callable[[Sequence[ScriptCall]], Awaitable[list[Any]]]) -> None:
        self._run = run
        self._waiting: list[_Waiting] = []
        self._sender: asyncio.Task[None] | None = None

    async def call(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Each call's answer (or the error Redis gave it), in order.

        Raises what `run` raised for the whole batch (UNREACHABLE: Redis could
        not be reached), or a redis ConnectionError if the pipeline stopped.
        """
        loop = asyncio.get_running_loop()
        waiting = _Waiting(calls, loop.create_future())
        self._waiting.append(waiting)
        if self._sender is None:
            # It starts on the next tick: every call made in this one goes with it.
            self._sender = loop.create_task(self._send())
        return await waiting.answers

    async def stop(self) -> None:
        """Cancel the batch in flight; its callers and those waiting get a ConnectionError."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)

    async def _send(self) -> None:
        batch: list[_Waiting] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._send_batch(batch)
        finally:
            self._sender = None
            for waiting in batch + self._waiting:
                _fail(waiting, RedisConnectionError("redis broker stopped"))
            self._waiting = []

    async def _send_batch(self, batch: list[_Waiting]) -> None:
        # Equal calls of a shared (read) script run once and share one answer.
        unique: dict[ScriptCall, int] = {}
        calls: list[ScriptCall] = []
        places: list[list[int]] = []
        for waiting in batch:
            place = []
            for call in waiting.calls:
                index = unique.get(call) if call.script.is_shared else None
                if index is None:
                    index = len(calls)
                    calls.append(call)
                    if call.script.is_shared:
                        unique[call] = index
                place.append(index)
            places.append(place)
        try:
            answers = await self._run(calls)
        except Exception as error:  # each caller raises it: none may hang
            for waiting in batch:
                _fail(waiting, error)
            return
        for waiting, place in zip(batch, places, strict=True):
            if not waiting.answers.done():  # its caller may have been cancelled
                waiting.answers.set_result([answers[n] for n in place])


def _fail(waiting: _Waiting, error: Exception) -> None:
    if not waiting.answers.done():
        waiting.answers.set_exception(error)
