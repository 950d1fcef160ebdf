"""`pgqueue serve` as a child process on a loopback port, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from pgqueue.db import as_url
from pgqueue.server import free_port

REPO = Path(__file__).resolve().parents[2]
# The admin token of the servers `serving` starts.
ADMIN = "admin-token-for-process-tests-0123"


def start_serve(
    url: str, port: int, log: Path, env: Mapping[str, str], *, timeout_s: float = 30.0
) -> subprocess.Popen[bytes]:
    """Starts `pgqueue serve` on 127.0.0.1:`port` with DATABASE_URL `url` and `env` on top
    of this environment (without REDIS_URL or any PGQUEUE_/TWILIO_ setting of ours), its
    output in `log`; returns once the port takes connections."""
    environ = {
        **{
            k: v
            for k, v in os.environ.items()
            if k != "REDIS_URL" and not k.startswith(("PGQUEUE_", "TWILIO_"))
        },
        "DATABASE_URL": as_url(url),
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    argv = [sys.executable, "-m", "pgqueue.cli", "serve", "--host", "127.0.0.1", "--port"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*argv, str(port)], cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pgqueue serve exited:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                stop_serve(proc)
                raise RuntimeError(f"pgqueue serve did not start:\n{log.read_text()}") from None
            time.sleep(0.1)


def stop_serve(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited by then."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@asynccontextmanager
async def serving(
    db_url: str, tmp_path: Path, *, port: int | None = None, **env: str
) -> AsyncIterator[tuple[httpx.AsyncClient, subprocess.Popen[bytes], Path]]:
    """`pgqueue serve` until the block ends; yields a client, the process and its log."""
    port = port or free_port()
    log = tmp_path / f"serve-{port}.log"
    proc = await asyncio.to_thread(
        start_serve, db_url, port, log, {"PGQUEUE_ADMIN_TOKEN": ADMIN, **env}
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"pgqueue serve did not start:\n{log.read_text()}")
                await asyncio.sleep(0.1)
            yield client, proc, log
    finally:
        await asyncio.to_thread(stop_serve, proc)
