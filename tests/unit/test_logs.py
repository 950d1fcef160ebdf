"""Log lines never hold up the caller: a write that blocks (a stalled disk, a full
pipe) is the writer thread's wait, not the worker's event loop's."""

from __future__ import annotations

import logging
import threading
import time

from pgqueue.logs import BackgroundStreamHandler, PlainFormatter


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
