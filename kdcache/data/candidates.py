"""Candidate structures from a seed set, to be labelled by a teacher: ``kdcache data sample``.

Each seed structure gives ``per_seed`` candidates: a random symmetric strain of the cell and the
positions (every component of the strain tensor uniform in ``±strain``), then a Gaussian rattle
of the free atoms (``rattle`` Å per coordinate; atoms the seed holds fixed keep their strained
positions, as the bulk-like layers of a slab should). A candidate with two atoms closer than
``min_distance`` Å, periodic images included (ASE's neighbour list), is drawn again, up to
``attempts`` draws per wanted candidate. Seed structure ``i`` draws from its own generator,
seeded by ``(seed, i)``: the output depends only on the seed set and the settings, and the same
command writes the same file, byte for byte.

The output is an OC20 LMDB without labels (:func:`kdcache.data.lmdb_writer.write_lmdb`), with its
provenance under :data:`~kdcache.data.lmdb_writer.METADATA_KEY` (:func:`candidate_provenance`):
the seed files with their SHA-256, the seed set's fingerprint, the settings and the counts. A
candidate keeps its seed's tags and fixed atoms; its ``sid`` is the seed's (else the seed's
index), its ``fid`` the candidate's number, and ``seed_index`` names the seed. It is ready for
``kdcache extract`` (e.g. ``--teacher ase:...``) and ``kdcache train --labels teacher``.

Not :mod:`kdcache.data.sample`, which makes one validated sample of one record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import kdcache
from kdcache import keys as K
from kdcache.errors import ConfigError, DataError

#: what a candidate file's provenance says it is
KIND = "kdcache-candidates"


@dataclass(frozen=True)
class CandidateSettings:
    """How candidates are drawn.

    Args:
        per_seed: candidates per seed structure.
        rattle: standard deviation (Å) of the Gaussian displacement of each free atom's coordinates.
        strain: largest component of the random symmetric strain tensor (0.02: ±2 %).
        min_distance: closest two atoms may come (Å, periodic images included); 0 keeps all.
        seed: random seed.
        attempts: draws per wanted candidate before a seed structure gives up on it.
    """

    per_seed: int = 4
    rattle: float = 0.05
    strain: float = 0.0
    min_distance: float = 0.5
    seed: int = 0
    attempts: int = 10

    def check(self) -> None:
        """Raises ConfigError naming the option that is out of range."""
        for name, value, ok, rule in (
            ("per-seed", self.per_seed, self.per_seed >= 1, "at least 1"),
            ("rattle", self.rattle, math.isfinite(self.rattle) and self.rattle >= 0, "a finite number >= 0"),
            ("strain", self.strain, math.isfinite(self.strain) and 0 <= self.strain < 0.5, "in [0, 0.5)"),
            ("min-distance", self.min_distance, math.isfinite(self.min_distance) and self.min_distance >= 0,
             "a finite number >= 0"),
            ("seed", self.seed, self.seed >= 0, "at least 0"),
            ("attempts", self.attempts, self.attempts >= 1, "at least 1"),
        ):
            if not ok:
                raise ConfigError(f"--{name} must be {rule}, got {value}")
        if self.rattle == 0 and self.strain == 0:
            raise ConfigError("--rattle and --strain are both 0: every candidate would be a copy of its seed")


def perturb(atoms, rng: np.random.Generator, rattle: float, strain: float):
    """A strained, rattled copy of ``atoms`` (see the module docstring).

    Args:
        atoms: the seed structure (``FixAtoms`` marks the atoms not rattled).
        rng: the random generator (always drawn from in the same order).
        rattle: Gaussian displacement (Å) of the free atoms.
        strain: largest strain component.
    """
    from ase.constraints import FixAtoms

    new = atoms.copy()
    pos = new.get_positions()
    if strain > 0:
        a = rng.uniform(-strain, strain, size=(3, 3))
        deform = np.eye(3) + (a + a.T) / 2
        centre = pos.mean(axis=0)
        # row vectors: the cell's rows and the positions deform alike (fractional coordinates
        # kept), about the centre of the atoms so that a molecule stays where it is
        pos = centre + (pos - centre) @ deform
        new.set_cell(np.asarray(new.get_cell()) @ deform, scale_atoms=False)
    if rattle > 0:
        free = np.ones(len(new), dtype=bool)
        for c in new.constraints:
            if isinstance(c, FixAtoms):
                free[c.get_indices()] = False
        pos[free] += rng.normal(0.0, rattle, size=(int(free.sum()), 3))
    new.set_positions(pos, apply_constraint=False)
    return new


def too_close(atoms, min_distance: float) -> bool:
    """Whether two atoms (or an atom and a periodic image) are closer than ``min_distance`` Å."""
    if min_distance <= 0 or len(atoms) == 0:
        return False
    from ase.neighborlist import neighbor_list

    return len(neighbor_list("d", atoms, float(min_distance))) > 0


def seed_candidates(atoms, index: int, settings: CandidateSettings) -> tuple[list, int]:
    """The candidates of seed structure ``index``.

    Returns:
        (candidates, draws rejected by the minimum-distance filter).
    """
    rng = np.random.default_rng([settings.seed, index])
    accepted, rejected = [], 0
    for _ in range(settings.per_seed * settings.attempts):
        if len(accepted) == settings.per_seed:
            break
        cand = perturb(atoms, rng, settings.rattle, settings.strain)
        if too_close(cand, settings.min_distance):
            rejected += 1
        else:
            accepted.append(cand)
    return accepted, rejected


def seed_files(dataset) -> list[dict]:
    """Each file of the seed set with its size and SHA-256."""
    from kdcache.fs import file_sha256

    paths = getattr(dataset, "paths", None) or [dataset.path]
    return [{"path": str(Path(p).resolve()), "size": Path(p).stat().st_size, "sha256": file_sha256(p)} for p in paths]


def write_candidates(seed_data, out, settings: CandidateSettings, progress: Callable[[int], Any] | None = None) -> dict:
    """Draw candidates from every structure of ``seed_data`` into the LMDB ``out``.

    Args:
        seed_data: any dataset :func:`kdcache.data.open_dataset` reads (labels are ignored).
        out: the ``.lmdb`` file to write (appears only when complete).
        settings: how candidates are drawn.
        progress: called with 1 after each seed structure.

    Returns:
        The provenance written into the file (see :func:`candidate_provenance`).

    Raises:
        ConfigError: settings out of range.
        DataError: ``out`` is not a ``.lmdb`` file or is a file of the seed set, or no
            candidate passed the minimum-distance filter.
    """
    from kdcache.data import open_dataset
    from kdcache.data.atoms import sample_to_atoms
    from kdcache.data.lmdb_writer import atoms_to_record, write_lmdb

    settings.check()
    out = Path(out)
    if out.suffix != ".lmdb" or out.is_dir():
        raise DataError(out, None, None, "--out must be a .lmdb file" + (", not a folder" if out.is_dir() else ""))
    dataset = open_dataset(seed_data)
    files = seed_files(dataset)
    if out.exists() and str(out.resolve()) in {f["path"] for f in files}:
        raise DataError(out, None, None, "is a file of the seed set; write the candidates elsewhere")
    counts = {"seed_structures": len(dataset), "candidates": 0, "rejected_draws": 0, "seeds_short": []}
    meta = {"kind": KIND, "kdcache_version": kdcache.__version__,
            "seed_data": {"path": str(Path(seed_data).resolve()), "files": files,
                          "fingerprint": dataset.fingerprint()},
            "settings": asdict(settings), "counts": counts}

    def records():
        for i in range(len(dataset)):
            sample = dataset[i]
            cands, rejected = seed_candidates(sample_to_atoms(sample), i, settings)
            counts["rejected_draws"] += rejected
            if len(cands) < settings.per_seed:
                counts["seeds_short"].append(i)
            sid = int(sample[K.SID].reshape(-1)[0]) if K.SID in sample else i
            for k, cand in enumerate(cands):
                rec = atoms_to_record(cand, sid=sid, fid=k)  # no labels: a teacher gives them
                rec["seed_index"] = i
                counts["candidates"] += 1
                yield rec
            if progress is not None:
                progress(1)
        if counts["candidates"] == 0:  # raised inside the write: no file is left behind
            raise DataError(seed_data, None, None, f"no candidate passed the minimum-distance filter "
                            f"({settings.min_distance} Å) in {settings.attempts} draws per candidate; lower "
                            "--rattle/--strain or --min-distance")

    write_lmdb(out, records(), metadata=meta)
    return meta


def candidate_provenance(path) -> dict | None:
    """The provenance :func:`write_candidates` kept in an LMDB file (None for other files)."""
    from kdcache.data.lmdb_dataset import shared_env
    from kdcache.data.lmdb_writer import METADATA_KEY
    from kdcache.data.safe_pickle import safe_loads

    with shared_env(Path(path)).begin() as txn:
        raw = txn.get(METADATA_KEY)
    value = safe_loads(raw, path, None) if raw is not None else None
    return value if isinstance(value, dict) and value.get("kind") == KIND else None
