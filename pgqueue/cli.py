"""The `pgqueue` command. Every failure a user can cause ends in one line and exit code 2;
an unreachable database in one line and exit code 1; never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

from pgqueue import admin, demo, migrate, ops_cli, webhooks, worker
from pgqueue.config import Settings
from pgqueue.credentials import Keyring
from pgqueue.dashboard import dashboard_url, ttl_hours
from pgqueue.db import connect, resolve_database_url, stop_embedded
from pgqueue.errors import EXIT_USAGE, PgQueueError, exit_code
from pgqueue.http import serve
from pgqueue.http.auth import LOCAL_TOKEN_TTL_S, TOKEN_TTL_S

# A command: the parsed arguments and the settings from the environment in, exit code out.
Handler = Callable[[argparse.Namespace, Settings], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"pgqueue: {message}\n")


def _nonneg_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _int_or_default(text: str) -> int | None:
    if text in ("default", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'default'") from None


def _ttl(text: str) -> tuple[str, float | None]:
    kind, sep, seconds = text.partition("=")
    if not sep or not kind:
        raise argparse.ArgumentTypeError(f"{text!r} is not TYPE=SECONDS (or TYPE=none)")
    return kind, _float_or_none(seconds)


def _float_or_none(text: str) -> float | None:
    if text in ("none", "default"):
        return None
    return _nonneg_float(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pgqueue", description="PostgreSQL send queue for WhatsApp through Twilio")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    migrate_p = sub.add_parser(
        "migrate", help="upgrade the database schema to the newest migration"
    )
    migrate_p.set_defaults(func=_migrate)

    serve = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)

    worker_p = sub.add_parser("worker", help="run a worker that sends queued messages")
    worker.add_arguments(worker_p)
    worker_p.set_defaults(func=_worker)

    demo_p = sub.add_parser("demo", help="run the demo on the embedded database")
    demo_p.add_argument("--scenario", action="append", default=None)
    demo_p.add_argument("--keep-running", action="store_true")
    demo_p.add_argument("--duration-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    demo_p.set_defaults(func=_demo)

    tenant_p = sub.add_parser("tenant", help="add, list and change tenants")
    tenant_p.set_defaults(func=_in_loop(_tenant))
    tenant = tenant_p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    add = tenant.add_parser("add", help="add a tenant with its Twilio credentials")
    add.add_argument("id")
    add.add_argument("--account-sid", required=True)
    _auth_token_options(add, prompt=True)
    add.add_argument("--from", dest="whatsapp_from", required=True, help="WhatsApp sender, E.164")
    add.add_argument(
        "--sender",
        action="append",
        default=[],
        help="another WhatsApp sender of the tenant a message may name as fromNumber (repeatable)",
    )
    add.add_argument("--name")
    add.add_argument("--max-concurrency", type=int)
    add.add_argument("--rate", type=_nonneg_float, help="own sends/s limit")
    lst = tenant.add_parser("list", help="list tenants")
    lst.add_argument("--json", action="store_true")
    tset = tenant.add_parser("set", help="change a tenant")
    tset.add_argument("id")
    tset.add_argument("--name")
    tset.add_argument("--account-sid")
    _auth_token_options(tset, prompt=False)
    tset.add_argument("--from", dest="whatsapp_from", help="the default WhatsApp sender")
    tset.add_argument("--add-sender", action="append", default=[], help="(repeatable)")
    tset.add_argument("--remove-sender", action="append", default=[], help="(repeatable)")
    tset.add_argument(
        "--max-concurrency",
        type=_int_or_default,
        default=admin._UNSET,
        help="a number, or 'default' for the queue's",
    )
    tset.add_argument(
        "--rate", type=_float_or_none, default=admin._UNSET, help="sends/s, or 'none'"
    )
    tset.add_argument(
        "--fallback-content-sid",
        default=admin._UNSET,
        help="template for messages outside the 24-hour window, or 'none'",
    )
    tset.add_argument(
        "--fallback-variable", default=admin._UNSET, help="template variable that gets the text"
    )
    tset.add_argument(
        "--webhook-url",
        default=admin._UNSET,
        help="where the tenant's delivery events are posted (signed), or 'none'",
    )
    tset.add_argument(
        "--new-webhook-secret",
        action="store_true",
        help="make a new webhook signing secret (shown once)",
    )
    state = tset.add_mutually_exclusive_group()
    state.add_argument("--pause", action="store_true")
    state.add_argument("--resume", action="store_true")
    tenant.add_parser(
        "rotate-key",
        help="encrypt every tenant's auth token again with the first of PGQUEUE_SECRET_KEYS",
    )

    token_p = sub.add_parser("token", help="API tokens")
    token_p.set_defaults(func=_in_loop(_token))
    token = token_p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    tc = token.add_parser("create", help="create a token for a tenant (shown once)")
    tc.add_argument("tenant")
    tc.add_argument(
        "--expires-in-days", type=int, help="the token stops working after N days (default: never)"
    )
    tl = token.add_parser("list", help="list tokens: prefix, tenant, created, expires, last used")
    tl.add_argument("--tenant")
    tl.add_argument("--json", action="store_true")
    tr = token.add_parser("revoke", help="revoke a token at once")
    tr.add_argument("token", help="its id or prefix (as `token list` shows), or the token")

    queue_p = sub.add_parser("queue", help="queue limits")
    queue_p.set_defaults(func=_in_loop(_queue))
    queue = queue_p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    qs = queue.add_parser("show")
    qs.add_argument("--json", action="store_true")
    qset = queue.add_parser("set")
    qset.add_argument("--global-concurrency", type=int)
    qset.add_argument("--tenant-concurrency", type=int)
    qset.add_argument("--rate", type=_nonneg_float, help="sends per second for the whole queue")
    qset.add_argument("--retention-days", type=int)
    qset.add_argument(
        "--message-type-ttl",
        action="append",
        default=[],
        type=_ttl,
        metavar="TYPE=SECONDS|none",
        help="a message of TYPE that gives no deadline expires this long after it is due "
        "(repeatable; none: no TTL)",
    )

    dash = sub.add_parser("dashboard-url", help="print a signed link to the dashboard")
    dash.add_argument("--base-url", default="http://127.0.0.1:8000", help="where the API runs")
    dash.add_argument(
        "--ttl-hours", default="12", help="how long the link works (default 12, at most 168)"
    )
    dash.add_argument(
        "--allow-retry",
        action="store_true",
        help="the link may also retry dead letters (without it, it only reads)",
    )
    dash.set_defaults(func=_dashboard_url)

    roles = sub.add_parser(
        "roles",
        help="create the database roles pgqueue_api, pgqueue_worker, pgqueue_inspector "
        "and grant them least privilege on this database",
    )
    roles.add_argument(
        "--no-create",
        action="store_true",
        help="only grant to the roles that exist (no CREATEROLE needed)",
    )
    roles.add_argument("--json", action="store_true")
    roles.set_defaults(func=_in_loop(_roles))

    emb = sub.add_parser("embedded", help="the embedded PostgreSQL").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    emb.add_parser("stop", help="stop the embedded server of PGQUEUE_HOME").set_defaults(
        func=_embedded_stop
    )

    ops_cli.add_commands(sub)
    return p


def _auth_token_options(parser: argparse.ArgumentParser, *, prompt: bool) -> None:
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--auth-token",
        help="the Twilio auth token (shows in ps and shell history: prefer --auth-token-file)",
    )
    asked = " (neither: asked for on a terminal)" if prompt else ""
    given.add_argument(
        "--auth-token-file",
        metavar="PATH|-",
        help=f"read the Twilio auth token from a file, or from standard input with -{asked}",
    )


def _read_auth_token(args: argparse.Namespace, settings: Settings, *, required: bool) -> str | None:
    """The auth token from --auth-token, --auth-token-file or a prompt; warns on stderr
    where it is exposed (command line) or will be stored in plain text (no key)."""
    token: str | None
    if args.auth_token is not None:
        _warn("--auth-token shows in ps and in shell history; use --auth-token-file PATH|-")
        token = args.auth_token
    elif args.auth_token_file is not None:
        path = args.auth_token_file
        try:
            if path == "-":
                token = sys.stdin.readline()
            else:
                with open(path, encoding="utf-8") as f:
                    token = f.read(4096)
        except (OSError, UnicodeDecodeError) as exc:
            raise PgQueueError(f"cannot read the auth token from {path}: {exc}") from None
        token = token.strip()
    elif required and sys.stdin.isatty():
        token = getpass.getpass("Twilio auth token: ").strip()
    elif required:
        raise PgQueueError(
            "give the Twilio auth token with --auth-token-file PATH|- "
            "(standard input is not a terminal to ask on)"
        )
    else:
        return None
    if not settings.secret_keys:
        _warn(
            "PGQUEUE_SECRET_KEYS is not set: the auth token is stored in plain text "
            "(set it, then run `pgqueue tenant rotate-key`)"
        )
    return token


def _warn(message: str) -> None:
    print(f"pgqueue: warning: {message}", file=sys.stderr)


def _print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in columns))
    Console().print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _json(value: Any) -> None:
    print(json.dumps(value, default=str, indent=2))


async def _with_conn(settings: Settings, fn: Callable[[Any], Awaitable[int]]) -> int:
    url = resolve_database_url(settings)
    conn = await connect(url, application_name="pgqueue-cli")
    try:
        return await fn(conn)
    finally:
        await conn.close()


async def _tenant(args: argparse.Namespace, settings: Settings) -> int:
    keyring = Keyring(settings.secret_keys)
    if args.action == "rotate-key" and not keyring.encrypts:
        raise PgQueueError("PGQUEUE_SECRET_KEYS is not set: rotate-key encrypts with its first key")
    auth_token = (
        _read_auth_token(args, settings, required=args.action == "add")
        if args.action in ("add", "set")
        else None
    )

    async def run(conn: Any) -> int:
        if args.action == "rotate-key":
            done = await admin.rotate_key(conn, keyring)
            print(
                f"auth tokens of {done.tenants} tenant(s) encrypted with the first key of "
                f"PGQUEUE_SECRET_KEYS ({done.were_plain} were plain text)"
            )
        elif args.action == "add":
            row = await admin.add_tenant(
                conn,
                tenant_id=args.id,
                account_sid=args.account_sid,
                auth_token=auth_token or "",
                keyring=keyring,
                whatsapp_from=args.whatsapp_from,
                senders=args.sender,
                name=args.name,
                max_concurrency=args.max_concurrency,
                rate_per_second=args.rate,
            )
            print(f"tenant {row['id']} added (sender {row['whatsapp_from']})")
        elif args.action == "list":
            rows = await admin.list_tenants(conn)
            if args.json:
                _json(rows)
            else:
                _print_table(
                    rows,
                    [
                        "id",
                        "name",
                        "whatsapp_from",
                        "senders",
                        "max_concurrency",
                        "rate_per_second",
                        "active",
                        "paused",
                        "paused_until",
                        "pause_reason",
                        "completed_total",
                        "failed_total",
                        "webhook_url",
                        "webhook_last_error",
                    ],
                    "tenants",
                )
        else:
            fallback = args.fallback_content_sid
            if fallback in ("none", "default"):
                fallback = None
            row = await admin.set_tenant(
                conn,
                args.id,
                name=args.name,
                account_sid=args.account_sid,
                auth_token=auth_token,
                keyring=keyring,
                whatsapp_from=args.whatsapp_from,
                add_senders=args.add_sender,
                remove_senders=args.remove_sender,
                max_concurrency=args.max_concurrency,
                rate_per_second=args.rate,
                paused=True if args.pause else (False if args.resume else None),
                fallback_content_sid=fallback,
                fallback_variable=args.fallback_variable,
                webhook_url=None if args.webhook_url == "none" else args.webhook_url,
                new_webhook_secret=args.new_webhook_secret,
            )
            state = "paused" if row["paused"] else "active"
            print(
                f"tenant {row['id']}: {state}, max concurrency "
                f"{row['max_concurrency'] or 'queue default'}, rate "
                f"{row['rate_per_second'] or 'queue only'}, webhook "
                f"{row['webhook_url'] or 'none'}"
            )
            if row["webhook_secret"]:
                print(
                    f"webhook secret (shown once; it signs the {webhooks.SIGNATURE_HEADER} "
                    f"header): {row['webhook_secret']}"
                )
        return 0

    return await _with_conn(settings, run)


async def _token(args: argparse.Namespace, settings: Settings) -> int:
    async def run(conn: Any) -> int:
        if args.action == "list":
            rows = await admin.list_tokens(conn, args.tenant)
            if args.json:
                _json(rows)
            else:
                _print_table(
                    rows,
                    [
                        "id",
                        "prefix",
                        "tenant_id",
                        "state",
                        "created_at",
                        "expires_at",
                        "last_used_at",
                        "revoked_at",
                    ],
                    "API tokens",
                )
        elif args.action == "revoke":
            row = await admin.revoke_token(conn, args.token)
            print(
                f"token {row['id']} ({row['prefix']}…) of tenant {row['tenant_id']} revoked "
                f"at {row['revoked_at']:%Y-%m-%d %H:%M:%S %Z}; API processes refuse it within "
                f"{api_cache_s(settings):g} s"
            )
        else:
            token = await admin.create_token(
                conn, args.tenant, expires_in_days=args.expires_in_days
            )
            until = f", expires in {args.expires_in_days} days" if args.expires_in_days else ""
            print(f"API token for tenant {args.tenant} (shown once, stored hashed{until}):")
            print(token)
        return 0

    return await _with_conn(settings, run)


def api_cache_s(settings: Settings) -> float:
    """How long an API process may go on taking a revoked token (its token caches)."""
    return float(TOKEN_TTL_S) if settings.redis_url else LOCAL_TOKEN_TTL_S


async def _queue(args: argparse.Namespace, settings: Settings) -> int:
    async def run(conn: Any) -> int:
        if args.action == "set":
            limits = await admin.set_queue(
                conn,
                settings.queue_name,
                global_concurrency=args.global_concurrency,
                tenant_concurrency=args.tenant_concurrency,
                rate_per_second=args.rate,
                retention_days=args.retention_days,
                message_type_ttls=dict(args.message_type_ttl) or None,
            )
        else:
            limits = await admin.get_queue(conn, settings.queue_name)
        if getattr(args, "json", False):
            _json(limits.__dict__)
        else:
            print(
                f"queue {limits.name}: global concurrency {limits.global_concurrency}, "
                f"tenant concurrency {limits.tenant_concurrency}, rate "
                f"{limits.rate_per_second:g}/s, retention {limits.retention_days} days, "
                f"{limits.active} in flight"
                + (
                    ", TTL "
                    + ", ".join(f"{k} {v:g} s" for k, v in sorted(limits.message_type_ttls.items()))
                    if limits.message_type_ttls
                    else ""
                )
            )
        return 0

    return await _with_conn(settings, run)


async def _roles(args: argparse.Namespace, settings: Settings) -> int:
    async def run(conn: Any) -> int:
        rows = await admin.apply_roles(conn, create=not args.no_create)
        if args.json:
            _json(rows)
            return 0
        for r in rows:
            members = ", ".join(r["members"]) or "no members yet"
            print(f"{r['role']}: {r['state']} ({members})")
        if any(r["state"] == "missing" for r in rows):
            print("missing roles: run `pgqueue roles` as a user with CREATEROLE")
        print("make a login role a member with: GRANT pgqueue_worker TO <login>;")
        return 0

    return await _with_conn(settings, run)


def _in_loop(
    command: Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]],
) -> Handler:
    def handler(args: argparse.Namespace, settings: Settings) -> int:
        return asyncio.run(command(args, settings))

    return handler


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    url = resolve_database_url(settings)
    before = migrate.current_revision(url)
    migrate.upgrade(url)
    after = migrate.current_revision(url)
    print(f"database at migration {after}" + ("" if before == after else f" (was {before})"))
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    return serve(settings, host=args.host, port=args.port)


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    return worker.main_from_cli(settings, concurrency=args.concurrency, reload=args.reload)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    return demo.main(
        settings, scenarios=args.scenario, keep_running=args.keep_running, scale=args.duration_scale
    )


def _dashboard_url(args: argparse.Namespace, settings: Settings) -> int:
    ttl_s = ttl_hours(args.ttl_hours)
    print(dashboard_url(settings, args.base_url, ttl_s, allow_retry=args.allow_retry))
    return 0


def _embedded_stop(args: argparse.Namespace, settings: Settings) -> int:
    stopped = stop_embedded(settings.home)
    print("embedded server stopped" if stopped else "no embedded server was running")
    return 0


def run(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env(os.environ if environ is None else environ)
    handler: Handler = args.func
    return handler(args, settings)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(exit_code(lambda: run(argv)))


if __name__ == "__main__":
    main()
