"""Building blocks against independent references: neighbour lists, envelope, MoE, presets."""

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.neighborlist import neighbor_list

from janus_potential import JanusPotential, build_graph
from janus_potential.nn.geometry import build_triplets
from janus_potential.nn.moe import MixtureOfExperts, balance_loss
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
    out, probability_sum, load = moe(x, element)
    logits = moe.router(element + x)
    reference = moe.shared(x)
    reference_load = torch.zeros(5, dtype=torch.float64)
    for atom in range(40):
        top = torch.topk(logits[atom], 2)
        gates = torch.softmax(top.values, 0)
        for gate, e in zip(gates, top.indices):
            hidden = torch.nn.functional.silu(x[atom] @ moe.w_in[e] + moe.b_in[e])
            reference[atom] += gate * (hidden @ moe.w_out[e] + moe.b_out[e])
            reference_load[e] += 1
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(load, reference_load)
    torch.testing.assert_close(probability_sum, torch.softmax(logits, dim=-1).sum(dim=0))
    # Switch/GShard loss E sum_e f_e P_e of the returned sums, by hand; 1 for a uniform router
    balance = balance_loss(probability_sum.unsqueeze(0), load.unsqueeze(0), 40)
    expected = 5 * torch.sum(reference_load / 80 * torch.softmax(logits, dim=-1).mean(dim=0))
    torch.testing.assert_close(balance, expected)
    assert balance.requires_grad
    uniform = balance_loss(torch.full((1, 5), 8.0, dtype=torch.float64), torch.full((1, 5), 16.0), 40)
    assert float(uniform) == pytest.approx(1.0)


def test_router_scale_scales_the_routers_adam_steps_and_nothing_else():
    """`router_scale` s: the MoE equals one with s = 1 whose router weight is s W (the same
    function), and one AdamW step from the same loss moves its logits s times as far."""
    torch.manual_seed(0)
    scaled = MixtureOfExperts(8, num_experts=4, experts_per_atom=2, expert_hidden=6, shared_hidden=4,
                              router_uses_features=True, router_scale=0.01).double()
    plain = MixtureOfExperts(8, num_experts=4, experts_per_atom=2, expert_hidden=6, shared_hidden=4,
                             router_uses_features=True).double()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        plain.router.weight.mul_(0.01)
    x = torch.randn(30, 8, dtype=torch.float64)
    element = torch.randn(30, 8, dtype=torch.float64)
    before = plain.router(element + x)
    for a, b in zip(scaled(x, element), plain(x, element)):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)
    # initial logits of the same spread as the unscaled router's N(0, 0.02) weights
    assert 0.01 < float((scaled.router.weight * 0.01).std()) < 0.03
    steps = []
    for moe in (scaled, plain):
        optimizer = torch.optim.AdamW([moe.router.weight], lr=1e-3, weight_decay=0.0, eps=1e-15)
        out, probability_sum, _ = moe(x, element)
        ((out ** 2).sum() + probability_sum.pow(2).sum()).backward()
        optimizer.step()
        with torch.no_grad():
            logits = moe.router(element + x) * moe.router_scale
        steps.append(logits - before)
    # Adam's first step is lr * sign(gradient) per weight, whatever the gradient's size (up to eps)
    torch.testing.assert_close(steps[0], 0.01 * steps[1], atol=1e-12, rtol=1e-6)
    assert float(steps[1].abs().max()) > 1e-4
    with pytest.raises(ValueError, match="router_scale"):
        JanusPotential.from_preset("tiny", router_scale=0.0)


def test_element_aware_routing_is_fixed_by_composition(tiny_model):
    atoms = random_structure(["Mg", "O"], 16, seed=3)
    graph = build_graph(atoms, tiny_model.cutoff, dtype=torch.float64)
    load_a = tiny_model.compute(graph)["expert_load"]
    assert float(load_a.sum()) == len(atoms) * tiny_model.num_interactions  # one expert per atom and layer
    graph.positions = graph.positions + 0.05 * torch.randn_like(graph.positions)
    assert torch.equal(tiny_model.compute(graph)["expert_load"], load_a)


def documented_presets() -> dict[str, dict[str, str]]:
    """The preset table of docs/model.md, one dict of column -> cell per preset name."""
    lines = (Path(__file__).resolve().parents[1] / "docs" / "model.md").read_text().splitlines()
    start = lines.index("## Presets")
    end = next((k for k in range(start + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    rows = [line for line in lines[start:end] if line.startswith("|")]  # the section's own table
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    table = {}
    for row in rows[2:]:
        cells = dict(zip(header, (cell.strip() for cell in row.strip("|").split("|"))))
        table[cells["preset"]] = cells
    return table


def documented_count(text: str) -> tuple[float, float]:
    """(value, half a unit of its last digit) of '14.6 k', '0.492 M', '27.8 M (2.6 %)' or '1,086,148,993'."""
    number, *unit = text.split("(")[0].split()
    digits = number.replace(",", "")
    scale = {"k": 1e3, "M": 1e6}[unit[0]] if unit else 1.0
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return float(digits) * scale, 0.5 * 10.0 ** -decimals * scale


@pytest.mark.parametrize("row", list(documented_presets()))
def test_presets_match_the_documented_table(row):
    """Each preset's hyper-parameters and its total and active parameter counts (counted on
    the real tensors) are those of the table in docs/model.md; so is the model built without
    a configuration, for the row marked '(default)'."""
    cells = documented_presets()[row]
    with torch.device("meta"):
        models = [JanusPotential.from_preset(row.split()[0])]
        if "(default)" in row:
            models.append(JanusPotential())
    cutoff, three_body = (float(v) for v in cells["cutoff / 3-body"].split("/"))
    experts, top_k = cells["experts (top-k)"].replace("(", " ").replace(")", " ").split()
    total, total_rounding = documented_count(cells["total params"])
    active, active_rounding = documented_count(cells["active per atom"])
    for model in models:
        config = model.config
        assert (config.cutoff, config.three_body_cutoff) == (cutoff, three_body)
        assert (config.num_interactions, config.features) == (int(cells["L"]), int(cells["F"]))
        assert (config.num_experts, config.experts_per_atom) == (int(experts), int(top_k))
        report = model.parameter_report()
        assert abs(sum(p.numel() for p in model.parameters()) - total) <= total_rounding
        assert abs(report["total_parameters"] - total) <= total_rounding
        assert abs(report["active_parameters_per_atom"] - active) <= active_rounding


def test_presets_report_total_and_active_parameters():
    with torch.device("meta"):
        huge = JanusPotential.from_preset("1b")
    report = huge.parameter_report()
    counted = sum(p.numel() for p in huge.parameters())
    assert 0.9e9 < counted < 1.3e9
    assert report["active_parameters_per_atom"] <= 0.05 * counted
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


def test_energy_and_forces_are_traceable_by_make_fx(tiny_model):
    """The model is a pure module: make_fx traces energy + forces (no data-dependent Python,
    no state left on submodules) and the traced graph reproduces the eager result."""
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = build_graph(random_structure(["Mg", "O"], 12, seed=1), tiny_model.cutoff, dtype=torch.float64)
    state = ({k: v.detach() for k, v in tiny_model.named_parameters()}, dict(tiny_model.named_buffers()))

    def energy_and_forces(state, positions):
        out = torch.func.functional_call(tiny_model, state, (graph.species, graph.edge_index,
                                                             graph.edge_vectors(positions), graph.batch, 1))
        return out["energy"], out["forces"]

    traced = make_fx(energy_and_forces)(state, graph.positions)
    assert any(node.op == "call_function" for node in traced.graph.nodes)
    moved = graph.positions + 0.01  # a rigid shift: same graph shapes, new values
    for expected, actual in zip(energy_and_forces(state, moved), traced(state, moved)):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


# (symbol, period, group, block) from the IUPAC periodic table, written out by hand
PERIODIC_TABLE_SAMPLE = [
    ("H", 1, 1, "s"), ("He", 1, 18, "s"), ("Li", 2, 1, "s"), ("C", 2, 14, "p"), ("Ne", 2, 18, "p"),
    ("Mg", 3, 2, "s"), ("Cl", 3, 17, "p"), ("K", 4, 1, "s"), ("Sc", 4, 3, "d"), ("Fe", 4, 8, "d"),
    ("Zn", 4, 12, "d"), ("Ga", 4, 13, "p"), ("Kr", 4, 18, "p"), ("Mo", 5, 6, "d"), ("Sn", 5, 14, "p"),
    ("I", 5, 17, "p"), ("Cs", 6, 1, "s"), ("Ba", 6, 2, "s"), ("Ce", 6, 3, "f"), ("Gd", 6, 3, "f"),
    ("Hf", 6, 4, "d"), ("W", 6, 6, "d"), ("Pt", 6, 10, "d"), ("Hg", 6, 12, "d"), ("Pb", 6, 14, "p"),
    ("Rn", 6, 18, "p"), ("Fr", 7, 1, "s"), ("Ra", 7, 2, "s"), ("U", 7, 3, "f"), ("Pu", 7, 3, "f"),
]


def test_element_descriptors_follow_the_periodic_table():
    from ase.data import atomic_numbers

    from janus_potential.elements import element_descriptors, period_group_block

    table = element_descriptors(100)
    assert table.shape[0] == 101 and torch.isfinite(table).all() and not table[0].any()
    for symbol, period, group, block in PERIODIC_TABLE_SAMPLE:
        z = atomic_numbers[symbol]
        assert period_group_block(z) == (period, group, block), symbol
        row = table[z]
        assert row[period - 1] == 1 and row[:7].sum() == 1, symbol
        assert row[7 + group - 1] == 1 and row[7:25].sum() == 1, symbol
        assert row[25 + "spdf".index(block)] == 1 and row[25:29].sum() == 1, symbol
    # electronegativity (standardised, column 31) orders F > O > C > Na > Cs, as Pauling's scale
    chi = table[:, 31]
    assert chi[9] > chi[8] > chi[6] > chi[11] > chi[55]
    # the standardised columns have mean 0 and unit spread over the elements
    torch.testing.assert_close(table[1:, 31:].mean(dim=0), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_element_features_embedding_survives_a_checkpoint_and_shares_across_elements(tmp_path):
    """The embedding of `element_features` is the per-element row plus the shared map of the
    descriptors; a gradient from one element's atoms moves the embedding of the others."""
    torch.manual_seed(0)
    model = JanusPotential.from_preset("tiny", element_features=True).double()
    model.save_checkpoint(tmp_path / "model.pt")
    loaded = JanusPotential.load(tmp_path / "model.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name].to(value.dtype), value, atol=0, rtol=0, msg=name)
    embedding = model.embedding
    species = torch.tensor([26, 27])
    expected = embedding.weight[species] + embedding.descriptors[species] @ embedding.projection
    torch.testing.assert_close(embedding(species), expected, atol=1e-14, rtol=0)
    embedding(torch.tensor([26])).sum().backward()  # Fe only
    assert embedding.weight.grad[27].abs().sum() == 0 and embedding.projection.grad.abs().sum() > 0
