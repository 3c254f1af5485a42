"""The Bus: publish, deliver to the registry, the glue to the broker, and the
application's hooks and authorizers it calls."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import aiohttp

from .authorizers import Action, Authorizers, BatchAuthorizer, Verdict
from .brokers.base import (
    APPLICATION,
    Broker,
    HistoryOptions,
    Message,
    Publication,
    Published,
    check_publish,
    scoped_message_id,
)
from .brokers.presence import Member
from .connection import Connection, ConnectionHub, Expiries, WriteScheduler, message_frame
from .errors import BrokerUnavailable, InvalidToken
from .history import HistoryPage, read_history, read_positions
from .hooks import ConnectionInfo, Hooks
from .namespaces import Namespaces
from .presence import Presence
from .protocol import (
    CLIENT_GONE,
    SHUTTING_DOWN,
    SLOW_CONSUMER,
    Close,
    Position,
    encode_data,
    encode_ephemeral,
    text_frame,
)
from .registry import Connections, Registry
from .requests import Requests
from .revocations import Revocation
from .sessions import Sessions
from .settings import Settings
from .subscriptions import SubscribeResult, Subscriptions
from .tokens import Claims, TokenVerifier

__all__ = ["Bus", "SubscribeResult"]

logger = logging.getLogger("aiohttp_wsbus")

_Decorated = TypeVar("_Decorated", bound=Callable[..., Any])


class Bus:
    """Publishes messages and delivers them to the sockets whose grants cover the channel."""

    def __init__(self, settings: Settings, broker: Broker, verifier: TokenVerifier) -> None:
        self.settings = settings
        self.broker = broker
        self.verifier = verifier
        self.registry = Registry()
        history = HistoryOptions(settings.history_size, settings.history_ttl)
        self.namespaces = Namespaces(settings.channels, history)  # each channel's options
        self.connections = Connections()  # every authenticated socket, by user
        self.open_sockets = 0  # upgraded sockets, authenticated or not
        # Plain counters, read by the metrics collector at scrape time.
        self.messages_published = 0
        self.messages_delivered = 0  # one per subscriber a message was handed to
        self.slow_consumer_closes = 0
        self.auth_failures: collections.Counter[str] = collections.Counter()
        self.hook_errors: collections.Counter[str] = collections.Counter()
        self.rate_limited: collections.Counter[str] = collections.Counter()  # by limit
        self.sessions = Sessions(self)
        self.subscriptions = Subscriptions(self)
        self.presence_keeper = Presence(self)
        self.requests = Requests(self)  # RPC methods, publish hooks, request frames
        self.hooks = Hooks(self, self.hook_errors)
        self.on_connect = self.hooks.on_connect
        self.on_disconnect = self.hooks.on_disconnect
        self.on_subscribe = self.hooks.on_subscribe
        self.on_unsubscribe = self.hooks.on_unsubscribe
        self.authorizers: dict[Action, Authorizers] = {
            "subscribe": Authorizers("subscribe", self.hook_errors),
            "publish": Authorizers("publish", self.hook_errors),
        }
        self._hub: ConnectionHub | None = None  # what every connection shares; made at start
        self._background_tasks: set[asyncio.Task[None]] = set()

    # -- lifetime --------------------------------------------------------

    def authorizer(
        self, pattern: str, *, action: Action = "subscribe"
    ) -> Callable[[_Decorated], _Decorated]:
        """Register `async def f(claims, **parameters) -> bool` for channels matching `pattern`.

        It decides the channels matching `pattern` that the token's grants do not
        cover (`{name}` is one segment, passed as a keyword argument). Raises
        InvalidSettings for a bad pattern, RuntimeError once the app has started.
        """

        def register(authorizer: _Decorated) -> _Decorated:
            self.authorizers[action].add(pattern, authorizer)
            return authorizer

        if action not in self.authorizers:
            raise ValueError(f"action must be 'subscribe' or 'publish', not {action!r}")
        return register

    def batch_authorizer(
        self, authorizer: BatchAuthorizer, *, action: Action = "subscribe"
    ) -> None:
        """Decide, in one call per request, the channels no pattern authorizer matches.

        `await authorizer(claims, channels)` returns the allowed ones (the
        standalone server's `--authorize-url` is one).
        """
        self.authorizers[action].set_batch(authorizer)

    async def authorize(
        self, claims: Claims, channels: Collection[str], action: Action
    ) -> dict[str, Verdict]:
        """What the application's authorizers say about channels the token does not grant."""
        return await self.authorizers[action].decide(
            claims, channels, self.settings.authorize_timeout
        )

    def rpc(self, name: str) -> Callable[[_Decorated], _Decorated]:
        """Register `async def f(info: ConnectionInfo, data) -> data` as the RPC method `name`.

        ValueError answers the client `invalid` (with its message), Forbidden
        `forbidden`, over `rpc_timeout` `timeout`, anything else `internal` (logged).
        """
        return functools.partial(_registered, self.requests.add_method, name)

    def on_publish(self, pattern: str) -> Callable[[_Decorated], _Decorated]:
        """Register `async def f(claims, data, **parameters) -> data | None` for what token
        holders publish (frames, Bearer emits) to channels matching `pattern`.

        After the grant check it returns the data to publish (None: unchanged), e.g.
        stamped with the verified subject; Forbidden or ValueError refuses it.
        """
        return functools.partial(_registered, self.requests.add_publish_hook, pattern)

    async def start(self, session: aiohttp.ClientSession | None) -> None:
        self.hooks.freeze()
        self.requests.freeze()
        for authorizers in self.authorizers.values():
            authorizers.freeze()
        loop = asyncio.get_running_loop()
        self._hub = ConnectionHub(
            scheduler=WriteScheduler(loop),
            expiries=Expiries(loop),
            send_buffer_limit=self.settings.send_buffer_limit,
            on_close=self._forget,
            closer=self._start_closing,
        )
        await self.verifier.start(session)
        await self.broker.start(
            self.deliver,
            self.namespaces.default.history,
            on_control=self.sessions.apply,
            on_presence=self.presence_keeper.on_event if self.presence_keeper else None,
            presence=self.presence_keeper.options,
            on_ephemeral=self.deliver_ephemeral,
        )
        await self.broker.share_options(self.namespaces.writers_view())

    async def stop(self) -> None:
        await self.close_all(SHUTTING_DOWN)
        await self.broker.stop()
        await self.verifier.stop()

    async def close_all(self, close: Close) -> None:
        """Close every socket, concurrently, each under close_timeout.

        Background work (closes, broker unsubscribes, on_disconnect hooks) gets
        close_timeout to finish; what is left then is cancelled.
        """
        for connection in list(self.connections):
            connection.close(close)
        if self._background_tasks:
            _, left = await asyncio.wait(
                set(self._background_tasks), timeout=self.settings.close_timeout + 0.5
            )
            for task in left:
                task.cancel()
            if left:
                await asyncio.wait(left)

    # -- publishing ------------------------------------------------------

    async def publish(
        self, channel: str, data: Any, *, id: str | None = None, ephemeral: bool = False
    ) -> Published:
        """Publish `data` (any JSON value) to `channel`; return where it landed.

        `id` makes the publish idempotent among the application's own
        publishes (this method and the Redis publishers): the same id on the
        same channel within `history_ttl` is published once. `ephemeral=True`
        hands it to the channel's current subscribers on every node and keeps
        nothing: no offset, no history, never replayed (typing indicators).

        Raises InvalidChannel for a bad name, ValueError for data that is not
        JSON or a bad id, and BrokerUnavailable when the broker is down.
        """
        check_publish(channel, id)
        if ephemeral:
            if id is not None:
                raise ValueError("an ephemeral message takes no id")
            return await self.publish_ephemeral(channel, encode_data(data))
        return await self.publish_checked(channel, encode_data(data), id, APPLICATION)

    async def publish_ephemeral(self, channel: str, data: str) -> Published:
        """Publish JSON text, ephemeral, to a channel whose name the caller has checked."""
        await self.broker.publish_ephemeral(channel, data)
        self.messages_published += 1
        return Published(channel, 0, "", is_ephemeral=True)

    async def publish_checked(
        self, channel: str, data: str, message_id: str | None, publisher: str
    ) -> Published:
        """Publish JSON text whose channel name and id the caller has checked.

        For edges that validated their input already (the emit endpoint).
        `publisher` scopes `message_id` (see `scoped_message_id`).
        """
        if message_id is not None:
            message_id = scoped_message_id(publisher, message_id)
        history = self.namespaces.history_of(channel)
        published = await self.broker.publish(
            channel, data, message_id=message_id, history=history
        )
        if not published.is_repeat:
            self.messages_published += 1
        return published

    async def publish_many(
        self, messages: Iterable[tuple[str, Any] | tuple[str, Any, str | None]]
    ) -> list[Published]:
        """Publish each `(channel, data)` or `(channel, data, id)`, in order, in one round
        trip where the broker allows; where each landed, in the same order.

        Every message is checked before any is published (InvalidChannel,
        ValueError as `publish`); on BrokerUnavailable its `published` holds
        the first ones that landed.
        """
        checked = []
        for channel, data, *rest in messages:
            message_id = rest[0] if rest else None
            check_publish(channel, message_id)
            checked.append((channel, encode_data(data), message_id))
        return await self.publish_checked_many(checked, APPLICATION)

    async def publish_checked_many(
        self, messages: Sequence[tuple[str, str, str | None]], publisher: str
    ) -> list[Published]:
        """`publish_checked` for each `(channel, JSON text, id)`, through `broker.publish_many`."""
        publications = [
            Publication(
                channel,
                data,
                None if message_id is None else scoped_message_id(publisher, message_id),
                self.namespaces.history_of(channel),
            )
            for channel, data, message_id in messages
        ]
        try:
            published = await self.broker.publish_many(publications)
        except BrokerUnavailable as error:
            self.messages_published += sum(not p.is_repeat for p in error.published)
            raise
        self.messages_published += sum(not p.is_repeat for p in published)
        return published

    async def verify(self, token: str) -> Claims:
        """The token's Claims; InvalidToken also for a revoked token, cached or not."""
        claims = await self.verifier.verify(token)
        self.check_revoked(claims)
        return claims

    def check_revoked(self, claims: Claims) -> None:
        """Raise InvalidToken("revoked") if a revocation now covers these claims' token.

        For paths that waited after `verify` (an authorizer, a body): a
        revocation may have arrived meanwhile.
        """
        if self.sessions.revocations.covers(claims):
            raise InvalidToken("revoked")

    # -- the application ends sessions (sessions.py does the work) --------

    async def disconnect(self, user: str, *, reconnect: bool = False, reason: str = "") -> None:
        """Close every socket of `user`, on every node: 4410 (stop), or 4012 with
        `reconnect=True` (fetch a fresh token and reconnect: permissions changed).

        Raises ValueError for a bad user or reason, BrokerUnavailable if the
        broker cannot carry it.
        """
        await self.sessions.disconnect(user, reconnect=reconnect, reason=reason)

    async def unsubscribe_user(self, user: str, channels: Collection[str]) -> None:
        """Unsubscribe every socket of `user`, on every node, from `channels`
        (each gets `unsubscribed` with reason `server` for those it had)."""
        await self.sessions.unsubscribe_user(user, channels)

    async def revoke(
        self,
        *,
        until: float | datetime,
        user: str | None = None,
        token_id: str | None = None,
        issued_before: float | datetime | None = None,
    ) -> Revocation:
        """Refuse tokens from now until `until` (at most 30 days ahead), on every node.

        `user` revokes that user's tokens (those issued before `issued_before`,
        if given); `token_id` one token (its `jti`). Refused on connect, refresh
        and Bearer emit, cached or not; live sockets holding one are closed 4410.
        Kept across restarts by a broker that persists (Redis).
        """
        revocation = Revocation.make(
            until=until, user=user, token_id=token_id, issued_before=issued_before
        )
        await self.broker.revoke(revocation)  # every node's Sessions.apply takes it from there
        return revocation

    # -- presence (presence.py does the work) ------------------------------

    async def presence(self, channel: str) -> dict[str, Member]:
        """Who is present in `channel` (one of the `presence` patterns), cluster-wide.

        Raises InvalidChannel for a bad name, ValueError for a channel that
        keeps no presence, BrokerUnavailable when the broker is down.
        """
        return await self.presence_keeper.members(channel)

    async def presence_count(self, channel: str) -> int:
        """How many users are present in `channel`, cluster-wide (raises as `presence`)."""
        return await self.presence_keeper.count(channel)

    # -- positions and history (history.py does the work) ------------------

    async def position(self, channel: str) -> Position:
        """The channel's last offset and epoch (offset 0 of an empty epoch: nothing held).

        Raises InvalidChannel for a bad name, BrokerUnavailable when the broker is down.
        """
        return (await self.positions([channel]))[channel]

    async def positions(self, channels: Collection[str]) -> dict[str, Position]:
        """`position` of each channel in one read: for a page to embed (the JS `since`)."""
        options = {c: self.namespaces.history_of(c) for c in channels}
        return await read_positions(self.broker, channels, options=options)

    async def history(
        self, channel: str, *, limit: int = 50, before: int | None = None
    ) -> HistoryPage:
        """The channel's last `limit` messages (offsets below `before`), oldest first, and
        its position; raises as `position`, and ValueError naming a bad limit or before."""
        history = self.namespaces.history_of(channel)
        return await read_history(
            self.broker, channel, limit=limit, before=before, history=history
        )

    def refused(self, what: str, reason: str) -> None:
        """Count and log one refused credential (never the credential itself)."""
        logger.info("%s refused: %s", what, reason)
        self.auth_failures[reason] += 1

    def deliver_ephemeral(self, channel: str, data: str) -> None:
        """Hand one ephemeral message to its channel's subscribers (called by the broker)."""
        subscribers = self.registry.subscribers(channel)
        if not subscribers:
            return
        if self.presence_keeper.queued:  # its joins and leaves first, as decided
            self.presence_keeper.hand_out(channel)
        frame = text_frame(encode_ephemeral(channel, data))
        self.messages_delivered += len(subscribers)
        for connection in subscribers:
            connection.deliver_frame(channel, frame)  # after a replay being sent, like presence

    def deliver(self, message: Message) -> None:
        """Hand one message to its channel's subscribers (called by the broker)."""
        subscribers = self.registry.subscribers(message.channel)
        if not subscribers:
            return
        if self.presence_keeper.queued:  # its joins and leaves first, as decided
            self.presence_keeper.hand_out(message.channel)
        frame = message_frame(message)
        self.messages_delivered += len(subscribers)
        for connection in subscribers:
            connection.deliver(message, frame)

    # -- connections -----------------------------------------------------

    def connect(self, socket: Any, transport: asyncio.Transport, claims: Claims) -> Connection:
        """Register an authenticated socket; it closes itself at exp + leeway."""
        assert self._hub is not None, "not started"
        connection = Connection(socket, transport, claims, self._hub)
        self.connections.add(connection)
        connection.expire_at(claims.expires_at + self.settings.leeway)
        return connection

    async def announce(self, connection: Connection) -> None:
        """Run on_connect for a new connection; Forbidden or any error refuses it."""
        if self.on_connect:
            try:
                async with asyncio.timeout(self.settings.authorize_timeout):
                    await self.hooks.connect(ConnectionInfo.of(connection))
            except TimeoutError:
                self.hook_errors["on_connect"] += 1
                logger.warning("on_connect hook timed out for user %r", connection.claims.subject)
                raise
        connection.is_announced = True
        if connection.is_closing:  # closed while on_connect ran: its _forget saw no announce
            self._disconnected(connection)

    def _forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
        if self.settings.max_connections_per_user is not None:
            self.broker.release_connection(connection.claims.subject)
        if connection.closed_with is SLOW_CONSUMER:
            self.slow_consumer_closes += 1
        connection.pending = None
        if self.presence_keeper:
            self.presence_keeper.leave(connection, connection.channels)
        if connection.is_announced:
            self._disconnected(connection)
        self.subscriptions.drop_interest(self.registry.remove_all(connection))

    def _disconnected(self, connection: Connection) -> None:
        # Taken before the registry forgets the channels it was on.
        if self.on_disconnect:
            info = ConnectionInfo.of(connection)
            self.track(
                self.hooks.send("on_disconnect", self.on_disconnect, info, _code(connection))
            )

    def _start_closing(self, connection: Connection, close: Close) -> None:
        if connection.socket.closed or connection.transport.is_closing():
            # aiohttp answered the peer's close, or the connection is going: no close
            # frame could be answered, and a task per socket is what a close storm
            # would pay for nothing.
            return
        connection.closing = self.track(connection.send_close(close, self.settings.close_timeout))

    def track(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` in the background; `stop` and `close_all` wait for it."""
        task = asyncio.get_running_loop().create_task(work)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)
        return task

    async def subscribe(
        self,
        connection: Connection,
        channels: list[str],
        since: Mapping[str, Position],
        reply: Callable[[SubscribeResult], dict[str, Any]],
        rewind: Mapping[str, int] | None = None,
    ) -> SubscribeResult:
        """Subscribe `connection` to the allowed channels among `channels`, recovering
        from `since` or replaying the last `rewind[channel]` messages; queue
        `reply(result)` first (subscriptions.py does the work)."""
        return await self.subscriptions.subscribe(connection, channels, since, reply, rewind)

    def unsubscribe(self, connection: Connection, channels: list[str]) -> list[str]:
        """Unsubscribe from those of `channels` the connection has; return them."""
        return self.subscriptions.unsubscribe(connection, channels)

    async def refresh(self, connection: Connection, claims: Claims) -> list[str]:
        """Switch to a refreshed token; return the channels it no longer allows."""
        return await self.subscriptions.refresh(connection, claims)

    def regrant(self, connection: Connection, claims: Claims) -> list[str]:
        """Switch to claims whose grants and allowances are already decided."""
        return self.subscriptions.regrant(connection, claims)


def _registered(add: Callable[[str, Any], None], key: str, function: _Decorated) -> _Decorated:
    """Decorator body: `add(key, function)`, then `function` itself."""
    add(key, function)
    return function


def _code(connection: Connection) -> int:
    """The close code that ended a connection: the server's, or the peer's."""
    close = connection.closed_with
    if close is not CLIENT_GONE and close is not None:
        return int(close.code)
    code = connection.socket.close_code
    return 1006 if code is None else code  # 1006: gone without a close frame (heartbeat)
