"""One root error for everything pgqueue raises on purpose.

Each error carries a stable machine `code` and a human `message` that the API and the
CLI can show as-is: no traceback, no secret.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import psycopg

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 1

# Twilio's error codes after which sending to the number again cannot succeed until the
# recipient acts (21610 STOP, 63014 blocked the business, 63024 invalid recipient): the
# number is suppressed, whether the code came with the send or with a status callback.
SUPPRESS_CODES = frozenset({21610, 63014, 63024})


def first_line(exc: BaseException) -> str:
    """A one-line description of an exception for logs and CLI messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PgQueueError(Exception):
    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(PgQueueError):
    code = "invalid_config"


class ValidationError(PgQueueError):
    """Bad input to enqueue or to an admin command; `field` names what was wrong."""

    code = "invalid_request"

    def __init__(self, message: str, *, code: str = "invalid_request", field: str | None = None):
        super().__init__(message, code=code)
        self.field = field


class NotFoundError(PgQueueError):
    code = "not_found"


class DatabaseUnavailableError(PgQueueError):
    code = "database_unavailable"


class RequestTimeoutError(PgQueueError):
    """The client did not send its whole request in time (the API answers 408)."""

    code = "request_timeout"


class SendError(PgQueueError):
    """A provider refused or failed a send. `provider_code` is the provider's own code."""

    def __init__(
        self,
        message: str,
        *,
        provider_code: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message, code="send_failed")
        self.provider_code = provider_code
        self.http_status = http_status


class TransientSendError(SendError):
    """Worth retrying: rate limits, 5xx, timeouts, connection errors.

    `retry_after` (seconds) is the provider's own hint; `throttle` says the provider asked
    the whole queue to slow down (HTTP 429), not only this message. `ambiguous` marks a
    failure after which the provider may still have accepted the message (read timeout).
    """

    def __init__(
        self,
        message: str,
        *,
        provider_code: str | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
        throttle: bool = False,
        ambiguous: bool = False,
    ) -> None:
        super().__init__(message, provider_code=provider_code, http_status=http_status)
        self.retry_after = retry_after
        self.throttle = throttle
        self.ambiguous = ambiguous


class PermanentSendError(SendError):
    """Retrying cannot help (invalid number, unsubscribed, …): the job goes dead at once.

    `suppress` asks to stop sending to this number for this tenant.
    """

    def __init__(
        self,
        message: str,
        *,
        provider_code: str | None = None,
        http_status: int | None = None,
        suppress: bool = False,
    ) -> None:
        super().__init__(message, provider_code=provider_code, http_status=http_status)
        self.suppress = suppress


class TenantSendError(SendError):
    """The tenant's own set-up is broken (bad credentials, sender not WhatsApp).

    The tenant is paused: its jobs wait without burning retries until an operator resumes it.
    """


class SenderLimitError(SendError):
    """The tenant's WhatsApp sender hit a limit of Twilio's or Meta's (the business's
    messaging tier, the sender's queue at Twilio being full): the sender rests `rest_s`
    seconds and then goes on by itself; the message waits without spending its attempt,
    and other tenants' sends go on."""

    def __init__(
        self,
        message: str,
        *,
        rest_s: float,
        provider_code: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message, provider_code=provider_code, http_status=http_status)
        self.rest_s = rest_s


def exit_code(run: Callable[[], int], prog: str = "pgqueue") -> int:
    """Runs a command and turns what a user can cause into one line on stderr and an exit
    code, never a traceback: a PgQueueError or an unmigrated database exits 2, an
    unreachable or refusing database 1, Ctrl-C 130."""
    try:
        return run()
    except PgQueueError as e:
        print(f"{prog}: {e.message}", file=sys.stderr)
        return EXIT_USAGE
    except psycopg.OperationalError as e:
        print(f"{prog}: cannot reach the database: {first_line(e)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction) as e:
        print(
            f"{prog}: the database lacks pgqueue's schema or is behind it ({first_line(e)}): "
            "run `pgqueue migrate`",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except psycopg.Error as e:
        print(f"{prog}: the database refused: {first_line(e)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
