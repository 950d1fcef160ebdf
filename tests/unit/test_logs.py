"""Log lines never hold up the caller: a write that blocks (a stalled disk, a full
pipe) is the writer thread's wait, not the worker's event loop's."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time

from pgqueue.config import Settings
from pgqueue.logs import (
    BackgroundStreamHandler,
    DeferredJobLog,
    JsonFormatter,
    PlainFormatter,
    _direct_handler,
    job_log,
    show_previews,
)


class StuckStream:
    """A stream whose writes block until released, like a file on a stalled disk."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.text = ""

    def write(self, text: str) -> int:
        self.released.wait(timeout=10)
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_a_blocked_write_does_not_block_the_caller_and_loses_nothing() -> None:
    stream = StuckStream()
    handler = BackgroundStreamHandler(stream)
    handler.setFormatter(PlainFormatter())
    logger = logging.Logger("test-background", level=logging.INFO)
    logger.addHandler(handler)
    try:
        started = time.monotonic()
        for i in range(200):
            logger.info("line %d", i)
        assert time.monotonic() - started < 1.0  # the writes wait up to 10 s each
        assert stream.text == ""
        stream.released.set()
    finally:
        handler.close()  # writes what is queued, in order, then stops the writer
    lines = stream.text.splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(i) for i in range(200)]
    assert all("INFO test-background: line" in line for line in lines)


class Lines:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


async def test_job_lines_written_without_records_read_as_the_records_would() -> None:
    """The job log's short cut (no LogRecord when only setup_logging's handler would see
    it) must print exactly what the logging machinery prints, plain and JSON."""
    events = [
        ("processing", "processing job 7", {"job_id": 7, "tenant": "t0", "preview": None}),
        ("completed", "job 7 completed", {"job_id": 7, "sid": "SM1", "channel": "freeform"}),
        ("retry", "job 8 retry scheduled in 2.0s", {"job_id": 8, "delay_s": 2.0}),
    ]
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for formatter in (PlainFormatter(), JsonFormatter()):
            outputs = []
            for short_cut in (True, False):
                stream = Lines()
                handler = BackgroundStreamHandler(stream, gather_s=0)
                handler.setFormatter(formatter)
                root.handlers[:] = [handler]
                root.setLevel(logging.INFO)
                if not short_cut:  # a filter on the way: the records are made as usual
                    job_log.addFilter(lambda record: True)
                assert (_direct_handler() is not None) == short_cut
                log = DeferredJobLog()
                for event, message, fields in events:
                    log.add(event, message, **fields)
                # Same moments for both ways, including one right before a new second.
                for i, created in enumerate((1700000000.9996, 1700000001.0, 1700000001.5)):
                    _, level, message, fields = log._events[i]
                    log._events[i] = (created, level, message, fields)
                log.flush()
                handler.close()
                job_log.filters.clear()
                outputs.append(stream.text)
            assert outputs[0] == outputs[1]
            assert outputs[0].count("\n") == 3 and "job 7 completed" in outputs[0]
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


# -- what a line may carry (issue 17, item 5) --------------------------------------------

# Customer text and provider errors that try to end the line and forge the next one,
# colour the terminal, or break the line where a log viewer would.
HOSTILE = (
    'Hola\r\n2026-01-01 00:00:00,000 INFO pgqueue.jobs: job 1 completed tenant="tb" \\'
    "\x1b[31m red \x1b]0;title\x07 \x00\x08\x7f\x85\x9b\u2028next\u2029para\x0b\x0c\x1c"
    " \u202eevil\u202c \u2066iso\u2069 \u200f"
)
# Every character a plain line must not carry raw.
CONTROLS = {
    chr(c) for c in (*range(0x20), *range(0x7F, 0xA0), 0x200E, 0x200F, *range(0x2028, 0x202F))
} | {chr(c) for c in range(0x2066, 0x206A)}


def _write_job_lines(formatter: logging.Formatter, *, short_cut: bool) -> str:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = Lines()
    handler = BackgroundStreamHandler(stream, gather_s=0)
    handler.setFormatter(formatter)
    try:
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        if not short_cut:
            job_log.addFilter(lambda record: True)
        log = DeferredJobLog()
        log.add("processing", "processing job 1", job_id=1, tenant="t0", preview=HOSTILE)
        log.add("failed", f"job 1 failed: {HOSTILE}", job_id=1, code="21211", error=HOSTILE)
        log.flush()
        handler.close()
    finally:
        job_log.filters.clear()
        root.handlers[:], root.level = saved[0], saved[1]
    return stream.text


async def test_plain_lines_escape_every_control_character_in_every_field() -> None:
    show_previews(True)
    try:
        for short_cut in (True, False):
            lines = _write_job_lines(PlainFormatter(), short_cut=short_cut).split("\n")
            assert lines[-1] == "" and len(lines) == 3, lines  # two lines, as two events
            for line in lines[:2]:
                assert not CONTROLS & set(line), [c for c in line if c in CONTROLS]
                assert "\\r\\n2026-01-01" in line and "\\x1b[31m" in line and "\\u2028" in line
            processing, failed = lines[:2]
            # A value cannot end its field and forge another: it is quoted whole, and the
            # quotes inside it are escaped.
            head, _, quoted = processing.partition(' preview="')
            assert head.endswith("processing job 1 event=processing job_id=1 tenant=t0")
            assert re.fullmatch(r'(?:[^"\\]|\\.)*"', quoted) and quoted.startswith("Hola\\r\\n")
            assert ' error="Hola\\r\\n' in failed and "failed: Hola\\r\\n2026" in failed
    finally:
        show_previews(False)


async def test_json_lines_stay_json_and_keep_the_text_exactly() -> None:
    show_previews(True)
    try:
        for short_cut in (True, False):
            text = _write_job_lines(JsonFormatter(), short_cut=short_cut)
            lines = text.split("\n")
            assert len(lines) == 3 and not CONTROLS & set(text.replace("\n", ""))
            processing, failed = (json.loads(line) for line in lines[:2])
            assert processing["preview"] == HOSTILE and failed["error"] == HOSTILE
            assert failed["msg"] == f"job 1 failed: {HOSTILE}"
    finally:
        show_previews(False)


async def test_the_text_preview_is_left_out_unless_asked_for() -> None:
    for formatter in (PlainFormatter(), JsonFormatter()):
        for short_cut in (True, False):
            processing = _write_job_lines(formatter, short_cut=short_cut).split("\n")[0]
            assert "preview" not in processing and "job_id" in processing
    # Nor do the records other handlers see (caplog, an error tracker) carry it.
    log = DeferredJobLog()
    log.add("processing", "processing job 2", job_id=2, preview="secret text")
    assert "preview" not in log._events[0][3]
    log._events.clear()
    assert Settings.from_env({}).log_preview is False
    assert Settings.from_env({"PGQUEUE_LOG_PREVIEW": "true"}).log_preview is True


def test_a_traceback_cannot_forge_a_line_either() -> None:
    formatter = PlainFormatter()
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        record = logging.LogRecord(
            "pgqueue.api", logging.ERROR, "x", 1, "failed: %s", (HOSTILE,), sys.exc_info()
        )
    lines = formatter.format(record).split("\n")
    assert lines[0].startswith(formatter.formatTime(record)) and len(lines) > 2
    # Only the first line starts at the margin (a line of its own starts with the time).
    assert all(line.startswith("    ") for line in lines[1:])
    assert not CONTROLS & set("".join(lines))
