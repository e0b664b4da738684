"""Packed datasets: labelled frames on disk, read by random access, never loaded whole.

`janus pack INPUT... -o DIR` streams ASE-readable files (`ase.io.iread`: extended XYZ, ASE
databases) into DIR:

- `shard-NNNNNN.bin`: raw little-endian arrays (the layout `np.memmap` reads), each starting
  on a 64-byte boundary. Per atom: `species` (uint8), `positions`, `forces` (float64, NaN
  without a force label). Per frame: `atom_offset` (frame k owns atoms
  atom_offset[k]:atom_offset[k+1]), `cell`, `pbc`, `energy`, `stress` (3x3, ASE sign, NaN
  where missing), `has_labels` (energy, forces, stress as written in the file), `weight`,
  `source` (an index into the manifest's sources), and the statistics the trainer needs
  without reading frames: the composition (`composition_offset`, `composition_element`,
  `composition_count`, for the reference-energy fit and the element coverage) and
  `force_abs_sum` (sum of |force components|, for the force scale).
- `manifest.json`: format and version, frame and atom counts, element coverage, per-input
  and per-source counts, label statistics, and for every shard its arrays (offset, dtype,
  shape), its input file and its SHA-256, checked whenever a pack is opened.

A shard holds the frames of one input file, up to `shard_atoms` atoms; it is built in
memory and written once, so packing memory is bounded by the shard size whatever the
input size. `--append` adds shards and rewrites the manifest atomically; old shards are
never touched. Reads use `os.preadv` rather than memory maps: pages of a mapped file count
towards a process's resident memory, so a loader worker that has visited every frame would
look as large as the pack.

Plain files given to training are packed on first use into `data.cache_dir`, keyed by a
hash of their content (`open_dataset`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import numpy as np
from ase import Atoms
from ase.io import iread

from janus_potential.elements import MAX_ATOMIC_NUMBER, number_to_symbol
from janus_potential.errors import JanusInputError
from janus_potential.graph import check_overlaps, check_structure, neighbor_pairs

from .progress import ItemProgress

PACK_FORMAT = "janus-pack"
PACK_VERSION = 1
MANIFEST = "manifest.json"
ALIGNMENT = 64
SHARD_ATOMS = 1 << 21  # atoms per shard: bounds the memory of packing (about 100 MB)
CONSOLIDATE_EVERY = 1024  # frames between merges of the per-frame pieces of a shard
OVERLAP_SEARCH = 1.0  # Angstrom: the neighbour search for overlapping atoms (vesin is slow for tiny cutoffs)

# name: (dtype, shape of one item); items are per atom, per frame, per frame + 1 (offsets)
# or per composition entry (one element of one frame)
ARRAYS: dict[str, tuple[str, tuple[int, ...]]] = {
    "species": ("|u1", ()),
    "positions": ("<f8", (3,)),
    "forces": ("<f8", (3,)),
    "atom_offset": ("<i8", ()),
    "cell": ("<f8", (3, 3)),
    "pbc": ("|b1", (3,)),
    "energy": ("<f8", ()),
    "stress": ("<f8", (3, 3)),
    "has_labels": ("|b1", (3,)),
    "weight": ("<f8", ()),
    "source": ("<i4", ()),
    "force_abs_sum": ("<f8", ()),
    "composition_offset": ("<i8", ()),
    "composition_element": ("|u1", ()),
    "composition_count": ("<i4", ()),
}
PER_FRAME = ("cell", "pbc", "energy", "stress", "has_labels", "weight", "source", "force_abs_sum")
LABELS = ("energy", "forces", "stress")  # the order of `has_labels`


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ----------------------------------------------------------------------------- reading input
def frame_labels(atoms: Atoms, path: str, index: int) -> dict[str, Any]:
    """The energy, forces and stress (3x3) labels of one frame: `atoms.calc` results, or
    `energy`/`forces`/`stress` (also `REF_`/`dft_` prefixed) entries of info/arrays.
    Non-finite labels are an error naming the file and frame."""
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    for key in LABELS:
        if key not in results:
            source = atoms.info if key != "forces" else atoms.arrays
            for name in (key, f"REF_{key}", f"dft_{key}"):
                if name in source:
                    results[key] = source[name]
                    break
    labels: dict[str, Any] = {}
    if "energy" in results:
        labels["energy"] = float(np.asarray(results["energy"]).reshape(-1)[0])
    if "forces" in results:
        labels["forces"] = np.asarray(results["forces"], dtype=np.float64).reshape(len(atoms), 3)
    if "stress" in results:
        stress = np.asarray(results["stress"], dtype=np.float64).reshape(-1)
        if stress.size == 6:
            xx, yy, zz, yz, xz, xy = stress
            stress = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        labels["stress"] = stress.reshape(3, 3)
    for key, value in labels.items():
        if not np.all(np.isfinite(value)):
            raise JanusInputError(f"{path}: frame {index} has non-finite {key} labels")
    return labels


def read_frames(path: str) -> Iterator[tuple[Atoms, dict[str, Any]]]:
    """(atoms, labels) of every frame of `path`, one at a time, each checked as
    `build_graph` checks structures (and overlapping atoms); errors name the file and frame."""
    if not os.path.isfile(path):
        raise JanusInputError(f"data file {path!r} does not exist")
    frames = iread(path, ":")
    index = 0
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as exc:  # ASE's readers raise many types (UnknownFileTypeError, OSError, ValueError...)
            where = f" (frame {index})" if index else ""
            raise JanusInputError(f"data file {path!r} is not a structure file ASE can read{where}: "
                                  f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
        try:
            check_structure(atoms)
            i, j, _, distances = neighbor_pairs(atoms.get_positions(), atoms.get_cell().array, atoms.get_pbc(),
                                                OVERLAP_SEARCH)
            check_overlaps(i, j, distances)  # pairs closer than MIN_DISTANCE
        except JanusInputError as exc:
            raise JanusInputError(f"{path}: frame {index}: {exc}") from exc
        yield atoms, frame_labels(atoms, path, index)
        index += 1


# ----------------------------------------------------------------------------- writing
class _ShardWriter:
    """The frames of one shard, collected in memory (merged every `CONSOLIDATE_EVERY`
    frames) into the arrays of one shard file."""

    def __init__(self) -> None:
        self.pieces: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
        self.chunks: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
        self.frames = 0
        self.atoms = 0

    def add(self, atoms: Atoms, labels: dict[str, Any], source: int) -> None:
        n = len(atoms)
        species = np.asarray(atoms.get_atomic_numbers(), dtype=np.uint8)
        elements, counts = np.unique(species, return_counts=True)
        forces = labels.get("forces", np.full((n, 3), np.nan))
        values = {
            "species": species,
            "positions": np.asarray(atoms.get_positions(), dtype=np.float64),
            "forces": forces,
            "atom_offset": np.array([n]),  # sizes until written, then offsets
            "cell": np.asarray(atoms.get_cell().array, dtype=np.float64)[None],
            "pbc": np.asarray(atoms.get_pbc(), dtype=bool)[None],
            "energy": np.array([labels.get("energy", np.nan)]),
            "stress": labels.get("stress", np.full((3, 3), np.nan))[None],
            "has_labels": np.array([[key in labels for key in LABELS]]),
            "weight": np.array([float(atoms.info.get("weight", 1.0))]),
            "source": np.array([source]),
            "force_abs_sum": np.array([np.abs(forces).sum() if "forces" in labels else 0.0]),
            "composition_offset": np.array([elements.size]),
            "composition_element": elements,
            "composition_count": counts,
        }
        for name, value in values.items():
            self.pieces[name].append(value)
        self.frames += 1
        self.atoms += n
        if self.frames % CONSOLIDATE_EVERY == 0:
            self._consolidate()

    def _consolidate(self) -> None:
        for name, pieces in self.pieces.items():
            if pieces:
                self.chunks[name].append(np.concatenate(pieces).astype(ARRAYS[name][0]))
                pieces.clear()

    def finish(self) -> dict[str, np.ndarray]:
        """The shard's arrays; the pieces are released one array at a time (memory stays
        near one copy of the shard)."""
        self._consolidate()
        arrays = {}
        for name in ARRAYS:
            arrays[name] = np.concatenate(self.chunks.pop(name))
        for name in ("atom_offset", "composition_offset"):
            arrays[name] = np.concatenate([[0], np.cumsum(arrays[name])]).astype(ARRAYS[name][0])
        return arrays


def _write_shard(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write one shard (temporary file, fsync, rename); its layout and SHA-256."""
    digest = hashlib.sha256()
    layout: dict[str, Any] = {}
    position = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        for name, array in arrays.items():
            padding = b"\0" * (-position % ALIGNMENT)
            raw = memoryview(np.ascontiguousarray(array)).cast("B")  # the array's bytes, not a copy
            for chunk in (padding, raw):
                handle.write(chunk)
                digest.update(chunk)
            position += len(padding)
            layout[name] = {"offset": position, "dtype": ARRAYS[name][0], "shape": list(array.shape)}
            position += raw.nbytes
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "bytes": position, "sha256": digest.hexdigest(),
            "frames": len(arrays["energy"]), "atoms": len(arrays["species"]), "arrays": layout}


def _counts(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The manifest's counts of one shard, from the arrays written."""
    num_atoms = np.diff(arrays["atom_offset"])
    has_energy, has_forces, has_stress = arrays["has_labels"].T
    elements, slots = arrays["composition_element"], MAX_ATOMIC_NUMBER + 1
    return {"frames": len(num_atoms), "atoms": int(num_atoms.sum()), "energy_frames": int(has_energy.sum()),
            "force_atoms": int(num_atoms[has_forces].sum()), "stress_frames": int(has_stress.sum()),
            "force_abs_sum": float(arrays["force_abs_sum"].sum()),
            "element_frames": np.bincount(elements, minlength=slots),
            "element_atoms": np.bincount(elements, weights=arrays["composition_count"], minlength=slots),
            "source_frames": np.bincount(arrays["source"])}


def _empty_manifest() -> dict[str, Any]:
    return {"format": PACK_FORMAT, "version": PACK_VERSION, "frames": 0, "atoms": 0, "elements": {},
            "sources": [], "inputs": [],
            "statistics": {"energy_frames": 0, "force_atoms": 0, "stress_frames": 0, "force_abs_sum": 0.0,
                           "force_abs_mean": None},
            "shards": []}


def _add_counts(manifest: dict[str, Any], source: dict[str, Any], counts: dict[str, Any]) -> None:
    """Add one shard's counts to the manifest's totals and to its input file's entry."""
    for entry in (manifest, source):
        entry["frames"] += counts["frames"]
        entry["atoms"] += counts["atoms"]
    statistics = manifest["statistics"]
    for key in ("energy_frames", "force_atoms", "stress_frames", "force_abs_sum"):
        statistics[key] += counts[key]
    if statistics["force_atoms"]:
        statistics["force_abs_mean"] = statistics["force_abs_sum"] / (3 * statistics["force_atoms"])
    for z in np.nonzero(counts["element_frames"])[0].tolist():
        symbol = number_to_symbol(z)
        entry = manifest["elements"].setdefault(symbol, {"z": z, "frames": 0, "atoms": 0})
        entry["frames"] += int(counts["element_frames"][z])
        entry["atoms"] += int(counts["element_atoms"][z])
        if symbol not in source["elements"]:
            source["elements"].append(symbol)
    manifest["elements"] = dict(sorted(manifest["elements"].items(), key=lambda item: item[1]["z"]))
    for k, frames in enumerate(counts["source_frames"].tolist()):
        if frames:
            name = manifest["sources"][k]["name"]
            manifest["sources"][k]["frames"] += frames
            source["sources"][name] = source["sources"].get(name, 0) + frames


def _pack_input(path: str, directory: Path, manifest: dict[str, Any], progress: bool, every_s: float,
                stream: TextIO | None, shard_atoms: int) -> list[Path]:
    """Stream one input file into new shards of `directory` and add it to `manifest`; the
    shard files written (not yet in a manifest on disk)."""
    source_ids = {entry["name"]: k for k, entry in enumerate(manifest["sources"])}
    name = Path(path).stem
    written: list[Path] = []
    shards: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (manifest entry, counts)
    taken = {entry["file"] for entry in manifest["shards"]}
    bar = ItemProgress(progress, f"pack {Path(path).name}", "frames", every_s, stream)

    def flush(writer: _ShardWriter) -> None:
        number = len(taken)
        while f"shard-{number:06d}.bin" in taken or (directory / f"shard-{number:06d}.bin").exists():
            number += 1
        shard = directory / f"shard-{number:06d}.bin"
        taken.add(shard.name)
        arrays = writer.finish()
        shards.append((dict(_write_shard(shard, arrays), input=len(manifest["inputs"])), _counts(arrays)))
        written.append(shard)

    writer = _ShardWriter()
    atoms_read = 0
    try:
        for atoms, labels in read_frames(path):
            source = str(atoms.info.get("source", name))
            if source not in source_ids:
                source_ids[source] = len(manifest["sources"])
                manifest["sources"].append({"name": source, "frames": 0})
            if writer.frames and writer.atoms + len(atoms) > shard_atoms:
                flush(writer)
                writer = _ShardWriter()
            writer.add(atoms, labels, source_ids[source])
            atoms_read += len(atoms)
            bar.update(1, atoms=atoms_read)
        if not writer.frames:
            raise JanusInputError(f"data file {path!r} holds no structures")
        flush(writer)
        if not any(counts[key] for _, counts in shards for key in ("energy_frames", "force_atoms", "stress_frames")):
            raise JanusInputError(f"{path}: no frame has an energy, forces or stress label")
    except BaseException:
        for shard in written:
            shard.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    entry = {"path": os.path.abspath(path), "name": name, "sha256": file_sha256(path), "frames": 0, "atoms": 0,
             "sources": {}, "elements": []}
    manifest["inputs"].append(entry)
    for shard_entry, counts in shards:
        manifest["shards"].append(shard_entry)
        _add_counts(manifest, entry, counts)
    entry["elements"].sort(key=lambda symbol: manifest["elements"][symbol]["z"])
    return written


def _new_folder(path: Path) -> Path:
    """An empty folder at `path` (a leftover of an interrupted run of this process id is
    removed), made with the user's permissions, unlike `tempfile.mkdtemp`'s private ones."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / MANIFEST)


def pack_files(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, append: bool = False,
               progress: bool = False, every_s: float = 30.0, stream: TextIO | None = None,
               shard_atoms: int = SHARD_ATOMS) -> dict[str, Any]:
    """Pack `inputs` into the directory `output` (new, or an existing pack with `append`);
    returns the manifest. `progress`: a bar on a terminal, else a line every `every_s`
    seconds, on `stream` (stdout by default). A new pack is built in a temporary folder and
    renamed, so an interrupted run leaves nothing at `output`; an interrupted append leaves
    the pack as it was."""
    output = Path(output)
    paths = [os.fspath(path) for path in inputs]
    for path in paths:
        if not os.path.isfile(path):
            raise JanusInputError(f"data file {path!r} does not exist")
    if append:
        manifest = read_manifest(output)
        known = {entry["sha256"]: entry["path"] for entry in manifest["inputs"]}
        for path in paths:
            digest = file_sha256(path)
            if digest in known:
                raise JanusInputError(f"{path} is already in the pack {str(output)!r} (same content as "
                                      f"{known[digest]})")
        written: list[Path] = []
        try:
            for path in paths:
                written += _pack_input(path, output, manifest, progress, every_s, stream, shard_atoms)
            _write_manifest(output, manifest)
        except BaseException:
            for shard in written:
                shard.unlink(missing_ok=True)
            raise
        return manifest
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise JanusInputError(f"{str(output)!r} already exists (pass --append to add files to a pack)")
    building = _new_folder(output.parent / f".{output.name}.{os.getpid()}.tmp")
    try:
        manifest = _empty_manifest()
        for path in paths:
            _pack_input(path, building, manifest, progress, every_s, stream, shard_atoms)
        _write_manifest(building, manifest)
        if output.exists():
            output.rmdir()
        os.rename(building, output)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return manifest


# ----------------------------------------------------------------------------- reading packs
def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a pack; a folder that is not a pack of this version is an error."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise JanusInputError(f"{str(directory)!r} is not a packed dataset (no {MANIFEST}; `janus pack` writes one)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise JanusInputError(f"{str(path)!r} is not a readable pack manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise JanusInputError(f"{str(path)!r} is not a Janus pack manifest")
    if manifest.get("version") != PACK_VERSION:
        raise JanusInputError(f"{str(directory)!r} is a pack of format version {manifest.get('version')}; this "
                              f"Janus reads version {PACK_VERSION} (re-pack the input files)")
    return manifest


def _check_shard(directory: Path, entry: dict[str, Any]) -> None:
    path = directory / entry["file"]
    if not path.is_file():
        raise JanusInputError(f"packed dataset {str(directory)!r}: shard {str(path)!r} is missing")
    if path.stat().st_size != entry["bytes"]:
        raise JanusInputError(f"packed dataset {str(directory)!r}: shard {str(path)!r} has {path.stat().st_size} "
                              f"bytes, the manifest says {entry['bytes']} (truncated or replaced)")
    if file_sha256(path) != entry["sha256"]:
        raise JanusInputError(f"packed dataset {str(directory)!r}: shard {str(path)!r} is corrupt (its SHA-256 "
                              "differs from the manifest's); pack its input again")


@dataclass
class Frame:
    """One packed frame as it was read from its file (NaN where a label is missing)."""

    species: np.ndarray  # [N] uint8 atomic numbers
    positions: np.ndarray  # [N, 3]
    cell: np.ndarray  # [3, 3]
    pbc: np.ndarray  # [3] bool
    energy: float
    forces: np.ndarray  # [N, 3]
    stress: np.ndarray  # [3, 3], ASE sign, eV/A^3
    has_energy: bool
    has_forces: bool
    has_stress: bool  # a stress label in the file (training also needs a periodic cell)
    weight: float
    source: str
    file: str  # the input file's name without extension

    def atoms(self) -> Atoms:
        return Atoms(numbers=self.species, positions=self.positions, cell=self.cell, pbc=self.pbc)


@dataclass
class Composition:
    """Per-frame element counts, compressed by rows: frame k has `count[e]` atoms of element
    `element[e]` for e in offset[k]:offset[k+1]."""

    offset: np.ndarray  # [F + 1] int64
    element: np.ndarray  # [C] atomic numbers
    count: np.ndarray  # [C]

    @property
    def num_frames(self) -> int:
        return len(self.offset) - 1

    def rows(self, frames: np.ndarray) -> "Composition":
        """The composition of `frames` (indices into this one), in that order."""
        frames = np.asarray(frames, dtype=np.int64)
        starts = self.offset[frames]
        lengths = self.offset[frames + 1] - starts
        offset = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        entries = np.repeat(starts - offset[:-1], lengths) + np.arange(offset[-1])
        return Composition(offset, self.element[entries], self.count[entries])


class _OpenFiles:
    """Read-only file descriptors of shards, at most `limit` open (least recently used
    closed first): a pack may have more shards than a process may open files."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.open: OrderedDict[str, int] = OrderedDict()

    def read_into(self, path: str, offset: int, out: np.ndarray) -> None:
        """Fill the contiguous array `out` with the bytes of `path` from `offset` on."""
        fd = self.open.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            while len(self.open) >= self.limit:
                os.close(self.open.popitem(last=False)[1])
        self.open[path] = fd
        if out.nbytes and os.preadv(fd, [memoryview(out).cast("B")], offset) != out.nbytes:
            raise JanusInputError(f"{path!r} is shorter than its manifest says (truncated)")

    def __del__(self) -> None:
        for fd in self.open.values():
            os.close(fd)


class _Shard:
    """One shard file: its arrays' layout, its input file and the sources of its pack."""

    def __init__(self, directory: Path, entry: dict[str, Any], file: str, sources: list[str]) -> None:
        self.path = str(directory / entry["file"])
        self.frames = int(entry["frames"])
        self.arrays = entry["arrays"]
        self.file = file
        self.sources = sources

    def read(self, files: _OpenFiles, name: str, start: int, count: int) -> np.ndarray:
        """Items start:start+count of array `name`."""
        layout = self.arrays[name]
        item_shape = tuple(layout["shape"][1:])
        dtype = np.dtype(layout["dtype"])
        item_bytes = dtype.itemsize * int(np.prod(item_shape, dtype=np.int64))
        out = np.empty((count, *item_shape), dtype=dtype)
        files.read_into(self.path, layout["offset"] + start * item_bytes, out)
        return out

    def column(self, files: _OpenFiles, name: str) -> np.ndarray:
        return self.read(files, name, 0, self.arrays[name]["shape"][0])


class PackedFrames:
    """The frames of one or more packs, numbered in order, read by random access.

    Opening checks every shard's SHA-256. Picklable (DataLoader workers started by spawn
    reopen the files; forked workers share the descriptors, which positioned reads allow)."""

    def __init__(self, directories: Sequence[str | os.PathLike],
                 temporary: tempfile.TemporaryDirectory | None = None) -> None:
        self.directories = [Path(d) for d in directories]
        self.temporary = temporary  # keeps a pack of plain files alive (no cache folder)
        self.shards: list[_Shard] = []
        self.manifests = [read_manifest(d) for d in self.directories]
        for directory, manifest in zip(self.directories, self.manifests):
            sources = [entry["name"] for entry in manifest["sources"]]
            for entry in manifest["shards"]:
                self.shards.append(_Shard(directory, entry, manifest["inputs"][entry["input"]]["name"], sources))
        self._verify()
        self.starts = np.cumsum([0] + [shard.frames for shard in self.shards]).astype(np.int64)
        self.files = _OpenFiles()

    def _verify(self) -> None:
        checks = [(directory, entry) for directory, manifest in zip(self.directories, self.manifests)
                  for entry in manifest["shards"]]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for future in [pool.submit(_check_shard, *check) for check in checks]:
                future.result()

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key not in ("files", "temporary")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, files=_OpenFiles(), temporary=None)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, k: int) -> tuple[_Shard, int]:
        if not 0 <= k < len(self):
            raise IndexError(f"frame {k} of a pack of {len(self)} frames")
        s = int(np.searchsorted(self.starts, k, side="right")) - 1
        return self.shards[s], k - int(self.starts[s])

    def frame(self, k: int) -> Frame:
        shard, local = self._locate(k)

        def read(name: str, start: int = local, count: int = 1) -> np.ndarray:
            return shard.read(self.files, name, start, count)

        first, end = read("atom_offset", local, 2).tolist()
        has_energy, has_forces, has_stress = read("has_labels")[0].tolist()
        return Frame(species=read("species", first, end - first), positions=read("positions", first, end - first),
                     cell=read("cell")[0], pbc=read("pbc")[0], energy=float(read("energy")[0]),
                     forces=read("forces", first, end - first), stress=read("stress")[0],
                     has_energy=has_energy, has_forces=has_forces, has_stress=has_stress,
                     weight=float(read("weight")[0]), source=shard.sources[int(read("source")[0])], file=shard.file)

    def column(self, name: str) -> np.ndarray:
        """A per-frame array over all frames (read whole, without touching per-atom data)."""
        if name not in PER_FRAME:
            raise ValueError(f"{name} is not a per-frame array")
        return np.concatenate([shard.column(self.files, name) for shard in self.shards])

    def frame_files(self) -> np.ndarray:
        """The input file of every frame (str objects)."""
        return np.repeat(np.array([shard.file for shard in self.shards], dtype=object),
                         [shard.frames for shard in self.shards])

    def num_atoms(self) -> np.ndarray:
        """Atoms of every frame (int64)."""
        return np.concatenate([np.diff(shard.column(self.files, "atom_offset")) for shard in self.shards])

    def composition(self) -> Composition:
        offsets, elements, counts = [np.zeros(1, dtype=np.int64)], [], []
        for shard in self.shards:
            offset = shard.column(self.files, "composition_offset")
            offsets.append(offset[1:] + offsets[-1][-1])
            elements.append(shard.column(self.files, "composition_element"))
            counts.append(shard.column(self.files, "composition_count"))
        return Composition(np.concatenate(offsets), np.concatenate(elements), np.concatenate(counts))


def _cached_pack(path: str, cache_dir: Path, progress: bool, every_s: float, stream: TextIO | None) -> Path:
    """The pack of the plain file `path` in `cache_dir` (packed now unless a pack of the same
    content is there); concurrent packers of one file each write their own and one wins."""
    digest = file_sha256(path)
    target = cache_dir / f"{Path(path).stem}-{digest[:16]}.pack{PACK_VERSION}"
    if (target / MANIFEST).is_file():
        return target
    building = _new_folder(cache_dir / f".{target.name}.{os.getpid()}.tmp")
    try:
        pack_files([path], building / "pack", progress=progress, every_s=every_s, stream=stream)
        try:
            os.rename(building / "pack", target)
        except OSError:
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def open_dataset(paths: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None,
                 progress: bool = False, every_s: float = 30.0, stream: TextIO | None = None) -> PackedFrames:
    """The frames of `paths` (packed folders or ASE-readable files) in order. Plain files
    are packed on first use into `cache_dir` (keyed by their content), or into a temporary
    folder that lives as long as the returned object when `cache_dir` is empty."""
    temporary = None
    folders = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            folders.append(Path(path))
        elif not os.path.exists(path):
            raise JanusInputError(f"data file {path!r} does not exist")
        else:
            if not cache_dir and temporary is None:
                temporary = tempfile.TemporaryDirectory(prefix="janus-pack-")
            folder = Path(cache_dir) if cache_dir else Path(temporary.name)
            folders.append(_cached_pack(path, folder, progress, every_s, stream))
    return PackedFrames(folders, temporary=temporary)
