"""The worked example of docs/protocol.md section 13 (a Heartbeat) is generated here and checked, so the document
cannot rot.

    .venv/bin/python tests/test_heartbeat_example.py            # print the generated blocks
    .venv/bin/python tests/test_heartbeat_example.py --write    # rewrite them in docs/protocol.md
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import cbor2
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance import wire  # noqa: E402
from appliance.protocol.heartbeat import Heartbeat, decode_heartbeat, encode_heartbeat  # noqa: E402
from tests.test_wire_example import DOC, assert_doc_shows, diag, doc_blocks, wrap_hex, write_or_print  # noqa: E402

DEVICE_SEED = hashlib.sha256(b"fl-edge protocol example device").digest()


def example_key() -> SigningKey:
    return SigningKey(DEVICE_SEED)


def example_heartbeat() -> Heartbeat:
    device = wire.key_id(example_key().verify_key)
    return Heartbeat(
        device_id=device, agent_version="0.4.0", model_version=12, last_round=31, cameras=2, memory=209_715_200,
        memory_max=536_870_912, cpu_max=1500, cpu_throttled=250, oom_retries=1, outbox=1, outbox_bytes=4096,
        sent_at=1_764_288_000,
    )


def example_body() -> bytes:
    return encode_heartbeat(example_heartbeat(), example_key())


def example_blocks() -> dict[str, str]:
    body = example_body()
    protected, unprotected, payload, signature = cbor2.loads(body).value
    return {
        "heartbeat-diag": "\n".join([
            "18([",
            f"  / protected / << {diag(cbor2.loads(protected), 1)} >>,",
            f"  / unprotected / {diag(dict(unprotected))},",
            f"  / payload / << {diag(dict(cbor2.loads(payload)), 1)} >>,",
            f"  / signature / {diag(signature)}",
            "])",
        ]),
        "heartbeat-hex": wrap_hex(body) + f"\n/ {len(body)} bytes /",
    }  # fmt: skip


def test_the_example_decodes_to_what_was_sent() -> None:
    key = example_key()
    assert decode_heartbeat(example_body(), {wire.key_id(key.verify_key): key.verify_key}.get) == example_heartbeat()


def test_doc_shows_the_current_example() -> None:
    """If this fails after a deliberate protocol change, run: python tests/test_heartbeat_example.py --write"""
    assert_doc_shows(DOC, example_blocks())


def test_doc_hex_is_a_valid_heartbeat() -> None:
    hex_lines = doc_blocks(DOC.read_text())["heartbeat-hex"].splitlines()[:-1]
    key = example_key()
    decoded = decode_heartbeat(bytes.fromhex("".join(hex_lines)), {wire.key_id(key.verify_key): key.verify_key}.get)
    assert decoded == example_heartbeat()


if __name__ == "__main__":
    write_or_print(DOC, example_blocks())
