"""Log lines never hold up the caller: a write that blocks (a stalled disk, a full
pipe) is the writer thread's wait, not the worker's event loop's."""

from __future__ import annotations

import logging
import threading
import time

from pgqueue.logs import (
    BackgroundStreamHandler,
    DeferredJobLog,
    JsonFormatter,
    PlainFormatter,
    _direct_handler,
    job_log,
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
