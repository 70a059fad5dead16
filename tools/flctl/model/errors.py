"""Why an export stops. Each message is one line for the operator; nothing is written when one is raised."""

from __future__ import annotations


class ExportError(Exception):
    """The model, loss or options cannot be turned into a package (the message says which and why)."""


class UnsupportedOpError(ExportError):
    """An ATen op of the model (or of its backward pass) has no ONNX lowering: ``op`` and the ``modules`` that
    use it are named so the operator knows which layer to replace."""

    def __init__(self, op: str, modules: list[str], detail: str = ""):
        where = ", ".join(modules) if modules else "the model's forward code"
        super().__init__(f"unsupported op {op} (in {where}){': ' + detail if detail else ''}")
        self.op = op
        self.modules = modules


class GradientCheckError(ExportError):
    """A graph's loss, outputs or gradients differ from torch autograd: the package must not be written."""
