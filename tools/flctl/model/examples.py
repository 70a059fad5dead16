"""Small example networks, ordinary torch modules that ``flctl model export --torch`` takes as they are.

They are what the tests and the benchmarks export, and a starting point for your own (docs/models.md):

* :func:`mobilenet_v2` - MobileNetV2's inverted residual blocks (1x1 expansion, depthwise 3x3 with padding,
  1x1 linear projection, batch norm, ReLU6, residual add when the shape allows), global average pooling and
  a linear classifier; for the traffic cameras' 1x32x32 frames by default.
* :func:`unet` - a two-level U-Net for per-pixel classes: double 3x3 convolutions, max-pooling down,
  bilinear upsampling and a transposed convolution up, skip connections by concatenation; batch norm in the
  encoder, group norm in the decoder.

Run ``flctl model export --torch flctl.model.examples:mobilenet_v2 --input-shape 1,32,32 --loss cross-entropy``.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand (1x1), depthwise 3x3, project (1x1, no activation); residual when it fits."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [_conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def mobilenet_v2(num_classes: int = 4, in_channels: int = 1, width: int = 8) -> nn.Module:
    """A MobileNetV2-style classifier: 32x32 -> 16 (stem) -> 8 -> 4, then 1x1 to 4*width, pool, dropout, linear."""
    w = width
    return nn.Sequential(
        _conv_bn_relu6(in_channels, w, 3, stride=2),
        InvertedResidual(w, w, 1, expand=1),
        InvertedResidual(w, w * 3 // 2, 2, expand=4),
        InvertedResidual(w * 3 // 2, w * 3 // 2, 1, expand=4),
        InvertedResidual(w * 3 // 2, w * 2, 2, expand=4),
        _conv_bn_relu6(w * 2, w * 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(w * 4, num_classes),
    )


def _double_conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    def norm_layer() -> nn.Module:
        return nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(4, cout)

    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm_layer(), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), norm_layer(), nn.ReLU(),
    )


class UNet(nn.Module):
    """Two levels down (max-pool), two up (bilinear upsampling, then a transposed convolution), concat skips."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, width: int = 8):
        super().__init__()
        w = width
        self.enc1 = _double_conv(in_channels, w, "batch")
        self.enc2 = _double_conv(w, 2 * w, "batch")
        self.bottom = _double_conv(2 * w, 4 * w, "batch")
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = _double_conv(4 * w + 2 * w, 2 * w, "group")
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = _double_conv(2 * w, w, "group")
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def unet(num_classes: int = 2, in_channels: int = 1, width: int = 8) -> nn.Module:
    """A U-Net-style segmenter: (N, in_channels, H, W) -> (N, num_classes, H, W), H and W multiples of 4."""
    return UNet(num_classes, in_channels, width)
