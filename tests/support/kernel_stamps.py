"""Kernel timestamps of the HTTP requests that reach one local TCP port, taken by tcpdump.

DESIGN.md G4 counts a send's start when the request's first bytes reach the provider's
socket. The fake Twilio stamps arrivals in its own event loop, which on a loaded machine
runs late and in bunches. The kernel stamps each packet as the sender's write() pushes it
through the loopback interface, whatever the receiving process is doing: that stamp is the
start. This module captures the packets sent *to* the port that carry payload and returns
one stamp per HTTP request, the stamp of the segment that begins with the request line
(keep-alive connections carry many requests, and a request can span several segments).

    with KernelStamps(port, workdir / "wire.pcap") as stamps:
        ...  # the run: start() returned once tcpdump was capturing
    starts = stamps.capture.starts()  # Messages API requests, in time order

Stamps are libpcap's "host" stamps: CLOCK_REALTIME epoch seconds, the clock of
time.time(), so they compare with the fake's own records (`Capture.realtime`). It needs
tcpdump (Debian: `apt-get install tcpdump`) and the right to capture (root or
CAP_NET_RAW); without either, start() raises KernelStampsUnavailable saying which.
IPv4 and IPv6; pipelined HTTP/1.1 requests (several in one segment) would count as one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qsl

_METHODS = (b"POST ", b"GET ", b"PUT ", b"DELETE ", b"PATCH ", b"HEAD ", b"OPTIONS ")
_MESSAGES = re.compile(r"^/[^/]+/Accounts/([^/]+)/Messages\.json(?:\?.*)?$")
# "host" is the kernel's software stamp, on CLOCK_REALTIME; adapter_unsynced is a NIC's
# own clock, steadier but on no clock the rest of the run shares (loopback has none).
_PREFERRED_STAMP_TYPE = "adapter_unsynced"
_DEFAULT_STAMP_TYPE = "host"


class KernelStampsUnavailable(RuntimeError):
    """tcpdump is missing, may not capture here, or left a capture that cannot be read."""


@dataclass(frozen=True)
class Segment:
    t: float
    client: tuple[str, int]  # the sender's address and port: one TCP connection
    seq: int
    payload: bytes


@dataclass(frozen=True)
class WireRequest:
    """One HTTP request as it reached the port: `t` is its first segment's stamp and
    `order` its place on its connection (0 for the first)."""

    t: float
    client: tuple[str, int]
    order: int
    method: str
    path: str
    # The urlencoded body, when all of it was captured (empty otherwise).
    form: Mapping[str, str] = field(default_factory=dict)

    @property
    def account(self) -> str | None:
        """The AccountSid of a Twilio Messages API request; None for anything else."""
        m = _MESSAGES.match(self.path)
        return m.group(1) if m and self.method == "POST" else None


@dataclass(frozen=True)
class Capture:
    requests: tuple[WireRequest, ...]  # in time order
    stamp_type: str  # libpcap's name: host, adapter_unsynced, ...
    nanosecond: bool  # the file's precision (else microseconds)
    dropped: int | None  # tcpdump's "packets dropped by kernel"; None if it did not say

    @property
    def realtime(self) -> bool:
        """Stamps on time.time()'s clock (only then do they compare with other stamps)."""
        return self.stamp_type == _DEFAULT_STAMP_TYPE

    def messages(self) -> list[WireRequest]:
        """The Messages API requests (the fake's /_fake/ control calls left out)."""
        return [r for r in self.requests if r.account is not None]

    def starts(self) -> list[float]:
        return [r.t for r in self.messages()]

    def starts_by_account(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for r in self.messages():
            out.setdefault(r.account or "", []).append(r.t)
        return out


# -- tcpdump ---------------------------------------------------------------------------


def find_tcpdump() -> str | None:
    # A non-root PATH often lacks the sbin directories.
    return shutil.which("tcpdump") or next(
        (p for p in ("/usr/sbin/tcpdump", "/usr/bin/tcpdump") if os.access(p, os.X_OK)), None
    )


def stamp_types(tcpdump: str, interface: str) -> list[str]:
    """What `tcpdump -J` offers on the interface (empty if it will not say)."""
    try:
        out = subprocess.run(
            [tcpdump, "-J", "-i", interface], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    text = out.stdout + out.stderr
    return re.findall(r"^\s+(\S+) \(", text, flags=re.MULTILINE)


def bpf_filter(port: int) -> str:
    """TCP segments to `port` that carry payload (IPv4: payload = total length minus the
    IP and TCP headers); for IPv6 the empty segments are dropped when parsing."""
    payload = "((ip[2:2] - ((ip[0] & 0xf) << 2)) - ((tcp[12] & 0xf0) >> 2)) != 0"
    return f"(ip and tcp dst port {port} and {payload}) or (ip6 and tcp dst port {port})"


class KernelStamps:
    """tcpdump on `interface` for the requests to `port`, written to `pcap`. start()
    returns once tcpdump is capturing; stop() ends it, waits for the file to be complete
    and returns (and keeps, as `capture`) what it recorded."""

    def __init__(
        self,
        port: int,
        pcap: Path,
        *,
        interface: str = "lo",
        tcpdump: str | None = None,
        ready_timeout: float = 10.0,
    ) -> None:
        self.port = port
        self.pcap = pcap
        self.interface = interface
        self.tcpdump = tcpdump
        self.ready_timeout = ready_timeout
        self.stamp_type = _DEFAULT_STAMP_TYPE
        self.nanosecond = False
        self.capture: Capture | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: list[str] = []
        self._reader: threading.Thread | None = None

    def _argv(self, exe: str, *, options: bool) -> list[str]:
        argv = [exe, "-i", self.interface, "-n"]
        if options:
            argv += ["--time-stamp-precision=nano"]
            if self.stamp_type != _DEFAULT_STAMP_TYPE:
                argv += ["-j", self.stamp_type]
        # Immediate mode: libpcap's default TPACKET_V3 ring hands packets over in blocks
        # up to 1 s late and loses the unfinished block at exit. -s: a request's head and
        # form fit in 4 KiB, and the ring's slots are sized by it, so 16 MiB holds
        # thousands of packets while tcpdump itself waits for a CPU.
        argv += ["--immediate-mode", "-s", "4096", "-B", "16384", "-U", "-w", str(self.pcap)]
        return [*argv, bpf_filter(self.port)]

    def start(self) -> None:
        exe = self.tcpdump or find_tcpdump()
        if exe is None:
            raise KernelStampsUnavailable("tcpdump is not installed (apt-get install tcpdump)")
        if _PREFERRED_STAMP_TYPE in stamp_types(exe, self.interface):
            self.stamp_type = _PREFERRED_STAMP_TYPE
        try:
            self.pcap.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KernelStampsUnavailable(f"no directory for the capture: {e}") from e
        # With the precision or stamp type refused (an older tcpdump, an odd interface),
        # default stamps are still kernel stamps: try once more without them.
        failure = ""
        for options in (True, False):
            if not options:
                self.stamp_type = _DEFAULT_STAMP_TYPE
            failure = self._launch(self._argv(exe, options=options))
            if not failure:
                self.nanosecond = options
                return
        raise KernelStampsUnavailable(
            f"tcpdump could not capture on {self.interface} (it needs root or CAP_NET_RAW): "
            f"{failure}"
        )

    def _launch(self, argv: list[str]) -> str:
        """Starts tcpdump; "" once it says it is listening, else why it did not."""
        with contextlib.suppress(FileNotFoundError):
            self.pcap.unlink()
        self._stderr = []
        listening = threading.Event()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as e:
            return str(e)

        def read() -> None:
            # Drained to the end, so a chatty tcpdump never blocks on a full pipe.
            assert proc.stderr is not None
            with proc.stderr:
                for raw in proc.stderr:
                    line = raw.decode(errors="replace").rstrip()
                    self._stderr.append(line)
                    if "listening on" in line:
                        listening.set()

        reader = threading.Thread(target=read, name="tcpdump-stderr", daemon=True)
        reader.start()
        deadline = time.monotonic() + self.ready_timeout
        while not listening.wait(0.02):
            if proc.poll() is not None:
                reader.join(5)
                said = " ".join(x.strip() for x in self._stderr if x.strip())
                return said or f"exit status {proc.returncode}"
            if time.monotonic() > deadline:
                _end(proc)
                reader.join(5)
                return f"no 'listening on' within {self.ready_timeout:g} s"
        self._proc, self._reader = proc, reader
        return ""

    def stop(self) -> Capture:
        proc = self._proc
        if proc is None:
            raise KernelStampsUnavailable("tcpdump was not started")
        self._proc = None
        if proc.poll() is None:
            self._settle()
            _end(proc)
        if self._reader is not None:
            self._reader.join(5)
        dropped = None
        for line in self._stderr:
            m = re.match(r"(\d+) packets? dropped by kernel", line)
            if m:
                dropped = int(m.group(1))
        try:
            segments = list(read_segments(self.pcap))
        except (OSError, ValueError) as e:
            raise KernelStampsUnavailable(f"the capture {self.pcap} is unreadable: {e}") from e
        self.capture = Capture(tuple(requests(segments)), self.stamp_type, self.nanosecond, dropped)
        return self.capture

    def _settle(self, quiet: float = 0.2, limit: float = 5.0) -> None:
        """Until the file has stopped growing: with -U tcpdump writes each packet as it
        takes it from the ring, and an interrupt abandons what it has not taken yet."""
        deadline = time.monotonic() + limit
        size = -1
        while time.monotonic() < deadline:
            now = self.pcap.stat().st_size if self.pcap.exists() else 0
            if now == size:
                return
            size = now
            time.sleep(quiet)

    def __enter__(self) -> KernelStamps:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            self.stop()


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (tcpdump flushes and prints its counts), then firmer ways."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


# -- the capture file ------------------------------------------------------------------

_PCAP_MAGIC = {0xA1B2C3D4: False, 0xA1B23C4D: True}  # True: nanosecond stamps
_PCAPNG_SHB = 0x0A0D0D0A


def read_segments(path: Path) -> Iterator[Segment]:
    """The TCP segments with payload in a pcap (micro- or nanosecond, either byte order)
    or pcapng file. A record cut short at the end (tcpdump stopped mid-write) is ignored."""
    data = path.read_bytes()
    if len(data) < 4:
        raise ValueError("no capture header")
    if struct.unpack("<I", data[:4])[0] == _PCAPNG_SHB:
        yield from _pcapng(data)
    else:
        yield from _pcap(data)


def _pcap(data: bytes) -> Iterator[Segment]:
    for order in ("<", ">"):
        magic = struct.unpack(order + "I", data[:4])[0]
        if magic in _PCAP_MAGIC:
            break
    else:
        raise ValueError(f"not a pcap file (magic {data[:4].hex()})")
    if len(data) < 24:
        raise ValueError("pcap header cut short")
    scale = 1e-9 if _PCAP_MAGIC[magic] else 1e-6
    linktype = struct.unpack(order + "I", data[20:24])[0] & 0x0FFFFFFF
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack(order + "IIII", data[pos : pos + 16])
        frame = data[pos + 16 : pos + 16 + caplen]
        if len(frame) < caplen:
            return
        pos += 16 + caplen
        seg = _segment(sec + frac * scale, linktype, frame)
        if seg is not None:
            yield seg


def _pcapng(data: bytes) -> Iterator[Segment]:
    order = "<"
    interfaces: list[tuple[int, float]] = []  # (linktype, seconds per tick)
    pos = 0
    while pos + 12 <= len(data):
        kind = struct.unpack(order + "I", data[pos : pos + 4])[0]
        if kind == _PCAPNG_SHB:
            bom = data[pos + 8 : pos + 12]
            order = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
            interfaces = []
        length = struct.unpack(order + "I", data[pos + 4 : pos + 8])[0]
        if length < 12 or pos + length > len(data):
            return
        body = data[pos + 8 : pos + length - 4]
        pos += length
        if kind == 1:  # interface description
            linktype = struct.unpack(order + "H", body[:2])[0]
            interfaces.append((linktype, _tsresol(body[8:], order)))
        elif kind == 6 and len(body) >= 20:  # enhanced packet
            iface, hi, lo, caplen, _ = struct.unpack(order + "IIIII", body[:20])
            if iface >= len(interfaces):
                continue
            linktype, tick = interfaces[iface]
            seg = _segment(((hi << 32) | lo) * tick, linktype, body[20 : 20 + caplen])
            if seg is not None:
                yield seg


def _tsresol(options: bytes, order: str) -> float:
    pos = 0
    while pos + 4 <= len(options):
        code, size = struct.unpack(order + "HH", options[pos : pos + 4])
        if code == 0:
            break
        if code == 9 and size >= 1:  # if_tsresol
            v = options[pos + 4]
            return 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0**-v
        pos += 4 + (size + 3) // 4 * 4
    return 1e-6


def _segment(t: float, linktype: int, frame: bytes) -> Segment | None:
    """The TCP payload of one link-layer frame, or None (not TCP, or empty)."""
    if linktype == 1:  # Ethernet (Linux's lo too)
        proto, pos = (struct.unpack("!H", frame[12:14])[0] if len(frame) >= 14 else 0), 14
        while proto in (0x8100, 0x88A8) and len(frame) >= pos + 4:  # VLAN tags
            proto, pos = struct.unpack("!H", frame[pos + 2 : pos + 4])[0], pos + 4
    elif linktype == 113:  # Linux cooked v1
        proto, pos = (struct.unpack("!H", frame[14:16])[0] if len(frame) >= 16 else 0), 16
    elif linktype == 276:  # Linux cooked v2
        proto, pos = (struct.unpack("!H", frame[0:2])[0] if len(frame) >= 20 else 0), 20
    elif linktype in (0, 108):  # BSD loopback: the address family, host order
        family = (frame[0] or frame[3]) if len(frame) >= 4 else 0
        proto, pos = (0x0800 if family == 2 else 0x86DD if family in (10, 24, 28, 30) else 0), 4
    elif linktype in (101, 228, 229):  # raw IP
        version = frame[0] >> 4 if frame else 0
        proto, pos = (0x0800 if version == 4 else 0x86DD if version == 6 else 0), 0
    else:
        return None
    ip = frame[pos:]
    if proto == 0x0800 and len(ip) >= 20 and ip[9] == 6:
        header = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        # The total length, not the frame: Ethernet pads short frames.
        tcp = ip[header : total or len(ip)]
        src = ".".join(str(b) for b in ip[12:16])
    elif proto == 0x86DD and len(ip) >= 40 and ip[6] == 6:  # no extension headers
        tcp = ip[40 : 40 + struct.unpack("!H", ip[4:6])[0]]
        src = ip[8:24].hex(":", 2)
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, _, seq = struct.unpack("!HHI", tcp[:8])
    payload = tcp[(tcp[12] >> 4) * 4 :]
    if not payload:
        return None
    return Segment(t, (src, sport), seq, bytes(payload))


# -- segments to requests --------------------------------------------------------------


def _may_start_request(payload: bytes) -> bool:
    """Begins with a method and a space, or is cut short inside one ("POS")."""
    return any(payload[: len(m)] == m[: len(payload)] for m in _METHODS)


@dataclass
class _Stream:
    """One connection's bytes from a request's start on, with the stamp of the segment
    that carried each stretch of them."""

    next_seq: int
    order: int
    data: bytearray = field(default_factory=bytearray)
    stamps: list[tuple[int, float]] = field(default_factory=list)  # (offset, stamp)

    def consume(self, end: int) -> None:
        """Drop the first `end` bytes; the next request starts in the last segment that
        began at or before `end`."""
        first = max((x for x in self.stamps if x[0] <= end), key=lambda x: x[0])
        self.stamps = [(0, first[1])] + [(o - end, t) for o, t in self.stamps if o > end]
        del self.data[:end]
        self.order += 1


def requests(segments: Sequence[Segment]) -> list[WireRequest]:
    """Every request on every connection, stamped with the segment that carried its
    first byte. A connection's bytes are cut into requests by their heads and
    Content-Length (or chunked) bodies; after a gap (a packet tcpdump lost) the stream
    picks up again at the next segment that begins with a request line."""
    seen: set[tuple[tuple[str, int], int]] = set()
    streams: dict[tuple[str, int], _Stream] = {}
    orders: dict[tuple[str, int], int] = {}
    out: list[WireRequest] = []
    for seg in sorted(segments, key=lambda s: s.t):
        # A retransmission carries the bytes again: the start was the first copy.
        if (seg.client, seg.seq) in seen:
            continue
        seen.add((seg.client, seg.seq))
        s = streams.get(seg.client)
        if s is None or s.next_seq != seg.seq:
            if s is not None and s.data:
                out.append(_request(seg.client, s.order, s.stamps[0][1], bytes(s.data)))
                orders[seg.client] = s.order + 1
            streams.pop(seg.client, None)
            if not _may_start_request(seg.payload):
                continue
            s = streams[seg.client] = _Stream(seg.seq, orders.get(seg.client, 0))
        s.stamps.append((len(s.data), seg.t))
        s.data += seg.payload
        s.next_seq = (seg.seq + len(seg.payload)) % 2**32
        while (end := _request_end(s.data)) is not None:
            out.append(_request(seg.client, s.order, s.stamps[0][1], bytes(s.data[:end])))
            s.consume(end)
            if not s.data:
                s.stamps = []
        orders[seg.client] = s.order
    for client, s in streams.items():
        if s.data:  # cut off: its start still counts
            out.append(_request(client, s.order, s.stamps[0][1], bytes(s.data)))
    return sorted(out, key=lambda r: r.t)


def _head(data: bytes | bytearray) -> tuple[list[str], int] | None:
    """The head's lines and where the body begins, once the whole head is there."""
    head, sep, _ = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    return head.decode("latin-1").split("\r\n"), len(head) + 4


def _headers(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        out[name.strip().lower()] = value.strip()
    return out


def _request_end(data: bytes | bytearray) -> int | None:
    """Where the first request in `data` ends, or None while it is incomplete."""
    parsed = _head(data)
    if parsed is None:
        return None
    lines, body = parsed
    headers = _headers(lines)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        end = data.find(b"\r\n0\r\n\r\n", body - 2)
        return None if end < 0 else end + 7
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        length = 0
    return body + length if len(data) >= body + length else None


def _request(client: tuple[str, int], order: int, t: float, data: bytes) -> WireRequest:
    parsed = _head(data)
    lines = parsed[0] if parsed else data.decode("latin-1").split("\r\n", 1)[:1]
    method, _, rest = lines[0].partition(" ")
    path = rest.rsplit(" ", 1)[0] if " " in rest else rest
    form: dict[str, str] = {}
    if parsed is not None:
        headers = _headers(lines)
        body = data[parsed[1] :]
        length = headers.get("content-length")
        urlencoded = "urlencoded" in headers.get("content-type", "")
        if urlencoded and length is not None and length.isdigit() and len(body) >= int(length):
            text = body[: int(length)].decode("latin-1")
            form = dict(parse_qsl(text, keep_blank_values=True))
    return WireRequest(t, client, order, method, path, form)
