"""No frame leaves the appliance, shown on the wire: one round from a vivid camera under a packet capture.

The appliance boots with QEMU's ``filter-dump`` on its netdev (every frame it sends or receives, to a pcap),
trains round 1 from frames of the kernel's vivid camera (``[data] source = "cameras"``), delivers its update
to the host aggregator and powers off cleanly. Then, from the pcap and the frame buffer read back from the
data partition:

- only what the rig needs is on the wire: TCP between the appliance and the aggregator's guestfwd address
  10.0.2.100:8080, ARP among the appliance, QEMU's gateway 10.0.2.2 and 10.0.2.100, DHCP with QEMU's
  built-in server (the image configures its address by DHCP), and the IPv6 router advertisements QEMU's user
  network sends the appliance unasked (the image has IPv6 off). Nothing else: no DNS, no NTP, no IPv6 sent;
- every byte the appliance sent to the aggregator is an HTTP request of docs/openapi.yaml (path, method,
  parameters, media type), and every body is a signed update that verifies with the device's enrolled key;
- no 64-byte window of any frame in the buffer occurs anywhere in the capture (the pcap file as written, and
  every TCP stream reassembled, both directions), in any form the appliance holds it: the stored uint8
  bytes, the float32 [0, 1] form the trainer makes, the model's normalised input, and float16.

docs/privacy.md ("No frame leaves the appliance: the capture test") says what this shows and what not.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np
import pytest
import yaml
from captured_traffic import (
    CapturedFrame,
    HttpRequest,
    TcpStream,
    WindowIndex,
    read_frames,
    split_http_requests,
    tcp_streams,
)
from nacl.signing import VerifyKey
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6ND_RA
from scapy.layers.l2 import ARP

from appliance import wire
from appliance.framebuffer import FrameBuffer, to_model_input
from appliance.modelpkg import load_package
from appliance.protocol.heartbeat import decode_heartbeat
from flctl.ports import free_port
from flctl.qemu.rig import GUEST_AGGREGATOR, NETDEV_ID, Appliance, Identity, provision_data_partition

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = ROOT / "docs" / "openapi.yaml"
AGGREGATOR = GUEST_AGGREGATOR  # 10.0.2.100:8080, the guestfwd to the host aggregator
GATEWAY = "10.0.2.2"  # QEMU user networking's host side: DHCP server and ARP peer
DHCP_PORTS = {67, 68}
WINDOW = 64
AGENT = "fl-agent.service"
FRAMES = "/var/lib/fl-agent/frames"

# The round's agent.toml: frames from the camera (vivid), a round of 64 of them, the rig's plain-HTTP URL.
# A sample every 0.5 s fills the first batch of the frame buffer in well under a minute.
CAMERA_TOML = """[data]
source = "cameras"
samples_per_round = 64
[cameras]
sample_interval_seconds = 0.5
[training]
max_threads = 1
[aggregator]
url = "http://10.0.2.100:8080"
allow_plain_http = true
poll_wait_seconds = 5.0
"""


@dataclasses.dataclass(frozen=True)
class CapturedRun:
    pcap: Path
    frames_dir: Path  # the frame buffer, copied off the data partition after poweroff
    identity: Identity
    package: Path
    aggregator_pub_hex: str


def wait_round_published(guest, aggregator, device: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rounds = {r["round"]: r for r in aggregator.status()["rounds"]}
        first = rounds.get(1, {})
        if device in (first.get("devices") or []) and first.get("status") == "published":
            return first
        assert time.monotonic() < deadline, f"round 1 not published with fl0's update: {rounds}"
        guest.run("true")  # keep reading the console
        time.sleep(3)


@pytest.fixture(scope="module")
def captured_run(dev_image, machine, boot_appliance, idle_aggregator, tmp_path_factory) -> CapturedRun:
    """fl0 trains round 1 from vivid under filter-dump, then powers off; its frame buffer is read back."""
    if idle_aggregator.skip_reason:
        pytest.skip(idle_aggregator.skip_reason)
    rig = tmp_path_factory.mktemp("capture")
    identity = Identity.generate()
    idle_aggregator.enroll(identity.public_key_hex)
    appliance = Appliance("fl0", rig, identity, metrics_port=free_port(), aggregator_port=idle_aggregator.port)
    provision_data_partition(dev_image, appliance.data_image, identity, idle_aggregator.public_key_hex, CAMERA_TOML)
    # One round, then no more tasks: the appliance is idle (long-polls answered 204) when it is powered off.
    args = list(idle_aggregator.args)
    args[args.index("--rounds") + 1] = "1"
    idle_aggregator.args = args
    idle_aggregator.start()

    pcap = rig / "fl0.pcap"
    capture = ("-object", f"filter-dump,id=dump,netdev={NETDEV_ID},file={pcap}")
    started = time.monotonic()
    guest = boot_appliance(appliance, rig, dataclasses.replace(machine, qemu_args=capture))
    try:
        guest.wait_for(f"systemctl is-active --quiet {AGENT}", timeout=600, interval=3)
        guest.check("modprobe vivid n_devs=1 node_types=0x1 num_inputs=1")
        camera = time.monotonic()
        try:
            first = wait_round_published(guest, idle_aggregator, identity.device_id, timeout=1200)
        except AssertionError:
            print(guest.run(f"journalctl -u {AGENT} -o cat --no-pager | tail -40; ls -l /dev/video* {FRAMES}")[1])
            raise
        trained = time.monotonic()
        guest.wait_for("! ls -1 /var/lib/fl-agent/outbox | grep -q '[.]upd$'", timeout=300, interval=3)
        print(
            f"\n[qemu] capture run: agent up and vivid loaded {camera - started:.0f} s after power-on; round 1 "
            f"({first['samples']} samples) published {trained - camera:.0f} s later"
        )
        print("[qemu] " + guest.check(f"journalctl -u {AGENT} -o cat --no-pager | grep -E 'camera|round 1' | tail -6"))
        guest.poweroff()
    finally:
        if guest.qemu.status:
            guest.qemu.off()
    print(f"[qemu] capture run: {time.monotonic() - started:.0f} s from power-on to power-off")

    copy = rig / "data"
    copy.mkdir()
    done = subprocess.run(
        ["debugfs", "-R", f"rdump /fl-agent/frames {copy}", str(appliance.data_image)], capture_output=True, text=True
    )
    assert (copy / "frames").is_dir(), f"debugfs could not copy the frame buffer: {done.stderr[-2000:]}"
    return CapturedRun(pcap, copy / "frames", identity, idle_aggregator.package, idle_aggregator.public_key_hex)


@pytest.fixture(scope="module")
def frames(captured_run) -> list[CapturedFrame]:
    return read_frames(captured_run.pcap)


@pytest.fixture(scope="module")
def streams(frames) -> list[TcpStream]:
    return tcp_streams(frames)


# --- (c) nothing but the aggregator, ARP and DHCP ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Link:
    """The appliance's end of the link: its MAC (the sender of its DHCP requests) and the address QEMU's DHCP
    server gave it (the yiaddr of the DHCPACK)."""

    mac: str
    ip: str


def appliance_link(frames: list[CapturedFrame]) -> Link:
    requests = [f.packet for f in frames if BOOTP in f.packet and f.packet[BOOTP].op == 1]
    acks = [f.packet for f in frames if DHCP in f.packet and ("message-type", 5) in f.packet[DHCP].options]
    assert requests and acks, "no DHCP exchange in the capture: the appliance got no address from the rig"
    return Link(requests[0].src, acks[0][BOOTP].yiaddr)


def kind_of(frame: CapturedFrame, link: Link) -> str | None:
    """Which allowed kind of traffic a frame is (see the module docstring), or None when it is none of them."""
    packet = frame.packet
    sent = packet.src == link.mac
    if ARP in packet:
        return "ARP" if {packet[ARP].psrc, packet[ARP].pdst} <= {link.ip, GATEWAY, AGGREGATOR[0]} else None
    if ICMPv6ND_RA in packet and not sent:
        return "IPv6 router advertisement from QEMU"
    if IP not in packet:
        return None
    ip = packet[IP]
    if TCP in packet:
        ours, theirs = ((ip.src, packet[TCP].sport), (ip.dst, packet[TCP].dport))[:: 1 if sent else -1]
        return "TCP with the aggregator" if ours[0] == link.ip and theirs == AGGREGATOR else None
    if UDP in packet and {packet[UDP].sport, packet[UDP].dport} == DHCP_PORTS and BOOTP in packet and DHCP in packet:
        if sent:
            ok = ip.src in (link.ip, "0.0.0.0") and ip.dst in (GATEWAY, "255.255.255.255")
        else:
            ok = ip.src == GATEWAY and ip.dst in (link.ip, "255.255.255.255")
        return "DHCP" if ok else None
    return None


def test_nothing_but_the_aggregator_arp_and_dhcp_is_on_the_wire(captured_run, frames):
    link = appliance_link(frames)
    kinds: dict[str, int] = {}
    others = []
    for frame in frames:
        kind = kind_of(frame, link)
        if kind is None:
            others.append(f"frame {frame.index}: {frame.packet.summary()}")
        else:
            kinds[kind] = kinds.get(kind, 0) + 1
    size = captured_run.pcap.stat().st_size
    print(f"\n[qemu] capture: {len(frames)} frames, {size / 2**20:.2f} MiB; appliance {link.ip} ({link.mac}); {kinds}")
    assert not others, f"{len(others)} frames to or from other addresses or of other kinds:\n" + "\n".join(others[:40])
    assert kinds.get("TCP with the aggregator", 0) > 0


# --- (a) documented requests, signed bodies ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Operation:
    method: str
    template: str
    path: re.Pattern
    spec: dict


def documented_operations() -> list[Operation]:
    spec = yaml.safe_load(OPENAPI.read_text())
    operations = []
    for template, item in spec["paths"].items():
        path = re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)))
        operations += [Operation(method.upper(), template, path, op) for method, op in item.items()]
    return operations


def schema_accepts(schema: dict, text: str) -> bool:
    """Whether a parameter's text satisfies its OpenAPI schema (the kinds docs/openapi.yaml uses)."""
    if "oneOf" in schema:
        return any(schema_accepts(option, text) for option in schema["oneOf"])
    kind = schema.get("type")
    if kind == "string":
        return text in schema.get("enum", [text]) and re.search(schema.get("pattern", ""), text) is not None
    if kind == "integer" and re.fullmatch(r"-?[0-9]+", text):
        value = float(int(text))
    elif kind == "number" and re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", text):
        value = float(text)
    else:
        return False
    return schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)


def documented_operation(request: HttpRequest, operations: list[Operation]) -> Operation:
    """The operation of docs/openapi.yaml that ``request`` is; AssertionError saying how it is not one."""
    url = urlsplit(request.target)
    where = f"{request.method} {request.target} (byte {request.offset} of its connection)"
    candidates = [(op, m) for op in operations if (m := op.path.fullmatch(url.path))]
    assert candidates, f"{where}: no such path"
    found = [(op, m) for op, m in candidates if op.method == request.method]
    assert found, f"{where}: method not documented for {candidates[0][0].template}"
    op, match = found[0]
    params = {(p["in"], p["name"]): p for p in op.spec.get("parameters", [])}
    for name, value in match.groupdict().items():
        assert schema_accepts(params[("path", name)]["schema"], unquote(value)), f"{where}: {name}={value!r}"
    for name, value in parse_qsl(url.query, keep_blank_values=True):
        param = params.get(("query", name))
        assert param is not None and schema_accepts(param["schema"], value), f"{where}: query {name}={value!r}"
    assert request.header("Content-Encoding") in (None, "identity"), f"{where}: a Content-Encoding"
    body = op.spec.get("requestBody")
    if body is None:
        assert not request.body, f"{where}: a body of {len(request.body)} bytes, none documented"
    else:
        media = (request.header("Content-Type") or "").split(";")[0].strip()
        assert media in body["content"], f"{where}: Content-Type {media!r}, documented {sorted(body['content'])}"
    return op


def test_every_request_to_the_aggregator_is_documented_and_its_body_signed_by_the_device(captured_run, streams):
    operations = documented_operations()
    device = captured_run.identity
    specs = load_package(captured_run.package, VerifyKey(bytes.fromhex(captured_run.aggregator_pub_hex))).param_specs
    sent = [s for s in streams if s.dst == AGGREGATOR]
    assert sent, "no TCP connection from the appliance to the aggregator in the capture"
    counts: dict[str, int] = {}
    updates = []
    signed_by_device = wire.pinned(device.signing_key.verify_key)
    for stream in sent:
        for request in split_http_requests(stream.data):
            op = documented_operation(request, operations)
            if request.body:  # documented bodies are signed protocol messages: updates and heartbeats
                if op.template == "/v1/heartbeat":
                    assert decode_heartbeat(request.body, signed_by_device).device_id == device.device_id
                else:
                    assert op.template == "/v1/updates", f"a body on {op.method} {op.template}: no decoder here"
                    update = wire.decode_update(request.body, signed_by_device, specs)
                    assert update.device_id == device.device_id
                    updates.append(update)
            counts[f"{op.method} {op.template}"] = counts.get(f"{op.method} {op.template}", 0) + 1
    print(f"\n[qemu] {len(sent)} connections to the aggregator; requests: {counts}")
    print(f"[qemu] updates: {[(u.round_id, u.num_samples, u.encoding) for u in updates]}")
    assert [u.round_id for u in updates] and {u.round_id for u in updates} == {1}, "round 1's update is not there"


# --- (b) no window of a stored frame ----------------------------------------------------------------------


def frame_forms(captured_run) -> tuple[int, dict[str, list[bytes]]]:
    """How many frames the buffer holds, and each distinct frame, read with the frame buffer's own reader,
    in every form the appliance holds or could send it: as stored, the trainer's float32 in [0, 1], the
    model's normalised input (what onnxruntime gets), and float16 (the wire's half-precision encoding)."""
    stored, _labels = FrameBuffer(captured_run.frames_dir).load()
    package = load_package(captured_run.package, VerifyKey(bytes.fromhex(captured_run.aggregator_pub_hex)))
    unit = to_model_input(stored)
    forms = {
        "stored": stored,
        "float32 [0, 1]": unit,
        "model input": package.preprocess(unit),
        "float16 [0, 1]": unit.astype("<f2"),
    }
    return len(stored), {name: sorted({frame.tobytes() for frame in array}) for name, array in forms.items()}


def longest_run(data: bytes) -> int:
    """The longest run of one byte value in ``data``."""
    changes = np.flatnonzero(np.diff(np.frombuffer(data, np.uint8)) != 0)
    return int(np.diff(np.concatenate(([-1], changes, [len(data) - 1]))).max())


def test_no_64_byte_window_of_a_stored_frame_is_anywhere_in_the_capture(captured_run, streams):
    count, forms = frame_forms(captured_run)
    assert count >= 16, f"the frame buffer holds {count} frames: too few for the round to have trained on them"
    # vivid's colour bars and text have no 64 equal bytes in a row; a frame that did would match the capture's
    # zero padding and say nothing about a leak
    flat = [name for name, needles in forms.items() if any(longest_run(n) >= WINDOW for n in needles)]
    assert not flat, f"frames with {WINDOW} equal bytes in a row ({flat}): the window check cannot judge them"

    started = time.monotonic()
    capture = WindowIndex([captured_run.pcap.read_bytes(), *(s.data for s in streams)], WINDOW)
    for name, needles in forms.items():
        hits = [(n, hit) for n, needle in enumerate(needles) if (hit := capture.find(needle))]
        assert not hits, f"{len(hits)} frames ({name}) share {WINDOW} bytes with the capture, e.g. {hits[0]}"
    took = time.monotonic() - started
    windows = sum(len(n) - WINDOW + 1 for needles in forms.values() for n in needles)
    print(
        f"\n[qemu] {count} frames ({len(forms['stored'])} distinct), {windows} windows in {len(forms)} forms, "
        f"against {sum(map(len, capture.haystacks)) / 2**20:.2f} MiB of capture: none found ({took:.1f} s)"
    )
    # The search can fail: a window of a real frame planted in the largest upload is found.
    upload = max((s.data for s in streams if s.dst == AGGREGATOR), key=len)
    needle = forms["float32 [0, 1]"][0]
    planted = upload[: len(upload) // 2] + needle[100 : 100 + WINDOW] + upload[len(upload) // 2 :]
    assert WindowIndex([planted], WINDOW).find(needle), "the window search misses a planted frame window"
