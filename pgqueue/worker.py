"""A worker process: the composition root. `python -m pgqueue.worker` or `pgqueue worker`.

Wires the dispatcher (claims and sends), the LISTEN connection that wakes it, the
rescuer, the leader-only maintenance and the heartbeat. SIGTERM or SIGINT: stop
claiming, let sends in flight finish (bounded), write their outcomes, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgqueue import queries
from pgqueue.config import Settings
from pgqueue.credentials import Keyring
from pgqueue.db import connect, connection_lost, make_pool, resolve_database_url, shares_sessions
from pgqueue.dispatcher import Dispatcher, DispatcherConfig
from pgqueue.errors import PgQueueError, exit_code, first_line
from pgqueue.logs import setup_logging
from pgqueue.maintenance import Maintenance, Rescuer
from pgqueue.providers import Provider
from pgqueue.providers.default import default_provider
from pgqueue.webhooks import WebhookConfig, Webhooks

log = logging.getLogger("pgqueue.worker")

ProviderFactory = Callable[[Settings, AsyncConnectionPool[Any]], Provider]
DRAIN_TIMEOUT_S = 30.0
HEARTBEAT_S = 10.0


async def listen(
    url: str,
    channel: str,
    on_notify: Callable[[], None],
    stop: asyncio.Event,
    application_name: str,
    own_payload: str | None = None,
) -> None:
    """LISTEN on the queue's channel and call `on_notify` for each notification but the
    ones this worker sent itself (payload `own_payload`: it claimed in the same
    transaction that sent them); reconnects by itself. Polling in the dispatcher covers
    the gaps."""
    while not stop.is_set():
        try:
            conn = await connect(url, application_name=application_name, primary=True)
            try:
                await conn.execute(
                    psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel))
                )
                on_notify()  # anything sent while we were away
                while not stop.is_set():
                    async for n in conn.notifies(timeout=1.0):
                        if own_payload is None or n.payload != own_payload:
                            on_notify()
            finally:
                await conn.close()
        except psycopg.Error as e:
            # `cannot execute LISTEN during recovery`: the connection is on a standby
            # (a failover); made again, it lands on the new primary and LISTENs there.
            if not connection_lost(e):
                raise
            log.debug("listen connection lost: %s", e)
            await asyncio.sleep(0.2)


class Worker:
    def __init__(
        self,
        settings: Settings,
        url: str,
        *,
        concurrency: int = 20,
        provider_factory: ProviderFactory = default_provider,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        rescue_grace_s: float = 10.0,
        maintenance_interval_s: float = 30.0,
        config: DispatcherConfig | None = None,
        webhook_config: WebhookConfig | None = None,
    ) -> None:
        self.settings = settings
        self.webhook_config = webhook_config
        self.url = url
        self.config = config or DispatcherConfig(
            queue=settings.queue_name,
            concurrency=concurrency,
            backoff_ms=settings.backoff_delay_ms,
            send_timeout_s=settings.send_timeout_s + 5.0,
        )
        self.provider_factory = provider_factory
        self.drain_timeout_s = drain_timeout_s
        self.rescue_grace_s = rescue_grace_s
        self.maintenance_interval_s = maintenance_interval_s
        self.stop = asyncio.Event()
        # Set while running, for tests and operators poking at a live worker.
        self.dispatcher: Dispatcher | None = None
        self.pool: AsyncConnectionPool[Any] | None = None

    async def run(self) -> int:
        pool = make_pool(
            self.url, min_size=1, max_size=4, application_name=self.config.application_name
        )
        # The pool is closed on every path: a pool left open while asyncio shuts down
        # keeps reconnecting and the process never exits (psycopg_pool 3.3).
        await pool.open(wait=False)
        try:
            if not await self._register(pool):
                return 0  # asked to stop before the database ever answered
            await self._refuse_shared_sessions(pool)
            return await self._serve(pool)
        finally:
            await pool.close(timeout=5)

    async def _refuse_shared_sessions(self, pool: AsyncConnectionPool[Any]) -> None:
        """A worker's conversation locks are session advisory locks on its lock
        connection, and it wakes on LISTEN: through a transaction pooler neither holds,
        and two workers could send one conversation at once. Refused, naming the fix."""
        try:
            shared = await shares_sessions(self.url)
        except psycopg.OperationalError as e:  # gone again since it registered
            log.warning("could not check the connection for a pooler: %s", first_line(e))
            return
        if shared:
            async with pool.connection() as conn:
                await queries.execute(conn, "unregister_worker", {"id": self.config.worker_id})
            raise PgQueueError(
                "the worker's database URL goes through a pooler in transaction mode (two "
                "connections took turns on one server session): its conversation locks "
                "and LISTEN need a session of their own; set PGQUEUE_WORKER_DATABASE_URL "
                "to a direct or session-pooled URL (DATABASE_URL may stay pooled for the API)"
            )

    async def _register(self, pool: AsyncConnectionPool[Any]) -> bool:
        """Announce this worker; while the database is unreachable (starting, restarting)
        keep trying until it answers or the worker is asked to stop."""
        cfg = self.config
        while not self.stop.is_set():
            try:
                async with pool.connection(timeout=5) as conn:
                    await queries.ensure_queue(conn, cfg.queue)
                    await queries.execute(
                        conn,
                        "register_worker",
                        {
                            "id": cfg.worker_id,
                            "queue": cfg.queue,
                            "hostname": socket.gethostname(),
                            "pid": os.getpid(),
                            "concurrency": cfg.concurrency,
                        },
                    )
                return True
            except psycopg.OperationalError as e:  # PoolTimeout is one too
                log.warning("database not reachable yet (%s); retrying", str(e).strip()[:200])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=1.0)
        return False

    async def _serve(self, pool: AsyncConnectionPool[Any]) -> int:
        cfg = self.config
        provider = self.provider_factory(self.settings, pool)
        dispatcher = Dispatcher(self.url, provider, cfg)
        self.dispatcher, self.pool = dispatcher, pool
        log.info(
            "worker %s started: queue %s, concurrency %d",
            cfg.worker_id,
            cfg.queue,
            cfg.concurrency,
        )
        rescuer = Rescuer(pool, queue=cfg.queue, grace_s=self.rescue_grace_s)
        maintenance = Maintenance(
            pool, dispatcher, queue=cfg.queue, interval_s=self.maintenance_interval_s
        )
        webhooks = Webhooks(
            pool,
            worker_id=cfg.worker_id,
            keyring=Keyring(self.settings.secret_keys),
            config=self.webhook_config,
        )
        background = [
            asyncio.create_task(
                listen(
                    self.url,
                    queries.channel(cfg.queue),
                    dispatcher.wake,
                    self.stop,
                    cfg.application_name,
                    own_payload=cfg.worker_id,
                )
            ),
            asyncio.create_task(rescuer.run(self.stop)),
            asyncio.create_task(maintenance.run(self.stop)),
            asyncio.create_task(self._heartbeat(pool, dispatcher)),
            asyncio.create_task(webhooks.run(self.stop)),
        ]
        # Everything built so far lives as long as the process: out of the collector's
        # sight, a full collection no longer walks it. Walking the modules, the SDK's
        # classes and the pools took 80-110 ms, a stop of the whole process that could
        # fall between a send's slot check and its write and put it on the wire that
        # late (bench/senders.py: a 10/s sender with 11 starts in one second).
        gc.collect()
        gc.freeze()
        try:
            await dispatcher.run(self.stop)
        finally:
            cut = await dispatcher.drain(self.drain_timeout_s)
            if cut:
                log.warning("%d send(s) did not finish in time and were released", cut)
            self.stop.set()
            for t in background:
                t.cancel()
            for t in background:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            with contextlib.suppress(Exception):
                async with pool.connection() as conn:
                    await queries.execute(conn, "unregister_worker", {"id": cfg.worker_id})
            await dispatcher.close()
            await provider.aclose()
            await webhooks.aclose()
            log.info(
                "worker %s stopped: %d completed, %d retried, %d failed",
                cfg.worker_id,
                dispatcher.stats.completed,
                dispatcher.stats.retried,
                dispatcher.stats.failed,
            )
        return 0

    async def _heartbeat(self, pool: AsyncConnectionPool[Any], dispatcher: Dispatcher) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=HEARTBEAT_S)
            try:
                async with pool.connection() as conn:
                    tokens = dispatcher.claim_tokens()
                    if tokens:
                        await queries.execute(
                            conn,
                            "extend_leases",
                            {"tokens": tokens, "lease": self.config.lease_s},
                        )
                    await queries.execute(conn, "heartbeat_worker", {"id": self.config.worker_id})
            except Exception as e:  # the database may be restarting
                log.debug("heartbeat skipped: %s", e)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Runs a worker's event loop: uvloop's where it is installed (not on Windows). Every
    send hands work between tasks, timers and sockets a dozen times; uvloop does that for
    about 7 % less of the worker's CPU in the throughput figure. Its timers fire on whole
    milliseconds, up to one early, so what must not happen before a moment (a rate slot)
    looks at the clock again after its sleep."""
    try:
        import uvloop  # noqa: PLC0415 (optional)
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _main(settings: Settings, concurrency: int) -> int:
    url = settings.worker_database_url or resolve_database_url(settings)
    worker = Worker(settings, url, concurrency=concurrency)
    install_signal_handlers(worker.stop)
    return await worker.run()


def main_from_cli(settings: Settings, *, concurrency: int = 20, reload: bool = False) -> int:
    if concurrency < 1 or concurrency > 1000:
        raise PgQueueError("--concurrency must be from 1 to 1000")
    if reload:
        try:
            from watchfiles import run_process  # noqa: PLC0415 (optional)
        except ImportError:
            raise PgQueueError("--reload needs watchfiles: pip install watchfiles") from None
        package = Path(__file__).resolve().parent
        run_process(
            package,
            target=f"{sys.executable} -m pgqueue.worker --concurrency {concurrency}",
            target_type="command",
        )
        return 0
    setup_logging(settings.log_format, preview=settings.log_preview)
    return run_loop(_main(settings, concurrency))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's options, for `pgqueue worker` and `python -m pgqueue.worker` alike."""
    parser.add_argument("--concurrency", type=int, default=20, help="sends in flight (default 20)")
    parser.add_argument("--reload", action="store_true", help="restart on code changes (dev)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pgqueue.worker")
    add_arguments(parser)
    args = parser.parse_args(argv)
    sys.exit(
        exit_code(
            lambda: main_from_cli(
                Settings.from_env(), concurrency=args.concurrency, reload=args.reload
            ),
            prog="pgqueue worker",
        )
    )


if __name__ == "__main__":
    main()
