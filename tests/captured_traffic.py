"""What a packet capture holds, read with scapy: Ethernet frames, TCP streams put back together, HTTP/1.1
requests split apart, and byte windows shared with other data.

Used by the QEMU capture test (tests/qemu/test_qemu_capture.py) on the pcap that QEMU's ``filter-dump``
writes. Every reader here is strict: a capture it cannot account for byte by byte (a truncated frame, a TCP
stream with a hole or two versions of one byte, a request it cannot frame) raises ``CaptureError`` naming
where, because a check that skipped what it could not parse would miss exactly what it is looking for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Imported before any frame is dissected: importing a layer module binds its layers (BOOTP/DHCP to UDP 67/68,
# IPv6 to its EtherType), and a frame dissected before that shows them as undissected bytes.
from scapy.layers import dhcp, inet6  # noqa: F401
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import RawPcapReader

LINKTYPE_ETHERNET = 1
SEQ_MOD = 2**32
REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.[01]")


class CaptureError(ValueError):
    """The capture cannot be read completely; the message says where and why."""


@dataclass(frozen=True)
class CapturedFrame:
    """One Ethernet frame as recorded (``raw``) and as scapy dissects it (``packet``)."""

    index: int  # 0-based position in the pcap
    raw: bytes
    packet: Ether


def read_frames(path: Path) -> list[CapturedFrame]:
    """Every frame of an Ethernet pcap; CaptureError if one was recorded shorter than it was on the wire."""
    frames = []
    with RawPcapReader(str(path)) as reader:
        if reader.linktype != LINKTYPE_ETHERNET:
            raise CaptureError(f"{path}: link type {reader.linktype}, expected Ethernet ({LINKTYPE_ETHERNET})")
        for index, (raw, meta) in enumerate(reader):
            if meta.caplen != meta.wirelen:
                raise CaptureError(f"{path}: frame {index} recorded {meta.caplen} of its {meta.wirelen} bytes")
            frames.append(CapturedFrame(index, raw, Ether(raw)))
    return frames


@dataclass(frozen=True)
class TcpStream:
    """The bytes one side of one TCP connection sent, in order, each once."""

    src: tuple[str, int]
    dst: tuple[str, int]
    data: bytes
    first_frame: int


def _tcp_payload(packet: Ether) -> bytes:
    # From the IP and TCP lengths: Ethernet pads short frames, and the padding is no part of the stream.
    ip, tcp = packet[IP], packet[TCP]
    return bytes(tcp.payload)[: ip.len - ip.ihl * 4 - tcp.dataofs * 4]


class _StreamBuilder:
    def __init__(self, src: tuple[str, int], dst: tuple[str, int], isn: int, first_frame: int) -> None:
        self.src, self.dst, self.first_frame = src, dst, first_frame
        self.start = (isn + 1) % SEQ_MOD  # the SYN takes one sequence number
        self.segments: dict[int, bytes] = {}

    def add(self, seq: int, payload: bytes, frame: int) -> None:
        offset = (seq - self.start) % SEQ_MOD
        if offset >= SEQ_MOD // 2:
            raise CaptureError(f"frame {frame}: TCP {self.src} -> {self.dst} sends data before its SYN")
        known = self.segments.get(offset)
        if known is None or len(payload) > len(known):
            self.segments[offset] = payload

    def build(self) -> TcpStream:
        out = bytearray()
        for offset in sorted(self.segments):
            payload = self.segments[offset]
            if offset > len(out):
                raise CaptureError(
                    f"TCP {self.src} -> {self.dst}: bytes {len(out)}..{offset} of the stream are not in the capture"
                )
            overlap = out[offset : offset + len(payload)]
            if payload[: len(overlap)] != overlap:
                raise CaptureError(f"TCP {self.src} -> {self.dst}: two different versions of stream byte {offset}+")
            out += payload[len(overlap) :]
        return TcpStream(self.src, self.dst, bytes(out), self.first_frame)


def tcp_streams(frames: Iterable[CapturedFrame]) -> list[TcpStream]:
    """Every direction of every TCP connection in the capture, reassembled by sequence number.

    Retransmitted and overlapping segments must repeat the same bytes; a SYN on a 4-tuple starts a new
    stream. Data without a SYN before it, or a hole in a stream, is a CaptureError: the capture must hold
    whole connections.
    """
    open_streams: dict[tuple, _StreamBuilder] = {}
    done: list[_StreamBuilder] = []
    for frame in frames:
        packet = frame.packet
        if TCP not in packet or IP not in packet:
            continue
        ip, tcp = packet[IP], packet[TCP]
        key = (ip.src, tcp.sport, ip.dst, tcp.dport)
        if "S" in tcp.flags:
            if key in open_streams:
                done.append(open_streams.pop(key))
            open_streams[key] = _StreamBuilder((ip.src, tcp.sport), (ip.dst, tcp.dport), tcp.seq, frame.index)
            continue
        payload = _tcp_payload(packet)
        if not payload:
            continue
        builder = open_streams.get(key)
        if builder is None:
            raise CaptureError(f"frame {frame.index}: TCP data {key} without a SYN in the capture")
        builder.add(tcp.seq, payload, frame.index)
    return [b.build() for b in sorted([*done, *open_streams.values()], key=lambda b: b.first_frame)]


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str  # as sent: path and query
    headers: tuple[tuple[str, str], ...]
    body: bytes
    offset: int  # of the request line in its stream

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive); CaptureError if it was sent more than once."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        if len(values) > 1:
            raise CaptureError(f"request at byte {self.offset}: header {name} sent {len(values)} times")
        return values[0] if values else None


def split_http_requests(stream: bytes) -> list[HttpRequest]:
    """The HTTP/1.1 requests a client stream is made of, every byte accounted for.

    Bodies are framed by Content-Length (what the agent's client sends); a chunked body, a head without its
    end or a body cut short is a CaptureError.
    """
    requests = []
    at = 0
    while at < len(stream):
        end = stream.find(b"\r\n\r\n", at)
        if end < 0:
            raise CaptureError(f"byte {at}: {len(stream) - at} bytes that are not a complete HTTP request head")
        lines = stream[at:end].split(b"\r\n")
        line = REQUEST_LINE.fullmatch(lines[0])
        if line is None:
            raise CaptureError(f"byte {at}: not an HTTP/1.x request line: {lines[0][:80]!r}")
        headers = []
        for raw in lines[1:]:
            name, sep, value = raw.partition(b":")
            if not sep or not name or name != name.strip():
                raise CaptureError(f"byte {at}: malformed header line {raw[:80]!r}")
            headers.append((name.decode("ascii"), value.strip().decode("latin-1")))
        request = HttpRequest(line[1].decode("ascii"), line[2].decode("ascii"), tuple(headers), b"", at)
        if request.header("Transfer-Encoding") is not None:
            raise CaptureError(f"byte {at}: Transfer-Encoding {request.header('Transfer-Encoding')!r} is not read here")
        length_text = request.header("Content-Length") or "0"
        if not length_text.isdigit():
            raise CaptureError(f"byte {at}: Content-Length {length_text!r}")
        body_start = end + 4
        body_end = body_start + int(length_text)
        if body_end > len(stream):
            raise CaptureError(f"byte {at}: body of {length_text} bytes cut short at {len(stream) - body_start}")
        requests.append(HttpRequest(request.method, request.target, request.headers,
                                    stream[body_start:body_end], at))  # fmt: skip
        at = body_end
    return requests


@dataclass(frozen=True)
class SharedWindow:
    """Bytes a needle has in common with a haystack: the needle's from ``needle_offset`` on are
    ``haystacks[haystack]``'s from ``haystack_offset`` on, for the index's ``width``."""

    needle_offset: int
    haystack: int
    haystack_offset: int


_HASH_BASE = 0x100000001B3  # odd, so invertible modulo 2**64
_HASH_BASE_INVERSE = pow(_HASH_BASE, -1, 2**64)


def _powers(base: int, count: int) -> np.ndarray:
    out = np.full(count, base, np.uint64)
    out[0] = 1
    return np.cumprod(out, out=out)  # base**0 .. base**(count - 1), modulo 2**64 (uint64 wraps)


def window_hashes(data: bytes, width: int) -> np.ndarray:
    """Element s: a polynomial hash (modulo 2**64) of ``data[s:s + width]``, for every window, vectorised.

    From prefix sums P[j] = sum of data[i] * B**i over i < j: P[s + width] - P[s] is B**s times the window's
    hash, and B is odd, so B**-s exists modulo 2**64 and takes the factor away.
    """
    n = len(data) - width + 1
    if n < 1:
        return np.empty(0, np.uint64)
    prefix = np.zeros(len(data) + 1, np.uint64)
    np.cumsum(np.frombuffer(data, np.uint8).astype(np.uint64) * _powers(_HASH_BASE, len(data)), out=prefix[1:])
    return (prefix[width:] - prefix[:n]) * _powers(_HASH_BASE_INVERSE, n)


class WindowIndex:
    """Every ``width``-byte window of some haystacks, hashed once, to look needles up in.

    ``find`` hashes every window of a needle, looks each up among the haystacks' hashes, and compares each hit
    byte for byte: exact (equal windows always hash alike; a collision is caught by the comparison), and
    linear in the bytes whatever the data repeats.
    """

    def __init__(self, haystacks: Sequence[bytes], width: int = 64) -> None:
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.haystacks = list(haystacks)
        self.width = width
        self._hashes = [window_hashes(hay, width) for hay in self.haystacks]
        self._known = np.unique(np.concatenate([np.empty(0, np.uint64), *self._hashes]))

    def find(self, needle: bytes) -> SharedWindow | None:
        """A window of ``needle`` that occurs in a haystack, or None when none does."""
        if not len(self._known):
            return None
        own = window_hashes(needle, self.width)
        at = np.minimum(np.searchsorted(self._known, own), len(self._known) - 1)
        for offset in np.flatnonzero(self._known[at] == own):
            window = needle[offset : offset + self.width]
            for h, hay in enumerate(self.haystacks):
                for pos in np.flatnonzero(self._hashes[h] == own[offset]):
                    if hay[pos : pos + self.width] == window:
                        return SharedWindow(int(offset), h, int(pos))
        return None
