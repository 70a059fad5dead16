"""The worked example of docs/protocol.md section 6.5 (a ModelDelta) is generated here and checked, so the
document cannot rot.

    .venv/bin/python tests/test_downlink_example.py            # print the generated blocks
    .venv/bin/python tests/test_downlink_example.py --write    # rewrite them in docs/protocol.md
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

import cbor2
import numpy as np
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance import wire  # noqa: E402
from appliance.protocol import downlink  # noqa: E402
from tests.test_wire_example import (  # noqa: E402
    DOC,
    _plain,
    assert_doc_shows,
    diag,
    doc_blocks,
    wrap_hex,
    write_or_print,
)

AGGREGATOR_SEED = hashlib.sha256(b"fl-edge protocol example aggregator").digest()
PACKAGE_DIGEST = hashlib.sha256(b"fl-edge example package").digest()
SPECS = [wire.ParamSpec("fc.bias", (2,)), wire.ParamSpec("fc.weight", (2, 3)), wire.ParamSpec("embed", (8,))]
BASE = {
    "fc.bias": np.array([0.015625, -0.75], dtype=np.float32),
    "fc.weight": np.array([[0.5, -0.25, 0.125], [1.0, 0.0, -2.0]], dtype=np.float32),
    "embed": np.linspace(-1, 1, 8, dtype=np.float32),
}
CHANGE = {  # what the round moved: the bias and the weights a little, one entry of the embedding
    "fc.bias": np.array([0.01, -0.02], dtype=np.float32),
    "fc.weight": np.array([[0.004, -0.001, 0.0], [0.003, 0.002, -0.005]], dtype=np.float32),
    "embed": np.where(np.arange(8) == 5, np.float32(0.03), np.float32(0.0)).astype(np.float32),
}


def example_key() -> SigningKey:
    return SigningKey(AGGREGATOR_SEED)


def example() -> tuple[bytes, bytes, dict[str, np.ndarray], bytes, bytes]:
    """(the message, the step section, the published parameters, the base's digest, the published digest)."""
    target = {name: BASE[name] + CHANGE[name] for name in BASE}
    section, published = downlink.publish_step(BASE, target, SPECS, "int8")
    base_digest = wire.tensors_digest(wire.encode_tensors(BASE))
    digest = wire.tensors_digest(wire.encode_tensors(published))
    message = downlink.encode_model_delta(
        version=4, base_version=3, base_digest=base_digest, model_digest=digest, package_digest=PACKAGE_DIGEST,
        created_at=1_764_288_000, steps=[section], key=example_key(),
    )
    return message, section, published, base_digest, digest


def _floats(array: np.ndarray) -> str:
    return "[" + ", ".join(repr(float(x)) for x in np.asarray(array).reshape(-1)) + "]"


def example_blocks() -> dict[str, str]:
    message, section, published, base_digest, digest = example()
    envelope = message[: len(message) - len(section) - 1]
    protected, unprotected, payload, signature = cbor2.loads(envelope).value
    (step,) = _plain(cbor2.loads(message[len(envelope):]))
    q = np.frombuffer(step["fc.bias"][0].value[1].value, dtype=np.int8)
    scale = step["fc.bias"][1]
    rows = []
    for name in ("fc.bias", "fc.weight", "embed"):
        rows.append(f"{name}:")
        rows.append(f"  base      {_floats(BASE[name])}")
        rows.append(f"  target    {_floats(BASE[name] + CHANGE[name])}")
        rows.append(f"  published {_floats(published[name])}")
    values = {
        "delta-example": "\n".join([
            f"aggregator seed (private)  {AGGREGATOR_SEED.hex()}",
            f"aggregator id / kid        {wire.key_id(example_key().verify_key)}",
            "encoding                   int8 (serve --downlink int8)",
            "",
            *rows,
            "",
            "fc.bias step, by the rule of section 5:",
            f"  scale = max|c| / 127 = {scale!r}; q = {q.tolist()}",
            f"  base + binary32(q) x binary32(scale) = {_floats(published['fc.bias'])}",
            "embed: one change in 8 entries, so the bitmap form (1 byte + 1 value) is smaller than 8 dense bytes;",
            "  bit 5 of byte 0 is set: element 5 changes, the others add +0.0",
            "",
            f"base digest (version 3)       {base_digest.hex()}",
            f"model digest (version 4)      {digest.hex()}  = SHA-256 of the published float32 section",
            f"step section                  {len(section)} bytes (the full float32 section is "
            f"{len(wire.encode_tensors(published))})",
            f"message                       {len(message)} bytes",
        ]),
        "delta-diag": "\n".join([
            "/ item 1: COSE_Sign1 /",
            "18([",
            f"  / protected / << {diag(cbor2.loads(protected), 1)} >>,",
            f"  / unprotected / {diag(dict(unprotected))},",
            f"  / payload / << {diag(dict(cbor2.loads(payload)), 1)} >>,",
            f"  / signature / {diag(signature)}",
            "])",
            "/ item 2: section, an array of 1 step /",
            diag([step]),
        ]),
        "delta-hex": wrap_hex(message),
    }
    return values


def test_the_example_rebuilds_the_published_model() -> None:
    message, _, published, base_digest, digest = example()
    base = wire.ModelRelease(3, PACKAGE_DIGEST, BASE, base_digest)
    rebuilt = downlink.decode_model_answer(message, example_key().verify_key, SPECS, base)
    assert rebuilt.digest == digest and rebuilt.version == 4
    for name, array in published.items():
        assert rebuilt.tensors[name].tobytes() == array.tobytes()


def test_the_documented_rule_rebuilds_the_example() -> None:
    """Section 6.5's reconstruction, written from its text with struct and hashlib (no numpy arithmetic): each
    change as binary32(q) x binary32(scale) rounded to binary32, added to the base in binary32."""
    message, section, _, _, digest = example()
    (step,) = _plain(cbor2.loads(message[len(message) - len(section) - 1:]))

    def f32(x: float) -> float:
        return struct.unpack("<f", struct.pack("<f", x))[0]

    rebuilt = {}
    for spec in SPECS:
        form = step[spec.name]
        if len(form) == 3:  # [dims, bitmap, [72(values), scale]]
            _, mask, (values, scale) = form
            ints = iter(struct.unpack(f"<{len(values.value)}b", values.value))
            present = [(mask[i // 8] >> (i % 8)) & 1 for i in range(spec.size)]
            q = [next(ints) if bit else None for bit in present]
        else:  # [40([dims, 72(q)]), scale]
            (_, data), scale = form[0].value, form[1]
            q = list(struct.unpack(f"<{spec.size}b", data.value))
        change = [0.0 if qi is None else f32(f32(qi) * f32(scale)) for qi in q]
        base = BASE[spec.name].reshape(-1).tolist()
        rebuilt[spec.name] = np.array([f32(b + c) for b, c in zip(base, change, strict=True)],
                                      dtype=np.float32).reshape(spec.shape)
    assert hashlib.sha256(wire.encode_tensors(rebuilt)).digest() == digest


def test_doc_shows_the_current_example() -> None:
    """If this fails after a deliberate protocol change, run: python tests/test_downlink_example.py --write"""
    assert_doc_shows(DOC, example_blocks())


def test_doc_hex_is_a_valid_delta() -> None:
    message = bytes.fromhex(doc_blocks(DOC.read_text())["delta-hex"].replace("\n", ""))
    _, _, _, base_digest, digest = example()
    base = wire.ModelRelease(3, PACKAGE_DIGEST, BASE, base_digest)
    assert downlink.decode_model_answer(message, example_key().verify_key, SPECS, base).digest == digest


if __name__ == "__main__":
    write_or_print(DOC, example_blocks())
