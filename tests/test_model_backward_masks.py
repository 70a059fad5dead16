"""The exporter's faster backward rewrites (flctl.model.decompositions): ReLU's and ReLU6's backward as a product
with a mask instead of onnxruntime's slow ``Where``, and a stride-1 convolution's weight gradient as shifted slices
and one batched MatMul; both against torch's native kernels, and the ONNX a ReLU network exports to."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch (a tools/dev dependency) is needed to check the rewrites")

from flctl.model import decompositions  # noqa: E402

aten = torch.ops.aten


def _edges() -> torch.Tensor:
    """Values on both sides of ReLU's and ReLU6's kinks and exactly on them."""
    gen = torch.Generator().manual_seed(0)
    x = 8 * torch.randn((4, 3, 5, 5), generator=gen)
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, 6.0, 1e-7, -1e-7, 6.0 - 1e-6])
    return x


def test_relu_backward_matches_aten_at_and_around_the_threshold():
    x = _edges()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for threshold in (0.0, 0.5):
        torch.testing.assert_close(decompositions.threshold_backward(grad, x, threshold),
                                   aten.threshold_backward(grad, x, threshold), rtol=0, atol=0)


def test_relu6_backward_matches_aten_at_and_around_both_limits():
    x = _edges()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(decompositions.hardtanh_backward(grad, x, 0.0, 6.0),
                               aten.hardtanh_backward(grad, x, 0.0, 6.0), rtol=0, atol=0)


@pytest.mark.parametrize("kernel,padding,dilation", [(3, 1, 1), (3, 2, 2), (1, 0, 1), (5, 0, 1), (2, 1, 3)])
def test_stride_1_weight_gradient_by_slices_and_matmul_matches_aten(kernel, padding, dilation):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((5, 3, 9, 8), generator=gen)
    w = torch.randn((4, 3, kernel, kernel), generator=gen)
    args = ([1, 1], [padding, padding], [dilation, dilation], False, [0, 0], 1)
    grad = torch.randn(aten.convolution(x, w, None, *args).shape, generator=gen)
    want = aten.convolution_backward(grad, x, w, [4], *args, [False, True, False])[1]
    got = decompositions._conv_weight_grad_matmul(grad, x, (kernel, kernel), [padding, padding],
                                                  [dilation, dilation])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_relu_network_exports_without_where_in_its_backward_pass():
    import onnx

    from flctl.model.losses import resolve_loss
    from flctl.model.torch_export import export_graphs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.ReLU6(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    graphs = export_graphs(model, resolve_loss("mse"), (1, 8, 8))  # cross-entropy's own backward has a Where
    ops = [node.op_type for node in onnx.load_from_string(graphs.training).graph.node]
    assert "Where" not in ops and "MatMul" in ops  # masks as products; the first conv's weight gradient a MatMul
