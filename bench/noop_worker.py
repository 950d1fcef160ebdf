"""A worker process whose provider returns at once: `python bench/noop_worker.py --url URL`.

Everything but the provider is the production worker (pgqueue.worker.Worker with its
default DispatcherConfig: LISTEN/NOTIFY wake, 1 s poll fallback, rescuer, maintenance,
heartbeat, the per-job log lines at INFO), so what it measures is pgqueue's own cost per
job: claim, hand-off, completion, promotion. Used by bench/dispatch.py for throughput
and memory; `--turn-times FILE` also writes where a full turn's time goes (TurnClock).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from pgqueue import queries
from pgqueue.config import Settings
from pgqueue.logs import setup_logging
from pgqueue.models import Job, SendResult
from pgqueue.worker import Worker, install_signal_handlers, run_loop


class NoopProvider:
    """Accepts every message at once, like a provider with zero latency."""

    def __init__(self) -> None:
        self._sids = itertools.count(1)

    async def send(self, job: Job) -> SendResult:
        return SendResult(sid=f"SM{next(self._sids):032x}")

    async def aclose(self) -> None:
        return None


class TurnClock:
    """Where a full turn's time goes, from the worker's side: queueing the statements,
    the work handed to `on_sent` (the job log lines), the wait for the server's answer,
    and the time between one turn's answer and the next turn. Wraps queries.cycle, which
    the dispatcher calls once a turn; only turns that claim at least `full` jobs count."""

    def __init__(self, full: int) -> None:
        self.full = full
        # (start, statements queued, on_sent done, answer, jobs claimed)
        self.turns: list[tuple[float, float, float, float, int]] = []
        self._cycle = queries.cycle

    async def cycle(self, conn: queries.Conn, **kw: Any) -> queries.CycleResult:
        start = time.perf_counter()
        sent: list[float] = []
        on_sent = kw.get("on_sent")

        def mark() -> None:
            sent.append(time.perf_counter())
            if on_sent is not None:
                on_sent()
            sent.append(time.perf_counter())

        result = await self._cycle(conn, **{**kw, "on_sent": mark})
        if len(sent) == 2:
            self.turns.append((start, sent[0], sent[1], time.perf_counter(), len(result.claimed)))
        return result

    def summary(self) -> dict[str, float] | None:
        """Medians in ms, or None when too few full turns were seen to say anything."""
        t = [turn for turn in self.turns if turn[4] >= self.full]
        if len(t) < 3:
            return None
        pairs = zip(self.turns, self.turns[1:], strict=False)
        gaps = [b[0] - a[3] for a, b in pairs if min(a[4], b[4]) >= self.full]
        ms = 1000.0
        return {
            "turns": len(t),
            "claimed": statistics.median(turn[4] for turn in t),
            "queue_ms": statistics.median(b - a for a, b, *_ in t) * ms,
            "on_sent_ms": statistics.median(c - b for _, b, c, *_ in t) * ms,
            "server_ms": statistics.median(d - c for _, _, c, d, _ in t) * ms,
            "between_ms": statistics.median(gaps) * ms if gaps else float("nan"),
        }


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", required=True)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--log-level", default="INFO", help="INFO (production) or WARNING")
    p.add_argument("--turn-times", type=Path, help="write TurnClock's medians here (JSON)")
    args = p.parse_args()
    setup_logging("plain", level=getattr(logging, args.log_level.upper()))
    clock = None
    if args.turn_times is not None:
        clock = TurnClock(full=args.concurrency)
        queries.cycle = clock.cycle
    worker = Worker(
        Settings(),
        args.url,
        concurrency=args.concurrency,
        provider_factory=lambda settings, pool: NoopProvider(),
    )
    install_signal_handlers(worker.stop)
    code = await worker.run()
    if clock is not None and (summary := clock.summary()) is not None:
        args.turn_times.write_text(json.dumps(summary))
    return code


if __name__ == "__main__":
    raise SystemExit(run_loop(main()))
