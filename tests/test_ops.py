"""The fused edge operators (janus_potential/ops.py) against the torch expression they replace,
and their first and second derivatives against finite differences (gradcheck, gradgradcheck),
in float64; float32 forward against float64."""

from __future__ import annotations

import pytest
import torch

from janus_potential import ops


def case(n_value: int = 7, n_out: int = 5, edges: int = 23, features: int = 12, groups: int = 3, seed: int = 0,
         dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(n_value, features, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(edges, groups, generator=generator, dtype=dtype, requires_grad=True)
    gather = torch.randint(0, n_value, (edges,), generator=generator)
    scatter = torch.randint(0, n_out, (edges,), generator=generator)
    return value, weight, gather, scatter, n_out


def test_edge_scatter_equals_the_torch_expression():
    value, weight, gather, scatter, n_out = case()
    fused = ops.edge_scatter(value, weight, gather, scatter, n_out)
    reference = ops.edge_scatter_reference(value, weight, gather, scatter, n_out)
    torch.testing.assert_close(fused, reference, rtol=1e-13, atol=1e-13)
    # gradients of a loss through both, including the second-order ones force training takes
    for create_graph in (False, True):
        grads = torch.autograd.grad((fused * fused.detach().cos()).sum(), (value, weight), create_graph=create_graph,
                                    retain_graph=True)
        ref = torch.autograd.grad((reference * reference.detach().cos()).sum(), (value, weight),
                                  create_graph=create_graph, retain_graph=True)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    # float32 = float64 to float32 precision
    fused32 = ops.edge_scatter(value.detach().float(), weight.detach().float(), gather, scatter, n_out)
    torch.testing.assert_close(fused32.double(), reference.detach(), rtol=1e-5, atol=1e-5)


def test_edge_scatter_gradcheck_and_gradgradcheck():
    value, weight, gather, scatter, n_out = case()
    function = lambda v, w: ops.edge_scatter(v, w, gather, scatter, n_out)  # noqa: E731
    assert torch.autograd.gradcheck(function, (value, weight))
    assert torch.autograd.gradgradcheck(function, (value, weight))


def test_edge_dot_gradcheck_and_gradgradcheck():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(6, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    index_a = torch.randint(0, 6, (17,), generator=generator)
    index_b = torch.randint(0, 4, (17,), generator=generator)
    expected = (a[index_a] * b[index_b]).view(17, 2, 4).sum(-1)
    torch.testing.assert_close(ops.edge_dot(a, b, index_a, index_b, 2), expected, rtol=1e-13, atol=1e-13)
    function = lambda x, y: ops.edge_dot(x, y, index_a, index_b, 2)  # noqa: E731
    assert torch.autograd.gradcheck(function, (a, b))
    assert torch.autograd.gradgradcheck(function, (a, b))


def test_operators_script_and_check_their_input():
    value, weight, gather, scatter, n_out = case()

    @torch.jit.script
    def scripted(v: torch.Tensor, w: torch.Tensor, g: torch.Tensor, s: torch.Tensor, n: int) -> torch.Tensor:
        return torch.ops.janus.edge_scatter(v, w, g, s, n)

    torch.testing.assert_close(scripted(value, weight, gather, scatter, n_out),
                               ops.edge_scatter(value, weight, gather, scatter, n_out))
    with pytest.raises(RuntimeError, match="gather holds a row outside"):
        ops.edge_scatter(value, weight, gather + 100, scatter, n_out)
    with pytest.raises(RuntimeError, match="not a multiple of G"):
        ops.edge_scatter(value, torch.ones(weight.shape[0], 5, dtype=weight.dtype), gather, scatter, n_out)
