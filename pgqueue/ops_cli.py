"""Operations commands of `pgqueue`: jobs, stats, doctor, suppression.

Tables for people (rich), `--json` for scripts. `cli.build_parser` calls `add_commands`
and `cli.run` hands these commands to `run`. Errors a user can cause are PgQueueErrors
(one line, exit 2 in cli.main); `doctor` exits 1 when anything needs attention.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from pgqueue import events, jobs, migrate, queries
from pgqueue.config import Settings, redact_url
from pgqueue.db import connect, resolve_database_url, shares_sessions
from pgqueue.enqueue import normalize_phone
from pgqueue.errors import NotFoundError, PgQueueError, ValidationError, first_line
from pgqueue.http.models import Job, json_body
from pgqueue.metrics import queue_metrics

# Waiting longer than this while due means something is stuck (no worker, a pause, a
# rate far below the load); `doctor` says so.
STALLED_AFTER_S = 300.0


def add_commands(subparsers: Any) -> None:
    """Add jobs, stats, doctor and suppression to `pgqueue`'s subparsers."""
    jobs_p = subparsers.add_parser("jobs", help="list, show, cancel, retry and clean jobs")
    parser_class = type(jobs_p)
    jobs_sub = jobs_p.add_subparsers(dest="action", required=True, parser_class=parser_class)
    lst = jobs_sub.add_parser("list", help="newest jobs first, live and finished")
    lst.add_argument(
        "--state", choices=["waiting", "delayed", "active", "completed", "failed", "expired"]
    )
    lst.add_argument("--tenant")
    lst.add_argument("--conversation")
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--json", action="store_true")
    show = jobs_sub.add_parser("show", help="one job in full")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true")
    cancel = jobs_sub.add_parser("cancel", help="take back a job that has not started")
    cancel.add_argument("id", type=int)
    retry = jobs_sub.add_parser("retry", help="send failed jobs again: one ID, or --failed")
    retry.add_argument("id", type=int, nargs="?")
    retry.add_argument("--failed", action="store_true", help="every failed job")
    retry.add_argument("--tenant", help="only this tenant's")
    clean = jobs_sub.add_parser("clean", help="delete failed jobs (dead letters)")
    clean.add_argument("--state", required=True, choices=["failed"])
    clean.add_argument("--older-than", help="7d, 12h, 30m, 2w or an ISO 8601 time")
    clean.add_argument("--tenant")
    jobs_p.set_defaults(func=_run_jobs)

    stats = subparsers.add_parser("stats", help="queue counts (the API's metrics)")
    stats.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--tenant", help="one tenant's numbers only")
    stats.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    stats.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    stats.set_defaults(func=_run_stats)

    subparsers.add_parser(
        "doctor", help="check the database, migrations, workers, jobs, Redis"
    ).set_defaults(func=_run_doctor)

    sup = subparsers.add_parser("suppression", help="numbers a tenant may not message")
    sup_sub = sup.add_subparsers(dest="action", required=True, parser_class=parser_class)
    sl = sup_sub.add_parser("list", help="suppressed numbers, newest first")
    sl.add_argument("tenant", nargs="?")
    sl.add_argument("--limit", type=int, default=200)
    sl.add_argument("--json", action="store_true")
    sr = sup_sub.add_parser("remove", help="allow messages to a number again")
    sr.add_argument("tenant")
    sr.add_argument("number")
    sup.set_defaults(func=_run_suppression)


def _run_jobs(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_with_conn(settings, lambda conn: _jobs(conn, args, settings)))


def _run_stats(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_stats(args, settings))
    except KeyboardInterrupt:
        return 0


def _run_doctor(args: argparse.Namespace, settings: Settings) -> int:
    checks = asyncio.run(doctor(settings))
    for check in checks:
        print(check.line())
    return 0 if all(c.ok for c in checks) else 1


def _run_suppression(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_with_conn(settings, lambda conn: _suppression(conn, args)))


# -- helpers -------------------------------------------------------------------------


async def _with_conn(settings: Settings, fn: Callable[[queries.Conn], Awaitable[int]]) -> int:
    conn = await connect(resolve_database_url(settings), application_name="pgqueue-cli")
    try:
        return await fn(conn)
    finally:
        await conn.close()


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=str, indent=2))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(_cell(v) for v in r))
    return table


def _print(renderable: Any) -> None:
    Console().print(renderable)


# -- jobs ----------------------------------------------------------------------------


async def _jobs(conn: queries.Conn, args: argparse.Namespace, settings: Settings) -> int:
    queue = settings.queue_name
    if args.action == "list":
        rows = await jobs.list_jobs(
            conn,
            queue=queue,
            state=args.state,
            tenant_id=args.tenant,
            conversation=args.conversation,
            limit=args.limit,
        )
        if args.json:
            _print_json([json_body(Job.of(r)) for r in rows])
            return 0
        _print(
            _table(
                f"jobs of {queue} ({len(rows)}, newest first)",
                [
                    "id",
                    "state",
                    "tenant",
                    "conversation",
                    "attempts",
                    "error",
                    "provider",
                    "created",
                ],
                [
                    (
                        r["id"],
                        r["state"],
                        r["tenant_id"],
                        r["conversation"],
                        f"{r['attempts']}/{r['max_attempts']}",
                        r["last_error_code"],
                        r["provider_status"],
                        r["created_at"],
                    )
                    for r in rows
                ],
            )
        )
        return 0
    if args.action == "show":
        job = json_body(Job.of(await jobs.get_job(conn, args.id)))
        history = [events.as_json(r) for r in await events.of_job(conn, args.id)]
        if args.json:
            _print_json({**job, "events": history})
        else:
            _print(_table(f"job {args.id}", ["field", "value"], list(job.items())))
            _print(
                _table(
                    "events",
                    ["at", "event", "attempt", "detail"],
                    [
                        (
                            e["at"],
                            e["type"],
                            e.get("attempt"),
                            " ".join(
                                str(e[k])
                                for k in ("sid", "errorCode", "errorMessage", "runAt")
                                if k in e
                            ),
                        )
                        for e in history
                    ],
                )
            )
        return 0
    if args.action == "cancel":
        job = await jobs.cancel_job(conn, args.id, queue=queue)
        print(f"job {args.id} canceled (it was {job['state']})")
        return 0
    if args.action == "retry":
        if (args.id is None) == (not args.failed):
            raise ValidationError("give a job ID or --failed (not both)", field="id")
        if args.id is not None:
            if args.tenant:
                raise ValidationError("--tenant goes with --failed", field="tenant")
            job = await jobs.retry_job(conn, args.id, queue=queue)
            print(f"job {args.id} queued again ({job['state']})")
            return 0
        ids = await jobs.retry_failed(conn, queue=queue, tenant_id=args.tenant)
        print(f"{len(ids)} failed job(s) queued again")
        return 0
    older = None if args.older_than is None else jobs.parse_older_than(args.older_than)
    deleted = await jobs.clean_failed(conn, queue=queue, older_than=older, tenant_id=args.tenant)
    print(f"{deleted} failed job(s) deleted")
    return 0


# -- stats ---------------------------------------------------------------------------


async def _stats(args: argparse.Namespace, settings: Settings) -> int:
    queue = settings.queue_name
    conn = await connect(resolve_database_url(settings), application_name="pgqueue-cli")
    try:

        async def snapshot() -> tuple[dict[str, Any], dict[str, Any] | None, list[Any]]:
            data = await queue_metrics(conn, queue, tenant_id=args.tenant)
            state = await queries.fetch_one(conn, "api_queue_state", {"queue": queue})
            tenants = await queries.fetch_all(
                conn, "api_tenants", {"queue": queue, "tenant_id": args.tenant}
            )
            return data, state, tenants

        if not args.watch:
            data, state, tenants = await snapshot()
            if args.json:
                _print_json(data)
            else:
                _print(_stats_view(queue, data, state, tenants))
            return 0
        shown = 0
        if args.json:
            while not args.count or shown < args.count:
                data, _, _ = await snapshot()
                print(json.dumps({"at": datetime.now(UTC).isoformat(), **data}), flush=True)
                shown += 1
                await asyncio.sleep(args.interval)
            return 0

        with Live(auto_refresh=False) as live:
            while not args.count or shown < args.count:
                live.update(_stats_view(queue, *(await snapshot())), refresh=True)
                shown += 1
                await asyncio.sleep(args.interval)
        return 0
    finally:
        await conn.close()


def _stats_view(
    queue: str, data: dict[str, Any], state: dict[str, Any] | None, tenants: list[Any]
) -> Any:
    counts = _table(
        f"queue {queue}",
        ["waiting", "active", "delayed", "completed", "failed"],
        [[data["waiting"], data["active"], data["delayed"], data["completed"], data["failed"]]],
    )
    parts: list[Any] = [counts]
    if state is not None:
        parts.append(
            _table(
                "limits",
                ["in flight", "rate", "booked ahead", "workers", "oldest due waiting"],
                [
                    [
                        f"{state['in_flight']}/{state['global_concurrency']}",
                        f"{state['rate_per_second']:g}/s",
                        f"{state['rate_ahead_s']:.1f} s",
                        state["workers"],
                        "-" if state["oldest_due_s"] is None else f"{state['oldest_due_s']:.1f} s",
                    ]
                ],
            )
        )
    parts.append(
        _table(
            "tenants",
            ["tenant", "in flight", "completed", "failed", "paused"],
            [
                [
                    t["id"],
                    f"{t['active']}/{t['max_concurrency']}",
                    t["completed_total"],
                    t["failed_total"],
                    (t["pause_reason"] or "yes") if t["paused"] else "",
                ]
                for t in tenants
            ],
        )
    )
    return Group(*parts)


# -- doctor --------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    ok: bool
    name: str
    detail: str

    def line(self) -> str:
        return f"{'OK' if self.ok else 'FAIL':<4}  {self.name}: {self.detail}"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


async def doctor(settings: Settings) -> list[Check]:
    """Every check, in order; the database ones stop at the first that makes the rest
    meaningless (no connection, an old schema)."""
    checks = await _database_checks(settings)
    checks.append(await _redis_check(settings))
    return checks


async def _database_checks(settings: Settings) -> list[Check]:
    queue = settings.queue_name
    try:
        url = resolve_database_url(settings, announce=None)
        conn = await asyncio.wait_for(connect(url, application_name="pgqueue-doctor"), 10)
    except (psycopg.Error, OSError, TimeoutError, PgQueueError) as exc:
        return [
            Check(
                False,
                "database",
                f"cannot connect ({first_line(exc)}): check DATABASE_URL and that "
                "PostgreSQL is running",
            )
        ]
    checks: list[Check] = []
    try:
        version = (await queries.fetch_one(conn, "server_version", {}) or {}).get("v")
        checks.append(Check(True, "database", f"reachable (PostgreSQL {version})"))
        checks.append(await _node_check(conn))
        checks.append(await _pooler_check(settings, url))

        head = migrate.head_revision()
        try:
            row = await queries.fetch_one(conn, "api_schema_version", {})
            current = None if row is None else str(row["version_num"])
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            current = None
        if current != head:
            checks.append(
                Check(
                    False,
                    "migrations",
                    f"database at {current or 'no migration'}, code expects {head}: "
                    "run `pgqueue migrate`",
                )
            )
            return checks
        checks.append(Check(True, "migrations", f"at head ({head})"))

        now = datetime.now(UTC)
        workers = await queries.fetch_all(conn, "api_workers", {"queue": queue})
        alive = [w for w in workers if w["connected"]]
        if alive:
            described = "; ".join(
                f"{w['id']} on {w['hostname']} pid {w['pid']} since "
                f"{_cell(w['started_at'])} UTC ({_ago((now - w['started_at']).total_seconds())})"
                for w in alive
            )
            checks.append(Check(True, "workers", f"{len(alive)} alive: {described}"))
        else:
            checks.append(
                Check(False, "workers", f"none running for queue {queue}: start `pgqueue worker`")
            )
        for w in workers:
            if not w["connected"]:
                checks.append(
                    Check(
                        False,
                        "workers",
                        f"{w['id']} on {w['hostname']} pid {w['pid']} is gone (last heartbeat "
                        f"{_ago((now - w['heartbeat_at']).total_seconds())} ago): its jobs are "
                        "rescued automatically; check that host's logs for why it died",
                    )
                )

        orphans = await queries.fetch_all(conn, "find_orphans", {"queue": queue, "grace": 10})
        if orphans:
            expired = sum(1 for o in orphans if o["lease_expired"])
            checks.append(
                Check(
                    False,
                    "active jobs",
                    f"{len(orphans)} held by no live worker ({expired} with an expired lease): "
                    "a running worker rescues them within a second"
                    + ("" if alive else "; start one with `pgqueue worker`"),
                )
            )
        else:
            checks.append(Check(True, "active jobs", "every active job has a live worker"))

        state = await queries.fetch_one(conn, "api_queue_state", {"queue": queue})
        oldest = None if state is None else state["oldest_due_s"]
        if oldest is not None and oldest > STALLED_AFTER_S:
            checks.append(
                Check(
                    False,
                    "backlog",
                    f"the oldest due message has waited {_ago(oldest)}: check that workers "
                    "run, that its tenant is not paused, and `pgqueue queue show` limits",
                )
            )
        else:
            waited = "nothing due is waiting" if oldest is None else f"oldest due {_ago(oldest)}"
            checks.append(Check(True, "backlog", waited))
        if state is not None and state["rate_ahead_s"] > 5:
            checks.append(
                Check(
                    True,
                    "rate",
                    f"sends are booked {state['rate_ahead_s']:.0f} s ahead (a provider 429 or "
                    "a backlog above the rate limit)",
                )
            )

        paused = await queries.fetch_all(conn, "api_paused_tenants", {})
        for t in paused:
            checks.append(
                Check(
                    False,
                    "tenants",
                    f"{t['id']} is paused ({t['pause_reason'] or 'no reason given'}; last "
                    f"changed {_cell(t['updated_at'])} UTC): fix the cause, then "
                    f"`pgqueue tenant set {t['id']} --resume`",
                )
            )
        if not paused:
            checks.append(Check(True, "tenants", "none paused"))
    except psycopg.Error as exc:
        checks.append(Check(False, "database", f"query failed: {first_line(exc)}"))
    finally:
        await conn.close()
    return checks


async def _node_check(conn: queries.Conn) -> Check:
    role = await queries.fetch_one(conn, "node_role", {}) or {}
    if role.get("standby"):
        return Check(
            False,
            "node",
            f"a standby in recovery (WAL receiver: {role.get('receiving') or 'not streaming'}):"
            " the API and the workers need the primary; list every host in the URL with "
            "target_session_attrs=read-write",
        )
    standbys, synchronous = int(role.get("standbys") or 0), int(role.get("synchronous") or 0)
    if not standbys:
        return Check(True, "node", "primary, no standby streaming from it")
    return Check(
        True, "node", f"primary, {standbys} standby(s) streaming, {synchronous} synchronous"
    )


async def _pooler_check(settings: Settings, url: str) -> Check:
    """The URLs as workers and the API use them: workers need sessions of their own."""
    worker_url = settings.worker_database_url or url
    try:
        pooled = await shares_sessions(url)
        worker_pooled = pooled if worker_url == url else await shares_sessions(worker_url)
    except psycopg.Error as exc:
        return Check(False, "pooler", f"could not tell ({first_line(exc)})")
    if worker_pooled:
        return Check(
            False,
            "pooler",
            "the workers' URL is pooled in transaction mode (connections take turns on "
            "server sessions): set PGQUEUE_WORKER_DATABASE_URL to a direct or "
            "session-pooled URL",
        )
    if pooled:
        return Check(
            True,
            "pooler",
            "DATABASE_URL is pooled in transaction mode (the API prepares no statement "
            "there); the workers use PGQUEUE_WORKER_DATABASE_URL, which keeps its sessions",
        )
    return Check(True, "pooler", "none in transaction mode: every connection keeps its session")


async def _redis_check(settings: Settings) -> Check:
    if not settings.redis_url:
        return Check(True, "redis", "not configured (optional; the database answers everything)")
    from redis.asyncio import Redis  # noqa: PLC0415 (optional)
    from redis.asyncio.retry import Retry  # noqa: PLC0415 (optional)
    from redis.backoff import NoBackoff  # noqa: PLC0415 (optional)

    client = Redis.from_url(
        settings.redis_url,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        async with asyncio.timeout(3):
            await client.ping()
    except Exception as exc:  # any failure means "unreachable" to an operator
        return Check(
            False,
            "redis",
            f"unreachable at {redact_url(settings.redis_url)} ({type(exc).__name__}): the API "
            "works without it, only slower; start Redis or unset REDIS_URL",
        )
    finally:
        await client.aclose()
    return Check(True, "redis", f"reachable at {redact_url(settings.redis_url)}")


# -- suppression ---------------------------------------------------------------------


async def _suppression(conn: queries.Conn, args: argparse.Namespace) -> int:
    if args.action == "list":
        rows = await queries.fetch_all(
            conn, "api_suppressions", {"tenant_id": args.tenant, "limit": args.limit}
        )
        if args.json:
            _print_json(rows)
            return 0
        _print(
            _table(
                "suppressed numbers",
                ["tenant", "number", "provider code", "since"],
                [
                    (r["tenant_id"], r["phone_number"], r["reason_code"], r["created_at"])
                    for r in rows
                ],
            )
        )
        return 0
    number = normalize_phone(args.number, field="number")
    row = await queries.fetch_one(
        conn, "api_unsuppress", {"tenant_id": args.tenant, "phone_number": number}
    )
    if row is None:
        raise NotFoundError(f"{number} is not suppressed for tenant {args.tenant}")
    print(f"{number} may receive messages from {args.tenant} again")
    return 0
