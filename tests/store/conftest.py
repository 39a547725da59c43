"""Fixtures of the store tests: tiny molecule LMDBs (3-8 atoms, so teachers run fast on a CPU),
teacher checkpoints with a non-trivial normaliser, and a store comparison helper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

REPO = Path(__file__).resolve().parents[2]
#: ``python SLOW_WRITES SECONDS ARGS...``: ``kdcache ARGS...`` pausing after each group it writes
SLOW_WRITES = Path(__file__).with_name("slow_writes.py")


def write_molecules(path: Path, n: int = 14, seed: int = 0) -> Path:
    """An OC20-format LMDB of ``n`` small random molecules in a non-periodic 10 Å box."""
    from ase import Atoms

    from kdcache.data.lmdb_writer import atoms_to_record, write_lmdb

    rng = np.random.default_rng(seed)
    recs = []
    for _ in range(n):
        k = int(rng.integers(3, 9))
        # spread atoms so no two are closer than ~0.9 Å
        pos = rng.uniform(0, 3.5, size=(k, 3))
        atoms = Atoms(numbers=rng.choice([1, 6, 7, 8], size=k), positions=pos, cell=np.eye(3) * 10.0, pbc=False)
        atoms.set_tags(np.where(np.arange(k) < 2, 1, 2))
        recs.append(atoms_to_record(atoms, energy=float(rng.normal()), forces=rng.normal(size=(k, 3))))
    write_lmdb(path, recs)
    return path


@pytest.fixture(scope="session")
def mol_lmdb(tmp_path_factory) -> Path:
    return write_molecules(tmp_path_factory.mktemp("data") / "mol.lmdb", n=14, seed=0)


@pytest.fixture(scope="session")
def other_lmdb(tmp_path_factory) -> Path:
    """Same size and count as ``mol_lmdb`` but different structures."""
    return write_molecules(tmp_path_factory.mktemp("data2") / "mol.lmdb", n=14, seed=1)


def make_checkpoint(path: Path, preset: str, seed: int = 0) -> Path:
    """A kdcache checkpoint of a (random) preset with a non-trivial normaliser."""
    from kdcache.models.base import Normalizer
    from kdcache.models.checkpoint import save_checkpoint
    from kdcache.models.presets import build_preset

    torch.manual_seed(seed)
    model = build_preset(preset)
    model.normalizer = Normalizer(energy_mean=-3.5, energy_std=2.0, forces_std=2.0)
    save_checkpoint(path, model)
    return path


@pytest.fixture(scope="session")
def gemnet_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "gemnet_tiny.pt", "gemnet-oc-tiny")


@pytest.fixture(scope="session")
def painn_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "painn_tiny.pt", "painn-tiny")


#: small shards so that 14 molecules make several groups
LAYOUT = dict(shard_atoms=16, chunk_atoms=8)


def run_cli(*args: str, env: dict | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """``kdcache ...`` in a subprocess (``python -m kdcache.cli.main``)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "kdcache.cli.main", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"kdcache {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_stores_equal(a: Path, b: Path) -> None:
    """Every array of two stores holds the same values (bit for bit) and both are complete."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert ga.attrs["kdcache"]["complete"] and gb.attrs["kdcache"]["complete"]
    names_a = sorted(k for k, _ in ga.arrays())
    names_b = sorted(k for k, _ in gb.arrays())
    assert names_a == names_b
    for name in names_a:
        xa, xb = ga[name][:], gb[name][:]
        assert xa.dtype == xb.dtype and xa.shape == xb.shape, name
        assert np.array_equal(xa.view(np.uint8), xb.view(np.uint8)), f"array {name} differs"
    assert ga.attrs["kdcache"]["dataset"]["sample_hashes_sha256"] == gb.attrs["kdcache"]["dataset"]["sample_hashes_sha256"]
    # statistics are merged in group order: equal however extraction was split or resumed
    assert ga.attrs["kdcache"].get("stats") == gb.attrs["kdcache"].get("stats")


#: the extraction every resume/multi-process test compares against
PAINN_ARGS = dict(features=None, dtype="float16", batch_size=3, **LAYOUT)


def painn_cli_args(data: Path, ckpt: Path, out: Path) -> list[str]:
    return ["extract", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--dtype", "float16",
            "--batch-size", "3", "--shard-atoms", str(LAYOUT["shard_atoms"]), "--chunk-atoms", str(LAYOUT["chunk_atoms"]),
            "--no-progress"]


@pytest.fixture(scope="session")
def painn_ref_store(tmp_path_factory, mol_lmdb, painn_ckpt) -> Path:
    """An uninterrupted single-process extraction (painn-tiny teacher, float16)."""
    from kdcache.store.extract import extract

    out = tmp_path_factory.mktemp("ref") / "painn.zarr"
    extract(mol_lmdb, out, checkpoint=str(painn_ckpt), progress=False, **PAINN_ARGS)
    return out


def crash_on_group_write(monkeypatch, call: int = 3):
    """Make the ``call``-th group write of StoreWriter raise ``RuntimeError("simulated crash")``
    (a crash between groups); returns a function that restores the real writer."""
    from kdcache.store.writer import StoreWriter

    real = StoreWriter.write_group
    calls = {"n": 0}

    def flaky(self, g, *a, **kw):
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError("simulated crash")
        return real(self, g, *a, **kw)

    monkeypatch.setattr(StoreWriter, "write_group", flaky)
    return lambda: monkeypatch.setattr(StoreWriter, "write_group", real)
