"""The standalone server: `python -m aiohttp_wsbus` (or `wsbus`).

Every setup() setting is a flag and a WSBUS_* environment variable (flags
win); the values go through the same validation as setup(). A bad setting
exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import socket
import stat
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final, NoReturn, get_args, get_type_hints

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .authorize_url import UrlAuthorizer
from .brokers import Broker
from .bus import Bus
from .errors import InvalidSettings
from .settings import Settings, setting_help
from .web import setup
from .workers import MAX_WORKERS, reserve_port, run_workers

__all__ = ["AccessLogger", "main"]

logger = logging.getLogger("aiohttp_wsbus")

ENV_PREFIX: Final = "WSBUS_"
EXIT_BAD_SETTING: Final = 2
EXIT_CANNOT_LISTEN: Final = 1
REDIS_URL_SCHEMES: Final = ("redis://", "rediss://", "unix://")

# Plural settings whose flag names one item.
_SINGULAR_FLAGS: Final = {"api_keys": "--api-key"}
# Settings a flag cannot spell: they come from a JSON file (a server flag) instead.
_FILE_SETTINGS: Final = {"channels": "--channels-file"}
# Secrets, and the safer way to give them: a command line shows in `ps`.
_SAFER_SOURCE: Final = {"jwt_secret": "WSBUS_JWT_SECRET", "api_keys": "--api-key-file"}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})

_EPILOG: Final = """\
Every bus setting can also come from the environment variable shown next to it
(flags win). Lists take comma-separated values.

examples:
  wsbus --jwks-url https://idp.example.com/.well-known/jwks.json \\
        --issuer https://idp.example.com/ --audience wsbus --api-key-file /etc/wsbus/keys
  WSBUS_JWKS_URL=https://idp.example.com/jwks.json WSBUS_REDIS_URL=redis://localhost:6379/0 \\
        python -m aiohttp_wsbus --path /run/wsbus/wsbus.sock

exit status: 0 after a clean shutdown (SIGTERM or SIGINT), 1 if the address
cannot be used, 2 for a bad setting.
"""


class BadSetting(Exception):
    """A flag or variable the server cannot start with; the message is one line."""


@dataclass(frozen=True, slots=True)
class Option:
    """One setup() setting as the command line and the environment spell it."""

    name: str
    kind: type  # str, int, float, bool, list (of str) or tuple (a rate: per second, burst)
    is_optional: bool
    flag: str
    env: str
    meaning: str  # the setting's one line, from Settings
    default: Any

    @property
    def where(self) -> str:
        return f"{self.flag} / {self.env}"


def setting_options() -> list[Option]:
    """The options derived from the Settings dataclass, in its order."""
    hints = get_type_hints(Settings)
    options = []
    for field in fields(Settings):
        if field.name in _FILE_SETTINGS:
            continue
        kind, is_optional = _kind_of(hints[field.name])
        options.append(
            Option(
                name=field.name,
                kind=kind,
                is_optional=is_optional,
                flag=_SINGULAR_FLAGS.get(field.name, "--" + field.name.replace("_", "-")),
                env=ENV_PREFIX + field.name.upper(),
                meaning=setting_help(field),
                default=field.default,
            )
        )
    return options


def _kind_of(hint: Any) -> tuple[type, bool]:
    arguments = get_args(hint)
    is_optional = isinstance(hint, types.UnionType) and type(None) in arguments
    if is_optional:
        (hint,) = [a for a in arguments if a is not type(None)]
    if hint in (str, int, float, bool):
        return hint, is_optional
    if get_args(hint) == (str, ...):
        return list, is_optional
    if get_args(hint) == (float, int):
        return tuple, is_optional
    raise TypeError(f"the command line cannot express a setting of type {hint}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other refusal: no usage block to scroll past.
        self.exit(EXIT_BAD_SETTING, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = "wsbus") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        usage="%(prog)s [options]",
        description="Run an aiohttp-wsbus server: clients hold WebSockets authorized by\n"
        "their JWT; back ends publish with POST {base_path}/emit.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", help="address to listen on [env WSBUS_HOST, default 127.0.0.1]")
    server.add_argument("--port", help="TCP port [env WSBUS_PORT, default 8080; 0 picks one]")
    server.add_argument(
        "--path",
        help="listen on this unix socket instead of host:port [env WSBUS_PATH]",
    )
    server.add_argument(
        "--redis-url",
        help="share messages between processes through Redis, e.g. redis://localhost:6379/0 "
        "[env WSBUS_REDIS_URL, default: in-process memory broker]",
    )
    server.add_argument(
        "--workers",
        help=f"server processes sharing the port (SO_REUSEPORT), 1 to {MAX_WORKERS}; more than "
        "one needs --redis-url [env WSBUS_WORKERS, default 1]",
    )
    server.add_argument(
        "--authorize-url",
        help="ask this URL (POST, with the first API key) about channels a token does not "
        "grant; see docs/authorization.md [env WSBUS_AUTHORIZE_URL]",
    )
    server.add_argument(
        "--api-key-file",
        help="file of API keys, one per line ('#' comments allowed); added to --api-key "
        "[env WSBUS_API_KEY_FILE]",
    )
    server.add_argument(
        "--channels-file",
        help="JSON file of options per grant pattern, the `channels` setting: "
        '{"typing:*": {"history_size": 0}}; see docs/limits.md [env WSBUS_CHANNELS_FILE]',
    )
    server.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="[env WSBUS_LOG_LEVEL, default info]",
    )
    server.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        help="log each request, without its query string [env WSBUS_ACCESS_LOG, default on]",
    )
    bus = parser.add_argument_group("bus settings (as for aiohttp_wsbus.setup())")
    for option in setting_options():
        help_text = _help(option)
        if option.kind is bool:
            bus.add_argument(
                option.flag, dest=option.name, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif option.kind is list:
            bus.add_argument(
                option.flag,
                dest=option.name,
                action="append",
                metavar="VALUE" if option.name in _SINGULAR_FLAGS else "A,B",
                help=help_text,
            )
        else:
            bus.add_argument(
                option.flag, dest=option.name, metavar=_metavar(option), help=help_text
            )
    return parser


def _metavar(option: Option) -> str:
    if option.name.endswith("_url"):
        return "URL"
    if option.name == "base_path":
        return "PATH"
    # Every float setting is a duration; every int one a size or a count.
    return {str: "TEXT", int: "N", float: "SECONDS", tuple: "RATE,BURST"}[option.kind]


def _help(option: Option) -> str:
    """The setting's meaning, then how the command line spells it."""
    notes = []
    if option.kind is list:
        notes.append("repeat for several" if option.name in _SINGULAR_FLAGS else "comma-separated")
    if option.is_optional and option.kind in (int, float, tuple):
        notes.append("`none` for None")
    if option.name in _SAFER_SOURCE:
        notes.append(f"prefer {_SAFER_SOURCE[option.name]}: flags show in `ps`")
    default = option.default
    if isinstance(default, tuple):
        default = ",".join(str(item) for item in default)
    elif isinstance(default, bool):
        default = "on" if default else "off"
    where = f"env {option.env}" + ("" if default in (None, "") else f", default {default}")
    text = "; ".join([option.meaning, *notes]) + f" [{where}]"
    return text.replace("%", "%%")  # argparse formats help with %


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the command line decided: the bus settings and where to listen."""

    settings: dict[str, Any]
    host: str
    port: int
    path: str | None
    redis_url: str | None
    authorize_url: str | None
    log_level: str
    access_log: bool
    workers: int = 1


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """Merge flags over WSBUS_* variables and convert them; raise BadSetting."""

    def given(name: str) -> Any:
        value = getattr(args, name, None)
        if value is not None:
            return value
        # An empty variable counts as unset, so a compose file can blank one out.
        return environ.get(ENV_PREFIX + name.upper()) or None

    settings: dict[str, Any] = {}
    for option in setting_options():
        raw = given(option.name)
        if raw is not None:
            settings[option.name] = _convert(option, raw)
    key_file = given("api_key_file")
    if key_file is not None:
        settings["api_keys"] = [*settings.get("api_keys", []), *_read_key_file(key_file)]
    channels_file = given("channels_file")
    if channels_file is not None:
        settings["channels"] = _read_channels_file(channels_file)
    port = given("port")
    try:
        port_number = 8080 if port is None else int(port)
    except ValueError:
        raise BadSetting(f"--port / WSBUS_PORT: not a port number: {port!r}") from None
    if not 0 <= port_number <= 65535:
        raise BadSetting(f"--port / WSBUS_PORT: must be 0 to 65535, got {port_number}")
    access_log = given("access_log")
    workers = _workers(given("workers"), redis_url=given("redis_url"), path=given("path"))
    return ServerConfig(
        settings=settings,
        host=given("host") or "127.0.0.1",
        port=port_number,
        path=given("path"),
        redis_url=given("redis_url"),
        authorize_url=given("authorize_url"),
        log_level=(given("log_level") or "info").upper(),
        access_log=True
        if access_log is None
        else _boolean("--access-log / WSBUS_ACCESS_LOG", access_log),
        workers=workers,
    )


def _workers(raw: str | None, *, redis_url: str | None, path: str | None) -> int:
    where = "--workers / WSBUS_WORKERS"
    try:
        count = 1 if raw is None else int(raw)
    except ValueError:
        raise BadSetting(f"{where}: not a number: {raw!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise BadSetting(f"{where}: must be 1 to {MAX_WORKERS}, got {count}")
    if count > 1 and redis_url is None:
        raise BadSetting(
            f"{where}: {count} processes need --redis-url: each would otherwise have its "
            "own in-process broker, and a message would reach only one process's clients"
        )
    if count > 1 and path is not None:
        raise BadSetting(f"{where}: several processes listen on host:port, not on --path")
    return count


def _convert(option: Option, raw: Any) -> Any:
    if option.kind is bool:
        return _boolean(option.where, raw)
    if option.kind is list:
        items = raw if isinstance(raw, list) else [raw]
        return [part.strip() for item in items for part in item.split(",") if part.strip()]
    if option.is_optional and option.kind is not str and raw.strip().lower() == "none":
        return None
    if option.kind is str:
        return raw
    try:
        if option.kind is tuple:
            rate, burst = raw.split(",")
            return [float(rate), int(burst)]
        return option.kind(raw)
    except ValueError:
        kind = {int: "an integer", float: "a number", tuple: "RATE,BURST (as 20,100)"}
        raise BadSetting(f"{option.where}: {raw!r} is not {kind[option.kind]}") from None


def _boolean(where: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BadSetting(f"{where}: {raw!r} is not a boolean (true/false, 1/0, yes/no, on/off)")


def _read_key_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise BadSetting(
            f"--api-key-file / WSBUS_API_KEY_FILE: cannot read {path}: {reason}"
        ) from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _read_channels_file(path: str) -> Any:
    where = "--channels-file / WSBUS_CHANNELS_FILE"
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except OSError as error:
        raise BadSetting(f"{where}: cannot read {path}: {error.strerror}") from None
    except ValueError as error:  # UnicodeDecodeError included
        raise BadSetting(f"{where}: {path} is not JSON: {error}") from None


def make_broker(redis_url: str | None) -> Broker | None:
    """A RedisBroker for `redis_url`, or None for setup()'s default MemoryBroker.

    The URL is checked here, before listening: the broker itself would only
    read it when the app starts, and fail with a traceback.
    """
    if redis_url is None:
        return None
    where = "--redis-url / WSBUS_REDIS_URL"
    # Never echo the URL: it may hold a password.
    if not redis_url.lower().startswith(REDIS_URL_SCHEMES):
        raise BadSetting(f"{where}: must start with redis://, rediss:// or unix://")
    try:
        # Imported only when asked for: the redis package is an optional extra.
        module = importlib.import_module("aiohttp_wsbus.brokers.redis")
        from redis.connection import parse_url
    except ImportError as error:
        raise BadSetting(
            f"{where}: the Redis broker is not available "
            f"({error}); install it with: pip install 'aiohttp-wsbus[redis]'"
        ) from None
    try:
        parse_url(redis_url)  # type: ignore[no-untyped-call]  # redis leaves it unannotated
        broker: Broker = module.RedisBroker(redis_url)
    except ValueError as error:
        raise BadSetting(f"{where}: not a usable Redis URL: {error}") from None
    return broker


def build_app(config: ServerConfig) -> web.Application:
    """The application with the bus set up; raise BadSetting naming what is wrong."""
    broker = make_broker(config.redis_url)
    app = web.Application()
    try:
        bus = setup(app, broker=broker, **config.settings)
    except InvalidSettings as error:
        raise BadSetting(_name_flags(str(error))) from None
    if config.authorize_url is not None:
        _authorize_through(app, bus, config.authorize_url)
    return app


def _authorize_through(app: web.Application, bus: Bus, url: str) -> None:
    where = "--authorize-url / WSBUS_AUTHORIZE_URL"
    if not url.lower().startswith(("http://", "https://")):
        raise BadSetting(f"{where}: must be an http:// or https:// URL")
    if not bus.settings.api_keys:
        raise BadSetting(f"{where}: needs an API key (--api-key or --api-key-file) to send")
    authorizer = UrlAuthorizer(url, bus.settings.api_keys[0], bus.settings.authorize_timeout)
    # Subscribe only: a webhook that answers "may they see it" must not be read as
    # "may they publish to it".
    bus.batch_authorizer(authorizer.for_action("subscribe"), action="subscribe")
    app.cleanup_ctx.append(authorizer.lifetime)


def _name_flags(message: str) -> str:
    named = [o.where for o in setting_options() if f"{o.name}:" in message]
    named += [flag for name, flag in _FILE_SETTINGS.items() if f"{name}:" in message]
    message = " ".join(message.split())  # one line, always
    return f"{message} (set by {', '.join(named)})" if named else message


def listen(config: ServerConfig) -> tuple[socket.socket, str]:
    """Bind and listen now, so the address is known (port 0) and errors come early."""
    if config.path is not None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(config.path).st_mode):
                os.unlink(config.path)  # a stale socket from a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(config.path)
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        return sock, f"unix:{config.path}"
    family, _, _, _, address = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.create_server(address, family=family, backlog=128)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return sock, f"http://{shown}:{port}"


class AccessLogger(AbstractAccessLogger):
    """One line per request, without the query string: a ?token= must never reach a log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        version = request.version
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.6fs',
            request.remote or "-",
            request.method,
            request.rel_url.raw_path,
            version.major,
            version.minor,
            response.status,
            response.body_length,
            time,
        )


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str = "wsbus",
) -> int:
    """Run the server until SIGTERM or SIGINT; return the exit status."""
    args = build_parser(prog).parse_args(argv)
    environ = os.environ if environ is None else environ
    try:
        config = resolve(args, environ)
        app = build_app(config)
    except BadSetting as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return EXIT_BAD_SETTING
    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if config.workers > 1:
            sock, address = reserve_port(config.host, config.port)
        else:
            sock, address = listen(config)
    except OSError as error:
        where = config.path or f"{config.host}:{config.port}"
        print(f"{prog}: cannot listen on {where}: {error.strerror or error}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    base_path = config.settings.get("base_path", "/ws")
    freeze_start_up()

    def ready() -> None:
        workers = f" in {config.workers} processes" if config.workers > 1 else ""
        logger.info("listening on %s (WebSocket at %s)%s", address, base_path, workers)

    if config.workers > 1:
        status = run_workers(config.workers, sock, lambda own: _serve(app, own, config), ready)
    else:
        ready()
        try:
            status = _serve(app, sock, config)
        finally:
            if config.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(config.path)
    logger.info("stopped")
    return status


def freeze_start_up() -> None:
    """Move what start-up made out of the cyclic collector's reach (gc.freeze).

    Modules, the app and the bus live as long as the process. Left in the
    collector's oldest generation, every full collection walks them again, and a
    connect storm triggers one each time the heap grows by a quarter; frozen,
    those collections walk only what the sockets made. Forked workers also stop
    writing to the pages they share with the parent (the collector's own headers
    sit in each object), which is the use Python's gc documentation gives.
    """
    gc.collect()  # garbage made at start-up is freed first, not kept for ever
    gc.freeze()
    logger.debug("froze %d start-up objects out of the collector's reach", gc.get_freeze_count())


def _serve(app: web.Application, sock: socket.socket, config: ServerConfig) -> int:
    """Serve `app` on `sock` until SIGTERM or SIGINT."""
    web.run_app(
        app,
        sock=sock,
        print=None,
        access_log=logging.getLogger("aiohttp.access") if config.access_log else None,
        access_log_class=AccessLogger,
    )
    return 0
