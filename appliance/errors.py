"""The one error type the protocol raises, shared by the decoder, the signature check and the message schemas."""

from __future__ import annotations


class ProtocolError(Exception):
    """A message was refused. ``reason`` is stable and machine-readable (``bad-signature``, ``too-large``...);
    ``detail`` is for the operator and may change between versions."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
