"""The built package ships the JS client (the bytes of js/wsbus.js, not a symlink),
py.typed and the `wsbus` console script; the public API imports without the extras."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp_wsbus
from aiohttp_wsbus.brokers import redis, redis_publisher

ROOT = Path(__file__).parent.parent
# What setup.py needs; the symlinks in aiohttp_wsbus/static point into js/.
SOURCES = ("setup.py", "README.md", "aiohttp_wsbus", "js")


def build_wheel(tmp_path: Path) -> Path:
    """Build a wheel from a copy of the sources, so the build leaves the worktree alone."""
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "node_modules", "*.egg-info")
            shutil.copytree(path, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    assert (source / "aiohttp_wsbus" / "static" / "wsbus.js").is_symlink()
    out = tmp_path / "dist"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--disable-pip-version-check", "-q", "-w", str(out), str(source)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)  # noqa: S603
    (wheel,) = out.glob("aiohttp_wsbus-*.whl")
    return wheel


def test_wheel_ships_the_js_client_byte_for_byte(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("aiohttp_wsbus/static/wsbus.js")
        types = archive.read("aiohttp_wsbus/static/wsbus.d.ts")
        assert "aiohttp_wsbus/py.typed" in archive.namelist()
        (entry_points,) = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
        # The standalone server's console script.
        assert "wsbus = aiohttp_wsbus.cli:main" in archive.read(entry_points).decode()
        # The test kit and its pytest plugin, named as its module (see setup.py).
        assert "aiohttp_wsbus/testing/__init__.py" in archive.namelist()
        assert (
            "aiohttp_wsbus.testing = aiohttp_wsbus.testing" in archive.read(entry_points).decode()
        )
    assert shipped == (ROOT / "js" / "wsbus.js").read_bytes()
    assert types == (ROOT / "js" / "wsbus.d.ts").read_bytes()


# Run first in a fresh interpreter: as if the redis package were not installed.
WITHOUT_REDIS = """
import sys

class NoRedis:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "redis":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoRedis())
"""


def test_star_import_works_without_redis_and_redis_names_say_what_to_install() -> None:
    script = (
        WITHOUT_REDIS
        + """
from aiohttp_wsbus import *
assert setup and MemoryBroker and EmitClient
try:
    from aiohttp_wsbus import RedisBroker
except ImportError as error:
    print(error)
else:
    raise SystemExit("RedisBroker imported without redis")
"""
    )
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "aiohttp_wsbus.RedisBroker needs the redis package: pip install 'aiohttp-wsbus[redis]'"
    )


def test_redis_names_import_from_the_package_when_redis_is_installed() -> None:
    from aiohttp_wsbus import RedisBroker, RedisPublisher, SyncRedisPublisher

    assert RedisBroker is redis.RedisBroker
    assert RedisPublisher is redis_publisher.RedisPublisher
    assert SyncRedisPublisher is redis_publisher.SyncRedisPublisher
    assert {"RedisBroker", "RedisPublisher", "setup"} <= set(dir(aiohttp_wsbus))
