"""`GET /dashboard`: one self-contained page (no build step, no CDN, works offline) that
polls `/dashboard/data` every two seconds.

A browser cannot send a bearer header from a typed address, so the page is opened with
a signed link (`pgqueue dashboard-url`): an expiry, a scope and an HMAC of both. The
HMAC's key is the dashboard's own (PGQUEUE_DASHBOARD_KEY, or one derived from the admin
token), never the admin token itself, so a link reveals nothing usable against the API
and changing the key revokes every link. A link lives at most MAX_TTL_S and only reads,
unless it was signed with the `retry` scope. The same query string authorises the page's
data and retry calls. A request with the admin token as a bearer header may do both.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from typing import Any, Literal
from urllib.parse import urlencode

import psycopg
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from pgqueue import jobs, queries
from pgqueue.config import Settings
from pgqueue.errors import PgQueueError
from pgqueue.metrics import queue_metrics

Scope = Literal["read", "retry"]
SCOPES: tuple[Scope, ...] = ("read", "retry")
DEFAULT_TTL_S = 12 * 3600
# A link is a bearer credential that ends up in browser histories and chat logs: it
# cannot be revoked one by one, so it must not outlive a week.
MAX_TTL_S = 7 * 24 * 3600
# Clocks of the host that signed a link and of the API may disagree a little.
_CLOCK_SKEW_S = 300
# Fixed: changing it revokes every link signed with a key derived from the admin token.
_KEY_LABEL = b"pgqueue dashboard link key v2"
_SIG = re.compile(r"[0-9a-f]{64}")
_MAX_JOB_ID = 2**63 - 1


def link_key(settings: Settings) -> bytes | None:
    """The key that signs links: PGQUEUE_DASHBOARD_KEY, else HMAC-SHA256 of a fixed label
    under the admin token (None: neither is set, and no link is valid)."""
    if settings.dashboard_key:
        return settings.dashboard_key.encode()
    if settings.admin_token:
        return hmac.new(settings.admin_token.encode(), _KEY_LABEL, hashlib.sha256).digest()
    return None


def sign(key: bytes, expires: int, scope: Scope) -> str:
    return hmac.new(key, f"dashboard:{scope}:{expires}".encode(), hashlib.sha256).hexdigest()


def signed_query(
    key: bytes, ttl_s: int = DEFAULT_TTL_S, *, scope: Scope = "read", now: float | None = None
) -> str:
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise PgQueueError(
            f"a dashboard link lives from 1 s to {MAX_TTL_S // 3600} hours, not {ttl_s} s"
        )
    if scope not in SCOPES:
        raise PgQueueError(f"a dashboard link's scope is one of {', '.join(SCOPES)}")
    expires = int((time.time() if now is None else now) + ttl_s)
    return urlencode({"exp": expires, "scope": scope, "sig": sign(key, expires, scope)})


def dashboard_url(
    settings: Settings, base_url: str, ttl_s: int = DEFAULT_TTL_S, *, allow_retry: bool = False
) -> str:
    key = link_key(settings)
    if key is None:
        raise PgQueueError(
            "neither PGQUEUE_DASHBOARD_KEY nor PGQUEUE_ADMIN_TOKEN is set: "
            "the dashboard needs one of them to sign links"
        )
    query = signed_query(key, ttl_s, scope="retry" if allow_retry else "read")
    return f"{base_url.rstrip('/')}/dashboard?{query}"


def ttl_hours(text: str) -> int:
    """`--ttl-hours` as seconds: a finite number of hours, more than 0, at most a week."""
    try:
        hours = float(text)
    except ValueError:
        hours = math.nan
    if not (math.isfinite(hours) and 0 < hours <= MAX_TTL_S / 3600):
        raise PgQueueError(
            f"--ttl-hours must be a number of hours more than 0 and at most "
            f"{MAX_TTL_S // 3600} (7 days), got {text[:40]!r}"
        )
    return max(1, math.ceil(hours * 3600))


def grant(request: Request, settings: Settings) -> Scope | None:
    """What the request may do: the admin token as a bearer header may do everything, a
    valid link what it was signed for. Any other value, however malformed, is None."""
    admin = settings.admin_token
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if admin and scheme.lower() == "bearer":
        # Digests: compare_digest refuses str with non-ASCII characters, and a header
        # may hold any byte.
        given = hashlib.sha256(token.strip().encode("utf-8", "replace")).digest()
        if hmac.compare_digest(given, hashlib.sha256(admin.encode()).digest()):
            return "retry"
    key = link_key(settings)
    params = request.query_params
    exp, scope, sig = params.get("exp", ""), params.get("scope", ""), params.get("sig", "")
    if key is None or not (exp.isascii() and exp.isdigit() and len(exp) <= 12):
        return None
    now = time.time()
    if not now < int(exp) <= now + MAX_TTL_S + _CLOCK_SKEW_S:
        return None
    granted = next((s for s in SCOPES if s == scope), None)
    if granted is None or not _SIG.fullmatch(sig):
        return None
    return granted if hmac.compare_digest(sig, sign(key, int(exp), granted)) else None


def _denied() -> JSONResponse:
    return JSONResponse(
        {
            "error": "unauthorized",
            "message": "the link is missing, malformed, expired or signed with another key; "
            "open the dashboard with a new link from `pgqueue dashboard-url`",
        },
        status_code=401,
        headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"},
    )


def _read_only() -> JSONResponse:
    return JSONResponse(
        {
            "error": "forbidden",
            "message": "this dashboard link is read-only; "
            "retrying needs a link from `pgqueue dashboard-url --allow-retry`",
        },
        status_code=403,
    )


def _unavailable(exc: BaseException) -> JSONResponse:
    return JSONResponse(
        {"error": "database_unavailable", "message": "the database cannot be reached"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


async def snapshot(conn: queries.Conn, queue: str) -> dict[str, Any]:
    """Everything the page shows, in one JSON document."""
    metrics = await queue_metrics(conn, queue)
    limits = await queries.fetch_one(conn, "dashboard_queue", {"queue": queue}) or {}
    tenants = await queries.fetch_all(conn, "tenant_in_flight", {"queue": queue})
    series = await queries.fetch_all(conn, "dashboard_throughput", {"queue": queue})
    failed = await queries.fetch_all(conn, "dashboard_failed", {"queue": queue, "limit": 50})
    hooks = await queries.fetch_all(conn, "api_webhooks", {"tenant_id": None})
    rate_wait = float(limits.get("rate_wait") or 0.0)
    return {
        "queue": queue,
        "counts": {
            k: metrics[k]
            for k in ("waiting", "active", "delayed", "completed", "failed", "expired")
        },
        "limits": {
            "global": limits.get("global_concurrency"),
            "tenant": limits.get("tenant_concurrency"),
            "rate": limits.get("rate_per_second"),
        },
        "workers": int(limits.get("workers") or 0),
        # The bucket: seconds until the next send may start (0 = a slot is free now).
        "rateWait": max(rate_wait, 0.0),
        "throughput": [
            {"t": int(r["bucket"]), "completed": int(r["completed"]), "failed": int(r["failed"])}
            for r in series
        ],
        "tenants": [
            {
                "id": t["id"],
                "active": int(t["active"]),
                "limit": int(t["max_concurrency"]),
                "paused": bool(t["paused"]),
                "reason": t["pause_reason"],
            }
            for t in tenants
        ],
        "failedJobs": [
            {
                "id": int(f["id"]),
                "tenant": f["tenant_id"],
                "to": f["to_number"],
                "code": f["last_error_code"],
                "message": (f["last_error_message"] or "")[:160],
                "attempts": int(f["attempts"]),
                "finishedAt": f["finished_at"].isoformat(),
            }
            for f in failed
        ],
        "webhooks": [
            {
                "tenant": w["tenant_id"],
                "delivered": int(w["delivered"]),
                "failing": int(w["attempts"]),
                "dead": int(w["dead"]),
            }
            for w in hooks
        ],
        "now": time.time(),
    }


def routes(settings: Settings, pool: AsyncConnectionPool[Any]) -> list[Route]:
    queue = settings.queue_name

    async def page(request: Request) -> Response:
        if grant(request, settings) is None:
            return _denied()
        return HTMLResponse(PAGE, headers=_PAGE_HEADERS)

    async def data(request: Request) -> Response:
        scope = grant(request, settings)
        if scope is None:
            return _denied()
        try:
            async with pool.connection(timeout=5) as conn:
                body = await snapshot(conn, queue)
        except (psycopg.OperationalError, TimeoutError) as e:
            return _unavailable(e)
        return JSONResponse({**body, "canRetry": scope == "retry"})

    async def retry(request: Request) -> Response:
        scope = grant(request, settings)
        if scope is None:
            return _denied()
        if scope != "retry":
            return _read_only()
        raw = request.path_params.get("job_id", "")
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and 0 < int(raw) <= _MAX_JOB_ID):
            return JSONResponse(
                {"error": "invalid_request", "message": "job id must be a positive number"},
                status_code=422,
            )
        try:
            async with pool.connection(timeout=5) as conn:
                job = await jobs.retry_job(conn, int(raw), queue=queue)
        except PgQueueError as e:
            status = 404 if e.code == "not_found" else 409
            return JSONResponse({"error": e.code, "message": e.message}, status_code=status)
        except (psycopg.OperationalError, TimeoutError) as e:
            return _unavailable(e)
        return JSONResponse({"id": int(job["id"]), "state": job["state"]})

    return [
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/data", data, methods=["GET"]),
        Route("/dashboard/jobs/{job_id}/retry", retry, methods=["POST"]),
    ]


# The link is in the page's address: no Referer may carry it elsewhere, and no other
# site may frame the page to click its retry buttons.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pgqueue dashboard</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:baseline}
header h1{font-size:18px;margin:0}#status{color:#9fb3c8;font-size:12px}
main{padding:16px 20px;display:grid;gap:16px;
grid-template-columns:repeat(auto-fit,minmax(380px,1fr))}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 14px}
h2{font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:#5b6575;margin:0 0 8px}
.counts{display:flex;gap:18px;flex-wrap:wrap}.count b{display:block;font-size:24px}
.count span{color:#5b6575;font-size:12px}table{width:100%;border-collapse:collapse}
td,th{text-align:left;padding:3px 6px;border-bottom:1px solid #eef0f3;font-size:13px}
.bar{background:#eef0f3;border-radius:3px;height:10px;width:120px;display:inline-block}
.bar i{display:block;height:10px;border-radius:3px;background:#2f7de1}
.bar i.full{background:#d9822b}.paused{color:#c23030;font-weight:600}
button{font:inherit;font-size:12px;padding:2px 8px;cursor:pointer}
svg{width:100%;height:160px}.muted{color:#8a94a3}
</style></head><body>
<header><h1>pgqueue</h1><span id="queue"></span><span id="status">loading…</span></header>
<main>
<section><h2>Queue</h2><div class="counts" id="counts"></div>
<p id="rate" class="muted"></p></section>
<section><h2>Sends per second, last 15 minutes</h2><svg id="chart" viewBox="0 0 900 160"
 preserveAspectRatio="none"></svg><p id="chartinfo" class="muted"></p></section>
<section><h2>Tenants: in flight / limit</h2><table id="tenants"></table></section>
<section><h2>Paused tenants</h2><div id="paused" class="muted"></div></section>
<section><h2>Webhooks: events delivered, refusals in a row, dead letters</h2>
<table id="webhooks"></table></section>
<section style="grid-column:1/-1"><h2>Failed jobs (dead letters)</h2>
<table id="failed"></table></section>
</main>
<script>
const auth = location.search;
const el = id => document.getElementById(id);
const esc = s => String(s ?? "").replace(/[&<>"']/g,
  c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
function chart(points, now) {
  const W = 900, H = 150, start = now - 900;
  const byT = new Map(points.map(p => [p.t, p.completed / 10]));
  const xs = []; for (let t = Math.floor(start / 10) * 10; t <= now; t += 10) xs.push(t);
  const max = Math.max(1, ...xs.map(t => byT.get(t) || 0));
  const path = xs.map((t, i) => `${i ? "L" : "M"}${((t - start) / 900 * W).toFixed(1)},` +
    `${(H - (byT.get(t) || 0) / max * (H - 10)).toFixed(1)}`).join(" ");
  el("chart").innerHTML = `<path d="${path}" fill="none" stroke="#2f7de1" stroke-width="2"/>`;
  el("chartinfo").textContent = "peak " + max.toFixed(1) + " sends/s (10-second buckets)";
}
async function retry(id, button) {
  button.disabled = true;
  const r = await fetch(`/dashboard/jobs/${id}/retry${auth}`, {method: "POST"});
  button.textContent = r.ok ? "queued" : "failed";
  refresh();
}
async function refresh() {
  let d;
  try {
    const r = await fetch("/dashboard/data" + auth, {cache: "no-store"});
    if (!r.ok) { el("status").textContent = "error " + r.status; return; }
    d = await r.json();
  } catch (e) { el("status").textContent = "offline, retrying"; return; }
  el("status").textContent = "updated " + new Date().toLocaleTimeString() +
    " · " + d.workers + " worker(s)";
  el("queue").textContent = d.queue;
  el("counts").innerHTML = ["waiting","active","delayed","completed","failed","expired"].map(k =>
    `<div class="count" data-state="${k}"><b>${d.counts[k]}</b><span>${k}</span></div>`).join("");
  el("rate").textContent = `limits: ${d.limits.global} in flight, ${d.limits.tenant} per tenant, ` +
    `${d.limits.rate}/s · rate bucket: ` + (d.rateWait > 0.05
      ? `next send slot in ${(d.rateWait * 1000).toFixed(0)} ms` : "a slot is free");
  chart(d.throughput, d.now);
  el("tenants").innerHTML = "<tr><th>tenant</th><th>in flight</th><th></th></tr>" +
    d.tenants.map(t => `<tr><td>${esc(t.id)}</td><td>${t.active} / ${t.limit}</td><td>` +
      `<span class="bar"><i class="${t.active >= t.limit ? "full" : ""}" style="width:` +
      `${Math.min(100, t.active / t.limit * 100)}%"></i></span></td></tr>`).join("");
  const paused = d.tenants.filter(t => t.paused);
  el("paused").innerHTML = paused.length ? paused.map(t =>
    `<div class="paused">${esc(t.id)}: ${esc(t.reason)}</div>`).join("") : "none";
  el("webhooks").innerHTML = "<tr><th>tenant</th><th>delivered</th><th>failing</th>" +
    "<th>dead letters</th></tr>" + d.webhooks.map(w => `<tr data-webhook="${esc(w.tenant)}">` +
    `<td>${esc(w.tenant)}</td><td>${w.delivered}</td><td>${w.failing}</td>` +
    `<td>${w.dead}</td></tr>`).join("");
  el("failed").innerHTML = "<tr><th>job</th><th>tenant</th><th>to</th><th>code</th>" +
    "<th>error</th><th>attempts</th><th></th></tr>" + d.failedJobs.map(f =>
    `<tr data-job="${f.id}"><td>${f.id}</td><td>${esc(f.tenant)}</td><td>${esc(f.to)}</td>` +
    `<td>${esc(f.code)}</td><td>${esc(f.message)}</td><td>${f.attempts}</td>` +
    `<td>${d.canRetry ? `<button onclick="retry(${f.id}, this)">retry</button>` : ""}</td></tr>`
  ).join("");
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
