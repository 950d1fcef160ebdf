"""A provider for tests that records every send as an interval, across processes.

Each send appends two JSON lines (start, end) to a file, so several worker processes
can share one record. The messages' text scripts failures: a body containing
`[transient:N]` fails its first N attempts with a 503, `[permanent]` fails with 21211,
`[tenant]` with 20003, `[throttle:S]` with a 429 asking for S seconds once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgqueue.errors import PermanentSendError, TenantSendError, TransientSendError
from pgqueue.models import Job, SendResult

_TRANSIENT = re.compile(r"\[transient:(\d+)\]")
_THROTTLE = re.compile(r"\[throttle:([\d.]+)\]")


class RecordingProvider:
    def __init__(
        self, path: Path, *, latency: tuple[float, float] = (0.0, 0.0), seed: int | None = None
    ) -> None:
        self.path = path
        self.latency = latency
        self.rng = random.Random(seed)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _write(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record) + "\n").encode())

    async def send(self, job: Job) -> SendResult:
        start = time.time()
        base = {
            "job": job.id,
            "tenant": job.tenant_id,
            "conv": job.conversation,
            "attempt": job.attempts,
            "pid": os.getpid(),
            "body": job.body,
        }
        self._write({**base, "ev": "start", "t": start})
        outcome = "ok"
        try:
            lo, hi = self.latency
            if hi > 0:
                await asyncio.sleep(self.rng.uniform(lo, hi))
            body = job.body or ""
            m = _TRANSIENT.search(body)
            if m and job.attempts <= int(m.group(1)):
                outcome = "transient"
                raise TransientSendError(
                    "service unavailable", provider_code="sandbox-503", http_status=503
                )
            m = _THROTTLE.search(body)
            if m and job.attempts == 1:
                outcome = "throttle"
                raise TransientSendError(
                    "too many requests",
                    provider_code="20429",
                    http_status=429,
                    retry_after=float(m.group(1)),
                    throttle=True,
                )
            if "[permanent]" in body:
                outcome = "permanent"
                raise PermanentSendError(
                    "invalid To number", provider_code="21211", http_status=400
                )
            if "[tenant]" in body:
                outcome = "tenant"
                raise TenantSendError("authenticate", provider_code="20003", http_status=401)
            return SendResult(sid="SM" + uuid.uuid4().hex)
        finally:
            self._write({**base, "ev": "end", "t": time.time(), "outcome": outcome})

    async def aclose(self) -> None:
        os.close(self._fd)


@dataclass
class Send:
    job: int
    tenant: str
    conv: str
    attempt: int
    start: float
    end: float
    outcome: str
    body: str | None
    pid: int = 0


def read_sends(path: Path) -> list[Send]:
    starts: dict[tuple[int, int], dict[str, Any]] = {}
    sends: list[Send] = []
    if not path.exists():
        return sends
    for line in path.read_text().splitlines():
        r = json.loads(line)
        key = (r["job"], r["attempt"])
        if r["ev"] == "start":
            starts[key] = r
        else:
            s = starts.pop(key)
            sends.append(
                Send(
                    r["job"],
                    r["tenant"],
                    r["conv"],
                    r["attempt"],
                    s["t"],
                    r["t"],
                    r["outcome"],
                    r["body"],
                    r["pid"],
                )
            )
    for s in starts.values():  # started, never ended (the worker died mid-send)
        sends.append(
            Send(
                s["job"],
                s["tenant"],
                s["conv"],
                s["attempt"],
                s["t"],
                float("inf"),
                "cut",
                s["body"],
                s["pid"],
            )
        )
    return sorted(sends, key=lambda s: s.start)


def max_overlap(sends: list[Send], key: Any = None) -> int:
    """Most sends in progress at once (per `key(send)` group if given)."""
    groups: dict[Any, list[tuple[float, int]]] = {}
    for s in sends:
        g = key(s) if key else None
        groups.setdefault(g, []).extend([(s.start, 1), (s.end, -1)])
    best = 0
    for events in groups.values():
        cur = 0
        # An end at the same instant as a start is not an overlap.
        for _, d in sorted(events, key=lambda e: (e[0], e[1])):
            cur += d
            best = max(best, cur)
    return best


def max_starts_per_window(sends: list[Send], window: float = 1.0) -> int:
    starts = sorted(s.start for s in sends)
    best, lo = 0, 0
    for hi, t in enumerate(starts):
        while t - starts[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
