"""The protocol's refusal reasons, declared once for both sides.

Every refusal carries one stable, machine-readable reason: ``ProtocolError.reason`` in Python, ``reason`` in
the aggregator's problem document (docs/protocol.md, section 9). The metrics of both sides create one series
per reason from these tuples, so each series exists, at 0, before its first event: a rate or an alert on a
reason works from the first scrape. tests/test_metrics_initialised.py checks that every reason the code raises
is declared here.
"""

from __future__ import annotations

# What appliance.wire and appliance.cbor_reader raise while decoding any signed message.
DECODER_REASONS: tuple[str, ...] = (
    "too-large",
    "truncated",
    "trailing-bytes",
    "indefinite-length",
    "malformed",
    "too-deep",
    "too-long",
    "too-many-items",
    "unknown-tag",
    "not-signed",
    "bad-algorithm",
    "unknown-key",
    "bad-signature",
    "bad-payload",
    "unsupported-version",
    "wrong-type",
    "kid-mismatch",
    "digest-mismatch",
    "bad-tensor",
    "tensor-too-large",
    "wrong-tensors",
    "wrong-shape",
    "not-finite",
)

# What appliance.modelpkg adds when it refuses a model package (besides the decoder's reasons).
PACKAGE_REASONS: tuple[str, ...] = ("bad-content", "unsupported-format", "unreadable")

# What the aggregator adds when it refuses an upload (besides the decoder's reasons).
AGGREGATOR_UPLOAD_REASONS: tuple[str, ...] = (
    "revoked",
    "wrong-encoding",
    "expired",
    "round-closed",
    "too-stale",
    "wrong-round",
    "wrong-model",
    "duplicate",
    "norm-too-large",
    "too-many-samples",
    "body-too-large",
    "unsupported-media-type",
    "unsupported-content-encoding",
    "device-busy",
    "body-timeout",
    "client-gone",
)

# What secure aggregation adds (appliance/protocol/messages.py and the aggregator's secure rounds; docs/protocol.md
# section 12.7).
SECAGG_REASONS: tuple[str, ...] = (
    "wrong-phase",
    "bad-section",
    "wrong-length",
    "bad-roster",
    "not-in-roster",
    "bad-key",
    "bad-shares",
    "not-secure",
)

# Every reason the aggregator can refuse an upload with.
UPDATE_REFUSAL_REASONS: tuple[str, ...] = DECODER_REASONS + AGGREGATOR_UPLOAD_REASONS + SECAGG_REASONS
