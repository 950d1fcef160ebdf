"""Log lines: one per job event as the old system had them, plain or JSON.

Never a secret; a message's text only as a short preview, and only when the operator
asked for it (PGQUEUE_LOG_PREVIEW). A plain line is one line whatever its fields hold:
text from customers and providers cannot start a line of its own or drive a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import re
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

job_log = logging.getLogger("pgqueue.jobs")

# Fields that carry a message's text: left out of every job line unless previews are on.
TEXT_FIELDS = ("preview",)
_previews = False

# Every C0 and C1 control (CR, LF and ESC among them), DEL, the Unicode line and
# paragraph separators, and the bidirectional marks, embeddings, overrides and isolates:
# what a terminal acts on, a log viewer breaks a line at, or what shows a line's text in
# another order than it is read ("Trojan Source").
_UNSAFE = "\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[{_UNSAFE}]")
# A plain field's value is quoted when it holds any of these too, so that a value cannot
# end its own field and forge another one (`error="x tenant=other"`).
_NEEDS_QUOTES = re.compile(f'[{_UNSAFE} "=\\\\]')
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def escape(text: str) -> str:
    """`text` with each control character written as its Python escape (`\\n`, `\\x1b`,
    `\\u2028`): one line, and nothing in it a terminal would act on."""
    return _CONTROL.sub(_escaped, text)


def show_previews(enabled: bool) -> None:
    """Whether job lines carry a preview of the message's text (process-wide, as the
    logging configuration is): customer text, so setup_logging leaves it off unless
    PGQUEUE_LOG_PREVIEW asks for it."""
    global _previews
    _previews = enabled


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        data = self._data(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            fields if isinstance(fields, dict) else {},
        )
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)

    def format_event(
        self, created: float, level: int, name: str, message: str, fields: dict[str, Any]
    ) -> str:
        """The line `format` makes of such a record, without making the record."""
        data = self._data(created, logging.getLevelName(level), name, message, fields)
        return json.dumps(data, default=str)

    @staticmethod
    def _data(
        created: float, level_name: str, name: str, message: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "ts": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
            "level": level_name.lower(),
            "logger": name,
            "msg": message,
            **fields,
        }


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._date_and_time(int(record.created))},{int(record.msecs):03d}"

    def _date_and_time(self, second: int) -> str:
        # Two lines per message: format each second's date and time once.
        if second != self._second:
            self._second, self._stamp = (
                second,
                time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)),
            )
        return self._stamp

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        line = (
            f"{self.formatTime(record)} {record.levelname} {record.name}: "
            f"{escape(record.getMessage())}" + _pairs(fields if isinstance(fields, dict) else {})
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + _indented(record.exc_text)
        if record.stack_info:
            line += "\n" + _indented(self.formatStack(record.stack_info))
        return line

    def format_event(
        self, created: float, level: int, name: str, message: str, fields: dict[str, Any]
    ) -> str:
        """The line `format` makes of such a record, without making the record."""
        second = int(created)
        stamp = f"{self._date_and_time(second)},{int((created - second) * 1000):03d}"
        return f"{stamp} {logging.getLevelName(level)} {name}: {escape(message)}" + _pairs(fields)


def _pairs(fields: dict[str, Any]) -> str:
    """A plain line's fields, ` key=value` each; empty ones left out."""
    if not fields:
        return ""
    return " " + " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)


def _value(value: Any) -> str:
    if type(value) is int:
        return str(value)
    text = str(value)
    if text and _NEEDS_QUOTES.search(text) is None:
        return text
    return '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _indented(text: str) -> str:
    """A traceback under its line: an exception's message may hold anything, so each of
    its lines is indented (a line of its own starts with the time, never with a space)."""
    return "\n".join("    " + escape(line) for line in text.splitlines())


class BackgroundStreamHandler(logging.Handler):
    """Formats a line in the caller's thread and writes it from a thread of its own.

    A write can block: ext4 holds writers while its journal commits on a stalled disk,
    and a pipe to a slow log collector fills up. In the worker's event loop that delays
    sends that already passed their rate-slot check, which then reach the provider late
    and bunched (G4); the reliability harness saw up to 16 ms of it while the disk
    stalled. The writer takes whatever lines have queued up and writes them at once.
    Lines still queued when the process is killed are lost with it; a normal exit
    (logging.shutdown) writes them first."""

    def __init__(self, stream: Any, gather_s: float = 0.02) -> None:
        super().__init__()
        self.stream = stream
        self.gather_s = gather_s
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._writer = threading.Thread(target=self._write, name="pgqueue-log", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self._idle.clear()
        self._lines.put(line)

    def emit_text(self, text: str) -> None:
        """Queue lines already formatted (each ending in a newline)."""
        self._idle.clear()
        self._lines.put(text)

    def _write(self) -> None:
        stop = False
        while not stop:
            batch = [self._lines.get()]
            # Let lines gather: each wake-up of this thread takes the GIL from the event
            # loop, and waking for every line cost a drain of 20,000 jobs about 12 %.
            time.sleep(self.gather_s)
            while not self._lines.empty():
                batch.append(self._lines.get_nowait())
            stop = None in batch
            text = "".join(line for line in batch if line is not None)
            # A closed or broken stream (ValueError, OSError): nothing to report it to.
            with contextlib.suppress(OSError, ValueError):
                if text:
                    self.stream.write(text)
                    self.stream.flush()
            if self._lines.empty():
                self._idle.set()

    def flush(self) -> None:
        """Wait (a little) until the queued lines are written."""
        self._idle.wait(timeout=5.0)

    def close(self) -> None:
        if self._writer.is_alive():
            self._lines.put(None)
            self._writer.join(timeout=5.0)
        super().close()


def setup_logging(fmt: str = "plain", level: int = logging.INFO, *, preview: bool = False) -> None:
    show_previews(preview)
    handler = BackgroundStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BackgroundStreamHandler):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # A worker writes two lines per message: skip what no line of ours shows (the
    # caller's frame, thread and process names), as the logging HOWTO's optimisation
    # section suggests. (Formatting stays in the caller's thread: moving it to the
    # writer as well cost more CPU than it saved, in an earlier measurement.)
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # The SDK and HTTP libraries log request lines (with account SIDs) at INFO.
    for noisy in ("twilio", "httpx", "aiohttp", "psycopg.pool", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _direct_handler() -> tuple[BackgroundStreamHandler, PlainFormatter | JsonFormatter] | None:
    """The handler the job lines go to when nothing but it would see their records:
    setup_logging's handler on the root logger, with one of our formatters and no
    filters anywhere on the way (otherwise the records are made and handled as usual)."""
    logger: logging.Logger | None = job_log
    while logger is not None and logger.parent is not None:  # up to, not including, root
        if logger.handlers or logger.filters or not logger.propagate or logger.disabled:
            return None
        logger = logger.parent
    root = logging.getLogger()
    if root.filters or len(root.handlers) != 1:
        return None
    handler = root.handlers[0]
    if not isinstance(handler, BackgroundStreamHandler) or handler.filters:
        return None
    formatter = handler.formatter
    if type(formatter) is PlainFormatter or type(formatter) is JsonFormatter:
        return handler, formatter
    return None


def _level(event: str) -> int:
    """`event` is one of processing, completed, retry, failed, released."""
    return logging.WARNING if event in ("failed", "retry", "released") else logging.INFO


class DeferredJobLog:
    """Job event lines recorded when their events happen and written a little later.

    A worker writes two lines per message, and formatting and writing them costs about as
    much of the worker's own time as the rest of the send. The dispatcher flushes them once
    a turn's statements are sent, so they are written while the database works on the
    turn instead of between turns, when the sends wait for them. A line is written
    at most `max_delay_s` after its event and carries the event's time; lines still
    buffered when the process is killed (at most one turn's) are lost with it.
    """

    def __init__(self, max_delay_s: float = 0.05) -> None:
        self.max_delay_s = max_delay_s
        self._events: list[tuple[float, int, str, dict[str, Any]]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, event: str, message: str, **fields: Any) -> None:
        level = _level(event)
        if not job_log.isEnabledFor(level):
            return
        if not _previews:
            for name in TEXT_FIELDS:
                fields.pop(name, None)
        self._events.append((time.time(), level, message, {"event": event, **fields}))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_delay_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        events, self._events = self._events, []
        if not events:
            return
        direct = _direct_handler()
        if direct is not None:
            # Two lines a message: making and handling a LogRecord for each cost the
            # worker about as much as formatting it, for a result the formatter can
            # give from the fields alone when nothing else would see the record.
            handler, formatter = direct
            handler.emit_text(
                "".join(
                    formatter.format_event(created, level, job_log.name, message, fields) + "\n"
                    for created, level, message, fields in events
                    if level >= handler.level
                )
            )
            return
        for created, level, message, fields in events:
            record = job_log.makeRecord(
                job_log.name,
                level,
                "(unknown file)",
                0,
                message,
                (),
                None,
                extra={"fields": fields},
            )
            record.created, record.msecs = created, (created - int(created)) * 1000
            job_log.handle(record)
