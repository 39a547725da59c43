"""Graph reuse in molecular dynamics: a Verlet neighbour list gives exactly the fresh graphs, and
the ASE calculator that reuses per-structure work gives exactly the energies and forces of one
that rebuilds everything, along an MD trajectory (neighbour limits cutting on a dense slab)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.build import add_adsorbate, fcc111, molecule
from ase.md.verlet import VelocityVerlet

from kdcache import graph as G
from kdcache.calculator import KDCacheCalculator
from kdcache.models.presets import build_preset


def _dense_slab():
    """Pt(111) 3x3x3 + O: ~45 atoms within 6 Å of a surface atom, so a limit of 30 (PaiNN,
    GemNet-OC main) or 8 (quadruplets) cuts, and small-cell self-images tie exactly."""
    slab = fcc111("Pt", size=(3, 3, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.8, "fcc")
    slab.set_tags([0] * 9 + [1] * 18 + [2])
    return slab


def _hot(atoms, seed: int = 0, temperature_k: float = 1500.0):
    """Random Maxwell-Boltzmann momenta (hot, so atoms cross cutoffs and neighbour ranks in a few steps)."""
    rng = np.random.default_rng(seed)
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * temperature_k))
    return atoms


def _cluster():
    """A 38-atom Pt cluster in a box, no periodic direction (the list's molecule branch): its
    inner atoms have more neighbours within 6 Å than the limits below keep."""
    from ase.cluster import Octahedron

    atoms = Octahedron("Pt", 4, 1)
    atoms.center(vacuum=3.0)
    atoms.pbc = False
    return atoms


@pytest.mark.parametrize("structure", ["slab", "slab-2d", "cluster"])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "shells"])
def test_neighbor_list_equals_fresh_radius_graph(strict, structure):
    slab = _cluster() if structure == "cluster" else _dense_slab()
    pos0 = torch.tensor(slab.positions)
    cell = torch.tensor(np.asarray(slab.cell))[None]
    pbc = {"slab": [True, True, True], "slab-2d": [True, True, False], "cluster": [False, False, False]}[structure]
    pbc, natoms = torch.tensor([pbc]), torch.tensor([len(slab)])
    rng = np.random.default_rng(0)
    nl = G.NeighborList(skin=1.0)
    walk = pos0.clone()
    for step in range(12):
        if step:  # a random walk: ~0.17 Å per step, a rebuild every few steps
            walk = walk + torch.tensor(rng.normal(scale=0.1, size=walk.shape))
        # the unmoved start: every surface atom's in-plane images tie exactly
        for cutoff, limit in ((6.0, 30), (6.0, 8), (5.0, None), (4.0, 12)):
            fresh = G.radius_graph_pbc(walk, cell, pbc, natoms, cutoff, limit, strict)
            listed = nl.radius_graph(walk, cell, pbc, natoms, cutoff, limit, strict)
            for a, b in zip(fresh, listed):
                assert torch.equal(a, b), (step, cutoff, limit)
        assert fresh[0].shape[1] > 0
    assert 1 < nl.builds < 12
    # a new cell is a new structure: rebuilt, and still the fresh graph
    builds = nl.builds
    wide = cell * 1.1
    assert all(torch.equal(a, b) for a, b in zip(G.radius_graph_pbc(walk, wide, pbc, natoms, 6.0, 30, strict),
                                                  nl.radius_graph(walk, wide, pbc, natoms, 6.0, 30, strict)))
    assert nl.builds == builds + 1


def _trajectory(model, atoms, steps: int, **calc_options):
    atoms = atoms.copy()
    atoms.calc = KDCacheCalculator(model, **calc_options)
    energies, forces = [], []

    def record():
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces(apply_constraint=False))

    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    dyn.attach(record, interval=1)
    dyn.run(steps)
    return np.array(energies), np.array(forces), atoms.calc


@pytest.mark.parametrize("preset, overrides, steps", [
    ("painn-tiny", {"num_layers": 1}, 25),
    ("schnet-tiny", {"num_interactions": 1}, 10),
    ("gemnet-oc-tiny", {"num_blocks": 1}, 8),
], ids=["painn", "schnet", "gemnet-oc"])
def test_md_with_reuse_equals_fresh_graphs(preset, overrides, steps):
    torch.manual_seed(0)
    model = build_preset(preset, **overrides).eval()
    start = _hot(_dense_slab())
    e_fresh, f_fresh, fresh_calc = _trajectory(model, start, steps, skin=0.0)
    e_reuse, f_reuse, calc = _trajectory(model, start, steps, skin=1.0)
    assert fresh_calc.neighbor_list is None
    assert calc.neighbor_list is not None and 1 <= calc.neighbor_list.builds < steps
    # the graphs are the fresh ones edge for edge, so the numbers are identical, not just close
    np.testing.assert_array_equal(e_reuse, e_fresh)
    np.testing.assert_array_equal(f_reuse, f_fresh)
    assert np.ptp(e_fresh) > 0  # the atoms moved


def test_calculator_starts_afresh_when_more_than_positions_change():
    torch.manual_seed(0)
    model = build_preset("painn-tiny", num_layers=1).eval()
    atoms = _dense_slab()
    atoms.calc = KDCacheCalculator(model, skin=1.0)
    atoms.get_forces()
    first = atoms.calc.neighbor_list
    atoms.positions[-1] += 0.05
    atoms.get_forces()
    assert atoms.calc.neighbor_list is first  # positions only: the same list
    for change in ("cell", "numbers", "tags"):
        if change == "cell":
            atoms.set_cell(atoms.cell * 1.02, scale_atoms=True)
        elif change == "numbers":
            atoms.numbers[-1] = 8 if atoms.numbers[-1] != 8 else 6
        else:  # ASE does not see tags: with positions moving too, as in MD
            atoms.set_tags(np.roll(atoms.get_tags(), 1))
            atoms.positions[0] += 0.05
        forces = atoms.get_forces()
        assert atoms.calc.neighbor_list is not first, change
        first = atoms.calc.neighbor_list
        reference = atoms.copy()
        reference.calc = KDCacheCalculator(model, skin=0.0)
        np.testing.assert_array_equal(forces, reference.get_forces())


def test_fast_calculator_matches_eager_along_md():
    """The compiled path with graph reuse, against today's calculator (eager, fresh graphs)."""
    torch.manual_seed(0)
    model = build_preset("painn-tiny", num_layers=2).eval()
    for atoms in (_dense_slab(), molecule("CH3CH2OH")):
        start = _hot(atoms, temperature_k=300.0)
        e_ref, f_ref, _ = _trajectory(model, start, 6, skin=0.0)
        e_fast, f_fast, calc = _trajectory(model, start, 6, fast=True)
        assert calc.model.fast_path is not None and model.fast_path is None
        np.testing.assert_allclose(e_fast, e_ref, rtol=0, atol=2e-5 * max(1.0, np.abs(e_ref).max()))
        np.testing.assert_allclose(f_fast, f_ref, rtol=0, atol=2e-5 * max(1.0, np.abs(f_ref).max()))


def _moved(a):
    a.positions[3, 1] += 1e-3


def _numbers(a):
    a.numbers[0] = 7 if a.numbers[0] != 7 else 6


def _cell(a):
    a.cell = [12.0, 12.0, 12.0]


def _pbc(a):
    a.pbc = [True, True, False]


def _charges(a):
    a.set_initial_charges(np.linspace(-1, 1, len(a)))


def _extra_atom(a):
    a.extend(a[:1])


def _momenta(a):  # not a system change for ASE
    a.set_momenta(np.ones((len(a), 3)))


def _below_tol(a):  # within ASE's tolerance: no change
    a.positions[0, 0] += 1e-17


@pytest.mark.parametrize("change", [None, _moved, _numbers, _cell, _pbc, _charges, _extra_atom, _momenta,
                                    _below_tol, lambda a: (_moved(a), _numbers(a))])
def test_check_state_answers_as_ase(change):
    """The calculator's quick check_state reports what ASE's compare_atoms reports."""
    from ase.calculators.calculator import compare_atoms

    calc = KDCacheCalculator(build_preset("schnet-tiny"))
    start = molecule("CH3CH2OH")
    calc.atoms = start.copy()
    now = start.copy()
    if change is not None:
        change(now)
    assert sorted(calc.check_state(now)) == sorted(compare_atoms(calc.atoms, now))
