"""Packaging for aiohttp-wsbus."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="aiohttp-wsbus",
    version="0.1.0.dev0",
    description="A real-time channel bus for aiohttp: JWT-authorized WebSocket push with an HTTP emit endpoint.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["aiohttp_wsbus", "aiohttp_wsbus.*"]),
    # The served JS client is js/wsbus.js itself: one source, no copy that can drift.
    # static/wsbus.js is a symlink to js/wsbus.js: the build copies its bytes in.
    package_data={"aiohttp_wsbus": ["py.typed", "static/wsbus.js", "static/wsbus.d.ts"]},
    entry_points={
        "console_scripts": ["wsbus = aiohttp_wsbus.cli:main"],
        # The test kit's fixtures, in every pytest run of an environment that installs us;
        # named as the module, so `-p aiohttp_wsbus.testing` does not register it twice.
        "pytest11": ["aiohttp_wsbus.testing = aiohttp_wsbus.testing"],
    },
    install_requires=[
        "aiohttp>=3.11",
        "aiosignal>=1.4",  # the hooks are aiohttp-style signals
        "PyJWT[crypto]>=2.13",
        "cryptography",
        "marshmallow>=4.1.2",
    ],
    extras_require={
        "redis": ["redis>=5.2"],
        "metrics": ["prometheus-client>=0.20"],
        # aiohttp_wsbus.testing's fixtures (the rest of it needs only the runtime install).
        "testing": ["pytest>=8", "pytest-aiohttp>=1.1"],
        # The benchmark's peers and tools: python -m benchmarks (benchmarks/README.md).
        "bench": [
            "matplotlib",
            "asgi-ws==1.0.0",
            "fastapi",
            "uvicorn",
            "python-socketio>=5",
            "py-spy",
        ],
        "test": [
            "pytest>=8",
            "pytest-aiohttp>=1.1",
            "hypothesis>=6",
            "mypy>=1.13",
            "ruff>=0.8",
            "redis>=5.2",
            "prometheus-client>=0.20",
            "playwright>=1.50",
            "wheel",  # builds the wheel in tests/test_packaging.py (setuptools < 70.1)
        ],
    },
    classifiers=[
        "Framework :: AsyncIO",
        "Framework :: aiohttp",
        "Programming Language :: Python :: 3",
        "Typing :: Typed",
    ],
)
