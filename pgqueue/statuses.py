"""Delivery statuses from the provider's callbacks, applied to the messages they name.

A callback may arrive before the worker has committed the message's SID: Twilio can call
back within milliseconds of accepting a send, while the completion that records the SID
is still on its way (or waits for the database to come back). Such a status is held and
applied by maintenance once the message has finished, so no status is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgqueue import queries
from pgqueue.errors import SUPPRESS_CODES

# Held statuses that no finished message claims after this long are forgotten.
EARLY_STATUS_MAX_AGE_S = 86_400.0
# Twilio's "message validity period expired": it never delivered the message in time.
VALIDITY_EXPIRED = "30036"


@dataclass(frozen=True)
class StatusUpdate:
    updated: int
    held: bool


def suppresses(status: str | None, code: str | None) -> bool:
    """A delivery that failed with this code means: do not message this number again."""
    return (
        status in ("failed", "undelivered")
        and code is not None
        and code.isdigit()
        and int(code) in SUPPRESS_CODES
    )


def expired_at_provider(status: str | None, code: str | None) -> bool:
    """Twilio gave up on the message when its ValidityPeriod ran out (30036)."""
    return status in ("failed", "undelivered") and code == VALIDITY_EXPIRED


async def apply_status(
    conn: queries.Conn, *, tenant_id: str, sid: str, status: str, error_code: str | None
) -> StatusUpdate:
    """Move the message `sid` of `tenant_id` forward to `status`, or hold the status if
    no message carries that SID yet; a failure that forbids the number suppresses it."""
    status = status.lower()
    rows = await queries.fetch_all(
        conn,
        "api_provider_status",
        {"tenant_id": tenant_id, "sid": sid, "status": status, "error_code": error_code},
    )
    changed = [r for r in rows if not r["held"]]
    if suppresses(status, error_code):
        for job in changed:
            await _suppress(conn, tenant_id, job["to_number"], error_code)
    if changed and expired_at_provider(status, error_code):
        await queries.execute(conn, "expired_at_provider", {"tenant_id": tenant_id, "sid": sid})
    return StatusUpdate(updated=len(changed), held=len(changed) < len(rows))


async def apply_early_statuses(
    conn: queries.Conn, *, max_age_s: float = EARLY_STATUS_MAX_AGE_S
) -> int:
    """Apply the held statuses whose messages have finished since; returns how many
    messages moved forward."""
    rows = await queries.fetch_all(conn, "apply_early_statuses", {"max_age": max_age_s})
    for r in rows:
        if suppresses(r["provider_status"], r["last_error_code"]):
            await _suppress(conn, r["tenant_id"], r["to_number"], r["last_error_code"])
        if expired_at_provider(r["provider_status"], r["last_error_code"]):
            await queries.execute(
                conn, "expired_at_provider", {"tenant_id": r["tenant_id"], "sid": r["sid"]}
            )
    return len(rows)


async def _suppress(conn: queries.Conn, tenant_id: str, phone: str, code: str | None) -> None:
    await queries.execute(
        conn, "suppress_number", {"tenant_id": tenant_id, "phone_number": phone, "code": code}
    )
