"""Building blocks against independent references: neighbour lists, envelope, MoE, presets."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.neighborlist import neighbor_list

from janus_potential import JanusPotential, ModelConfig, build_graph
from janus_potential.nn.geometry import build_triplets
from janus_potential.nn.moe import MixtureOfExperts
from janus_potential.nn.radial import smooth_envelope
from janus_potential.testing import random_structure


@pytest.mark.parametrize(
    "atoms",
    [
        bulk("Si", "diamond", a=5.43),  # cell smaller than the cutoff
        random_structure(["Mg", "O"], 20, seed=2),
        random_structure(["Cu", "O"], 12, seed=4, pbc=[True, False, True]),
        random_structure(["C", "H"], 8, seed=5, pbc=False),
    ],
)
def test_graph_matches_ase_neighbor_list(atoms):
    cutoff = 4.5
    graph = build_graph(atoms, cutoff, dtype=torch.float64)
    i, j, d, D = neighbor_list("ijdD", atoms, cutoff)
    ours = sorted(zip(graph.edge_index[0].tolist(), graph.edge_index[1].tolist(),
                      np.round(graph.edge_vectors().numpy(), 8).tolist()))
    ref = sorted(zip(i.tolist(), j.tolist(), np.round(D, 8).tolist()))
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a[:2] == b[:2]
        np.testing.assert_allclose(a[2], b[2], atol=1e-7)


def test_envelope_and_two_derivatives_vanish_at_cutoff():
    x = torch.tensor([1.0 - 1e-7, 1.0, 1.3], dtype=torch.float64, requires_grad=True)
    u = smooth_envelope(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x)
    assert torch.all(u.abs() < 1e-12) and torch.all(du.abs() < 1e-10) and torch.all(d2u.abs() < 1e-5)
    inside = smooth_envelope(torch.tensor([0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(inside, torch.tensor([1.0, 0.5], dtype=torch.float64))


def test_triplets_are_all_ordered_pairs_of_distinct_edges_per_centre():
    centre = torch.tensor([0, 1, 0, 2, 0, 1, 3])
    short = torch.tensor([0, 1, 2, 4, 5, 6])
    first, second = build_triplets(centre, short)
    ours = sorted(zip(first.tolist(), second.tolist()))
    ref = sorted((a, b) for a in short.tolist() for b in short.tolist() if a != b and centre[a] == centre[b])
    assert ours == ref


def test_moe_equals_dense_reference():
    torch.manual_seed(0)
    moe = MixtureOfExperts(8, num_experts=5, experts_per_atom=2, expert_hidden=6, shared_hidden=4,
                           router_uses_features=True).double()
    x = torch.randn(40, 8, dtype=torch.float64)
    element = torch.randn(40, 8, dtype=torch.float64)
    out = moe(x, element)
    logits = moe.router(element + x)
    reference = moe.shared(x)
    for atom in range(40):
        top = torch.topk(logits[atom], 2)
        gates = torch.softmax(top.values, 0)
        for gate, e in zip(gates, top.indices):
            hidden = torch.nn.functional.silu(x[atom] @ moe.w_in[e] + moe.b_in[e])
            reference[atom] += gate * (hidden @ moe.w_out[e] + moe.b_out[e])
    torch.testing.assert_close(out, reference)
    load = moe.last_expert_load
    assert int(load.sum()) == 80
    assert moe.last_balance_loss.requires_grad and float(moe.last_balance_loss.detach()) >= 0.99


def test_element_aware_routing_is_fixed_by_composition(tiny_model):
    atoms = random_structure(["Mg", "O"], 16, seed=3)
    graph = build_graph(atoms, tiny_model.cutoff, dtype=torch.float64)
    tiny_model.compute(graph)
    load_a = tiny_model.expert_load()
    graph.positions = graph.positions + 0.05 * torch.randn_like(graph.positions)
    tiny_model.compute(graph)
    assert tiny_model.expert_load() == load_a


def test_presets_report_total_and_active_parameters():
    with torch.device("meta"):
        huge = JanusPotential.from_preset("1b")
    report = huge.parameter_report()
    counted = sum(p.numel() for p in huge.parameters())
    assert report["total_parameters"] == counted
    assert 0.9e9 < counted < 1.3e9
    assert report["active_parameters_per_atom"] <= 0.05 * counted
    small = JanusPotential.from_preset("small")
    assert small.config == ModelConfig()
    with pytest.raises(ValueError, match="unknown preset"):
        JanusPotential.from_preset("huge")
    with pytest.raises(ValueError, match="unknown model option"):
        JanusPotential.from_preset("tiny", widht=3)


def test_float32_default_and_float64_on_request():
    model = JanusPotential.from_preset("tiny")
    assert model.embedding.weight.dtype == torch.float32
    atoms = bulk("Cu", "fcc", a=3.6)
    out32 = model.compute(build_graph(atoms, model.cutoff))
    assert out32["energy"].dtype == torch.float64 and out32["forces"].dtype == torch.float32
    out64 = model.double().compute(build_graph(atoms, model.cutoff, dtype=torch.float64))
    assert out64["forces"].dtype == torch.float64
    torch.testing.assert_close(out32["energy"], out64["energy"], rtol=1e-5, atol=1e-5)
