"""Embedded demo data: OC20-like slabs with adsorbates, labelled with ASE's EMT calculator.

Each *system* (one ``sid``) is a metal slab (Al, Ni, Cu, Pd, Ag, Pt, Au; fcc(111), (100) or
(110)) with an adsorbate (O, H, N, C, OH, CO, NO, CH, CH2, CH3, NH, NH2, H2O, N2) placed above
a random surface point. Several frames (``fid``) of a system differ by random displacements of
the free atoms, like snapshots of a relaxation, so forces are non-trivial. As in OC20: tags
0 = subsurface (fixed, FixAtoms), 1 = surface, 2 = adsorbate; periodic cells with vacuum along z;
positions wrapped into the cell; energies and forces (eV, eV/Å) without constraints applied.

A fourth, optional split, ``pool``, holds structures of yet other systems *without labels*: the
unlabelled structures that a teacher labels (``kdcache data sample``, ``kdcache extract``). Its
frames are made (and filtered) exactly as a labelled split's; only the labels are left out.

Everything is drawn from ``numpy.random.default_rng([seed, split, system])``, so a seed gives
bit-identical files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from kdcache.data.lmdb_writer import atoms_to_record, write_lmdb
from kdcache.fs import ensure_output_folder

METALS = ("Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")
# Lattice constants (Å) at the EMT energy minimum, so unperturbed slabs are near equilibrium.
EMT_LATTICE = {"Al": 3.994, "Ni": 3.487, "Cu": 3.590, "Pd": 3.879, "Ag": 4.064, "Pt": 3.922, "Au": 4.056}
FACETS = ("fcc111", "fcc100", "fcc110")
# Adsorbates: atoms relative to the binding atom (first), Å, molecule axis along +z.
ADSORBATES: dict[str, list[tuple[str, tuple[float, float, float]]]] = {
    "O": [("O", (0, 0, 0))],
    "H": [("H", (0, 0, 0))],
    "N": [("N", (0, 0, 0))],
    "C": [("C", (0, 0, 0))],
    "OH": [("O", (0, 0, 0)), ("H", (0, 0, 0.97))],
    "CO": [("C", (0, 0, 0)), ("O", (0, 0, 1.15))],
    "NO": [("N", (0, 0, 0)), ("O", (0, 0, 1.17))],
    "N2": [("N", (0, 0, 0)), ("N", (0, 0, 1.12))],
    "CH": [("C", (0, 0, 0)), ("H", (0, 0, 1.09))],
    "CH2": [("C", (0, 0, 0)), ("H", (0.89, 0, 0.63)), ("H", (-0.89, 0, 0.63))],
    "CH3": [("C", (0, 0, 0)), ("H", (1.03, 0, 0.36)), ("H", (-0.51, 0.89, 0.36)), ("H", (-0.51, -0.89, 0.36))],
    "NH": [("N", (0, 0, 0)), ("H", (0, 0, 1.02))],
    "NH2": [("N", (0, 0, 0)), ("H", (0.82, 0, 0.6)), ("H", (-0.82, 0, 0.6))],
    "H2O": [("O", (0, 0, 0)), ("H", (0.76, 0, 0.59)), ("H", (-0.76, 0, 0.59))],
}
SPLITS = {"train": 0, "val": 1, "test": 2, "pool": 3}
#: splits written without labels
UNLABELLED_SPLITS = ("pool",)
MIN_ATOMS, MAX_ATOMS = 20, 80
MAX_FORCE = 25.0  # eV/Å; frames above are dropped


def _slab(rng: np.random.Generator):
    from ase import build

    metal = METALS[rng.integers(len(METALS))]
    facet = FACETS[rng.integers(len(FACETS))]
    layer_choices = (4, 5, 6) if facet == "fcc110" else (3, 4, 5)
    layers = int(layer_choices[rng.integers(len(layer_choices))])
    sizes = [(a, b) for a in (2, 3, 4) for b in (2, 3, 4)
             if MIN_ATOMS <= a * b * layers <= MAX_ATOMS - 4]
    a, b = sizes[rng.integers(len(sizes))]
    vacuum = float(rng.uniform(6.0, 8.0))
    slab = getattr(build, facet)(metal, size=(a, b, layers), a=EMT_LATTICE[metal], vacuum=vacuum)
    # ase.build tags layers 1 (top) .. layers (bottom); OC20: top half surface (1), rest fixed (0).
    layer = slab.get_tags()
    surface = layer <= (layers + 1) // 2
    slab.set_tags(np.where(surface, 1, 0))
    return slab


def _add_adsorbate(slab, rng: np.random.Generator) -> None:
    from ase import Atoms

    name = list(ADSORBATES)[rng.integers(len(ADSORBATES))]
    parts = ADSORBATES[name]
    rel = np.array([p for _, p in parts], dtype=float)
    # Random rotation about z and a small tilt, so orientations vary.
    phi, tilt = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.4)
    rz = np.array([[np.cos(phi), -np.sin(phi), 0], [np.sin(phi), np.cos(phi), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    rel = rel @ (rz @ rx).T
    frac = rng.uniform(0, 1, size=2)
    xy = frac[0] * slab.cell[0, :2] + frac[1] * slab.cell[1, :2]
    height = rng.uniform(1.1, 1.6) if parts[0][0] == "H" else rng.uniform(1.5, 2.1)
    top = slab.positions[:, 2].max()
    ads = Atoms([s for s, _ in parts], positions=rel + np.array([xy[0], xy[1], top + height]))
    # A random point may lie right above a metal atom: lift the adsorbate until its closest
    # contact is a bond length, not a clash (EMT forces explode at short range).
    from ase.geometry import get_distances

    _, dist = get_distances(ads.positions, slab.positions, cell=slab.cell, pbc=[True, True, False])
    lift = (1.6 if parts[0][0] == "H" else 1.85) - dist.min()
    if lift > 0:
        ads.positions[:, 2] += lift
    ads.set_tags(2)
    slab.extend(ads)


def _system(seed: int, code: int, system: int) -> list[tuple]:
    """All frames of one system: [(atoms without calculator, energy, forces, sid, fid)]."""
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    rng = np.random.default_rng([seed, code, system])
    base = _slab(rng)
    _add_adsorbate(base, rng)
    base.pbc = True  # OC20 cells are periodic in all directions (vacuum separates slabs)
    free = base.get_tags() > 0
    base.set_constraint(FixAtoms(mask=~free))
    sid = code * 1_000_000 + system
    frames = []
    for fid in range(int(rng.integers(1, 5))):  # fid gaps mark dropped frames
        atoms = base.copy()
        sigma = rng.uniform(0.03, 0.1)
        # FixAtoms would cancel displacements of fixed atoms; move the free ones explicitly.
        pos = atoms.get_positions()
        pos[free] += rng.normal(0.0, sigma, size=(int(free.sum()), 3))
        atoms.set_positions(pos, apply_constraint=False)
        atoms.wrap()
        atoms.calc = EMT()
        energy = float(atoms.get_potential_energy(apply_constraint=False))
        forces = atoms.get_forces(apply_constraint=False).copy()
        atoms.calc = None
        if np.abs(forces).max() > MAX_FORCE:
            continue  # a rare clash of the random geometry: not a useful training label
        frames.append((atoms, energy, forces, sid, fid))
    return frames


def _system_star(args):
    return _system(*args)


def demo_systems(num_frames: int, seed: int = 0, split: str = "train", workers: int = 1) -> Iterator[dict]:
    """Yield OC20 records (see :func:`kdcache.data.lmdb_writer.atoms_to_record`) of demo frames.

    Args:
        num_frames: how many frames to yield.
        seed: random seed; the same seed gives the same frames (whatever ``workers``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"pool"`` (different systems, disjoint
            ``sid``; ``pool`` records have no energy and forces).
        workers: processes computing EMT labels (systems are independent; order is kept).
    """
    labelled = split not in UNLABELLED_SPLITS
    code = SPLITS[split]
    made, system = 0, 0
    pool = None
    if workers > 1 and num_frames > 16:
        import multiprocessing as mp

        pool = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(workers)
    try:
        while made < num_frames:
            # Each system has 1-4 frames, so this block never overshoots by more than 4x.
            block = range(system, system + max(1, min(256, (num_frames - made + 3) // 4)))
            args = [(seed, code, s) for s in block]
            results = pool.map(_system_star, args, chunksize=8) if pool else map(_system_star, args)
            for frames in results:
                for atoms, energy, forces, sid, fid in frames:
                    if made >= num_frames:
                        break
                    if not labelled:  # computed all the same: the same frames pass the force filter
                        energy = forces = None
                    yield atoms_to_record(atoms, energy=energy, forces=forces, sid=sid, fid=fid)
                    made += 1
            system = block.stop
    finally:
        if pool is not None:
            pool.terminate()


def write_demo(out_dir, num_train: int = 2000, num_val: int = 200, num_test: int = 200,
               seed: int = 0, progress: bool = False, workers: int | None = None,
               num_pool: int = 0) -> dict[str, Path]:
    """Write ``train.lmdb``, ``val.lmdb`` and ``test.lmdb`` (and ``pool.lmdb``) of demo data to ``out_dir``.

    Args:
        out_dir: folder (created).
        num_train, num_val, num_test: frames per split.
        num_pool: unlabelled frames of other systems (``pool.lmdb``, written when > 0).
        seed: random seed.
        progress: show a progress bar.
        workers: processes for EMT labelling (default: up to 2, by CPU count); does not
            change the output.

    Returns:
        split name -> path of the written file.
    """
    if workers is None:
        import os

        workers = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    out = ensure_output_folder(out_dir, "demo folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    counts = {"train": num_train, "val": num_val, "test": num_test}
    if num_pool:
        counts["pool"] = num_pool
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(counts.values()), desc="demo data (EMT)", unit="structure")
    try:
        for split, n in counts.items():
            paths[split] = out / f"{split}.lmdb"
            write_lmdb(paths[split], demo_systems(n, seed, split, workers), progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    return paths
