"""Which ATen ops are rewritten before the graph is lowered to ONNX, and the rewrites torch does not provide.

The exporter differentiates in two stages (flctl.model.torch_export): the forward pass is traced to ATen ops,
some of which are first *decomposed* into simpler ATen ops (``FORWARD_DECOMPOSED``); then autograd runs over that
graph and the backward ops it emits are decomposed too (``backward_table``). What is left must have an ONNX
lowering in onnxscript's ATen library (torchlib).

Three kinds of rewrite, all per ATen op and independent of any model:

* a forward op is decomposed *before* differentiation when its backward op has no ONNX lowering but its
  decomposition's ops do (upsampling, adaptive pooling), or when it mutates buffers (batch norm updates its
  running statistics in place, which a grad transform refuses): autograd then differentiates the simpler ops;
* a backward op with no decomposition in torch and no lowering in torchlib is written here in terms of forward
  ATen ops that do lower: ``convolution_backward`` as a transposed convolution for the input gradient and, for
  the weight gradient, shifted slices and a batched matrix product (stride 1, no groups) or a convolution over
  the batch axis (the rest), and ``avg_pool2d_backward`` as the input gradient of a depthwise convolution with
  a constant kernel. tests/test_model_decompositions.py checks both against the
  native ATen ops over strides, paddings, dilations, groups and transposition;
* a backward op whose torch decomposition lowers to something onnxruntime runs slowly is written here too:
  ``threshold_backward`` (ReLU) and ``hardtanh_backward`` (ReLU6) as a product with a mask instead of ``Where``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

aten = torch.ops.aten

# Forward ops decomposed before autograd runs, by name prefix (every overload), and why.
FORWARD_DECOMPOSED: dict[str, str] = {
    "native_batch_norm": "updates running statistics in place; decomposed, the update is an ordinary output",
    "_native_batch_norm_legit": "as native_batch_norm",
    "_native_batch_norm_legit_functional": "as native_batch_norm",
    "_native_batch_norm_legit_no_training": "as native_batch_norm",
    "_batch_norm_with_update": "as native_batch_norm",
    "_batch_norm_with_update_functional": "as native_batch_norm",
    "_batch_norm_no_update": "as native_batch_norm",
    "upsample_nearest2d": "upsample_nearest2d_backward has no ONNX lowering; its gather decomposition does",
    "upsample_bilinear2d": "upsample_bilinear2d_backward has no ONNX lowering; its gather decomposition does",
    "upsample_bicubic2d": "upsample_bicubic2d_backward has no ONNX lowering; its gather decomposition does",
    "_adaptive_avg_pool2d": "_adaptive_avg_pool2d_backward has no ONNX lowering; a mean or gathers do",
}


def forward_table() -> dict[Any, Callable]:
    """Core ATen decompositions plus ``FORWARD_DECOMPOSED``: applied to the traced forward pass."""
    from torch._decomp import core_aten_decompositions, decomposition_table

    table = dict(core_aten_decompositions())
    for op, fn in decomposition_table.items():
        if op.name().split("::")[-1].split(".")[0] in FORWARD_DECOMPOSED:
            table[op] = fn
    return table


def backward_table() -> dict[Any, Callable]:
    """Core ATen decompositions, torch's max-pool backward and the rewrites below: applied to the joint graph."""
    from torch._decomp import core_aten_decompositions, decomposition_table

    table = dict(core_aten_decompositions())
    table[aten.max_pool2d_with_indices_backward.default] = decomposition_table[
        aten.max_pool2d_with_indices_backward.default
    ]
    table[aten.convolution_backward.default] = convolution_backward
    table[aten.avg_pool2d_backward.default] = avg_pool2d_backward
    table[aten.threshold_backward.default] = threshold_backward
    table[aten.hardtanh_backward.default] = hardtanh_backward
    return table


def threshold_backward(grad: torch.Tensor, inp: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReLU's backward, ``grad`` where ``inp > threshold`` and 0 elsewhere, as a product with the mask.

    torch's decomposition is ``where(inp <= threshold, 0, grad)``, and onnxruntime's ``Where`` with a scalar
    branch is slow: 1.3 ms against 0.17 ms for ``Greater``, ``Cast`` and ``Mul`` over the detector's
    32x32x16x16 activations (one thread), and a network has one per activation layer. Same values (a masked
    gradient becomes +-0 instead of 0)."""
    return grad * (inp > threshold).to(grad.dtype)


def hardtanh_backward(grad: torch.Tensor, inp: torch.Tensor, min_val: float, max_val: float) -> torch.Tensor:
    """ReLU6's (and hardtanh's) backward as a product with the mask ``min_val < inp < max_val``: see
    :func:`threshold_backward`."""
    return grad * ((inp > min_val) & (inp < max_val)).to(grad.dtype)


def _conv_weight_grad_matmul(
    grad: torch.Tensor, inp: torch.Tensor, kernel: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
) -> torch.Tensor:
    """Weight gradient of a stride-1, ungrouped ``conv2d(inp, w, 1, padding, dilation)``: the padded input's
    ``kh * kw`` shifted windows (im2col, ``(N, Cin * kh * kw, Ho * Wo)``) times the output gradient per sample
    (one batched MatMul), summed over the batch.

    onnxruntime runs this 20-30 % faster than the convolution over the batch axis for the detector's 3x3 layers
    at batch 32 (its Conv kernel is slow for a kernel as large as the output map, e.g. 16x16 with a 3x3 output);
    for strided convolutions it was not faster, so those keep the convolution (bench/training.py, docs/models.md).
    """
    ho, wo = grad.shape[2], grad.shape[3]
    padded = aten.constant_pad_nd(inp, [padding[1], padding[1], padding[0], padding[0]], 0.0)
    windows = [padded[:, :, ky * dilation[0]:ky * dilation[0] + ho, kx * dilation[1]:kx * dilation[1] + wo]
               for ky in range(kernel[0]) for kx in range(kernel[1])]
    cols = torch.stack(windows, dim=2).flatten(1, 2).flatten(2, 3)  # (N, Cin * kh * kw, Ho * Wo)
    per_sample = torch.bmm(cols, grad.flatten(2, 3).transpose(1, 2))  # (N, Cin * kh * kw, Cout)
    return per_sample.sum(0).reshape(inp.shape[1], kernel[0], kernel[1], grad.shape[1]).permute(3, 0, 1, 2)


def _conv_weight_grad(
    grad: torch.Tensor, inp: torch.Tensor, kernel: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> torch.Tensor:
    """Weight gradient of ``conv2d(inp, w, stride, padding, dilation, groups)`` given the output gradient.

    Stride 1 without groups: :func:`_conv_weight_grad_matmul`. Otherwise a convolution over the batch axis: the
    input's channels of one group become the batch, its samples the channels, the output gradient the kernel;
    the roles of stride and dilation swap. Rows and columns past the kernel (when the stride does not divide
    the padded input) are cut off.
    """
    if groups == 1 and tuple(stride) == (1, 1):
        return _conv_weight_grad_matmul(grad, inp, kernel, padding, dilation)
    n, cin = inp.shape[0], inp.shape[1]
    per_group = cin // groups
    x = inp.reshape(n, groups, per_group, inp.shape[2], inp.shape[3]).permute(2, 1, 0, 3, 4)
    x = x.reshape(per_group, groups * n, inp.shape[2], inp.shape[3])
    w = grad.permute(1, 0, 2, 3)
    out = aten.convolution(x, w, None, list(dilation), list(padding), list(stride), False, [0, 0], groups)
    return out[:, :, : kernel[0], : kernel[1]].permute(1, 0, 2, 3)


def convolution_backward(
    grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias_sizes: Any, stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
    groups: int, output_mask: Sequence[bool],
) -> Any:
    """``aten.convolution_backward`` for 2-d convolutions (plain, grouped, depthwise, transposed), in terms of
    ``aten.convolution``. Other ranks are left to torch (NotImplemented), and then reported as unsupported."""
    if weight.dim() != 4:
        return NotImplemented
    kernel = (weight.shape[2], weight.shape[3])
    grad_input = grad_weight = grad_bias = None
    if not transposed:
        if output_mask[0]:
            # The transposed convolution's output_padding restores the rows the forward stride dropped.
            reach = [(grad.shape[2 + i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1 for i in range(2)]
            extra = [inp.shape[2 + i] + 2 * padding[i] - reach[i] for i in range(2)]
            grad_input = aten.convolution(grad, weight, None, list(stride), list(padding), list(dilation), True,
                                          extra, groups)
        if output_mask[1]:
            grad_weight = _conv_weight_grad(grad, inp, kernel, stride, padding, dilation, groups)
    else:
        if output_mask[0]:
            grad_input = aten.convolution(grad, weight, None, list(stride), list(padding), list(dilation), False,
                                          [0, 0], groups)
        if output_mask[1]:
            # A transposed convolution's weight gradient is the plain one with input and output swapped.
            grad_weight = _conv_weight_grad(inp, grad, kernel, stride, padding, dilation, groups)
    if output_mask[2]:
        grad_bias = grad.sum([0, 2, 3])
    return grad_input, grad_weight, grad_bias


def avg_pool2d_backward(
    grad: torch.Tensor, inp: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], ceil_mode: bool, count_include_pad: bool, divisor_override: int | None,
) -> Any:
    """``aten.avg_pool2d_backward`` as the input gradient of a depthwise convolution with a constant kernel.

    Exact when every window has the same divisor: no ceil mode, and no padding unless padded zeros count
    (``count_include_pad``, torch's default) or a ``divisor_override`` is given. Other settings are left to
    torch (NotImplemented) and reported as unsupported.
    """
    kh, kw = kernel_size[0], kernel_size[-1]
    sh, sw = (stride[0], stride[-1]) if stride else (kh, kw)
    ph, pw = (padding[0], padding[-1]) if padding else (0, 0)
    if ceil_mode or (not count_include_pad and (ph or pw) and not divisor_override):
        return NotImplemented
    channels = inp.shape[1]
    divisor = divisor_override or kh * kw
    weight = torch.full((channels, 1, kh, kw), 1.0 / divisor, dtype=grad.dtype, device=grad.device)
    grad_input, _, _ = convolution_backward(
        grad, inp, weight, None, [sh, sw], [ph, pw], [1, 1], False, [0, 0], channels, [True, False, False]
    )
    return grad_input
