"""Shared fixtures for the deployment tests (chart, dashboard, alerts, image).

Run with `make deploy-test` (installs .venv from requirements.txt), or
`.venv/bin/pytest tests/deploy` once the venv and `target/debug/tollgate` exist.
"""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tollgate"


def tollgate_binary() -> Path:
    """The gateway binary under test: $TOLLGATE_BIN, else the debug build."""
    return Path(os.environ.get("TOLLGATE_BIN", ROOT / "target" / "debug" / "tollgate"))


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports, all held until every one is read."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def check_config(path: Path) -> subprocess.CompletedProcess:
    """`tollgate -t -c path`."""
    return subprocess.run(
        [str(tollgate_binary()), "-t", "-c", str(path)],
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture(scope="session")
def tollgate_bin() -> Path:
    b = tollgate_binary()
    if not b.exists():
        pytest.fail(f"{b} is missing: run `cargo build` first (make deploy-test does)")
    return b


def require_tool(name: str) -> str:
    """Path of a tool the Makefile installs; fail (never skip) when it is missing."""
    p = shutil.which(name) or (str(ROOT / ".venv" / "bin" / name) if (ROOT / ".venv" / "bin" / name).exists() else None)
    if p is None:
        pytest.fail(f"{name} not found: run `make deps-deploy`")
    return p
