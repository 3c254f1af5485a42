"""Client requests over the socket: publish, rpc and history frames, each answered by its ref.

A request runs beside the frame loop (an RPC may take `rpc_timeout`), at most
MAX_REQUESTS_IN_FLIGHT per socket; answers come when ready, in any order. A
request never closes the socket: whatever goes wrong is answered with an
`error` frame carrying one of docs/protocol.md's codes, never a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from .authorizers import PatternTable
from .brokers.base import check_publish, subject_publisher
from .connection import Connection
from .errors import BrokerUnavailable, Forbidden, RequestError
from .grants import is_valid_channel, may
from .history import DEFAULT_HISTORY_LIMIT
from .hooks import ConnectionInfo
from .protocol import (
    MAX_REQUESTS_IN_FLIGHT,
    ClientPublish,
    HistoryRead,
    Request,
    RpcCall,
    encode,
    encode_data,
    text_frame,
)
from .tokens import Claims

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["MAX_METHOD_LENGTH", "PublishHook", "Requests", "RpcHandler"]

logger = logging.getLogger("aiohttp_wsbus")

MAX_METHOD_LENGTH: Final = 128
# `async def handler(info, data) -> data`: one RPC method.
RpcHandler = Callable[[ConnectionInfo, Any], Awaitable[Any]]
# `async def hook(claims, data, **parameters) -> data | None`: may refuse or rewrite a publish.
PublishHook = Callable[..., Awaitable[Any]]


class Requests:
    """One bus's RPC methods and publish hooks, and the serving of request frames."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.methods: dict[str, RpcHandler] = {}
        # The application's on_publish hooks: the most specific pattern decides, as for authorizers.
        self.publish_hooks: PatternTable[PublishHook] = PatternTable()
        self._in_flight: collections.Counter[str] = collections.Counter()  # by connection id
        self._is_frozen = False

    def add_method(self, name: str, handler: RpcHandler) -> None:
        self._check_open()
        if not isinstance(name, str) or not 0 < len(name) <= MAX_METHOD_LENGTH:
            raise ValueError(f"an RPC method name is 1 to {MAX_METHOD_LENGTH} characters")
        if name in self.methods:
            raise ValueError(f"RPC method {name!r} is already registered")
        self.methods[name] = handler

    def add_publish_hook(self, pattern: str, hook: PublishHook) -> None:
        self._check_open()
        self.publish_hooks.add(pattern, hook)

    def freeze(self) -> None:
        self._is_frozen = True

    def _check_open(self) -> None:
        if self._is_frozen:
            raise RuntimeError("RPC methods and publish hooks are registered before the app starts")

    def start(self, connection: Connection, request: Request) -> None:
        """Serve `request` in the background, or answer `limit` if too many are in flight."""
        if self._in_flight[connection.id] >= MAX_REQUESTS_IN_FLIGHT:
            reason = f"at most {MAX_REQUESTS_IN_FLIGHT} requests in flight"
            connection.send(error_frame(request.ref, RequestError("limit", reason)))
            return
        self._in_flight[connection.id] += 1
        self.bus.track(self._serve(connection, request))

    async def _serve(self, connection: Connection, request: Request) -> None:
        try:
            answer = await self._answer(connection, request)
        except RequestError as error:
            answer = text_frame(encode(error_frame(request.ref, error)))
        except Exception:
            logger.exception("%s request failed", type(request).__name__)
            answer = text_frame(encode(error_frame(request.ref, RequestError("internal"))))
        finally:
            self._in_flight[connection.id] -= 1
            if self._in_flight[connection.id] <= 0:
                del self._in_flight[connection.id]
        connection.enqueue(answer)

    async def _answer(self, connection: Connection, request: Request) -> bytes:
        if isinstance(request, ClientPublish):
            return text_frame(encode(await self._publish(connection, request)))
        if isinstance(request, RpcCall):
            return await self._call(connection, request)
        return text_frame(encode(await self._history(connection, request)))

    # -- publish -----------------------------------------------------------

    async def _publish(self, connection: Connection, request: ClientPublish) -> dict[str, Any]:
        if not self.bus.settings.client_publish:
            raise RequestError("disabled", "client publish is off (client_publish=False)")
        channel, message_id = request.channel, request.id
        try:
            check_publish(channel, message_id)
        except ValueError as error:
            raise RequestError("invalid", str(error)) from None
        if request.is_ephemeral and message_id is not None:
            raise RequestError("invalid", "an ephemeral message takes no id")
        claims = connection.claims
        if not may(claims.publish, channel):
            verdict = (await self.bus.authorize(claims, [channel], "publish"))[channel]
            if verdict != "allowed":
                raise RequestError(verdict)
        data = await self.rewrite(claims, channel, request.data)
        try:
            text = encode_data(data)
        except ValueError as error:
            raise RequestError("invalid", str(error)) from None
        if connection.is_closing:  # nobody to answer: a retry with its id is the client's
            raise RequestError("unavailable", "the socket is closing")
        try:
            if request.is_ephemeral:
                await self.bus.publish_ephemeral(channel, text)
                return {"type": "published", "ref": request.ref}
            published = await self.bus.publish_checked(
                channel, text, message_id, subject_publisher(claims.subject)
            )
        except BrokerUnavailable:
            raise RequestError("unavailable", "the broker is down") from None
        return {
            "type": "published",
            "ref": request.ref,
            "offset": published.offset,
            "epoch": published.epoch,
        }

    async def rewrite(self, claims: Claims, channel: str, data: Any) -> Any:
        """What the on_publish hook for `channel` makes of `data` (no hook: `data`).

        Every publish a token holder makes goes through it: publish frames and
        Bearer emits. Raises RequestError (forbidden, invalid, unavailable).
        """
        found = self.publish_hooks.find(channel)
        if found is None:
            return data
        hook, parameters = found
        try:
            async with asyncio.timeout(self.bus.settings.authorize_timeout):
                rewritten = await hook(claims, data, **parameters)
        except Forbidden:
            raise RequestError("forbidden", "refused by the application") from None
        except ValueError as error:  # the application's words for the client
            raise RequestError("invalid", str(error)) from None
        except Exception as error:
            self.bus.hook_errors["on_publish"] += 1
            if isinstance(error, TimeoutError):
                logger.warning("on_publish hook timed out for %s", channel)
            else:
                logger.error("on_publish hook failed for %s", channel, exc_info=error)
            raise RequestError("unavailable", "the application could not decide") from None
        return data if rewritten is None else rewritten

    # -- rpc ---------------------------------------------------------------

    async def _call(self, connection: Connection, request: RpcCall) -> bytes:
        handler = self.methods.get(request.method)
        if handler is None:
            raise RequestError("not_found", f"no RPC method {request.method[:128]!r}")
        try:
            async with asyncio.timeout(self.bus.settings.rpc_timeout):
                result = await handler(ConnectionInfo.of(connection), request.data)
        except TimeoutError:
            logger.warning("RPC method %r timed out", request.method)
            raise RequestError("timeout") from None
        except Forbidden:
            raise RequestError("forbidden", "refused by the application") from None
        except ValueError as error:  # the application's words for the client
            raise RequestError("invalid", str(error)) from None
        except Exception:
            self.bus.hook_errors["rpc"] += 1
            logger.exception("RPC method %r failed", request.method)
            raise RequestError("internal") from None
        try:
            data = encode_data(result)
        except ValueError:
            self.bus.hook_errors["rpc"] += 1
            logger.error("RPC method %r returned what JSON cannot carry", request.method)
            raise RequestError("internal") from None
        return text_frame(f'{{"type":"rpc_result","ref":{request.ref},"data":{data}}}'.encode())

    # -- history -----------------------------------------------------------

    async def _history(self, connection: Connection, request: HistoryRead) -> dict[str, Any]:
        channel = request.channel
        if not is_valid_channel(channel):
            raise RequestError("invalid", f"invalid channel name: {channel[:200]!r}")
        if not connection.may_subscribe(channel):
            verdict = await self.bus.subscriptions.may_read(connection.claims, channel)
            if verdict != "allowed":
                raise RequestError(verdict)
        limit = DEFAULT_HISTORY_LIMIT if request.limit is None else request.limit
        try:
            page = await self.bus.history(channel, limit=limit, before=request.before)
        except ValueError as error:
            raise RequestError("invalid", str(error)) from None
        except BrokerUnavailable:
            raise RequestError("unavailable", "the broker is down") from None
        return {"type": "history_result", "ref": request.ref, **page.as_json()}


def error_frame(ref: int, error: RequestError) -> dict[str, Any]:
    """The `error` frame answering request `ref`."""
    frame: dict[str, Any] = {"type": "error", "ref": ref, "error": error.error}
    if error.reason:
        frame["reason"] = error.reason
    return frame
