"""The compiled training step (training/compiled.py) against the eager one, and the
shape-stable MoE dispatch against the per-expert loop (issue 11, items 1 and 2).

References: the eager step (model.compute + loss_terms + backward), float64, 1e-10; the
dispatch against the loop and against a dense evaluation of every expert on every atom."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from janus_potential.nn.moe import MixtureOfExperts
from janus_potential.training.compiled import CompiledStep, expert_loads
from janus_potential.training.config import LossConfig
from janus_potential.training.data import collate
from janus_potential.training.loss import loss_terms

from .model_suite import make_model
from .test_training import labelled_structures, samples_of

TOLERANCE = 1e-10


def dense_moe(moe: MixtureOfExperts, x: torch.Tensor, element_embedding: torch.Tensor) -> torch.Tensor:
    """Every expert on every atom, combined with the gates: an independent reference."""
    expert_index, gates, _ = moe.route(x, element_embedding)
    out = moe.shared(x)
    for e in range(moe.num_experts):
        y = F.silu(x @ moe.w_in[e] + moe.b_in[e]) @ moe.w_out[e] + moe.b_out[e]
        weight = (gates * (expert_index == e)).sum(dim=1, keepdim=True)
        out = out + weight * y
    return out


@pytest.mark.parametrize("block", [1, 4, 32])
@pytest.mark.parametrize("top_k", [1, 2])
def test_blocked_dispatch_equals_the_loop_and_a_dense_evaluation(block, top_k):
    torch.manual_seed(0)
    moe = MixtureOfExperts(8, 6, top_k, 16, 8, router_uses_features=True).double()
    x = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    embedding = torch.randn(37, 8, dtype=torch.float64)
    loop = moe(x, embedding)
    moe.dispatch_block = block
    blocked = moe(x, embedding)
    for a, b in zip(loop, blocked):
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(blocked[0], dense_moe(moe, x, embedding), atol=TOLERANCE, rtol=0)
    # and the gradients, first and second order
    (g_loop,) = torch.autograd.grad(loop[0].square().sum(), x, create_graph=True)
    (g_blocked,) = torch.autograd.grad(blocked[0].square().sum(), x, create_graph=True)
    torch.testing.assert_close(g_loop, g_blocked, atol=TOLERANCE, rtol=0)
    w_loop = torch.autograd.grad(g_loop.square().sum(), moe.w_in, retain_graph=True)[0]
    w_blocked = torch.autograd.grad(g_blocked.square().sum(), moe.w_in)[0]
    torch.testing.assert_close(w_loop, w_blocked, atol=TOLERANCE, rtol=0)


def _eager(model, batch, config, ratios, coefficients):
    """The trainer's eager step for one evaluation (train_step with one pass)."""
    model.zero_grad(set_to_none=True)
    prediction = model.compute(batch.graph, compute_virial=bool(batch.has_stress.any()), create_graph=True,
                               head=batch.head)
    terms = loss_terms(prediction, batch, config)
    total = (ratios[0] * config.energy_weight * terms["energy"] + ratios[1] * config.forces_weight * terms["forces"]
             + ratios[2] * config.stress_weight * terms["stress"])
    balance = (coefficients * prediction["router_probability_sum"]).sum()
    (total + config.balance_weight * balance).backward()
    return terms, prediction, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"element_features": True}], ids=["embedding", "element-features"])
def test_compiled_step_equals_the_eager_step(overrides):
    """energies' and forces' and stress losses, forces and every parameter gradient, float64
    1e-10; a second batch of other sizes reuses the graph (no new compile); a batch of ONE
    structure breaks the first graph's assumptions (its structure count was a symbol >= 2)
    and gets a graph of its own, equally exact. Also with the element embedding of chemical
    descriptors (nn/embedding.py)."""
    model = make_model("tiny", **overrides).train()
    config = LossConfig(balance_weight=0.1)
    frames = labelled_structures(7)
    batches = [collate(samples_of(frames[:3], model)), collate(samples_of(frames[3:6], model)),
               collate(samples_of(frames[6:], model))]
    step = CompiledStep(copy.deepcopy(model), config)
    ratios = torch.tensor([0.7, 0.9, 0.5], dtype=torch.float64)
    for k, batch in enumerate(batches):
        loads = expert_loads(model, batch.graph.species)
        coefficients = loads / loads.sum(dim=-1, keepdim=True) * loads.shape[-1] / batch.graph.species.shape[0]
        terms, prediction, grads = _eager(model, batch, config, ratios, coefficients)
        torch.testing.assert_close(loads, prediction["expert_load"].double(), atol=0, rtol=0)
        out = step(batch, True, ratios, coefficients)
        for name in ("energy", "forces", "stress"):
            torch.testing.assert_close(out[name], terms[name].detach(), atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(out["forces_prediction"], prediction["forces"].detach(), atol=TOLERANCE, rtol=0)
        assert out["gradients"].keys() == grads.keys()
        for name, grad in grads.items():
            got = out["gradients"][name]
            assert (got is None) == (grad is None), name
            if grad is not None:
                torch.testing.assert_close(got, grad, atol=TOLERANCE, rtol=0, msg=name)
        if k == 1:
            assert step.compiles == 1, "the second batch (other sizes) should reuse the first graph"
    assert step.compiles == 2 and "outside the traced graphs' assumptions" in step.reasons[1]
