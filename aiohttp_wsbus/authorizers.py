"""Channel authorizers: the application decides channels that a token does not grant.

An authorizer is registered for a channel pattern such as `order:{order_id}`:
`{name}` matches one segment (channel-name characters other than `:` and `/`),
literal text matches itself, and the pattern matches the whole channel name.
The most specific pattern that matches a channel (the most literal characters;
registration order breaks ties) decides it; a channel no pattern matches goes
to the batch authorizer, if there is one, or is forbidden.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar

from .errors import InvalidSettings
from .grants import MAX_CHANNEL_LENGTH
from .tokens import Claims

__all__ = [
    "MAX_AUTHORIZERS",
    "Action",
    "Authorizers",
    "BatchAuthorizer",
    "ChannelPattern",
    "PatternTable",
    "Verdict",
]

logger = logging.getLogger("aiohttp_wsbus")

MAX_AUTHORIZERS: Final = 1000
Action = Literal["subscribe", "publish"]
# What became of one channel: allowed, forbidden, or unavailable (the
# authorizer failed or timed out: the client may try again later).
Verdict = Literal["allowed", "forbidden", "unavailable"]
Authorizer = Callable[..., Awaitable[bool]]
# Called once per request with the channels no pattern matched; returns the allowed ones.
BatchAuthorizer = Callable[[Claims, list[str]], Awaitable[Collection[str]]]

_LITERAL_RE: Final = re.compile(r"[A-Za-z0-9_\-.:@/=]+")
_PARAMETER_RE: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SEGMENT: Final = r"[A-Za-z0-9_\-.@=]+"
_Handler = TypeVar("_Handler")


@dataclass(frozen=True, slots=True)
class ChannelPattern:
    """A parsed authorizer pattern such as `order:{order_id}`."""

    text: str
    regex: re.Pattern[str]
    prefix: str  # the literal text before the first parameter: a cheap first filter
    literal_length: int

    @classmethod
    def parse(cls, text: str) -> ChannelPattern:
        """Parse `text`; raise InvalidSettings naming it if it is not a pattern."""
        if not isinstance(text, str) or not 0 < len(text) <= MAX_CHANNEL_LENGTH:
            raise InvalidSettings(f"authorizer pattern {text!r}: 1 to 200 characters")
        parts: list[str] = []
        names: set[str] = set()
        literal_length = 0
        position = 0
        previous_was_parameter = False
        for found in _PARAMETER_RE.finditer(text):
            literal = text[position : found.start()]
            if literal:
                parts.append(cls._literal(text, literal))
                literal_length += len(literal)
            elif previous_was_parameter:
                raise InvalidSettings(
                    f"authorizer pattern {text!r}: two parameters need literal text between them"
                )
            name = found.group(1)
            if name in names:
                raise InvalidSettings(f"authorizer pattern {text!r}: {{{name}}} appears twice")
            names.add(name)
            parts.append(f"(?P<{name}>{_SEGMENT})")
            position = found.end()
            previous_was_parameter = True
        if position < len(text):
            tail = text[position:]
            parts.append(cls._literal(text, tail))
            literal_length += len(tail)
        first = _PARAMETER_RE.search(text)
        prefix = text if first is None else text[: first.start()]
        return cls(text, re.compile("".join(parts)), prefix, literal_length)

    @staticmethod
    def _literal(pattern: str, literal: str) -> str:
        if _LITERAL_RE.fullmatch(literal) is None:
            raise InvalidSettings(
                f"authorizer pattern {pattern!r}: literal text may hold only channel-name "
                "characters (A-Z a-z 0-9 _ - . : @ / =), parameters are written {name}"
            )
        return re.escape(literal)

    def match(self, channel: str) -> dict[str, str] | None:
        """The parameters if the pattern matches the whole channel name, else None."""
        if not channel.startswith(self.prefix):
            return None
        found = self.regex.fullmatch(channel)
        return None if found is None else found.groupdict()


class PatternTable(Generic[_Handler]):
    """Handlers by channel pattern: the most specific pattern matching a channel picks its
    handler (the most literal characters; registration order breaks ties)."""

    def __init__(self) -> None:
        self._entries: list[tuple[ChannelPattern, _Handler]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, pattern: str, handler: _Handler) -> None:
        """Add `handler` for `pattern`; raise InvalidSettings naming a bad pattern."""
        self._entries.append((ChannelPattern.parse(pattern), handler))
        # Most literal characters first; sort is stable, so registration order breaks ties.
        self._entries.sort(key=lambda entry: -entry[0].literal_length)

    def find(self, channel: str) -> tuple[_Handler, dict[str, str]] | None:
        """The handler for `channel`, and the pattern's parameters; None if none matches."""
        for pattern, handler in self._entries:
            parameters = pattern.match(channel)
            if parameters is not None:
                return handler, parameters
        return None


class Authorizers:
    """The authorizers of one action, and how they decide a request's channels."""

    def __init__(self, action: Action, errors: collections.Counter[str]) -> None:
        self.action = action
        self.batch: BatchAuthorizer | None = None
        self._table: PatternTable[Authorizer] = PatternTable()
        self._errors = errors
        self._is_frozen = False

    def __bool__(self) -> bool:
        return bool(self._table) or self.batch is not None

    def add(self, pattern: str, authorizer: Authorizer) -> None:
        self._check_open()
        if len(self._table) >= MAX_AUTHORIZERS:
            raise InvalidSettings(f"authorizer pattern {pattern!r}: at most {MAX_AUTHORIZERS}")
        self._table.add(pattern, authorizer)

    def set_batch(self, authorizer: BatchAuthorizer) -> None:
        self._check_open()
        self.batch = authorizer

    def freeze(self) -> None:
        self._is_frozen = True

    def _check_open(self) -> None:
        if self._is_frozen:
            raise RuntimeError("authorizers are registered before the application starts")

    def find(self, channel: str) -> tuple[Authorizer, dict[str, str]] | None:
        """The most specific authorizer for `channel`, and the pattern's parameters."""
        return self._table.find(channel)

    async def decide(
        self, claims: Claims, channels: Iterable[str], timeout: float
    ) -> dict[str, Verdict]:
        """Ask the authorizers about `channels`, concurrently, within `timeout` seconds."""
        verdicts: dict[str, Verdict] = {}
        asks: list[Awaitable[None]] = []
        unmatched: list[str] = []

        async def ask(channel: str, authorizer: Authorizer, parameters: dict[str, str]) -> None:
            try:
                async with asyncio.timeout(timeout):
                    answer: Any = await authorizer(claims, **parameters)
                if not isinstance(answer, bool):
                    raise TypeError(f"an authorizer must return a bool, not {answer!r}")
            except Exception as error:
                self._failed(channel, error)
                verdicts[channel] = "unavailable"
                return
            verdicts[channel] = "allowed" if answer else "forbidden"

        for channel in channels:
            found = self.find(channel)
            if found is not None:
                asks.append(ask(channel, *found))
            elif self.batch is not None:
                unmatched.append(channel)
            else:
                verdicts[channel] = "forbidden"
        if unmatched:
            asks.append(self._ask_batch(claims, unmatched, timeout, verdicts))
        if len(asks) == 1:
            await asks[0]  # the common case: no task to make
        elif asks:
            await asyncio.gather(*asks)
        return verdicts

    async def _ask_batch(
        self, claims: Claims, channels: list[str], timeout: float, verdicts: dict[str, Verdict]
    ) -> None:
        assert self.batch is not None
        try:
            async with asyncio.timeout(timeout):
                allowed = set(await self.batch(claims, channels))
        except Exception as error:
            self._failed(", ".join(channels), error)
            verdicts.update(dict.fromkeys(channels, "unavailable"))
            return
        for channel in channels:
            verdicts[channel] = "allowed" if channel in allowed else "forbidden"

    def _failed(self, channels: str, error: Exception) -> None:
        hook = f"authorize_{self.action}"
        self._errors[hook] += 1
        if isinstance(error, TimeoutError):
            logger.warning("%s authorizer timed out for %s", self.action, channels)
        else:
            logger.error("%s authorizer failed for %s", self.action, channels, exc_info=error)
