"""The wire protocol: client frame parsing, server frame encoding, close codes.

docs/protocol.md is the contract; this module is its one implementation.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .errors import InvalidRequest

__all__ = [
    "ANOTHER_USER",
    "BEARER_PREFIX",
    "BROKER_UNAVAILABLE",
    "CLIENT_GONE",
    "CONNECTION_LIMIT",
    "INTERNAL_ERROR",
    "KEYS_UNAVAILABLE",
    "MAX_REF",
    "MAX_REQUESTS_IN_FLIGHT",
    "NO_CONNECT_FRAME",
    "PROTOCOL",
    "RATE_LIMITED",
    "REFUSED",
    "SHUTTING_DOWN",
    "SLOW_CONSUMER",
    "TOKEN_EXPIRED",
    "TOKEN_REVOKED",
    "USER_CONNECTION_LIMIT",
    "BadFrame",
    "ClientFrame",
    "ClientPublish",
    "Close",
    "CloseCode",
    "Connect",
    "HistoryRead",
    "Ping",
    "Position",
    "Refresh",
    "Request",
    "RpcCall",
    "Subscribe",
    "Unsubscribe",
    "bad_request",
    "bearer_token",
    "encode",
    "encode_data",
    "encode_ephemeral",
    "encode_message",
    "ended",
    "parse_client_frame",
    "query_connect",
    "reconnect",
    "text_frame",
    "unauthorized",
]

MAX_EPOCH_LENGTH: Final = 64
MAX_OFFSET: Final = 2**63 - 1  # Redis stream ids and counters are 64-bit
# Epochs are printable ASCII; anything else names no history (recovered: false).
_EPOCH_RE: Final = re.compile(rf"[\x21-\x7e]{{0,{MAX_EPOCH_LENGTH}}}")
MAX_REF: Final = 2**53  # the largest integer every JSON reader (JavaScript's too) keeps exact
MAX_REQUESTS_IN_FLIGHT: Final = 16  # publish, rpc and history frames a socket may have unanswered
# The handshake's Sec-WebSocket-Protocol: a client offers PROTOCOL, and may offer its
# token as one more entry, BEARER_PREFIX + the JWT (base64url and dots: a header
# token as it is). The server echoes PROTOCOL only, never the token's entry.
PROTOCOL: Final = "wsbus.v1"
BEARER_PREFIX: Final = "wsbus.bearer."


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server sends, and what each asks of the client."""

    NORMAL = 1000  # stop
    GOING_AWAY = 1001  # server shutting down: reconnect with backoff
    PROTOCOL_ERROR = 1002  # aiohttp: a frame that breaks RFC 6455: stop
    INVALID_PAYLOAD = 1007  # aiohttp: a text frame that is not UTF-8: stop
    MESSAGE_TOO_BIG = 1009  # stop
    INTERNAL_ERROR = 1011  # reconnect with backoff
    TRY_AGAIN_LATER = 1013  # reconnect with backoff
    TOKEN_EXPIRED = 4001  # fetch a fresh token, reconnect at once
    RECONNECT = 4012  # the application changed permissions: fresh token, reconnect at once
    SLOW_CONSUMER = 4002  # reconnect
    BAD_REQUEST = 4400  # stop
    UNAUTHORIZED = 4401  # fetch a fresh token, retry once, then stop
    FORBIDDEN = 4403  # stop
    TOO_MANY_CONNECTIONS = 4408  # the user holds max_connections_per_user sockets: stop
    SESSION_ENDED = 4410  # the application ended this session (logout, ban, revoke): stop
    TOO_MANY_REQUESTS = 4429  # over client_rate or subscribe_rate: reconnect after 5 s or more


@dataclass(frozen=True, slots=True)
class Close:
    """Why the server closes a socket: the code, and a short reason sent with it."""

    code: CloseCode
    reason: str

    def __post_init__(self) -> None:
        # RFC 6455 leaves 123 bytes for the reason in a close frame.
        if len(self.reason.encode()) > 123:
            raise ValueError("a close reason is at most 123 bytes of UTF-8")


# Every close the server sends, with its reason; docs/protocol.md's table.
CLIENT_GONE: Final = Close(CloseCode.NORMAL, "closed")
SHUTTING_DOWN: Final = Close(CloseCode.GOING_AWAY, "server shutting down")
INTERNAL_ERROR: Final = Close(CloseCode.INTERNAL_ERROR, "internal error")
CONNECTION_LIMIT: Final = Close(CloseCode.TRY_AGAIN_LATER, "connection limit")
BROKER_UNAVAILABLE: Final = Close(CloseCode.TRY_AGAIN_LATER, "broker unavailable")
KEYS_UNAVAILABLE: Final = Close(CloseCode.TRY_AGAIN_LATER, "keys unavailable")
TOKEN_EXPIRED: Final = Close(CloseCode.TOKEN_EXPIRED, "token expired")
SLOW_CONSUMER: Final = Close(CloseCode.SLOW_CONSUMER, "slow consumer")
NO_CONNECT_FRAME: Final = Close(CloseCode.UNAUTHORIZED, "no connect frame")
ANOTHER_USER: Final = Close(CloseCode.FORBIDDEN, "refresh token is for another user")
REFUSED: Final = Close(CloseCode.FORBIDDEN, "refused by the application")
USER_CONNECTION_LIMIT: Final = Close(CloseCode.TOO_MANY_CONNECTIONS, "too many connections")
RATE_LIMITED: Final = Close(CloseCode.TOO_MANY_REQUESTS, "too many requests")


TOKEN_REVOKED: Final = Close(CloseCode.SESSION_ENDED, "token revoked")


def ended(reason: str) -> Close:
    """4410: the application ended the session (its reason, or a default one)."""
    return Close(CloseCode.SESSION_ENDED, reason or "session ended")


def reconnect(reason: str) -> Close:
    """4012: reconnect at once with a fresh token (permissions changed)."""
    return Close(CloseCode.RECONNECT, reason or "reconnect with a fresh token")


def unauthorized(reason: str) -> Close:
    """4401 for a token refused for `reason` (a word such as expired, never the token)."""
    return Close(CloseCode.UNAUTHORIZED, f"token {reason}")


def bad_request(error: BadFrame) -> Close:
    """4400 for a malformed or unexpected frame."""
    return Close(CloseCode.BAD_REQUEST, str(error))


class BadFrame(Exception):
    """A client frame that is malformed or unexpected (close code 4400)."""


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a channel's stream: the last offset seen, in the history named by epoch."""

    offset: int
    epoch: str

    def as_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "epoch": self.epoch}


@dataclass(frozen=True, slots=True)
class Connect:
    token: str | None
    channels: list[str]
    since: dict[str, Position]
    rewind: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Subscribe:
    channels: list[str]
    since: dict[str, Position]
    rewind: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channels: list[str]


@dataclass(frozen=True, slots=True)
class Refresh:
    token: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class ClientPublish:
    """A client publishes `data` to `channel` (only with `client_publish`)."""

    ref: int
    channel: str
    data: Any
    id: str | None
    is_ephemeral: bool


@dataclass(frozen=True, slots=True)
class RpcCall:
    """A client calls the application's `bus.rpc` handler named `method`."""

    ref: int
    method: str
    data: Any


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """A client reads the last `limit` messages of `channel` before offset `before`."""

    ref: int
    channel: str
    limit: int | None
    before: int | None


Request = ClientPublish | RpcCall | HistoryRead
ClientFrame = Connect | Subscribe | Unsubscribe | Refresh | Ping | Request


def _token(frame: Mapping[str, Any]) -> str:
    # Empty, over-long or garbled tokens are the verifier's to refuse (4401):
    # only a token that is not a string at all is a malformed frame.
    token = frame.get("token")
    if not isinstance(token, str):
        raise BadFrame("token must be a string")
    return token


def _channels(frame: Mapping[str, Any], *, required: bool) -> list[str]:
    channels = frame.get("channels")
    if channels is None and not required:
        return []
    # Names are checked against the naming rules later, per channel ("invalid"),
    # but the shape must be right: a list of strings.
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise BadFrame("channels must be a list of strings")
    return list(dict.fromkeys(channels))  # drop repeats, keep order


def _since(frame: Mapping[str, Any]) -> dict[str, Position]:
    since = frame.get("since")
    if since is None:
        return {}
    if not isinstance(since, dict):
        raise BadFrame("since must be an object")
    positions: dict[str, Position] = {}
    for channel, position in since.items():
        if not isinstance(position, dict):
            raise BadFrame("since entries must be objects")
        offset, epoch = position.get("offset"), position.get("epoch")
        if (
            not isinstance(offset, int)
            or isinstance(offset, bool)
            or not 0 <= offset <= MAX_OFFSET
            or not isinstance(epoch, str)
            or len(epoch) > MAX_EPOCH_LENGTH
        ):
            raise BadFrame("since entries need an integer offset >= 0 and a string epoch")
        positions[channel] = Position(offset, epoch if _EPOCH_RE.fullmatch(epoch) else "")
    return positions


def _rewind(frame: Mapping[str, Any]) -> dict[str, int]:
    rewind = frame.get("rewind")
    if rewind is None:
        return {}
    if not isinstance(rewind, dict) or not all(
        _is_integer(count, MAX_OFFSET) for count in rewind.values()
    ):
        raise BadFrame("rewind must map channels to integers >= 0")
    return rewind


def _is_integer(value: object, maximum: int, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum


def _ref(frame: Mapping[str, Any]) -> int:
    ref = frame.get("ref")
    if not _is_integer(ref, MAX_REF):
        raise BadFrame("ref must be an integer from 0 to 2^53")
    assert isinstance(ref, int)
    return ref


def _field(frame: Mapping[str, Any], ref: int, name: str, kind: type) -> Any:
    """Field `name` if it is a `kind` (None when absent or null), else InvalidRequest."""
    value = frame.get(name)
    if value is None:
        return None
    # JSON's true and false are not integers here, whatever Python says.
    is_kind = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not is_kind:
        raise InvalidRequest(ref, f"{name} must be {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES: Final = {str: "a string", int: "an integer", bool: "true or false"}


def _request(kind: str, frame: Mapping[str, Any]) -> Request:
    ref = _ref(frame)
    if kind == "publish":
        if "data" not in frame:
            raise InvalidRequest(ref, "data is required")
        return ClientPublish(
            ref,
            _field(frame, ref, "channel", str) or "",
            frame["data"],
            _field(frame, ref, "id", str),
            _field(frame, ref, "ephemeral", bool) or False,
        )
    if kind == "rpc":
        return RpcCall(ref, _field(frame, ref, "method", str) or "", frame.get("data"))
    return HistoryRead(
        ref,
        _field(frame, ref, "channel", str) or "",
        _field(frame, ref, "limit", int),
        _field(frame, ref, "before", int),
    )


def bearer_token(offered: str | None) -> str | None:
    """The token a handshake's Sec-WebSocket-Protocol carries, None if it carries none.

    Raises BadFrame when the header offers a token but not PROTOCOL (the
    server could echo nothing the client asked for) or offers two tokens.
    """
    if offered is None or BEARER_PREFIX not in offered:
        return None  # the common frame-path handshake, without splitting anything
    entries = [entry.strip() for entry in offered.split(",")]
    tokens = [entry[len(BEARER_PREFIX) :] for entry in entries if entry.startswith(BEARER_PREFIX)]
    if not tokens:
        return None
    if PROTOCOL not in entries:
        raise BadFrame(f"a token in Sec-WebSocket-Protocol needs {PROTOCOL} offered too")
    if len(tokens) > 1:
        raise BadFrame("Sec-WebSocket-Protocol offers more than one token")
    return tokens[0]


def query_connect(token: str, query: Mapping[str, str]) -> Connect:
    """A connect made of a token from the handshake and the URL query's `channels`
    (comma-separated), `since` and `rewind` (JSON, as in the connect frame)."""
    frame: dict[str, Any] = {"channels": [c for c in query.get("channels", "").split(",") if c]}
    for name in ("since", "rewind"):
        if name in query:
            try:
                frame[name] = json.loads(query[name])
            except (ValueError, RecursionError):
                raise BadFrame(f"{name} is not JSON, or nested too deeply") from None
    return Connect(token, _channels(frame, required=False), _since(frame), _rewind(frame))


def parse_client_frame(text: str | bytes) -> ClientFrame:
    """Parse one client text frame; raise BadFrame if it is not a valid frame."""
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        raise BadFrame("frame is not JSON, or nested too deeply") from None
    if not isinstance(frame, dict):
        raise BadFrame("frame must be a JSON object")
    kind = frame.get("type")
    if kind == "connect":
        token = frame.get("token")
        return Connect(
            None if token is None else _token(frame),
            _channels(frame, required=False),
            _since(frame),
            _rewind(frame),
        )
    if kind == "subscribe":
        return Subscribe(_channels(frame, required=True), _since(frame), _rewind(frame))
    if kind == "unsubscribe":
        return Unsubscribe(_channels(frame, required=True))
    if kind == "refresh":
        return Refresh(_token(frame))
    if kind == "ping":
        return Ping()
    if kind in ("publish", "rpc", "history"):
        return _request(kind, frame)
    raise BadFrame("unknown frame type")


# Made once: json.dumps(frame, separators=...) makes one per call (a third of
# encoding a pong; the same encoder, so the same bytes).
_FRAME_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))


def encode(frame: Mapping[str, Any]) -> bytes:
    """Encode a server control frame as compact JSON.

    ASCII escapes keep it valid UTF-8 even when it echoes a client's bad
    string back (a channel name holding a lone surrogate, denied as invalid).
    """
    return _FRAME_ENCODER.encode(frame).encode()


# Made once: json.dumps(data, separators=...) makes an encoder per call, which
# cost more than the encoding itself of a typical message.
_DATA_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_data(data: Any) -> str:
    """Encode a message's data as JSON once, for every subscriber and the history.

    Raises ValueError for anything a client could not decode: values JSON
    cannot hold (NaN, Infinity, objects) and strings that are not valid
    Unicode (a lone surrogate), so a refused message never takes an offset.
    """
    try:
        text = _DATA_ENCODER.encode(data)
        text.encode()
    except (TypeError, ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise ValueError(f"data is not JSON-serialisable: {reason}") from None
    return text


def encode_message(
    channel: str, offset: int, epoch: str, data: str, *, recovered: bool = False
) -> bytes:
    """Encode a message frame around `data`, JSON the publisher encoded once."""
    # Channel names and epochs hold no characters JSON would escape, so plain
    # quoting is exact; this runs once per published message, not per socket.
    tail = ',"recovered":true}' if recovered else "}"
    return (
        f'{{"type":"message","channel":"{channel}","offset":{offset},'
        f'"epoch":"{epoch}","data":{data}{tail}'
    ).encode()


def encode_ephemeral(channel: str, data: str) -> bytes:
    """Encode an ephemeral message frame: no offset, no epoch, never replayed."""
    return f'{{"type":"message","channel":"{channel}","ephemeral":true,"data":{data}}}'.encode()


_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")
_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """Build one unmasked, uncompressed WebSocket text frame (server to client)."""
    length = len(payload)
    if length < 126:
        header = _SHORT.pack(_FIN_TEXT, length)
    elif length < 65536:
        header = _MEDIUM.pack(_FIN_TEXT, 126, length)
    else:
        header = _LONG.pack(_FIN_TEXT, 127, length)
    return header + payload
