"""The exporter's ATen rewrites (flctl.model.decompositions) against torch's native backward kernels."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch", reason="torch (a tools/dev dependency) is needed to check the rewrites")

from flctl.model import decompositions  # noqa: E402

aten = torch.ops.aten

CONV_CASES = [
    # kernel, stride, padding, dilation, groups, in/out channels, transposed, output_padding, size
    *[(k, s, p, d, g, 4, 8, False, 0, h)
      for k, s, p, d, g, h in itertools.product((1, 3), (1, 3), (0, 2), (1, 2), (1, 4), (9,))],
    (3, 1, 1, 1, 6, 6, 6, False, 0, 8),  # depthwise 3x3 with padding (MobileNet)
    (3, 2, 1, 1, 6, 6, 12, False, 0, 9),  # depthwise with a channel multiplier, odd size
    (3, 1, 2, 2, 1, 4, 6, True, 0, 6),  # transposed, stride 1: the weight gradient by shifted slices and MatMul
    (2, 2, 0, 1, 1, 4, 3, True, 0, 5),  # U-Net's transposed 2x2 stride 2
    (3, 2, 1, 1, 1, 4, 3, True, 1, 5),  # transposed with output padding
    (3, 2, 1, 2, 2, 4, 6, True, 1, 6),  # transposed, grouped, dilated
    (4, 3, 2, 1, 4, 4, 8, True, 2, 4),
]


@pytest.mark.parametrize("k,s,p,d,g,cin,cout,transposed,out_pad,size", CONV_CASES)
def test_convolution_backward_matches_aten(k, s, p, d, g, cin, cout, transposed, out_pad, size):
    gen = torch.Generator().manual_seed(0)
    weight_shape = (cin, cout // g, k, k) if transposed else (cout, cin // g, k, k)
    w = torch.randn(weight_shape, generator=gen)
    x = torch.randn((3, cin, size, size), generator=gen)
    args = ([s, s], [p, p], [d, d], transposed, [out_pad, out_pad], g)
    try:
        out = aten.convolution(x, w, None, *args)
    except RuntimeError:
        pytest.skip("torch refuses this convolution (the kernel does not fit)")
    grad = torch.randn(out.shape, generator=gen)
    mask = [True, True, True]
    want = aten.convolution_backward(grad, x, w, [out.shape[1]], *args, mask)
    got = decompositions.convolution_backward(grad, x, w, [out.shape[1]], *args, mask)
    for name, a, b in zip(("input", "weight", "bias"), want, got, strict=True):
        assert b.shape == a.shape, name
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)


def test_convolution_backward_leaves_other_ranks_to_torch():
    x, w = torch.randn(2, 3, 10), torch.randn(4, 3, 3)
    assert decompositions.convolution_backward(
        torch.randn(2, 4, 8), x, w, [4], [1], [0], [1], False, [0], 1, [True, True, True]) is NotImplemented


@pytest.mark.parametrize("kernel,stride,padding,count_include_pad,divisor", [
    (2, 2, 0, True, None), (3, 1, 1, True, None), (3, 2, 1, True, None), (3, 2, 1, False, 5), (2, 1, 0, False, None),
])
def test_avg_pool2d_backward_matches_aten(kernel, stride, padding, count_include_pad, divisor):
    x = torch.randn(2, 3, 9, 9)
    args = ([kernel, kernel], [stride, stride], [padding, padding], False, count_include_pad, divisor)
    out = aten.avg_pool2d(x, *args)
    grad = torch.randn(out.shape)
    want = aten.avg_pool2d_backward(grad, x, *args)
    torch.testing.assert_close(decompositions.avg_pool2d_backward(grad, x, *args), want, rtol=1e-5, atol=1e-5)


def test_avg_pool2d_backward_with_uneven_windows_is_left_to_torch():
    x, grad = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)
    assert decompositions.avg_pool2d_backward(grad, x, [3, 3], [2, 2], [1, 1], False, False, None) is NotImplemented
    assert decompositions.avg_pool2d_backward(grad, x, [3, 3], [2, 2], [1, 1], True, True, None) is NotImplemented
