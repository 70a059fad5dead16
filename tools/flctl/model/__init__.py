"""`flctl model`: build, check, sign and inspect model packages (host side; torch is a tools dependency).

One module per job: ``cli`` (the subcommand), ``torch_export`` (module + loss -> ONNX graphs, backward pass
derived by torch), ``decompositions`` (ATen rewrites before lowering), ``losses``, ``check`` (every graph
against torch autograd), ``build`` (a checked package), ``inspect``, ``refmodels`` and ``reference`` (the two
hand-written reference models), ``examples`` (small example networks). Importing this package does not import
torch.
"""

from flctl.model.check import CHECK_BATCH_SIZES, CheckReport, check_against_torch, check_finite_differences
from flctl.model.cli import add_parser
from flctl.model.errors import ExportError, GradientCheckError, UnsupportedOpError
from flctl.model.reference import build_reference_package, export_reference_package

__all__ = [
    "CHECK_BATCH_SIZES",
    "CheckReport",
    "ExportError",
    "GradientCheckError",
    "UnsupportedOpError",
    "add_parser",
    "build_reference_package",
    "check_against_torch",
    "check_finite_differences",
    "export_reference_package",
]
