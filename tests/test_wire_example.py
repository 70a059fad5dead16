"""The worked examples in docs/protocol.md are generated here, and checked so the document cannot rot.

    .venv/bin/python tests/test_wire_example.py            # print the generated blocks
    .venv/bin/python tests/test_wire_example.py --write    # rewrite them in docs/protocol.md

Everything about the example is fixed (seed key, nonce, times, tensors) and Ed25519 signatures are
deterministic, so the bytes are the same on every machine.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import cbor2
import numpy as np
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance import wire  # noqa: E402

DOC = ROOT / "docs" / "protocol.md"
SEED = hashlib.sha256(b"fl-edge protocol example device").digest()


def example_key() -> SigningKey:
    return SigningKey(SEED)


def example_update() -> wire.Update:
    key = example_key()
    return wire.Update(
        device_id=wire.key_id(key.verify_key),
        round_id=7,
        model_version=3,
        base_digest=hashlib.sha256(b"fl-edge example model v3").digest(),
        num_samples=128,
        tensors={
            "fc.weight": np.array([[0.5, -0.25, 0.125], [1.0, 0.0, -2.0]], dtype=np.float32),
            "fc.bias": np.array([0.015625, -0.75], dtype=np.float32),
        },
        metrics={"loss": 0.6875},
        encoding="float32",
        nonce=bytes(range(16)),
        created_at=1_764_288_000,  # 2025-11-28T00:00:00Z
    )


def example_body() -> bytes:
    return wire.encode_update(example_update(), example_key())


# ------------------------------------------------------------------------------- diagnostic notation


@dataclass(frozen=True)
class Embedded:
    """A byte string that holds the CBOR item ``item``, shown as << item >> (RFC 8610 G.3)."""

    item: object


def diag(value, indent: int = 0, embedded: frozenset[int] = frozenset()) -> str:
    """RFC 8949 section 8 diagnostic notation; byte strings holding CBOR shown as <<...>> (RFC 8610 G.3)."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(value, Embedded):
        return f"<< {diag(value.item, indent, embedded)} >>"
    if isinstance(value, cbor2.CBORTag):
        return f"{value.tag}({diag(value.value, indent, embedded)})"
    if isinstance(value, list | tuple):
        if all(not isinstance(v, list | tuple | dict | cbor2.CBORTag) for v in value) and len(value) <= 4:
            return "[" + ", ".join(diag(v, indent) for v in value) + "]"
        items = [inner + diag(v, indent + 1, embedded) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{diag(k)}: {diag(v, indent + 1, embedded)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, bytes):
        return f"h'{value.hex()}'"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    return str(value)


def envelope_and_section(body: bytes) -> tuple[bytes, bytes]:
    section = wire.encode_tensors(example_update().tensors)
    return body[: len(body) - len(section)], section


def example_diag() -> str:
    envelope, section = envelope_and_section(example_body())
    protected, unprotected, payload, signature = cbor2.loads(envelope).value
    payload_map = cbor2.loads(payload)
    lines = [
        "/ item 1: COSE_Sign1 /",
        "18([",
        f"  / protected / << {diag(cbor2.loads(protected), 1)} >>,",
        f"  / unprotected / {diag(dict(unprotected))},",
        f"  / payload / << {diag(payload_map, 1)} >>,",
        f"  / signature / {diag(signature)}",
        "])",
        "/ item 2: tensor section /",
        diag(_plain(cbor2.loads(section))),
    ]
    return "\n".join(lines)


def _plain(value):
    """cbor2 6 returns tuples and frozen maps inside tags; make them lists and dicts for printing."""
    if isinstance(value, cbor2.CBORTag):
        return cbor2.CBORTag(value.tag, _plain(value.value))
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    return value


def wrap_hex(data: bytes, width: int = 32) -> str:
    return "\n".join(data[i : i + width].hex() for i in range(0, len(data), width))


INT8_EXAMPLE = np.array([0.5, -0.25, 0.1, 0.00984252, -0.005905512, 0.001968504], dtype=np.float32)


def int8_example() -> str:
    """Section 5's rounding rule, step by step, for INT8_EXAMPLE."""
    section = wire.encode_tensors({"w": INT8_EXAMPLE}, "int8")
    (q_array, scale), = _plain(cbor2.loads(section)).values()
    q = np.frombuffer(q_array.value[1].value, dtype=np.int8)
    received, _ = wire.decode_tensors(section)
    s = np.float32(scale)
    lines = [
        f"m = max |x|            {float(np.abs(INT8_EXAMPLE).max())!r}",
        f"scale = m / 127        {scale!r} (binary64; sent as {cbor2.dumps(scale, canonical=True).hex()})",
        f"s = binary32(scale)    {float(s)!r}",
        "",
        f"{'x':<24}{'x ⊘ s':<24}{'q':>4}   binary32(q) × binary32(scale)",
    ]
    for x, qi, value in zip(INT8_EXAMPLE, q, received["w"], strict=True):
        lines.append(f"{float(x)!r:<24}{float(x / s)!r:<24}{int(qi):>4}   {float(value)!r}")
    lines += ["", "tensor section:", wrap_hex(section)]
    return "\n".join(lines)


EXAMPLE_PRIVACY = {"epsilon": 2.75, "delta": 1e-05, "noise_multiplier": 1.5, "rounds": 4}


def release_dp_example() -> str:
    """Section 6.3's optional ``dp`` field: the payload of a ModelRelease trained with central DP."""
    release = wire.ModelRelease(
        version=4,
        package_digest=hashlib.sha256(b"fl-edge example package").digest(),
        tensors={"fc.bias": np.array([0.015625, -0.75], dtype=np.float32)},
        created_at=1_764_288_000,
        privacy=EXAMPLE_PRIVACY,
    )
    message, _ = wire.encode_model_release(release, example_key())
    payload = cbor2.loads(cbor2.loads(message[: len(message) - len(wire.encode_tensors(release.tensors))]).value[2])
    dp_bytes = cbor2.dumps(EXAMPLE_PRIVACY, canonical=True)
    return "\n".join([f"payload {diag(dict(payload))}", "", "the dp map alone:", wrap_hex(dp_bytes)])


def example_blocks() -> dict[str, str]:
    """Name -> the text of a fenced block in docs/protocol.md."""
    body = example_body()
    envelope, section = envelope_and_section(body)
    protected, _, payload, _ = cbor2.loads(envelope).value
    key = example_key()
    sig_structure = cbor2.dumps(["Signature1", protected, b"", payload], canonical=True)
    return {
        "example-keys": "\n".join(
            [
                f"device seed (private)  {SEED.hex()}",
                f"device public key      {bytes(key.verify_key).hex()}",
                f"device id / kid        {wire.key_id(key.verify_key)}",
            ]
        ),
        "example-hex": wrap_hex(body),
        "example-diag": example_diag(),
        "example-parts": "\n".join(
            [
                f"body length             {len(body)} bytes",
                f"envelope (item 1)       bytes 0..{len(envelope) - 1} ({len(envelope)} bytes)",
                f"tensor section (item 2) bytes {len(envelope)}..{len(body) - 1} ({len(section)} bytes)",
                f"protected header        {bytes(protected).hex()}",
                f"tensors_sha256          {hashlib.sha256(section).hexdigest()}",
                f"update digest           {hashlib.sha256(envelope).hexdigest()} (SHA-256 of the envelope)",
                "Sig_structure (the bytes signed):",
                wrap_hex(sig_structure),
            ]
        ),
        "int8-example": int8_example(),
        "release-dp": release_dp_example(),
    }


# A block's text never holds ``` itself, so a match cannot run on into the next block (an empty block included).
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z0-9-]+) -->\n```[a-z]*\n)(?P<text>(?:(?!```).)*?)\n?```", re.S)


def doc_blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["text"] for m in BLOCK.finditer(text)}


def rewrite(text: str, blocks: dict[str, str]) -> str:
    """``text`` with the generated blocks named in ``blocks`` replaced (other generated blocks kept)."""
    return BLOCK.sub(lambda m: m[1] + blocks.get(m["name"], m["text"]) + "\n```", text)


def assert_doc_shows(doc: Path, blocks: dict[str, str]) -> None:
    """Every block of an example is in ``doc``, as generated now."""
    shown, where = doc_blocks(doc.read_text()), doc.relative_to(ROOT)
    for name, text in blocks.items():
        assert name in shown, f"{where} lacks the generated block {name!r}"
        assert shown[name] == text, f"{where} block {name!r} is stale"


def write_or_print(doc: Path, blocks: dict[str, str]) -> None:
    """An example module run as a script: ``--write`` puts its blocks into ``doc``, else prints them."""
    if "--write" in sys.argv:
        doc.write_text(rewrite(doc.read_text(), blocks))
        print(f"updated {doc}")
    else:
        for name, text in blocks.items():
            print(f"<!-- generated: {name} -->\n```\n{text}\n```\n")


# -------------------------------------------------------------------------------------------- tests


def test_example_is_a_valid_update():
    key = example_key()
    update = wire.decode_update(example_body(), {wire.key_id(key.verify_key): key.verify_key}.get)
    assert update.round_id == 7 and set(update.tensors) == {"fc.weight", "fc.bias"}


def test_example_is_deterministic():
    assert example_body() == example_body()


def test_doc_shows_the_current_example():
    """If this fails after a deliberate protocol change, run: python tests/test_wire_example.py --write"""
    assert_doc_shows(DOC, example_blocks())


def test_doc_hex_decodes_to_the_example():
    """The hex a reader copies out of the document is itself a valid, verifiable update."""
    body = bytes.fromhex(doc_blocks(DOC.read_text())["example-hex"].replace("\n", ""))
    key = example_key()
    update = wire.decode_update(body, {wire.key_id(key.verify_key): key.verify_key}.get)
    np.testing.assert_array_equal(update.tensors["fc.bias"], [0.015625, -0.75])


if __name__ == "__main__":
    write_or_print(DOC, example_blocks())


def test_following_the_documented_steps_reproduces_the_example():
    """Section 10's recipe, written from the document alone (cbor2 only for the payload map, the rest by
    hand), gives exactly the bytes wire.encode_update gives."""
    update, key = example_update(), example_key()
    kid = hashlib.sha256(bytes(key.verify_key)).digest()[:16].hex()

    def bstr(data: bytes) -> bytes:
        n = len(data)
        return (
            bytes([0x40 | n]) if n < 24 else b"\x58" + bytes([n]) if n < 256 else b"\x59" + n.to_bytes(2, "big")
        ) + data

    def tstr(text: str) -> bytes:
        return bytes([0x60 | len(text)]) + text.encode()

    section = b"\xa2"  # map(2); "fc.bias" (7 bytes) sorts before "fc.weight" (9 bytes)
    for name in sorted(update.tensors, key=lambda n: (len(n.encode()), n.encode())):
        array = update.tensors[name]
        dims = bytes([0x80 | array.ndim]) + bytes(array.shape)  # small dims only
        section += tstr(name) + b"\xd8\x28\x82" + dims + b"\xd8\x55" + bstr(array.astype("<f4").tobytes())
    payload = cbor2.dumps(
        {
            "v": 1, "type": "update", "device": kid, "round": update.round_id, "model_version": update.model_version,
            "base_digest": update.base_digest, "num_samples": update.num_samples, "metrics": update.metrics,
            "encoding": "float32", "nonce": update.nonce, "created_at": update.created_at,
            "tensors_sha256": hashlib.sha256(section).digest(),
        },
        canonical=True,
    )  # fmt: skip
    protected = bytes.fromhex("a20127045820") + kid.encode()
    sig_structure = b"\x84" + tstr("Signature1") + bstr(protected) + b"\x40" + bstr(payload)
    signature = key.sign(sig_structure).signature
    envelope = b"\xd2\x84" + bstr(protected) + b"\xa0" + bstr(payload) + bstr(signature)
    assert envelope + section == example_body()
