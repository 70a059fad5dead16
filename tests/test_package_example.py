"""The worked example in docs/package.md is generated here, and checked so the document cannot rot.

    .venv/bin/python tests/test_package_example.py            # print the generated blocks
    .venv/bin/python tests/test_package_example.py --write    # rewrite them in docs/package.md

Everything about the example is fixed (seed key, parameters, placeholder graphs) and Ed25519 signatures are
deterministic, so the bytes are the same on every machine.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import cbor2
import numpy as np
import pytest
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from test_wire_example import (  # noqa: E402
    Embedded,
    _plain,
    assert_doc_shows,
    diag,
    doc_blocks,
    wrap_hex,
    write_or_print,
)

from appliance import modelpkg, wire  # noqa: E402

DOC = ROOT / "docs" / "package.md"
SEED = hashlib.sha256(b"fl-edge package example aggregator").digest()

# The keys of the content map, as docs/package.md's table lists them.
CONTENT_KEYS = {"format", "name", "task", "class_names", "num_classes", "graphs", "io", "params", "initial_params",
                "optimizer", "preprocessing"}


def example_key() -> SigningKey:
    return SigningKey(SEED)


def example_package() -> modelpkg.ModelPackage:
    return modelpkg.ModelPackage(
        name="example",
        param_specs=[wire.ParamSpec("fc.weight", (2, 3)), wire.ParamSpec("fc.bias", (2,))],
        initial_params={
            "fc.weight": np.array([[0.5, -0.25, 0.125], [1.0, 0.0, -2.0]], dtype=np.float32),
            "fc.bias": np.array([0.015625, -0.75], dtype=np.float32),
        },
        training_graph=b"ONNX training graph",  # placeholders: a real package holds ONNX ModelProto bytes
        inference_graph=b"ONNX inference graph",
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
        preprocessing={"input_shape": [3], "layout": "NC", "input_range": [0.0, 1.0], "mean": 0.5, "std": 0.25},
        num_classes=2,
        task="Example: two classes from three features.",
        class_names=["no", "yes"],
    )


def example_file() -> bytes:
    return modelpkg.encode_package(example_package(), example_key())[0]


def split(data: bytes) -> tuple[bytes, bytes]:
    """(envelope, content): the first CBOR item of the file, and every byte after it."""
    stream = io.BytesIO(data)
    cbor2.CBORDecoder(stream).decode()
    return data[: stream.tell()], data[stream.tell():]


def example_diag() -> str:
    envelope, content = split(example_file())
    protected, unprotected, payload, signature = cbor2.loads(envelope).value
    body = _plain(cbor2.loads(content))
    body["initial_params"] = Embedded(_plain(cbor2.loads(body["initial_params"])))
    lines = [
        "/ item 1: COSE_Sign1, signed by the aggregator key /",
        "18([",
        f"  / protected / << {diag(cbor2.loads(protected), 1)} >>,",
        f"  / unprotected / {diag(dict(unprotected))},",
        f"  / payload / << {diag(cbor2.loads(payload), 1)} >>,",
        f"  / signature / {diag(signature)}",
        "])",
        "/ content: everything after item 1 /",
        diag(body),
    ]
    return "\n".join(lines)


def example_blocks() -> dict[str, str]:
    """Name -> the text of a fenced block in docs/package.md."""
    data = example_file()
    envelope, content = split(data)
    key = example_key()
    return {
        "package-keys": "\n".join(
            [
                f"aggregator seed (private)  {SEED.hex()}",
                f"aggregator public key      {bytes(key.verify_key).hex()}",
                f"aggregator id / kid        {wire.key_id(key.verify_key)}",
            ]
        ),
        "package-hex": wrap_hex(data),
        "package-diag": example_diag(),
        "package-parts": "\n".join(
            [
                f"file length             {len(data)} bytes",
                f"envelope (item 1)       bytes 0..{len(envelope) - 1} ({len(envelope)} bytes)",
                f"content                 bytes {len(envelope)}..{len(data) - 1} ({len(content)} bytes)",
                f"package digest          {hashlib.sha256(content).hexdigest()}",
                "  = SHA-256(content) = content_sha256 = a Task's package_digest = GET /v1/packages/{digest}",
                f"SHA-256 of the file     {hashlib.sha256(data).hexdigest()}  (not the digest)",
            ]
        ),
    }


# -------------------------------------------------------------------------------------------- tests


def test_example_is_deterministic() -> None:
    assert example_file() == example_file()


def test_doc_shows_the_current_example() -> None:
    """If this fails after a deliberate format change, run: python tests/test_package_example.py --write"""
    assert_doc_shows(DOC, example_blocks())


def test_doc_hex_is_a_package_a_device_loads() -> None:
    data = bytes.fromhex(doc_blocks(DOC.read_text())["package-hex"].replace("\n", ""))
    package = modelpkg.decode_package(data, example_key().verify_key)
    assert package.name == "example" and [s.name for s in package.param_specs] == ["fc.weight", "fc.bias"]
    np.testing.assert_array_equal(package.initial_params["fc.bias"], [0.015625, -0.75])
    assert package.digest.hex() in doc_blocks(DOC.read_text())["package-parts"]


def test_the_documented_layout_gives_the_digest() -> None:
    """From the document alone: the digest is the SHA-256 of every byte after the first CBOR item (the
    envelope), which the signed payload pins, and the content is one deterministic CBOR map."""
    data = bytes.fromhex(doc_blocks(DOC.read_text())["package-hex"].replace("\n", ""))
    envelope, content = split(data)
    payload = cbor2.loads(cbor2.loads(envelope).value[2])
    assert payload["type"] == "model-package" and payload["format"] == 1 and payload["v"] == 1
    assert payload["content_sha256"] == hashlib.sha256(content).digest() != hashlib.sha256(data).digest()
    assert payload["content_bytes"] == len(content)
    assert modelpkg.decode_package(data, example_key().verify_key).digest == hashlib.sha256(content).digest()
    decoded = cbor2.loads(content)
    assert set(decoded) == CONTENT_KEYS
    assert cbor2.dumps(decoded, canonical=True) == content
    tensors, encoding = wire.decode_tensors(decoded["initial_params"], example_package().param_specs)
    assert encoding == "float32" and set(tensors) == {"fc.weight", "fc.bias"}


def test_a_content_not_in_deterministic_encoding_is_refused() -> None:
    """The digest names the content, so the content must have one encoding: a re-ordered map is refused even
    when correctly signed."""
    _, content = split(example_file())
    decoded = cbor2.loads(content)
    shuffled = cbor2.dumps(dict(reversed(list(decoded.items()))))
    assert shuffled != content
    payload = {"v": 1, "type": "model-package", "format": 1, "name": "example",
               "content_sha256": hashlib.sha256(shuffled).digest(), "content_bytes": len(shuffled)}
    key = example_key()
    signed = wire.sign(payload, key, wire.key_id(key.verify_key)) + shuffled
    with pytest.raises(modelpkg.PackageError) as refused:
        modelpkg.decode_package(signed, key.verify_key)
    assert refused.value.reason == "bad-content" and "deterministic" in refused.value.detail


if __name__ == "__main__":
    write_or_print(DOC, example_blocks())
