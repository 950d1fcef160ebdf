"""Per-sender rate (DESIGN.md G4b), judged at the wire: no sender starts more sends in
any 1-second window than its own rate, and a sender with a backlog gets its rate.

    .venv/bin/python bench/senders.py [--runs 3] [--seconds 30] [--database-url URL]
        [--workdir DIR] [--keep]

Each run works in a scratch database of its own (migrated, dropped at the end) on the
server of `--database-url`, else DATABASE_URL, else pgqueue's embedded server:

* 45 tenants with rates of their own (`pgqueue tenant set ID --rate R
  [--max-concurrency N]`): 40 at 10/s, 4 at 50/s with max concurrency 10 and 1 at 1/s,
  601/s in all; the queue at global concurrency 200 and 1,000/s (`pgqueue queue set
  --global-concurrency 200 --rate 1000`), so only the senders' own rates bind;
* every tenant a backlog that lasts 20 s at its rate (12,020 messages), spread round robin
  over conversations enough for its rate (FIFO allows one send in flight per
  conversation), enqueued straight into the database before any worker starts;
* 3 `pgqueue worker --concurrency 60` processes sending to the fake Twilio, which
  answers after 0.12-0.18 s; a run ends when the queue is drained or after `--seconds`
  of sending, whichever comes first.

A start is when the request's first segment reaches the fake's port, stamped by the
kernel (tcpdump, tests/support/kernel_stamps.py); the request line names the AccountSid, hence
the tenant. Printed per run and as the median of the runs, from those stamps and again
from the fake's own (taken in its event loop, which a busy machine delays):

* worst 1-s window / rate: per sender, the most starts in any 1-second window over its
  rate; the worst sender's must be <= 1.00;
* achieved / rate under own backlog: per sender, starts per second from its first start
  + 1 s to the start of its 90 % quantile (if it sent everything; else to the end of the
  run, its backlog still there) over its rate; the worst sender's must be >= 0.95;
* aggregate: starts per second of all senders while every one of them had a backlog
  (from the first start + 1 s to the earliest end above) over 601/s; must be >= 95 %.

The exit status is 0 when the medians meet every target. Logs of every process, the
fake's records and the capture stay in `--workdir` (default /tmp/pgqueue-senders-<time>).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _common import cpu_busy, median, progress, render_table, scratch_database, server_url

from pgqueue import admin, migrate
from pgqueue.db import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the harness and the fake Twilio live in tests/

from tests.support.harness import (  # noqa: E402
    QUEUE,
    Planned,
    Rec,
    Wire,
    account_sid,
    add_tenants,
    child_url,
    cluster,
    enqueue_direct,
    jobs_live,
    loop_lag,
    max_starts_per_window,
    percentile,
    read_records,
    tenant_id,
)

BACKLOG_S = 20.0  # each sender's backlog, in seconds of its own rate
WARMUP_S = 1.0  # workers starting up on a full queue: not yet a steady rate
QUANTILE = 0.9  # a finished sender's tail, its last conversations alone, is no backlog
LATENCY = "0.12:0.18"
WORKERS = 3
WORKER_CONCURRENCY = 60
GLOBAL_CONCURRENCY = 200
QUEUE_RATE = 1000.0
MAX_WINDOW_RATIO = 1.0
MIN_ACHIEVED_RATIO = 0.95
MIN_AGGREGATE_SHARE = 0.95


@dataclass(frozen=True)
class Sender:
    index: int  # the harness's tenant number
    rate: float
    max_concurrency: int | None  # None: the queue's tenant default (5)
    conversations: int

    @property
    def tenant(self) -> str:
        return tenant_id(self.index)

    @property
    def account(self) -> str:
        return account_sid(self.index)

    @property
    def messages(self) -> int:
        return max(1, round(self.rate * BACKLOG_S))

    @property
    def label(self) -> str:
        return f"{self.tenant} ({self.rate:g}/s)"


def senders() -> list[Sender]:
    # Conversations: a conversation sends one at a time (G1), ~0.2 s a send with the
    # claim and the completion, so a sender at r/s needs more than 0.2 r of them.
    out = [Sender(i, 10.0, None, 8) for i in range(40)]
    out += [Sender(40 + i, 50.0, 10, 25) for i in range(4)]
    out.append(Sender(44, 1.0, None, 2))
    return out


def plan_messages(all_senders: Sequence[Sender]) -> list[Planned]:
    """Round robin over each sender's conversations (none outlasts the others), senders
    interleaved so that enqueue order favours none of them."""
    out = []
    for m in range(max(s.messages for s in all_senders)):
        for s in all_senders:
            if m < s.messages:
                conv = m % s.conversations
                out.append(
                    Planned(
                        key=f"s{s.index:02d}m{m:05d}",
                        tenant=s.tenant,
                        account=s.account,
                        phone=f"+1415570{conv:04d}",
                        seq=m // s.conversations,
                    )
                )
    return out


async def configure(url: str, all_senders: Sequence[Sender]) -> None:
    """What `pgqueue tenant set` and `pgqueue queue set` do, on one connection."""
    conn = await connect(url, application_name="bench-senders")
    try:
        for s in all_senders:
            await admin.set_tenant(
                conn, s.tenant, rate_per_second=s.rate, max_concurrency=s.max_concurrency
            )
        await admin.set_queue(
            conn, QUEUE, global_concurrency=GLOBAL_CONCURRENCY, rate_per_second=QUEUE_RATE
        )
    finally:
        await conn.close()


# -- figures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    worst_window: float  # max over senders of (most starts in any 1 s) / rate
    worst_window_of: str
    worst_achieved: float  # min over senders of (starts/s under own backlog) / rate
    worst_achieved_of: str
    aggregate: float  # starts/s of all senders while all had a backlog
    aggregate_s: float  # how long that was
    by_rate: dict[float, tuple[float, float]]  # rate -> (worst window, worst achieved)
    starts: int


def figures(
    starts_by_account: dict[str, list[float]],
    all_senders: Sequence[Sender],
    finished: set[str],
    stopped: float,
) -> Figures:
    windows: dict[str, float] = {}
    achieved: dict[str, float] = {}
    ends: list[float] = []
    firsts: list[float] = []
    for s in all_senders:
        st = sorted(starts_by_account.get(s.account, []))
        windows[s.account] = max_starts_per_window(st) / s.rate
        if not st:
            achieved[s.account] = 0.0
            ends.append(stopped)
            continue
        firsts.append(st[0])
        lo = st[0] + WARMUP_S
        hi = st[max(0, math.ceil(len(st) * QUANTILE) - 1)] if s.account in finished else stopped
        ends.append(hi)
        inside = sum(1 for t in st if lo <= t < hi)
        achieved[s.account] = inside / (hi - lo) / s.rate if hi - lo > WARMUP_S else math.nan
    by = {s.account: s for s in all_senders}
    w_of = max(windows, key=lambda a: windows[a])
    known = {a: v for a, v in achieved.items() if not math.isnan(v)}
    a_of = min(known, key=lambda a: known[a]) if known else ""
    everything = sorted(t for st in starts_by_account.values() for t in st)
    lo = min(firsts, default=stopped) + WARMUP_S
    hi = min(ends, default=stopped)
    aggregate = sum(1 for t in everything if lo <= t < hi) / (hi - lo) if hi > lo else math.nan
    by_rate: dict[float, tuple[float, float]] = {}
    for rate in sorted({s.rate for s in all_senders}):
        mine = [s.account for s in all_senders if s.rate == rate]
        by_rate[rate] = (
            max(windows[a] for a in mine),
            min((known[a] for a in mine if a in known), default=math.nan),
        )
    return Figures(
        worst_window=windows[w_of],
        worst_window_of=by[w_of].label,
        worst_achieved=known.get(a_of, math.nan),
        worst_achieved_of=by[a_of].label if a_of else "-",
        aggregate=aggregate,
        aggregate_s=max(0.0, hi - lo),
        by_rate=by_rate,
        starts=len(everything),
    )


def fake_starts(recs: Sequence[Rec]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        out[r.account].append(r.t)
    return out


@dataclass(frozen=True)
class Run:
    kernel: Figures | None  # None: no kernel stamps (see note)
    loop: Figures
    note: str
    delivered: int
    expected: int
    sending_s: float
    drained: bool
    lag_ms: tuple[float, float, float] | None  # fake's stamp behind the kernel's


async def run_once(url: str, workdir: Path, all_senders: Sequence[Sender], seconds: float) -> Run:
    t0 = time.monotonic()
    migrate.upgrade(child_url(url))
    await add_tenants(url, len(all_senders))
    await configure(url, all_senders)
    planned = plan_messages(all_senders)
    progress(f"  migrated and configured in {time.monotonic() - t0:.1f} s; enqueueing")
    await enqueue_direct(url, planned)
    progress(f"  {len(planned):,} messages enqueued after {time.monotonic() - t0:.1f} s")
    async with cluster(
        workdir,
        url,
        workers=WORKERS,
        latency=LATENCY,
        worker_args=["--concurrency", str(WORKER_CONCURRENCY)],
    ) as c:
        started = time.time()
        progress(f"  sending (at most {seconds:g} s)")
        drained = False
        while time.time() - started < seconds:
            if await jobs_live(url) == 0:
                drained = True
                break
            await asyncio.sleep(0.5)
        stopped = time.time()
        if not drained:
            # Nothing after `stopped` is measured, and the scratch database goes: SIGTERM
            # would wait out the workers' 30 s drain for the backlog they hold.
            for w in c.workers:
                w.send(signal.SIGKILL)
    recs = read_records(c.record)
    # Finished is a fact about deliveries, whoever stamped them: every message answered.
    sent: dict[str, set[str]] = defaultdict(set)
    for r in recs:
        if r.outcome == "sent" and r.key:
            sent[r.account].add(r.key)
    finished = {s.account for s in all_senders if len(sent[s.account]) >= s.messages}
    loop = figures(fake_starts(recs), all_senders, finished, stopped)
    kernel, note, lag = kernel_figures(c.wire, recs, all_senders, finished, stopped)
    return Run(
        kernel=kernel,
        loop=loop,
        note=note,
        delivered=sum(len(v) for v in sent.values()),
        expected=len(planned),
        sending_s=stopped - started,
        drained=drained,
        lag_ms=lag,
    )


def kernel_figures(
    wire: Wire,
    recs: Sequence[Rec],
    all_senders: Sequence[Sender],
    finished: set[str],
    stopped: float,
) -> tuple[Figures | None, str, tuple[float, float, float] | None]:
    cap = wire.capture
    if cap is None:
        return None, f"no kernel stamps ({wire.note}): judged from the fake's own", None
    by_account = cap.starts_by_account()
    seen = sum(len(v) for v in by_account.values())
    if seen < len(recs):
        return (
            None,
            f"the kernel capture is incomplete ({seen} of {len(recs)} requests, tcpdump "
            f"dropped {cap.dropped} packets): judged from the fake's own stamps",
            None,
        )
    lag = [x * 1000 for x in loop_lag(recs, cap)]
    lag_figs = (percentile(lag, 50), percentile(lag, 99), max(lag)) if lag else None
    precision = "ns" if cap.nanosecond else "µs"
    note = f"kernel stamps (tcpdump on lo, {cap.stamp_type} in {precision}), {seen} requests"
    return figures(by_account, all_senders, finished, stopped), note, lag_figs


# -- the report -------------------------------------------------------------------------


def cells(f: Figures | None, sum_rate: float) -> list[str]:
    if f is None:
        return ["-"] * 3
    return [
        f"{f.worst_window:.2f} ({f.worst_window_of})",
        f"{f.worst_achieved:.2f} ({f.worst_achieved_of})",
        f"{f.aggregate:.0f}/s = {f.aggregate / sum_rate:.1%} ({f.aggregate_s:.1f} s)",
    ]


def table(kernel: Figures | None, loop: Figures, sum_rate: float) -> str:
    targets = [
        f"<= {MAX_WINDOW_RATIO:.2f}",
        f">= {MIN_ACHIEVED_RATIO:.2f}",
        f">= {MIN_AGGREGATE_SHARE:.0%} of {sum_rate:g}/s",
    ]
    names = [
        "worst 1-s window / rate (max over senders)",
        "achieved / rate under own backlog (worst sender)",
        "aggregate starts/s under backlog / sum of rates",
    ]
    k, lp = cells(kernel, sum_rate), cells(loop, sum_rate)
    rows = [[n, t, k[i], lp[i]] for i, (n, t) in enumerate(zip(names, targets, strict=True))]
    for rate, (w, a) in loop.by_rate.items():
        kw, ka = kernel.by_rate[rate] if kernel is not None else (math.nan, math.nan)
        rows.append(
            [
                f"  {rate:g}/s senders: worst window / worst achieved",
                "",
                f"{kw:.2f} / {ka:.2f}",
                f"{w:.2f} / {a:.2f}",
            ]
        )
    return render_table(["figure", "target", "at the wire (kernel)", "at the fake's loop"], rows)


def verdict(f: Figures, sum_rate: float) -> list[str]:
    misses = []
    if not f.worst_window <= MAX_WINDOW_RATIO:
        misses.append(f"a sender above its rate ({f.worst_window:.2f}x, {f.worst_window_of})")
    if not f.worst_achieved >= MIN_ACHIEVED_RATIO:
        misses.append(
            f"a sender below {MIN_ACHIEVED_RATIO:.0%} of its rate under backlog "
            f"({f.worst_achieved:.2f}, {f.worst_achieved_of})"
        )
    if not f.aggregate >= MIN_AGGREGATE_SHARE * sum_rate:
        misses.append(f"aggregate {f.aggregate / sum_rate:.1%} of {sum_rate:g}/s")
    return misses


def median_figures(runs: Sequence[Figures]) -> Figures:
    """Each figure's median over the runs (the senders named are the first run's)."""
    rates = runs[0].by_rate
    return Figures(
        worst_window=median([f.worst_window for f in runs]),
        worst_window_of="median",
        worst_achieved=median([f.worst_achieved for f in runs]),
        worst_achieved_of="median",
        aggregate=median([f.aggregate for f in runs]),
        aggregate_s=median([f.aggregate_s for f in runs]),
        by_rate={
            r: (
                median([f.by_rate[r][0] for f in runs]),
                median([f.by_rate[r][1] for f in runs]),
            )
            for r in rates
        },
        starts=round(median([f.starts for f in runs])),
    )


async def run(args: argparse.Namespace) -> int:
    all_senders = senders()
    sum_rate = sum(s.rate for s in all_senders)
    when = dt.datetime.now(dt.UTC)
    workdir: Path = args.workdir or Path(f"/tmp/pgqueue-senders-{when:%Y%m%d-%H%M%S}")
    busy = cpu_busy()
    print(
        f"senders: {len(all_senders)} senders with their own rates (40 x 10/s, 4 x 50/s "
        f"max concurrency 10, 1 x 1/s: {sum_rate:g}/s), queue {GLOBAL_CONCURRENCY} in "
        f"flight and {QUEUE_RATE:g}/s, {WORKERS} workers --concurrency "
        f"{WORKER_CONCURRENCY}, provider latency {LATENCY} s; backlogs of {BACKLOG_S:g} s "
        f"at each rate; {args.runs} run(s) of at most {args.seconds:g} s sending; CPU busy "
        f"before: {'?' if busy is None else f'{busy:.0%}'}; logs in {workdir}",
        flush=True,
    )
    runs: list[Run] = []
    with server_url(args.database_url) as (url, source):
        progress(f"server: {source}")
        for i in range(args.runs):
            progress(f"run {i + 1} of {args.runs}")
            name = f"bench_senders_{os.getpid()}_{i + 1}"
            with scratch_database(url, name, keep=args.keep) as db:
                r = await run_once(db, workdir / f"run-{i + 1}", all_senders, args.seconds)
            runs.append(r)
            lag = (
                f"; the fake's stamp behind the kernel's p50 / p99 / max "
                f"{r.lag_ms[0]:.2f} / {r.lag_ms[1]:.2f} / {r.lag_ms[2]:.2f} ms"
                if r.lag_ms
                else ""
            )
            print(
                f"\nrun {i + 1}: {r.delivered:,} of {r.expected:,} delivered in "
                f"{r.sending_s:.1f} s ({'drained' if r.drained else 'stopped, backlog left'}); "
                f"starts from {r.note}{lag}\n{table(r.kernel, r.loop, sum_rate)}",
                flush=True,
            )
    kernels = [r.kernel for r in runs if r.kernel is not None]
    judged_kernel = len(kernels) == len(runs)
    med_kernel = median_figures(kernels) if judged_kernel else None
    med_loop = median_figures([r.loop for r in runs])
    print(f"\nmedian of {len(runs)} run(s)\n{table(med_kernel, med_loop, sum_rate)}")
    judged = med_kernel if med_kernel is not None else med_loop
    misses = verdict(judged, sum_rate)
    where = "at the wire (kernel stamps)" if med_kernel is not None else "at the fake's loop"
    print(
        f"\n{'PASS' if not misses else 'MISS'} {where}"
        + (": " + "; ".join(misses) if misses else ""),
        flush=True,
    )
    return 0 if not misses else 1


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=3, help="runs to take the median of (3)")
    p.add_argument(
        "--seconds", type=positive, default=30.0, help="longest sending phase of a run (30)"
    )
    p.add_argument("--database-url", help="server for the scratch databases")
    p.add_argument("--workdir", type=Path, help="logs, records, captures")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep each run's scratch database (bench_senders_<pid>_<run>) to inspect its jobs",
    )
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
