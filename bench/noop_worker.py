"""A worker process whose provider returns at once: `python bench/noop_worker.py --url URL`.

Everything but the provider is the production worker (pgqueue.worker.Worker with its
default DispatcherConfig: LISTEN/NOTIFY wake, 1 s poll fallback, rescuer, maintenance,
heartbeat, the per-job log lines at INFO), so what it measures is pgqueue's own cost per
job: claim, hand-off, completion, promotion. Used by bench/dispatch.py for throughput
and memory.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging

from pgqueue.config import Settings
from pgqueue.logs import setup_logging
from pgqueue.models import Job, SendResult
from pgqueue.worker import Worker, install_signal_handlers


class NoopProvider:
    """Accepts every message at once, like a provider with zero latency."""

    def __init__(self) -> None:
        self._sids = itertools.count(1)

    async def send(self, job: Job) -> SendResult:
        return SendResult(sid=f"SM{next(self._sids):032x}")

    async def aclose(self) -> None:
        return None


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", required=True)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--log-level", default="INFO", help="INFO (production) or WARNING")
    args = p.parse_args()
    setup_logging("plain", level=getattr(logging, args.log_level.upper()))
    worker = Worker(
        Settings(),
        args.url,
        concurrency=args.concurrency,
        provider_factory=lambda settings, pool: NoopProvider(),
    )
    install_signal_handlers(worker.stop)
    return await worker.run()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
