"""The traffic cameras' vehicle detector: a small CenterNet-style network and its loss, ordinary torch code that
``flctl model export --torch`` exports like any other model.

Why this head: anchor-free and single-stage, so the model is one fully convolutional tensor program with no
box-matching step in the graph (a centre heatmap, a size and an offset per cell); its targets are dense maps
that the device builds from boxes with numpy (appliance.detection.encode_targets), and decoding is a 3x3
max-pool and a top-k, cheap enough for the device (appliance.detection.decode).

Network (for the cameras' 1x32x32 frames; any c x H x W with H, W multiples of 2): a 3x3 stem at full
resolution, a stride-2 3x3 convolution, two 3x3 blocks at stride 2 (the second dilated, so a cell sees a whole
vehicle and its surroundings), a 3x3 head convolution, then one 1x1 convolution to ``classes + 4`` maps on the
16x16 grid: centre heatmap logits per class, box width and height (input pixels), centre offset in the cell.
Group norm (4 groups) after every 3x3 convolution of the backbone, not batch norm: the cameras' frames differ
in brightness and contrast (day, night), and with batch norm (its running statistics averaged over such
non-IID devices) FedAvg across 8 cameras reached held-out mAP@0.5 0.37 after 5 rounds, against 0.89 with group
norm; trained centrally on the same frames both reach 0.99 (bench/detector_fl.py, docs/models.md). 24,637
parameters with the defaults.

Loss (:func:`centre_net_loss`), the outputs against labels of ``classes + 5`` maps (heatmap targets, size,
offset, mask), as in CenterNet: the penalty-reduced focal loss on the heatmaps (alpha 2, beta 4) normalised by
the number of objects, plus 0.1 x L1 on sizes and 1 x L1 on offsets at the centre cells.

Export: ``flctl model export --torch flctl.model.detector:centre_net --input-shape 1,32,32
--loss flctl.model.detector:centre_net_loss --name traffic-detector --classes vehicle --mean 0.4 --std 0.25
--max-grad-norm 20 --out detector.flpkg --key aggregator.key``. The model's ``detection`` attribute goes into the
package, so the device knows to build heatmap targets from boxes and to decode peaks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 2
SIZE_WEIGHT = 0.1
OFFSET_WEIGHT = 1.0
FOCAL_ALPHA = 2.0  # CenterNet's exponents: (1 - p)^alpha on centres, (1 - target)^beta p^alpha elsewhere
FOCAL_BETA = 4.0
PRIOR = 0.1  # initial centre probability everywhere (the heatmap bias), as CenterNet and RetinaNet start


GROUPS = 4


def _conv_gn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(GROUPS, cout),
        nn.ReLU(),
    )


class CentreNet(nn.Module):
    """(N, in_channels, H, W) -> (N, classes + 4, H/2, W/2): heatmap logits, box size, centre offset."""

    def __init__(self, classes: int = 1, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.backbone = nn.Sequential(
            _conv_gn_relu(in_channels, w // 2),
            _conv_gn_relu(w // 2, w, stride=STRIDE),
            _conv_gn_relu(w, w * 2),
            _conv_gn_relu(w * 2, w * 2, dilation=2),
        )
        self.head = nn.Sequential(nn.Conv2d(w * 2, w * 2, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(w * 2, classes + 4, 1)
        with torch.no_grad():
            self.out.bias.zero_()
            self.out.bias[:classes] = -math.log((1 - PRIOR) / PRIOR)
            self.out.bias[classes:classes + 2] = 4.0  # a typical vehicle's size in pixels: sizes start sensible
            self.out.bias[classes + 2:] = 0.5  # the middle of the cell
        #: Read by the exporter and written into the package (appliance.detection.DetectionSpec).
        self.detection = {"kind": "centre-heatmap", "stride": STRIDE, "classes": classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.head(self.backbone(x)))


def centre_net(classes: int = 1, in_channels: int = 1, width: int = 16) -> CentreNet:
    """The detector with its defaults: one class (vehicle), grayscale frames."""
    return CentreNet(classes, in_channels, width)


def centre_net_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CenterNet's loss; ``outputs`` (N, C + 4, h, w), ``labels`` (N, C + 5, h, w) as appliance.detection lays
    them out. Normalised by the number of objects in the batch (at least 1)."""
    c = outputs.shape[1] - 4
    logits, size, offset = outputs[:, :c], outputs[:, c:c + 2], outputs[:, c + 2:]
    heat, size_t, offset_t, mask = labels[:, :c], labels[:, c:c + 2], labels[:, c + 2:c + 4], labels[:, c + 4:]
    centres = torch.where(heat == 1.0, torch.ones_like(heat), torch.zeros_like(heat))
    p = torch.sigmoid(logits)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    on_centres = -(log_p * (1 - p) ** FOCAL_ALPHA * centres).sum()
    elsewhere = -(log_not_p * p ** FOCAL_ALPHA * (1 - heat) ** FOCAL_BETA * (1 - centres)).sum()
    objects = mask.sum().clamp(min=1.0)
    size_l1 = (mask * (size - size_t).abs()).sum()
    offset_l1 = (mask * (offset - offset_t).abs()).sum()
    return (on_centres + elsewhere + SIZE_WEIGHT * size_l1 + OFFSET_WEIGHT * offset_l1) / objects


def _label_shape(output_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (output_shape[0] + 1, *output_shape[1:])


def _sample_labels(n: int, generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Plausible labels for the gradient check: a few objects per frame (Gaussian heatmaps peaking at exactly
    1, sizes of 2-8 pixels, offsets in [0, 1), mask at the centres) and some frames with none."""
    c, h, w = shape[0] - 5, shape[1], shape[2]
    labels = torch.zeros((n, *shape))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    for i in range(n):
        objects = int(torch.randint(0, 4, (1,), generator=generator))
        for _ in range(objects):
            k = int(torch.randint(0, c, (1,), generator=generator))
            row = int(torch.randint(0, h, (1,), generator=generator))
            col = int(torch.randint(0, w, (1,), generator=generator))
            blob = torch.exp(-((xs - col) ** 2 + (ys - row) ** 2) / 0.5)
            labels[i, k] = torch.maximum(labels[i, k], blob)
            labels[i, k, row, col] = 1.0
            size = 2 + 6 * torch.rand(2, generator=generator)
            offset = torch.rand(2, generator=generator)
            labels[i, c:c + 5, row, col] = torch.cat([size, offset, torch.ones(1)])
    return labels


centre_net_loss.label_shape = _label_shape  # type: ignore[attr-defined]
centre_net_loss.sample_labels = _sample_labels  # type: ignore[attr-defined]
