"""Packaging: the core install is the library and the ASE calculator; the rest are extras
whose absence is a clear error naming the extra."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ["yaml", "tqdm", "mpi4py", "lammps", "phonopy"]


def run_without_extras(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where every optional package fails to import."""
    blocker = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in OPTIONAL)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-c", blocker + code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_core_dependencies_are_the_library_and_ase_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split("==")[0].split(">=")[0].split("[")[0] for d in project["dependencies"]}
    assert names == {"torch", "ase", "numpy", "vesin"}
    extras = project["optional-dependencies"]
    assert {"train", "mpi", "lammps", "all"} <= set(extras)
    assert "janus-potential[train,mpi,lammps,phonons]" in extras["all"]


def test_calculator_works_without_any_extra(tmp_path):
    code = (
        "from ase.build import bulk\n"
        "from janus_potential import JanusPotential\n"
        "from janus_potential.ase import JanusCalculator\n"
        "from janus_potential.export import export_model\n"
        f"export_model(JanusPotential.from_preset('tiny'), {str(tmp_path / 'm.pt')!r})\n"
        "atoms = bulk('Si', 'diamond', a=5.43)\n"
        f"atoms.calc = JanusCalculator({str(tmp_path / 'm.pt')!r})\n"
        "print(atoms.get_potential_energy(), atoms.get_stress()[0])\n"
    )
    result = run_without_extras(code)
    assert result.returncode == 0, result.stderr[-2000:]


def test_missing_extras_are_named():
    train = run_without_extras("from janus_potential.training.cli import main\nsys.exit(main(['train']))")
    assert train.returncode == 2 and "pip install 'janus-potential[train]'" in train.stderr, train.stderr[-2000:]
    assert "Traceback" not in train.stderr
    lammps = run_without_extras("from janus_potential.lammps import lammps\nlammps()")
    assert "pip install 'janus-potential[lammps]'" in lammps.stderr
    mpi = run_without_extras("import os\nos.environ['PMI_RANK'] = '0'\nos.environ['PMI_SIZE'] = '2'\n"
                             "from janus_potential.parallel.mesh import init_distributed\ninit_distributed()")
    assert "pip install 'janus-potential[mpi]'" in mpi.stderr, mpi.stderr[-2000:]


def test_the_library_imports_no_front_end():
    """DESIGN.md's arrows: no module of the library (janus_potential/) imports the ASE or the
    training front end, not even inside a function (read from the source)."""
    import ast

    offenders = []
    for path in sorted((ROOT / "janus_potential").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module if node.level == 0 else f"janus_potential.{node.module}"]
            offenders += [f"{path.name}: {n}" for n in names
                          if n.startswith(("janus_potential.ase", "janus_potential.training", "ase_interface",
                                           "training"))]
    assert offenders == []
