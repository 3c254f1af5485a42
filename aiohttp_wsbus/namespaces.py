"""Options per kind of channel ("namespaces"): setup(channels={"typing:*": {...}}).

Each key is a grant pattern; a channel takes the options of the most specific
pattern covering it (grants.PatternTable), and the global settings for any
option that pattern leaves out or when no pattern covers it. The servers and
the Redis publishers load the same mapping through the same schema.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, validate
from marshmallow import fields as mf

from .brokers.base import MAX_HISTORY_SIZE, HistoryOptions
from .grants import PatternTable, is_valid_pattern

__all__ = ["ChannelOptions", "ChannelOptionsSchema", "ChannelsField", "Namespaces", "load_channels"]


class ChannelOptionsSchema(Schema):
    """The options one pattern may set.

    Adding one is a line here and a field (with its default) in ChannelOptions.
    """

    class Meta:
        unknown = RAISE

    history_size = mf.Integer(
        strict=True, validate=validate.Range(min=0, max=MAX_HISTORY_SIZE)
    )
    history_ttl = mf.Float(
        allow_nan=False,
        validate=validate.Range(min=0, min_inclusive=False, error="must be greater than 0"),
    )
    recovery = mf.Boolean(truthy={True}, falsy={False})


_SCHEMA = ChannelOptionsSchema()


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """What one channel gets: its history, and whether clients may recover it.

    Every field but `history` is an option of ChannelOptionsSchema by the same name.
    """

    history: HistoryOptions
    recovery: bool = True

    @property
    def is_recoverable(self) -> bool:
        """Recovery is on and there is history to recover from."""
        return self.recovery and self.history.size > 0


def load_channels(given: object) -> dict[str, dict[str, Any]]:
    """Validate setup()'s `channels`; ValidationError messages name the pattern and field."""
    if not isinstance(given, Mapping):
        raise ValidationError("give a mapping of grant patterns to options")
    loaded: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for pattern, options in given.items():
        if not is_valid_pattern(pattern):
            problems.append(f"{pattern!r} is not a grant pattern (name, prefix:* or *)")
            continue
        if not isinstance(options, Mapping):
            problems.append(f"{pattern!r}: give a mapping of options")
            continue
        try:
            loaded[pattern] = _SCHEMA.load(options)
        except ValidationError as error:
            for field, messages in sorted(error.messages_dict.items()):
                text = "; ".join(messages) if isinstance(messages, list) else str(messages)
                problems.append(f"{pattern!r}: {field}: {text}")
    if problems:
        raise ValidationError(problems)
    return loaded


class ChannelsField(mf.Field):  # type: ignore[type-arg]
    """The marshmallow field of setup()'s `channels` (see load_channels)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        return load_channels(value)


class Namespaces:
    """The ChannelOptions of every channel, from the patterns and the global settings."""

    def __init__(
        self,
        channels: Mapping[str, Mapping[str, Any]] | None,
        history: HistoryOptions,
        *,
        recovery: bool = True,
    ) -> None:
        default = ChannelOptions(history, recovery)
        self.patterns = {p: _options(o, default) for p, o in (channels or {}).items()}
        self.default = default
        self._table = PatternTable(self.patterns, default)

    def of(self, channel: str) -> ChannelOptions:
        return self._table.find(channel)

    def history_of(self, channel: str) -> HistoryOptions:
        return self._table.find(channel).history

    def writers_view(self) -> dict[str, Any]:
        """What every process that writes a channel's history must agree on, as JSON."""
        return {
            "history": _history_json(self.default.history),
            "channels": {p: _history_json(o.history) for p, o in sorted(self.patterns.items())},
        }


def _options(given: Mapping[str, Any], default: ChannelOptions) -> ChannelOptions:
    # The history options make one value; every other option is a ChannelOptions field.
    history = HistoryOptions(
        given.get("history_size", default.history.size),
        given.get("history_ttl", default.history.ttl),
    )
    rest = {name: value for name, value in given.items() if not name.startswith("history_")}
    return dataclasses.replace(default, history=history, **rest)


def _history_json(history: HistoryOptions) -> list[float]:
    return [history.size, float(history.ttl)]
