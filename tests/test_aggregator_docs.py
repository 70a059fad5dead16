"""docs/ match the server: docs/openapi.yaml describes the routes the app serves and every reason it can answer
with, the statuses docs/protocol.md and docs/api.md give each reason are the ones it answers with, and the cases
the documents single out get the documented answer from a real server."""

from __future__ import annotations

import hashlib
import io
import re
import time
from pathlib import Path

import cbor2
import yaml
from aggregator_harness import Harness, run, running, tiny_package
from aiohttp.test_utils import TestClient, TestServer
from nacl.signing import SigningKey

from aggregator.app import STATUS_FOR_REASON, AggregatorConfig, make_app
from aggregator.metrics import UPDATE_REJECT_REASONS
from aggregator.models import ServedPackage
from aggregator.registry import read_enrolment_file
from aggregator.simulate import synthetic_package
from appliance import modelpkg, wire

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_openapi_lists_exactly_the_served_routes(tmp_path: Path) -> None:
    spec = yaml.safe_load((DOCS / "openapi.yaml").read_text())
    assert spec["openapi"].startswith("3.")
    app = make_app(AggregatorConfig(state_dir=tmp_path, package=synthetic_package(10), key=SigningKey.generate()))
    routes = [r for r in app.router.routes() if r.method != "HEAD"]
    served = {(route.method.lower(), route.resource.canonical) for route in routes}
    documented = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert served == documented


def test_openapi_and_api_md_name_every_reason() -> None:
    spec = yaml.safe_load((DOCS / "openapi.yaml").read_text())
    enum = set(spec["components"]["schemas"]["Problem"]["properties"]["reason"]["enum"])
    reasons = set(UPDATE_REJECT_REASONS) | set(STATUS_FOR_REASON)
    assert reasons <= enum
    api = (DOCS / "api.md").read_text()
    assert not [r for r in sorted(enum) if f"`{r}`" not in api]


# ------------------------------------------------------------------------------ documented statuses

_PROTOCOL_ROW = re.compile(r"^\| `([a-z0-9-]+)` +\| (\d{3}) +\|", re.M)  # protocol.md section 9: reason, HTTP
_API_ROW = re.compile(r"^\| (\d{3}) \| (.*?) \|", re.M)  # api.md "Errors": status, reasons


def protocol_statuses() -> dict[str, int]:
    """Reason -> HTTP status, from the tables of docs/protocol.md section 9."""
    text = (DOCS / "protocol.md").read_text()
    section = text[text.index("## 9. Error reasons"): text.index("## 10.")]
    return {reason: int(status) for reason, status in _PROTOCOL_ROW.findall(section)}


def decoder_reasons() -> set[str]:
    """The reasons of protocol.md's first table in section 9: what appliance.wire raises."""
    text = (DOCS / "protocol.md").read_text()
    section = text[text.index("## 9. Error reasons"): text.index("Reasons added by the aggregator")]
    return {reason for reason, _ in _PROTOCOL_ROW.findall(section)}


def test_documented_statuses_are_the_ones_the_server_answers() -> None:
    """Every reason that reaches the client as a ProtocolError (the decoder's, and those in STATUS_FOR_REASON)
    is answered with STATUS_FOR_REASON's status or 400: both documents must say the same."""
    served = set(STATUS_FOR_REASON) | decoder_reasons()
    documented = protocol_statuses()
    assert decoder_reasons() <= set(documented) and len(decoder_reasons()) > 20
    api = (DOCS / "api.md").read_text()
    errors = api[api.index("## Errors"):]
    for status, reasons in _API_ROW.findall(errors):
        for reason in re.findall(r"`([a-z0-9-]+)`", reasons):
            if reason in served:
                assert STATUS_FOR_REASON.get(reason, 400) == int(status), f"api.md: {reason} under {status}"
    for reason, status in documented.items():
        if reason in served:
            assert STATUS_FOR_REASON.get(reason, 400) == status, f"protocol.md: {reason} [{status}]"


async def _answer(h: Harness, body: bytes) -> tuple[int, str]:
    status, problem = await h.upload(body)
    return status, problem["reason"] if status != 200 else ""


def _signed_update(h: Harness, task: wire.Task, section: bytes, signed_section: bytes) -> bytes:
    """An update of device 0 whose signed tensors_sha256 covers ``signed_section``, followed by ``section``."""
    device = h.devices[0]
    payload = {
        "v": 1, "type": "update", "device": device.device_id, "round": task.round_id,
        "model_version": task.model_version, "base_digest": task.model_digest, "num_samples": 8, "metrics": {},
        "encoding": "float32", "nonce": b"12345678", "created_at": int(time.time()),
        "tensors_sha256": hashlib.sha256(signed_section).digest(),
    }  # fmt: skip
    return wire.sign(payload, device.key, device.device_id) + section


def test_a_second_update_once_the_round_closed_is_round_closed_not_duplicate(tmp_path: Path) -> None:
    """protocol.md section 8: duplicate while the round is open; once it closed, the round is checked first."""
    documented = protocol_statuses()

    async def go() -> None:
        async with running(tmp_path, devices=2) as h:
            task = await h.task()
            first, second = h.devices
            assert (await h.upload(first.update(task, h.delta())))[0] == 200
            assert await _answer(h, first.update(task, h.delta())) == (documented["duplicate"], "duplicate")
            assert (await h.upload(second.update(task, h.delta())))[0] == 200
            assert await h.task(after=task.round_id, wait=10) is not None
            late = first.update(task, h.delta())
            assert await _answer(h, late) == (documented["round-closed"], "round-closed")

    run(go())


def test_bytes_after_the_tensor_section_are_digest_mismatch_or_trailing_bytes(tmp_path: Path) -> None:
    """protocol.md section 9: bytes appended to a signed update fail the digest; bytes after the section's map
    that the signed digest covers are trailing-bytes."""
    documented = protocol_statuses()

    async def go() -> None:
        async with running(tmp_path, devices=1) as h:
            task = await h.task()
            appended = h.devices[0].update(task, h.delta()) + b"\x00"
            assert await _answer(h, appended) == (documented["digest-mismatch"], "digest-mismatch")
            section = wire.encode_tensors(h.delta()) + b"\x00"
            covered = _signed_update(h, task, section, section)
            assert await _answer(h, covered) == (documented["trailing-bytes"], "trailing-bytes")

    run(go())


def test_the_task_names_the_package_by_the_digest_of_its_content(tmp_path: Path) -> None:
    """docs/package.md: package_digest is SHA-256 of the bytes after the package's envelope, not of the file."""

    key = SigningKey.generate()
    signed, _ = modelpkg.encode_package(tiny_package(), key)
    package = ServedPackage(info=modelpkg.decode_package(signed, key.verify_key), raw=signed)

    async def go() -> None:
        client = TestClient(TestServer(make_app(AggregatorConfig(tmp_path, package, key)), host="127.0.0.1"))
        await client.start_server()
        try:
            task = wire.decode_task(await (await client.get("/v1/task")).read(), key.verify_key)
            raw = await (await client.get("/v1/package")).read()
            assert raw == signed
            stream = io.BytesIO(raw)
            cbor2.CBORDecoder(stream).decode()  # the envelope: the first CBOR item of the file
            assert task.package_digest == hashlib.sha256(raw[stream.tell():]).digest()
            assert task.package_digest != hashlib.sha256(raw).digest()
            by_digest = await client.get(f"/v1/packages/{task.package_digest.hex()}")
            assert by_digest.status == 200 and await by_digest.read() == raw
        finally:
            await client.close()

    run(go())


def test_the_documented_enrolment_line_enrols_its_key(tmp_path: Path) -> None:
    """protocol.md section 2.1's example line is accepted, and its device_id is derived from its key."""
    text = (DOCS / "protocol.md").read_text()
    line = re.search(r"<!-- checked: enrolment-line -->\n```\n(.*?)\n```", text, re.S)[1]
    path = tmp_path / "enroll.jsonl"
    path.write_text(line + "\n")
    (enrolment,) = read_enrolment_file(path)
    assert enrolment.name == "cam-1"
    assert enrolment.device_id == hashlib.sha256(enrolment.public_key).digest()[:16].hex() == line[15:47]
