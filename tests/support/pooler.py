"""Debian's PgBouncer in front of a test server, on a port of its own, started (and
restarted) by the test: tests/db/test_pooler.py and the pooler scenario of
tests/support/harness.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from pgqueue.server import free_port


class Missing(RuntimeError):
    """PgBouncer is not installed here."""


PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@dataclass
class Bouncer:
    argv: list[str]
    url: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = _launch(self.argv, self.url, self.workdir)

    def stop(self, sig: signal.Signals = signal.SIGINT) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def bouncer(db_url: str, workdir: Path, mode: str) -> Iterator[Bouncer]:
    if not Path(PGBOUNCER).exists():
        raise Missing("pgbouncer is not installed (.ci/run installs Debian's)")
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    host, port = str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)
    user, dbname = str(info.get("user") or "postgres"), str(info["dbname"])
    listen = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        f"""[databases]
{dbname} = host={host} port={port} user={user} dbname={dbname}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = any
pool_mode = {mode}
default_pool_size = 4
max_client_conn = 50
ignore_startup_parameters = extra_float_digits,options
logfile = {workdir / "pgbouncer.log"}
pidfile = {workdir / "pgbouncer.pid"}
"""
    )
    argv = [PGBOUNCER, str(ini)]
    if os.geteuid() == 0:
        # PgBouncer will not run as root: as nobody, it needs its files and the server's
        # socket directory (a temporary one of the tests) reachable.
        argv[1:1] = ["-u", "nobody"]
        workdir.chmod(0o777)
        for path in (workdir / "pgbouncer.log",):
            path.touch(mode=0o666)
            path.chmod(0o666)
        if host.startswith("/"):
            Path(host).chmod(0o711)
    bouncer = Bouncer(argv, f"postgresql://{user}@127.0.0.1:{listen}/{dbname}", workdir)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


def _launch(argv: list[str], url: str, workdir: Path) -> subprocess.Popen[bytes]:
    """PgBouncer started with `argv`, once it answers on `url`."""
    ini = Path(argv[-1])
    with (workdir / "stderr.log").open("ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 15
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2, prepare_threshold=None) as c:
                c.execute("SELECT 1")
            break
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log = (workdir / "pgbouncer.log").read_text() if ini.exists() else ""
                err = (workdir / "stderr.log").read_text()
                raise AssertionError(f"pgbouncer did not start: {err}\n{log}") from None
            time.sleep(0.1)
    return proc


@contextlib.contextmanager
def bouncer_in_tmp(db_url: str, mode: str) -> Iterator[Bouncer]:
    # Not pytest's tmp_path: its parents are private to the user, and PgBouncer run as
    # nobody (under root) could not reach its own files there.
    workdir = Path(tempfile.mkdtemp(prefix=f"pgqueue-pgbouncer-{mode}-"))
    try:
        with bouncer(db_url, workdir, mode) as started:
            yield started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
