"""The built package ships the JS client (the bytes of js/wsbus.js, not a symlink),
py.typed and the `wsbus` console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

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
    assert shipped == (ROOT / "js" / "wsbus.js").read_bytes()
    assert types == (ROOT / "js" / "wsbus.d.ts").read_bytes()
