"""Whether a model package can train on the data this device's source delivers, decided when a task names it.

Both sources deliver frames of :data:`appliance.framebuffer.CAMERA_FRAME_SHAPE` (the cameras through the frame
buffer, the synthetic source drawn at that size) and one count label per frame, 0..3. A package that needs other
inputs, fewer classes than those labels, or labels of another shape would pass every signature and content check
and then fail every round in the trainer (``trainer-failed``): the fleet would see a failing device, not a package
that does not fit it. :func:`check_fits` refuses it before any training, counted under :data:`UNFIT_REASON`.

The refusal is the device's, not the content's: it depends on ``[data] source`` (a detector of several classes
trains on synthetic frames, not on the cameras' classless pseudo-boxes), so its PackageError carries no digest
and the agent does not remember the package as refused (appliance.agent.Agent._ensure_package): the package stays
stored, and is checked again, without a download, each time a task names it.
"""

from __future__ import annotations

from appliance.framebuffer import CAMERA_FRAME_SHAPE
from appliance.labels import MotionLabelSettings
from appliance.modelpkg import ModelPackage, PackageError
from appliance.synthetic import NUM_CLASSES

UNFIT_REASON = "unfit-for-device"

# How many count classes each source's labels span (0..n-1): the synthetic truth, the motion labeller's clip.
SOURCE_CLASSES: dict[str, int] = {"synthetic": NUM_CLASSES, "cameras": MotionLabelSettings().max_count + 1}


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def check_fits(package: ModelPackage, source: str) -> None:
    """Raise PackageError (:data:`UNFIT_REASON`, naming what does not fit) when ``package`` cannot train on what
    ``source`` ("cameras" or "synthetic") delivers."""
    problem = _misfit(package, source)
    if problem is not None:
        raise PackageError(UNFIT_REASON, f"{package.name}: {problem}")


def _misfit(package: ModelPackage, source: str) -> str | None:
    if package.input_shape != CAMERA_FRAME_SHAPE:
        return (f"package needs {_shape(package.input_shape)} inputs; this device's frames are "
                f"{_shape(CAMERA_FRAME_SHAPE)}")
    if package.detection:  # trains on targets built from boxes, not on the count labels
        classes = package.detection.get("classes")
        if source == "cameras" and classes != 1:
            return (f"package detects {classes} classes; the cameras' pseudo-boxes are moving blobs with no class, "
                    'so it trains with [data] source = "synthetic" only')
        return None
    if package.label_shape != ():
        return (f"package needs labels shaped {_shape(package.label_shape)}; this device's {source} source gives one "
                "count label per frame")
    labels = SOURCE_CLASSES[source]
    if package.class_labels and package.num_classes < labels:
        return (f"package has {package.num_classes} classes; this device's {source} labels run 0..{labels - 1}, "
                f"so it needs num_classes >= {labels}")
    return None
