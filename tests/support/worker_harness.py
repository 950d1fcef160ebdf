"""A real worker process with the recording provider: `python -m tests.support.worker_harness`.

Used by the multi-process and crash tests; everything but the provider is the
production worker (signals, LISTEN, rescuer, maintenance, drain).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pgqueue.config import Settings
from pgqueue.dispatcher import DispatcherConfig
from pgqueue.logs import setup_logging
from pgqueue.worker import Worker, install_signal_handlers, run_loop
from tests.support.recording import RecordingProvider


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--record", required=True, type=Path)
    p.add_argument("--latency", nargs=2, type=float, default=(0.0, 0.0))
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--backoff-ms", type=int, default=200)
    p.add_argument("--grace", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    setup_logging("plain")
    settings = Settings(backoff_delay_ms=args.backoff_ms)
    cfg = DispatcherConfig(
        concurrency=args.concurrency, backoff_ms=args.backoff_ms, poll_interval_s=0.5
    )
    worker = Worker(
        settings,
        args.url,
        config=cfg,
        rescue_grace_s=args.grace,
        provider_factory=lambda s, pool: RecordingProvider(
            args.record, latency=tuple(args.latency), seed=args.seed
        ),
    )
    install_signal_handlers(worker.stop)
    return await worker.run()


if __name__ == "__main__":
    raise SystemExit(run_loop(main()))
