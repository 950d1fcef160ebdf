"""tests/support/kernel_stamps.py's reading of captures, on pcap and pcapng files built here (no
tcpdump, no network)."""

from __future__ import annotations

import struct
from pathlib import Path

from tests.support.kernel_stamps import read_segments, requests

PORT = 8111
BODY = b"To=whatsapp%3A%2B14155550101&From=whatsapp%3A%2B14155550100&Body=chaos+message+m7"


def head(account: str, body: bytes = BODY) -> bytes:
    return (
        f"POST /2010-04-01/Accounts/{account}/Messages.json HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()


def frame(sport: int, seq: int, payload: bytes, *, pad: int = 0) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, PORT, seq, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, bytes([127, 0, 0, 1]), bytes(4)
    )
    # Ethernet pads short frames: the IP total length, not the frame, ends the payload.
    return bytes(12) + b"\x08\x00" + ip + tcp + bytes(pad)


def pcap(path: Path, packets: list[tuple[float, bytes]], *, nano: bool = True) -> Path:
    magic, scale = (0xA1B23C4D, 10**9) if nano else (0xA1B2C3D4, 10**6)
    out = [struct.pack(">IHHiIII", magic, 2, 4, 0, 0, 65535, 1)]  # big-endian writer
    for t, data in packets:
        sec = int(t)
        out.append(struct.pack(">IIII", sec, round((t - sec) * scale), len(data), len(data)))
        out.append(data)
    path.write_bytes(b"".join(out))
    return path


def stream() -> list[tuple[float, bytes]]:
    """Connection 40000: a request split inside its method ("POS"), its body in a third
    segment, a retransmission of that body, then a keep-alive second request with the
    body in its segment. Connection 40001: a control call, then a request cut off."""
    first = head("AC01")
    second = head("AC02") + BODY
    control = b"POST /_fake/config HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    seq = 1000
    return [
        (100.000000001, frame(40000, seq, b"POS", pad=6)),
        (100.000100000, frame(40000, seq + 3, first[3:])),
        (100.000200000, frame(40000, seq + len(first), BODY)),
        (100.200000000, frame(40000, seq + len(first), BODY)),
        (100.500000000, frame(40000, seq + len(first) + len(BODY), second)),
        (100.100000000, frame(40001, 7, control)),
        (100.600000000, frame(40001, 7 + len(control), head("AC03"))),  # body never came
    ]


def test_requests_are_stamped_by_their_first_byte(tmp_path: Path) -> None:
    got = requests(list(read_segments(pcap(tmp_path / "a.pcap", stream()))))
    assert [(r.client[1], r.order, r.account) for r in got] == [
        (40000, 0, "AC01"),
        (40001, 0, None),
        (40000, 1, "AC02"),
        (40001, 1, "AC03"),
    ]
    assert abs(got[0].t - 100.000000001) < 1e-9  # nanoseconds kept
    assert got[0].form["Body"] == "chaos message m7"
    assert got[0].form["To"] == "whatsapp:+14155550101"
    assert got[2].form["From"] == "whatsapp:+14155550100"
    assert got[3].form == {}  # cut off: it still started


def test_microsecond_pcap(tmp_path: Path) -> None:
    got = requests(list(read_segments(pcap(tmp_path / "u.pcap", stream(), nano=False))))
    assert [r.account for r in got] == ["AC01", None, "AC02", "AC03"]
    assert abs(got[2].t - 100.5) < 1e-6


def test_pcapng(tmp_path: Path) -> None:
    def block(kind: int, body: bytes) -> bytes:
        body += bytes(-len(body) % 4)
        size = 12 + len(body)
        return struct.pack("<II", kind, size) + body + struct.pack("<I", size)

    tsresol = struct.pack("<HHB3x", 9, 1, 9) + struct.pack("<HH", 0, 0)  # nanoseconds
    data = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    data += block(1, struct.pack("<HHI", 1, 0, 65535) + tsresol)
    for t, f in stream():
        ticks = round(t * 10**9)
        data += block(
            6, struct.pack("<IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(f), len(f)) + f
        )
    path = tmp_path / "n.pcapng"
    path.write_bytes(data)
    got = requests(list(read_segments(path)))
    assert [r.account for r in got] == ["AC01", None, "AC02", "AC03"]
    assert abs(got[0].t - 100.000000001) < 1e-6
