"""The Twilio provider's own cost per send: the real SDK against the fake Twilio (in its
own process, no latency), from one worker-like process with 20 sends in flight.

    .venv/bin/python bench/provider.py [--sends 3000] [--concurrency 20] [--runs 3]

Target (issue #4): >= 500 sends/s from one process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from pgqueue.config import Settings
from pgqueue.models import Job
from pgqueue.providers.twilio import TwilioProvider

REPO = Path(__file__).resolve().parent.parent
ACCOUNT = "AC" + "5" * 32
TOKEN = "bench-token-0123456789"


def job(i: int) -> Job:
    now = datetime.now(UTC)
    return Job(
        id=i,
        queue="q",
        tenant_id="t",
        conversation=f"c{i}",
        priority=0,
        to_number=f"+1415555{i % 10000:04d}",
        from_number=None,
        body="Your order is ready",
        content_sid=None,
        content_variables=None,
        message_type=None,
        attempts=1,
        max_attempts=4,
        claim_token=uuid.uuid4(),
        start_at=now,
        start_delay=0.0,
        created_at=now,
        lock_key=0,
        locked=True,
        account_sid=ACCOUNT,
        whatsapp_from="+14155550100",
        auth_token=TOKEN,
    )


async def one_run(base_url: str, sends: int, concurrency: int) -> float:
    provider = TwilioProvider(Settings(twilio_api_base_url=base_url))
    try:
        await asyncio.gather(*(provider.send(job(i)) for i in range(concurrency)))  # warm
        gate = asyncio.Semaphore(concurrency)

        async def send(i: int) -> None:
            async with gate:
                await provider.send(job(i))

        started = time.perf_counter()
        await asyncio.gather(*(send(i) for i in range(sends)))
        return sends / (time.perf_counter() - started)
    finally:
        await provider.aclose()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sends", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    fake = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.fake_twilio",
            "--port",
            "0",
            "--account",
            f"{ACCOUNT}:{TOKEN}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = fake.stdout.readline() if fake.stdout else ""
        base_url = line.strip().rsplit(" ", 1)[-1]
        rates = [
            asyncio.run(one_run(base_url, args.sends, args.concurrency)) for _ in range(args.runs)
        ]
    finally:
        fake.terminate()
        fake.wait()
    print(f"command: {' '.join(sys.argv)}")
    print(f"runs: {', '.join(f'{r:,.0f}' for r in rates)} sends/s")
    median = statistics.median(rates)
    verdict = "PASS" if median >= 500 else "MISS"
    print(
        f"Twilio provider, real SDK -> fake Twilio (separate process), "
        f"{args.concurrency} in flight: median {median:,.0f} sends/s (target >= 500) {verdict}"
    )


if __name__ == "__main__":
    main()
