"""The capture readers the QEMU capture test relies on (tests/captured_traffic.py), on pcaps made here.

The QEMU test can only show that no frame left the appliance if these readers miss nothing: a stream put
back together wrongly, a request split at the wrong byte or a window search that skips offsets would let a
leak through unseen. So each reader is checked on captures with the awkward cases in them.
"""

from __future__ import annotations

import itertools
import random
import struct
from pathlib import Path

import pytest
from captured_traffic import CaptureError, WindowIndex, read_frames, split_http_requests, tcp_streams
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

GUEST, SERVER = ("10.0.2.15", 40000), ("10.0.2.100", 8080)
ISN = 2**32 - 10  # the sequence numbers wrap inside the stream


def segment(seq: int, data: bytes = b"", flags: str = "PA", src=GUEST, dst=SERVER) -> Ether:
    return Ether() / IP(src=src[0], dst=dst[0]) / TCP(sport=src[1], dport=dst[1], seq=seq % 2**32, flags=flags) / data


def capture(tmp_path: Path, packets: list) -> Path:
    path = tmp_path / "c.pcap"
    wrpcap(str(path), packets)
    return path


def connection(stream: bytes, cuts: list[int]) -> list[Ether]:
    """SYN, then ``stream`` cut at ``cuts`` into segments."""
    bounds = [0, *cuts, len(stream)]
    return [segment(ISN, flags="S")] + [segment(ISN + 1 + a, stream[a:b]) for a, b in itertools.pairwise(bounds)]


def test_a_stream_comes_back_whole_from_reordered_retransmitted_and_padded_segments(tmp_path):
    upload = b"POST /v1/updates HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\n\r\n" + bytes(range(256)) + b"z" * 44
    poll = b"GET /v1/task?after=1&wait=5.0 HTTP/1.1\r\nHost: x\r\n\r\n"
    stream = upload + poll
    syn, *segments = connection(stream, [5, 40, 41, 200, 370])
    syn_ack = segment(6, flags="SA", src=SERVER, dst=GUEST)
    reply = segment(7, b"HTTP/1.1 200 OK\r\n\r\n", src=SERVER, dst=GUEST)
    again = segment(ISN + 1 + 40, stream[40:60])  # a retransmission overlapping two segments
    # a five-byte segment is a 59-byte frame, padded on the wire to Ethernet's 60 or more: not stream data
    segments[0] = Ether(bytes(segments[0]) + b"PAD!!")
    packets = [syn, syn_ack, segments[3], *segments[:3], again, reply, *segments[4:]]
    streams = tcp_streams(read_frames(capture(tmp_path, packets)))
    sent = [s for s in streams if s.dst == SERVER]
    assert len(sent) == 1 and sent[0].data == stream
    assert [s.data for s in streams if s.dst == GUEST] == [b"HTTP/1.1 200 OK\r\n\r\n"]
    requests = split_http_requests(sent[0].data)
    assert [(r.method, r.target) for r in requests] == [("POST", "/v1/updates"), ("GET", "/v1/task?after=1&wait=5.0")]
    assert requests[0].body == upload[-300:] and requests[1].body == b""
    assert requests[0].header("content-length") == "300"


def test_a_hole_in_a_stream_is_an_error(tmp_path):
    syn, first, _lost, last = connection(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n", [10, 20])
    with pytest.raises(CaptureError, match="not in the capture"):
        tcp_streams(read_frames(capture(tmp_path, [syn, first, last])))


def test_a_retransmission_with_other_bytes_is_an_error(tmp_path):
    packets = connection(b"GET / HTTP/1.1\r\n\r\n", [8])
    packets.append(segment(ISN + 1 + 4, b"XXXX"))
    with pytest.raises(CaptureError, match="two different versions"):
        tcp_streams(read_frames(capture(tmp_path, packets)))


def test_data_without_its_syn_is_an_error(tmp_path):
    with pytest.raises(CaptureError, match="without a SYN"):
        tcp_streams(read_frames(capture(tmp_path, [segment(ISN + 1, b"GET / HTTP/1.1\r\n\r\n")])))


def test_a_frame_recorded_short_is_an_error(tmp_path):
    frame = bytes(Ether() / IP(dst="10.0.2.3") / UDP(dport=53) / (b"q" * 40))
    head = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    record = struct.pack("<IIII", 0, 0, 30, len(frame)) + frame[:30]
    path = tmp_path / "short.pcap"
    path.write_bytes(head + record)
    with pytest.raises(CaptureError, match="frame 0 recorded 30 of its"):
        read_frames(path)


@pytest.mark.parametrize(
    ("stream", "problem"),
    [
        (
            b"POST /v1/updates HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "Transfer-Encoding",
        ),
        (b"POST /v1/updates HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", "cut short"),
        (b"GET /v1/task HTTP/1.1\r\nHost: x\r\n", "not a complete HTTP request head"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "not an HTTP/1.x request line"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nleftover bytes\r\n\r\n", "not an HTTP/1.x request line"),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "sent 2 times"),
    ],
)
def test_bytes_that_are_not_whole_requests_are_an_error(stream, problem):
    with pytest.raises(CaptureError, match=problem):
        split_http_requests(stream)


def test_a_window_is_found_wherever_it_lies_and_never_across_two_haystacks():
    rng = random.Random(7)
    frame = rng.randbytes(1024)
    for start in range(0, 1024 - 64, 37):
        for at in (0, 1, 31, 32, 33, 500):
            hay = rng.randbytes(at) + frame[start : start + 64] + rng.randbytes(100)
            hit = WindowIndex([rng.randbytes(300), hay]).find(frame)
            assert hit is not None and hit.haystack == 1
            assert frame[hit.needle_offset :][:64] == hay[hit.haystack_offset :][:64] == frame[start : start + 64]
    # 63 common bytes are not a window, nor are two halves in different haystacks
    assert WindowIndex([rng.randbytes(50) + frame[100:163] + rng.randbytes(50)]).find(frame) is None
    assert WindowIndex([frame[100:132], frame[132:164]]).find(frame) is None
    assert WindowIndex([]).find(frame) is None


def naive_shared(needle: bytes, haystacks: list[bytes], width: int) -> bool:
    return any(needle[i : i + width] in hay for i in range(len(needle) - width + 1) for hay in haystacks)


@settings(max_examples=300, deadline=None)
@given(needle=st.binary(max_size=40), haystacks=st.lists(st.binary(max_size=60), max_size=3),
       plant=st.booleans(), width=st.integers(1, 9), where=st.integers(0, 60))  # fmt: skip
def test_the_window_search_agrees_with_a_naive_one(needle, haystacks, plant, width, where):
    if plant and haystacks and len(needle) >= width:
        haystacks[-1] = haystacks[-1][:where] + needle[:width] + haystacks[-1][where:]
    # a small alphabet makes near misses common
    needle, haystacks = bytes(b % 3 for b in needle), [bytes(b % 3 for b in hay) for hay in haystacks]
    hit = WindowIndex(haystacks, width).find(needle)
    assert (hit is not None) == naive_shared(needle, haystacks, width)
    if hit is not None:
        hay = haystacks[hit.haystack]
        assert needle[hit.needle_offset :][:width] == hay[hit.haystack_offset :][:width]
