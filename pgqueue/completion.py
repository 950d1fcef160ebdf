"""What happens to a job after its send: a pure decision, applied elsewhere only if the
job is still ours and still active (queries.complete_jobs fences on the claim token)."""

from __future__ import annotations

from pgqueue.errors import (
    PermanentSendError,
    SenderLimitError,
    SendError,
    TenantSendError,
    TransientSendError,
)
from pgqueue.models import Job, Outcome, SendResult

MAX_ERROR_MESSAGE = 500


def backoff_s(attempt: int, base_ms: int) -> float:
    """Delay before retry after attempt `attempt` (1-based): base, 2 x base, 4 x base … (G7)."""
    return float(base_ms / 1000.0 * 2 ** max(attempt - 1, 0))


def _code(error: SendError) -> str:
    if error.provider_code:
        return str(error.provider_code)
    if error.http_status:
        return f"http-{error.http_status}"
    return type(error).__name__


def decide(job: Job, result: SendResult | BaseException, *, backoff_ms: int) -> Outcome:
    """Done, Retry(at), Dead, or Release, from the send's result.

    * success → completed, with the provider's SID;
    * permanent failure → failed at once (the dead letter), with the provider's code;
    * transient failure → retry after backoff (at least the provider's Retry-After)
      while attempts remain, else failed; a 429 also throttles the whole queue;
    * tenant-level failure (bad credentials) → released without spending the attempt,
      and the tenant is paused, so none of its jobs burns retries meanwhile;
    * anything else the provider raised is a bug or an unknown condition: retried like
      a transient failure, so a message is never dropped on an unexpected exception.
    """
    if isinstance(result, SendResult):
        return Outcome("completed", sid=result.sid, status=result.status, channel=result.channel)
    message = str(result)[:MAX_ERROR_MESSAGE] or type(result).__name__
    if isinstance(result, TenantSendError):
        return Outcome(
            "release",
            code=_code(result),
            message=message,
            pause_tenant=job.tenant_id,
        )
    if isinstance(result, SenderLimitError):
        return Outcome(
            "release",
            delay=result.rest_s,
            code=_code(result),
            message=message,
            rest_tenant_s=result.rest_s,
        )
    if isinstance(result, PermanentSendError):
        return Outcome(
            "failed",
            code=_code(result),
            message=message,
            suppress=result.suppress,
        )
    if isinstance(result, TransientSendError):
        code = _code(result)
        retry_after = result.retry_after
        throttle = retry_after if result.throttle and retry_after else None
    else:
        code = "internal-error"
        retry_after = None
        throttle = None
        message = f"{type(result).__name__}: {message}"
    if job.attempts >= job.max_attempts:
        return Outcome("failed", code=code, message=f"retries exhausted: {message}")
    delay = backoff_s(job.attempts, backoff_ms)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return Outcome("retry", delay=delay, code=code, message=message, throttle_s=throttle)


def expired(job: Job, now: float) -> Outcome | None:
    """`expired` for a job whose deadline has passed before its send could start (it
    is never sent), else None."""
    if job.expires_at is not None and job.expires_at.timestamp() <= now:
        return Outcome("expired", code="expired", message="not sent: its deadline passed first")
    return None


def decide_lost(*, attempts: int, max_attempts: int, code: str, message: str) -> Outcome:
    """The outcome of a send whose worker was lost or stalled (the rescuer's). The send
    may have reached the provider, so it is retried at once rather than after a backoff
    (nothing says the provider is struggling), while attempts remain; else it fails."""
    if attempts >= max_attempts:
        return Outcome("failed", code=code, message=f"retries exhausted: {message}")
    return Outcome("retry", delay=0.0, code=code, message=message)
