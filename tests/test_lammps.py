"""`pair_style janus` in real LAMMPS (`lmp`, `mpirun -np N lmp`, the Python `lammps` module).

References: `JanusCalculator` on the same configuration (energy, forces, stress, per-atom
energies), per-atom virials from the model's edge gradient, energy conservation of NVE, and
the LAMMPS error text of each bad input. The model, the structures and the calculator
reference come from the model suite (tests/model_suite.py).
The plugin must be built (`bash lammps_plugin/build.sh .venv/bin/python`, done by the
Makefile); these tests fail, not skip, when it is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.data import atomic_masses, atomic_numbers

from janus_potential.ase import JanusCalculator
from janus_potential.errors import JanusInputError
from janus_potential.export import export_model
from janus_potential.graph import build_graph
from janus_potential.lammps import PLUGIN_DIR, plugin_file
from janus_potential.testing import random_structure

from .conftest import flip_tensor_bytes
from .devices import CUDA_VISIBLE, DEVICES
from .model_suite import PERIODIC, STRUCTURES, calculator_results, make_model

pytestmark = pytest.mark.lammps

BIN = os.path.dirname(sys.executable)
# JANUS_LMP / JANUS_MPIRUN: another LAMMPS build (bench/gpu_check.sh builds one from sources
# on a GPU machine, where the wheel is not installed)
LMP = os.environ.get("JANUS_LMP") or os.path.join(BIN, "lmp")
MPIRUN = os.environ.get("JANUS_MPIRUN") or os.path.join(BIN, "mpirun")
ELEMENTS = ["Cu", "O", "Si", "Al"]
NKTV2P = 1.6021765e6  # LAMMPS metal units: bar per eV/Angstrom^3 (force->nktv2p)
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}

HEADER = """units metal
atom_style atomic
boundary p p p
newton on
read_data {data}
pair_style janus
pair_coeff * * {model} {elements}
"""

SINGLE_POINT = HEADER + """compute atom_pe all pe/atom
compute pair_virial all pressure NULL virial
thermo_style custom step pe vol c_pair_virial[1] c_pair_virial[2] c_pair_virial[3] c_pair_virial[4] c_pair_virial[5] c_pair_virial[6]
thermo_modify format float %.17g
dump forces all custom 1 forces.dump id fx fy fz c_atom_pe
dump_modify forces sort id format float %.17g
run 0
"""


# --------------------------------------------------------------------------- helpers
def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    return env


def run_lammps(script: str, workdir, ranks: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `script` with the wheel's `lmp` launcher (no plugin load line) on `ranks` MPI ranks."""
    (workdir / "in.lammps").write_text(script)
    command = [LMP, "-in", "in.lammps", "-log", "log.lammps"]
    if ranks > 1:
        command = [MPIRUN, "-np", str(ranks), *command]
    return subprocess.run(command, cwd=workdir, env=environment(), capture_output=True, text=True, timeout=timeout)


def write_data(atoms, path, elements: list[str] = ELEMENTS) -> None:
    """LAMMPS data file with full-precision coordinates, atom type k = elements[k - 1];
    `atoms.cell` must be lower triangular."""
    cell = [[float(v) for v in row] for row in atoms.cell.array]
    assert cell[0][1] == cell[0][2] == cell[1][2] == 0.0, "cell must be in LAMMPS (lower-triangular) form"
    types = {symbol: k + 1 for k, symbol in enumerate(elements)}
    lines = [
        "janus test structure", "", f"{len(atoms)} atoms", f"{len(elements)} atom types", "",
        f"0 {cell[0][0]!r} xlo xhi", f"0 {cell[1][1]!r} ylo yhi", f"0 {cell[2][2]!r} zlo zhi",
        f"{cell[1][0]!r} {cell[2][0]!r} {cell[2][1]!r} xy xz yz", "", "Masses", "",
    ]
    lines += [f"{types[s]} {float(atomic_masses[atomic_numbers[s]])!r}" for s in elements]
    lines += ["", "Atoms # atomic", ""]
    lines += [
        f"{k + 1} {types[s]} {float(p[0])!r} {float(p[1])!r} {float(p[2])!r}"
        for k, (s, p) in enumerate(zip(atoms.get_chemical_symbols(), atoms.positions))
    ]
    path.write_text("\n".join(lines) + "\n")


def thermo_table(log: str) -> tuple[list[str], np.ndarray]:
    """Columns and rows of the (last) thermo table of a LAMMPS log."""
    lines = log.splitlines()
    start = max(k for k, line in enumerate(lines) if line.split()[:1] == ["Step"])
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("Loop time"):
            break
        rows.append([float(v) for v in line.split()])
    return lines[start].split(), np.array(rows)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(actual) - expected)) / max(np.max(np.abs(expected)), 1e-300))


def check_ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"LAMMPS failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def plugin() -> str:
    try:
        return plugin_file()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (the LAMMPS tests need the plugin)", pytrace=False)


@pytest.fixture(scope="module")
def model():
    """The suite's random tiny model (float64, non-trivial reference energies)."""
    return make_model("tiny")


@pytest.fixture(scope="module")
def model_files(model, tmp_path_factory) -> dict[str, str]:
    """The same model exported in float32 and float64."""
    folder = tmp_path_factory.mktemp("models")
    files = {}
    for dtype in ("float32", "float64"):
        files[dtype] = str(folder / f"tiny_{dtype}.pt")
        export_model(model, files[dtype], dtype)
    return files


@pytest.fixture(scope="module")
def triclinic(tmp_path_factory):
    """Random multi-element triclinic cell (240 atoms) and its data file."""
    atoms = random_structure(ELEMENTS, 240, density=0.07, seed=3)
    path = tmp_path_factory.mktemp("structure") / "triclinic.data"
    write_data(atoms, path)
    return atoms, str(path)


@pytest.fixture(scope="module")
def references(model_files, triclinic) -> dict[str, dict[str, np.ndarray]]:
    atoms, _ = triclinic
    # energy, forces, per-atom energies, stress (xx yy zz yz xz xy, ASE sign, eV/A^3)
    return {dtype: calculator_results(JanusCalculator(path), atoms) for dtype, path in model_files.items()}


# --------------------------------------------------------------------------- accuracy
def single_point_results(workdir) -> dict[str, np.ndarray]:
    """Energy, forces, per-atom energies and stress (ASE order and sign, eV/A^3) of a
    SINGLE_POINT run, as `calculator_results` gives them."""
    columns, rows = thermo_table((workdir / "log.lammps").read_text())
    values = dict(zip(columns, rows[0]))
    dump = np.loadtxt(workdir / "forces.dump", skiprows=9, ndmin=2)
    # LAMMPS pair pressure (bar, order xx yy zz xy xz yz) = -stress (ASE order xx yy zz yz xz xy)
    pressure = np.array([values[f"c_pair_virial[{k}]"] for k in range(1, 7)]) / NKTV2P
    return {"energy": values["PotEng"], "forces": dump[:, 1:4], "energies": dump[:, 4],
            "stress": -pressure[[0, 1, 2, 5, 4, 3]]}


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_calculator(dtype, ranks, model_files, triclinic, references, tmp_path):
    _, data = triclinic
    script = SINGLE_POINT.format(data=data, model=model_files[dtype], elements=" ".join(ELEMENTS))
    check_ran(run_lammps(script, tmp_path, ranks))
    results = single_point_results(tmp_path)
    for key, expected in references[dtype].items():  # energy, forces, energies, stress
        assert relative_error(results[key], expected) < TOLERANCE[dtype], key


@pytest.mark.parametrize("device", DEVICES)
def test_device_keyword_on_one_and_two_ranks_matches_calculator(device, model_files, triclinic, references,
                                                                 tmp_path):
    """`pair_style janus device D threads 1` on 1 rank and 2 ranks (sharing the GPU for
    CUDA) = the CPU calculator (float64)."""
    _, data = triclinic
    script = SINGLE_POINT.format(data=data, model=model_files["float64"], elements=" ".join(ELEMENTS)).replace(
        "pair_style janus", f"pair_style janus device {device} threads 1")
    for ranks in (1, 2):
        workdir = tmp_path / f"ranks{ranks}"
        workdir.mkdir()
        result = run_lammps(script, workdir, ranks)
        check_ran(result)
        assert f"on {device}" in (workdir / "log.lammps").read_text()
        results = single_point_results(workdir)
        for key, expected in references["float64"].items():
            assert relative_error(results[key], expected) < TOLERANCE["float64"], (ranks, key)


@pytest.mark.parametrize("ranks", [1, 2])
def test_forces_reduced_on_the_device_match_calculator(ranks, model_files, triclinic, references, tmp_path):
    """`reduce device` (what a GPU run does by default: per-atom forces and the virial summed
    by torch on the model's device instead of the host loop over edges) = the calculator,
    float64, here on the CPU."""
    _, data = triclinic
    script = SINGLE_POINT.format(data=data, model=model_files["float64"], elements=" ".join(ELEMENTS)).replace(
        "pair_style janus", "pair_style janus reduce device")
    check_ran(run_lammps(script, tmp_path, ranks))
    results = single_point_results(tmp_path)
    for key, expected in references["float64"].items():
        assert relative_error(results[key], expected) < TOLERANCE["float64"], key


@pytest.mark.skipif(CUDA_VISIBLE, reason="checks the error of a machine without a GPU")
def test_cuda_device_without_a_gpu_is_a_lammps_error(model_files, triclinic, tmp_path):
    _, data = triclinic
    script = HEADER.format(data=data, model=model_files["float64"], elements=" ".join(ELEMENTS)).replace(
        "pair_style janus", "pair_style janus device cuda") + "run 0\n"
    result = run_lammps(script, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "ERROR" in output and "no CUDA GPU is visible" in output, output[-3000:]


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("name", PERIODIC)
def test_suite_structures_match_calculator(name, ranks, model_files, tmp_path):
    """The model suite's periodic structures, among them a 2-atom cell smaller than the
    cutoff (LAMMPS then holds several ghost images of each atom, on each rank)."""
    atoms = STRUCTURES[name]()
    elements = sorted(set(atoms.get_chemical_symbols()))
    write_data(atoms, tmp_path / "structure.data", elements)
    script = SINGLE_POINT.format(data="structure.data", model=model_files["float64"], elements=" ".join(elements))
    check_ran(run_lammps(script, tmp_path, ranks))
    results = single_point_results(tmp_path)
    for key, expected in calculator_results(JanusCalculator(model_files["float64"]), atoms).items():
        assert relative_error(results[key], expected) < TOLERANCE["float64"], key


PER_ATOM_VIRIAL = HEADER + """compute atom_virial all stress/atom NULL virial
dump virial all custom 1 virial.dump id c_atom_virial[*]
dump_modify virial sort id format float %.17g
run 0
"""


def per_atom_virials(model, atoms) -> np.ndarray:
    """W_i = -1/2 sum over the edges that touch atom i of sym(r_ij (x) dE/dr_ij) (eV, LAMMPS
    order xx yy zz xy xz yz): each edge's virial shared equally by its two atoms, so that the
    sum over atoms is the global virial W = -V * stress. dE/dr_ij: autograd of the model's
    energy with respect to the edge vectors of `build_graph`."""
    graph = build_graph(atoms, model.cutoff, dtype=torch.float64)
    vectors = graph.edge_vectors().detach().requires_grad_(True)
    out = model(graph.species, graph.edge_index, vectors, graph.batch, graph.num_graphs, False, False, False)
    (gradient,) = torch.autograd.grad(out["energy"].sum(), vectors)
    edge_virial = -0.5 * vectors.detach().unsqueeze(2) * gradient.unsqueeze(1)
    edge_virial = 0.5 * (edge_virial + edge_virial.transpose(1, 2))
    virial = torch.zeros(len(atoms), 3, 3, dtype=torch.float64)
    virial = virial.index_add(0, graph.edge_index[0], edge_virial).index_add(0, graph.edge_index[1], edge_virial)
    rows, columns = [0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]
    return virial[:, rows, columns].numpy()


@pytest.mark.parametrize("ranks", [1, 2])
def test_per_atom_virial(ranks, model, model_files, triclinic, references, tmp_path):
    """`compute stress/atom NULL virial` gives S_i = -W_i * nktv2p per atom (pressure x
    volume, bar A^3; order xx yy zz xy xz yz), W_i the per-atom virial of `per_atom_virials`;
    summed over the atoms, sum_i S_i / nktv2p = -W = V * stress (the calculator's, ASE sign).
    On 2 ranks, the halves of edges ending on ghost atoms reach their owners through
    LAMMPS's reverse communication."""
    atoms, data = triclinic
    expected = per_atom_virials(model, atoms)
    volume = atoms.get_volume()
    to_ase_order = [0, 1, 2, 5, 4, 3]
    stress = references["float64"]["stress"]
    assert relative_error(-expected.sum(axis=0)[to_ase_order] / volume, stress) < 1e-10  # the reference itself
    assert np.abs(expected).max() > 1e-3  # per-atom virials are not all zero

    script = PER_ATOM_VIRIAL.format(data=data, model=model_files["float64"], elements=" ".join(ELEMENTS))
    check_ran(run_lammps(script, tmp_path, ranks))
    per_atom_stress = np.loadtxt(tmp_path / "virial.dump", skiprows=9)[:, 1:7]  # bar A^3
    assert relative_error(-per_atom_stress / NKTV2P, expected) < 1e-10
    assert relative_error(per_atom_stress.sum(axis=0)[to_ase_order] / NKTV2P / volume, stress) < 1e-10


def test_python_module_autoloads(model_files, triclinic, references, tmp_path):
    """`from lammps import lammps` in a fresh process: no plugin load, no environment set-up."""
    _, data = triclinic
    script = HEADER.format(data=data, model=model_files["float64"], elements=" ".join(ELEMENTS)) + "run 0\n"
    (tmp_path / "in.lammps").write_text(script)
    program = (
        "from lammps import lammps\n"
        "lmp = lammps(cmdargs=['-log', 'none', '-screen', 'none'])\n"
        "lmp.file('in.lammps')\n"
        "print(repr(lmp.get_thermo('pe')))\n"
    )
    env = environment()
    env.pop("LAMMPS_PLUGIN_PATH", None)
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    energy = float(result.stdout.strip().splitlines()[-1])
    assert relative_error(energy, references["float64"]["energy"]) < TOLERANCE["float64"]


def test_plugin_load_line(model_files, triclinic, references, tmp_path):
    """`plugin load PATH` with the bare lmp binary (no entry points, no LAMMPS_PLUGIN_PATH)."""
    import lammps

    _, data = triclinic
    script = f"plugin load {plugin_file()}\n" + SINGLE_POINT.format(
        data=data, model=model_files["float64"], elements=" ".join(ELEMENTS))
    (tmp_path / "in.lammps").write_text(script)
    env = environment()
    env.pop("LAMMPS_PLUGIN_PATH", None)
    binary = os.path.join(os.path.dirname(lammps.__file__), "lmp")
    result = subprocess.run([binary, "-in", "in.lammps", "-log", "log.lammps"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    check_ran(result)
    assert "Loading plugin: Janus" in result.stdout
    columns, rows = thermo_table((tmp_path / "log.lammps").read_text())
    assert relative_error(dict(zip(columns, rows[0]))["PotEng"], references["float64"]["energy"]) < 1e-10


# --------------------------------------------------------------------------- dynamics
@pytest.mark.slow
def test_nve_conserves_energy(model_files, tmp_path):
    """1,000 steps of 0.5 fs on 2 ranks: drift of the total energy below 1e-5 eV/atom/ps. (The
    random model pulls some atoms together until the ZBL wall stops them: steep, so 0.5 fs.)"""
    atoms = random_structure(["Cu", "Si", "Al"], 96, density=0.06, seed=5, min_distance=2.0)
    write_data(atoms, tmp_path / "nve.data")
    script = HEADER.format(data="nve.data", model=model_files["float64"], elements=" ".join(ELEMENTS)) + (
        "velocity all create 300 12345 mom yes rot no dist gaussian\n"
        "timestep 0.0005\n"
        "fix integrate all nve\n"
        "thermo_style custom step time pe ke etotal\n"
        "thermo_modify format float %.17g\n"
        "thermo 10\n"
        "run 1000\n"
    )
    check_ran(run_lammps(script, tmp_path, ranks=2, timeout=600))
    columns, rows = thermo_table((tmp_path / "log.lammps").read_text())
    time_ps = rows[:, columns.index("Time")]
    total = rows[:, columns.index("TotEng")] / len(atoms)
    kinetic = rows[:, columns.index("KinEng")] / len(atoms)
    assert len(time_ps) == 101 and kinetic.max() > 0.01  # the atoms do move (about 300 K)
    slope, intercept = np.polyfit(time_ps, total, 1)
    fluctuation = np.std(total - (slope * time_ps + intercept))
    # drift beyond the integrator's own fluctuation: the fitted slope, less what noise of that
    # size can fake over one ps
    assert abs(slope) - 2 * fluctuation / time_ps[-1] < 1e-5, (slope, fluctuation)
    assert fluctuation < 1e-3 * np.std(kinetic) + 1e-6  # etotal is conserved far better than ke


# --------------------------------------------------------------------------- bad input
def corrupt_file(tmp_path) -> str:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 this is not a TorchScript archive" * 10)
    return str(path)


def wrong_version_file(model_files, tmp_path) -> str:
    module = torch.jit.load(model_files["float64"])
    metadata = json.loads(open_metadata(model_files["float64"]))
    metadata["format_version"] = 99
    path = tmp_path / "version99.pt"
    module._c.save(str(path), _extra_files={"metadata.json": json.dumps(metadata)})
    return str(path)


def open_metadata(path: str) -> str:
    extra = {"metadata.json": ""}
    torch.jit.load(path, _extra_files=extra)
    return extra["metadata.json"]


BAD_INPUTS = {
    "missing file": (lambda files, tmp: str(tmp / "no_such_model.pt"), "Cu O Si Al", "",
                     "cannot open model file"),
    "corrupt file": (lambda files, tmp: corrupt_file(tmp), "Cu O Si Al", "", "cannot load model file"),
    "wrong format version": (wrong_version_file, "Cu O Si Al", "", "has format version 99, this plugin reads format version 2"),
    "element not covered": (lambda files, tmp: files["float64"], "Cu O Si Og", "",
                            "element Og (atom type 4) is not covered by model"),
    "not an element": (lambda files, tmp: files["float64"], "Cu O Xx Al", "", "'Xx' (atom type 3) is not an element symbol"),
    "type left unmapped": (lambda files, tmp: files["float64"], "Cu O Si", "",
                           "pair_coeff maps 3 of 4 atom types"),
    "NULL type": (lambda files, tmp: files["float64"], "Cu O NULL Al", "",
                  "atom type 3 is not mapped to an element"),
    "units real": (lambda files, tmp: files["float64"], "Cu O Si Al", "units", "requires 'units metal'"),
    "unknown pair_style keyword": (lambda files, tmp: files["float64"], "Cu O Si Al", "style:janus colour red",
                                   "unknown keyword 'colour'"),
    "bad device": (lambda files, tmp: files["float64"], "Cu O Si Al", "style:janus device tpu",
                   "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    "bad thread count": (lambda files, tmp: files["float64"], "Cu O Si Al", "style:janus threads 0",
                         "threads must be at least 1"),
    "newton off": (lambda files, tmp: files["float64"], "Cu O Si Al", "newton", "requires 'newton on'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_lammps_error(case, model_files, triclinic, tmp_path):
    make_model_path, elements, change, message = BAD_INPUTS[case]
    _, data = triclinic
    script = HEADER.format(data=data, model=make_model_path(model_files, tmp_path), elements=elements) + "run 0\n"
    if change == "units":
        script = script.replace("units metal", "units real")
    if change == "newton":
        script = script.replace("newton on", "newton off")
    if change.startswith("style:"):
        script = script.replace("pair_style janus", "pair_style " + change[len("style:"):])
    result = run_lammps(script, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ERROR" in output and message in output, output[-3000:]
    assert "Segmentation" not in output and "signal" not in output.lower()


def test_plugin_directory_is_the_entry_point():
    from importlib import metadata

    points = {ep.name: ep for ep in metadata.entry_points(group="lammps.plugins")}
    assert points["janus"].load()() == PLUGIN_DIR
    assert os.path.basename(plugin_file()).endswith("plugin.so")


# --------------------------------------------------------------------------- pair_style hybrid
ZBL_COEFFS = "".join(
    f"pair_coeff {i + 1} {j + 1} zbl {atomic_numbers[a]} {atomic_numbers[b]}\n"
    for i, a in enumerate(ELEMENTS) for j, b in enumerate(ELEMENTS) if i <= j
)
LJ_COEFF = "pair_coeff * 4 lj/cut 0.01 2.0\n"
PAIR_STYLES = {
    # hybrid/overlay: janus on every type plus ZBL on every pair
    "overlay": ("pair_style hybrid/overlay janus zbl 1.8 2.4\npair_coeff * * janus {model} Cu O Si Al\n" + ZBL_COEFFS,
                "pair_style zbl 1.8 2.4\n" + ZBL_COEFFS.replace(" zbl ", " ")),
    # hybrid: janus on Cu, O, Si; lj/cut on every pair with Al
    "subset": ("pair_style hybrid janus lj/cut 3.0\npair_coeff * * janus {model} Cu O Si NULL\n" + LJ_COEFF,
               "pair_style lj/cut 3.0\npair_coeff * * 0.0 1.0\n" + LJ_COEFF.replace(" lj/cut ", " ")),
}
HYBRID_RUN = """units metal
atom_style atomic
boundary p p p
newton on
read_data {data}
{pair}
{computes}thermo_style custom step pe {thermo}
thermo_modify format float %.17g
dump forces all custom 1 forces.dump id fx fy fz
dump_modify forces sort id format float %.17g
run 0
"""


def single_point(pair: str, data: str, workdir, ranks: int, computes: str = "", thermo: str = ""):
    """(thermo values, forces sorted by atom id) of one `run 0` with the given pair lines."""
    workdir.mkdir(parents=True, exist_ok=True)
    script = HYBRID_RUN.format(data=data, pair=pair, computes=computes, thermo=thermo)
    check_ran(run_lammps(script, workdir, ranks))
    columns, rows = thermo_table((workdir / "log.lammps").read_text())
    return dict(zip(columns, rows[0])), np.loadtxt(workdir / "forces.dump", skiprows=9)[:, 1:4]


@pytest.fixture(scope="module")
def janus_without_al(model_files, triclinic):
    """ASE reference for janus on the structure without its Al atoms (the NULL type)."""
    atoms, _ = triclinic
    keep = np.array([s != "Al" for s in atoms.get_chemical_symbols()])
    subset = atoms[keep]
    subset.calc = JanusCalculator(model_files["float64"])
    return keep, float(subset.get_potential_energy()), subset.get_forces()


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("style", list(PAIR_STYLES))
def test_pair_style_hybrid(style, ranks, model_files, triclinic, references, janus_without_al, tmp_path):
    """hybrid/overlay = janus + the other style; janus on a subset of types (NULL for the rest)
    = janus on the structure without those atoms; on 1, 2 and 4 ranks."""
    _, data = triclinic
    hybrid, other = PAIR_STYLES[style]
    values, forces = single_point(hybrid.format(model=model_files["float64"]), data, tmp_path / "hybrid", ranks,
                                  computes="compute janus all pair janus\n", thermo="c_janus")
    other_values, other_forces = single_point(other, data, tmp_path / "other", ranks)
    janus_energy, janus_forces = values["PotEng"] - other_values["PotEng"], forces - other_forces
    if style == "overlay":
        expected_energy, expected_forces = references["float64"]["energy"], references["float64"]["forces"]
    else:
        keep, expected_energy, subset_forces = janus_without_al
        expected_forces = np.zeros_like(forces)
        expected_forces[keep] = subset_forces
    assert relative_error(values["c_janus"], expected_energy) < 1e-10
    assert relative_error(janus_energy, expected_energy) < 1e-10
    assert np.max(np.abs(janus_forces - expected_forces)) < 1e-9 * max(1.0, np.max(np.abs(forces)))


def test_overlapping_atoms_name_their_ids(model_files, tmp_path):
    """Two atoms closer than 0.1 A: the same rule as the ASE calculator, with LAMMPS atom IDs."""
    atoms = random_structure(ELEMENTS, 24, density=0.05, seed=7, min_distance=2.0)
    atoms.positions[17] = atoms.positions[4] + [0.03, 0.0, 0.04]
    write_data(atoms, tmp_path / "overlap.data")
    script = HEADER.format(data="overlap.data", model=model_files["float64"], elements=" ".join(ELEMENTS)) + "run 0\n"
    result = run_lammps(script, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "ERROR" in output
    assert ("atoms 5 and 18 overlap" in output or "atoms 18 and 5 overlap" in output), output[-2000:]
    atoms.calc = JanusCalculator(model_files["float64"])
    with pytest.raises(JanusInputError, match="overlap"):
        atoms.get_potential_energy()


def test_corrupt_model_file_is_refused(model_files, triclinic, tmp_path):
    """Bytes flipped inside a weight tensor of model.pt: an error naming the file, in LAMMPS and ASE."""
    path = tmp_path / "flipped.pt"
    path.write_bytes(open(model_files["float64"], "rb").read())
    flip_tensor_bytes(path)
    _, data = triclinic
    script = HEADER.format(data=data, model=path, elements=" ".join(ELEMENTS)) + "run 0\n"
    result = run_lammps(script, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"model file {path} is corrupt" in output, output[-2000:]
    with pytest.raises(JanusInputError, match="is corrupt"):
        JanusCalculator(str(path))
