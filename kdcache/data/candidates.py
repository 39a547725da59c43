"""Candidate structures from a seed set, to be labelled by a teacher: ``kdcache data sample``.

Each seed structure gives ``per_seed`` candidates: a random symmetric strain of the cell and the
positions (every component of the strain tensor uniform in ``±strain``), then a Gaussian rattle
of the free atoms (``rattle`` Å per coordinate; atoms the seed holds fixed keep their strained
positions, as the bulk-like layers of a slab should). A candidate with two atoms closer than
``min_distance`` Å, periodic images included (ASE's neighbour list), is drawn again, up to
``attempts`` draws per wanted candidate. Seed structure ``i`` draws from its own generator,
seeded by ``(seed, i)``: the output depends only on the seed set and the settings, and the same
command writes the same file, byte for byte.

Optionally each perturbed structure then moves under a calculator (a :class:`Driver`: any ASE
calculator, or a kdcache checkpoint through :class:`kdcache.calculator.KDCacheCalculator`):
``md_steps`` steps of Langevin MD at ``md_temperature`` (velocity Verlet, NVE, with
``md_friction`` 0; starting velocities Maxwell-Boltzmann), or ``relax_steps`` steps of an ASE
optimiser (FIRE or BFGS, until ``relax_fmax``). A frame is kept every ``keep_every`` steps (0:
the last one only), and each kept frame is a candidate if it passes the minimum-distance filter
(a frame that fails it is dropped: an MD run that brings two atoms together is not drawn
again). The thermostat's noise and the velocities come from the seed structure's generator, so
a deterministic calculator (EMT, a kdcache model on the CPU) gives the same file for a seed.

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
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

import kdcache
from kdcache import keys as K
from kdcache.errors import ConfigError, DataError

if TYPE_CHECKING:
    from kdcache.teachers.calculator import CalculatorSpec

#: what a candidate file's provenance says it is
KIND = "kdcache-candidates"
#: the optimisers of ``relax_steps`` (ase.optimize)
RELAX_OPTIMIZERS = ("FIRE", "BFGS")


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
        md_steps: steps of MD after the perturbation (0: none).
        md_temperature: the MD's temperature (K): of the thermostat and the starting velocities.
        md_timestep: the MD's time step (fs).
        md_friction: the Langevin friction (1/fs); 0 runs velocity Verlet (NVE).
        relax_steps: steps of relaxation after the perturbation (0: none; not with ``md_steps``).
        relax_optimizer: one of :data:`RELAX_OPTIMIZERS`.
        relax_fmax: the relaxation stops early once every force is below this (eV/Å).
        keep_every: keep a frame every this many steps of the MD or relaxation (0: the last only).
    """

    per_seed: int = 4
    rattle: float = 0.05
    strain: float = 0.0
    min_distance: float = 0.5
    seed: int = 0
    attempts: int = 10
    md_steps: int = 0
    md_temperature: float = 300.0
    md_timestep: float = 1.0
    md_friction: float = 0.01
    relax_steps: int = 0
    relax_optimizer: str = "FIRE"
    relax_fmax: float = 0.05
    keep_every: int = 0

    @property
    def dynamics_steps(self) -> int:
        """Steps of MD or relaxation after each perturbation (0: the perturbed structure is the candidate)."""
        return self.md_steps or self.relax_steps

    def recorded(self) -> dict:
        """The settings as the provenance keeps them: those of the dynamics only when it runs
        (the MD's or the relaxation's), so that a file without is recorded as before them."""
        unused = {"md": not self.md_steps, "relax": not self.relax_steps, "keep": not self.dynamics_steps}
        return {k: v for k, v in asdict(self).items() if not unused.get(k.split("_")[0], False)}

    def check(self) -> None:
        """Raises ConfigError naming the option that is out of range."""

        def at_least(value, low):
            return math.isfinite(value) and value >= low

        for name, value, ok, rule in (
            ("per-seed", self.per_seed, self.per_seed >= 1, "at least 1"),
            ("rattle", self.rattle, at_least(self.rattle, 0), "a finite number >= 0"),
            ("strain", self.strain, math.isfinite(self.strain) and 0 <= self.strain < 0.5, "in [0, 0.5)"),
            ("min-distance", self.min_distance, at_least(self.min_distance, 0), "a finite number >= 0"),
            ("seed", self.seed, self.seed >= 0, "at least 0"),
            ("attempts", self.attempts, self.attempts >= 1, "at least 1"),
            ("md-steps", self.md_steps, self.md_steps >= 0, "at least 0"),
            ("md-temperature", self.md_temperature, at_least(self.md_temperature, 0), "a finite number >= 0"),
            ("md-timestep", self.md_timestep, at_least(self.md_timestep, 0) and self.md_timestep > 0,
             "a finite number > 0"),
            ("md-friction", self.md_friction, at_least(self.md_friction, 0), "a finite number >= 0"),
            ("relax-steps", self.relax_steps, self.relax_steps >= 0, "at least 0"),
            ("relax-optimizer", self.relax_optimizer, self.relax_optimizer in RELAX_OPTIMIZERS,
             f"one of {', '.join(RELAX_OPTIMIZERS)}"),
            ("relax-fmax", self.relax_fmax, at_least(self.relax_fmax, 0), "a finite number >= 0"),
            ("keep-every", self.keep_every, self.keep_every >= 0, "at least 0"),
        ):
            if not ok:
                raise ConfigError(f"--{name} must be {rule}, got {value}")
        if self.md_steps and self.relax_steps:
            raise ConfigError("--md-steps and --relax-steps: choose one (each perturbed structure runs one of them)")
        if self.keep_every > self.dynamics_steps:
            raise ConfigError(f"--keep-every {self.keep_every} is more than the {self.dynamics_steps} steps of "
                              "--md-steps/--relax-steps" if self.dynamics_steps else
                              "--keep-every needs --md-steps or --relax-steps")
        if self.rattle == 0 and self.strain == 0 and not self.md_steps:
            # MD draws its own velocities, so its frames differ; a relaxation of the seed would not
            raise ConfigError("--rattle and --strain are both 0: every candidate would be a copy of its seed")


@dataclass(frozen=True)
class Driver:
    """The calculator that moves the candidates (MD or relaxation), with its provenance.

    Args:
        calc: an ASE calculator.
        description: what it is (recorded in the candidates' provenance).
    """

    calc: Any
    description: dict

    @classmethod
    def from_spec(cls, spec: "CalculatorSpec") -> "Driver":
        """An ASE calculator (``--calculator ase:MODULE:FACTORY[:JSON]``; builds it, running its code)."""
        from kdcache.teachers.calculator import package_info

        calc = spec.build()
        return cls(calc, {"kind": "ase_calculator", "name": spec.name, "kwargs": spec.kwargs,
                          "calculator": f"{type(calc).__module__}.{type(calc).__qualname__}",
                          **package_info(spec.module)})

    @classmethod
    def from_checkpoint(cls, path, device: str | None = None) -> "Driver":
        """A kdcache or Open Catalyst checkpoint (``--model``), run by
        :class:`kdcache.calculator.KDCacheCalculator`.

        Args:
            path: the checkpoint.
            device: where the model runs (default: the GPU when there is one, else the CPU).
        """
        from kdcache.calculator import KDCacheCalculator
        from kdcache.distributed import pick_device
        from kdcache.models.checkpoint import load_checkpoint

        loaded = load_checkpoint(path, device=pick_device(device))
        return cls(KDCacheCalculator(loaded.model), {"kind": "kdcache_model", "checkpoint": str(Path(path).resolve()),
                                                     "checkpoint_sha256": loaded.sha256, "model": loaded.name})


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


def trajectory(atoms, driver: Driver, settings: CandidateSettings, rng: np.random.Generator) -> list[tuple[int, Any]]:
    """The frames of a short MD run or relaxation of ``atoms`` (see the module docstring).

    Args:
        atoms: the start (a perturbed candidate; its ``FixAtoms`` hold during the dynamics).
        driver: the calculator.
        settings: ``md_*`` or ``relax_*``, and ``keep_every``.
        rng: the generator of the velocities and the thermostat's noise.

    Returns:
        ``(step, frame)`` every ``keep_every`` steps and at the end (a relaxation that has
        converged ends there), frames without calculator.
    """
    from ase import units

    moving = atoms.copy()
    moving.calc = driver.calc
    reset = getattr(driver.calc, "reset", None)
    if callable(reset):
        reset()  # nothing of the previous structure carries over
    relax = settings.relax_steps > 0
    if relax:
        from ase.optimize import BFGS, FIRE

        dyn = {"FIRE": FIRE, "BFGS": BFGS}[settings.relax_optimizer](moving, logfile=None)
    else:
        from ase.md import velocitydistribution as velocities
        from ase.md.langevin import Langevin
        from ase.md.verlet import VelocityVerlet

        # ASE 3.29 renamed MaxwellBoltzmannDistribution (same draws); kdcache supports ase>=3.22
        thermalize = getattr(velocities, "thermalize_momenta", None) or velocities.MaxwellBoltzmannDistribution
        thermalize(moving, temperature_K=settings.md_temperature, rng=rng)
        step = settings.md_timestep * units.fs
        # fixcm=False: ASE's centre-of-mass correction biases the sampling of small systems
        # (and a slab's fixed atoms hold it anyway)
        dyn = (Langevin(moving, timestep=step, temperature_K=settings.md_temperature,
                        friction=settings.md_friction / units.fs, fixcm=False, rng=rng, logfile=None)
               if settings.md_friction > 0 else VelocityVerlet(moving, timestep=step, logfile=None))
    total = settings.dynamics_steps
    every = settings.keep_every or total
    frames, done = [], 0
    while done < total:
        n = min(every, total - done)
        converged = dyn.run(fmax=settings.relax_fmax, steps=n) if relax else dyn.run(n)
        done += n
        frame = moving.copy()
        frame.calc = None
        frames.append((done, frame))
        if relax and converged:
            break
    moving.calc = None
    return frames


def seed_candidates(atoms, index: int, settings: CandidateSettings, driver: Driver | None = None) -> tuple[list, dict]:
    """The candidates of seed structure ``index``.

    Args:
        atoms: the seed structure.
        index: its index in the seed set (seeds its generator).
        settings: how candidates are drawn.
        driver: the calculator of the MD or relaxation (``settings.dynamics_steps`` > 0).

    Returns:
        (``(step, candidate)`` pairs, step 0 without dynamics; counts: ``rejected_draws`` of the
        perturbation, ``rejected_frames`` of the dynamics, ``starts``: perturbed structures
        accepted).
    """
    rng = np.random.default_rng([settings.seed, index])
    counts = {"rejected_draws": 0, "rejected_frames": 0, "starts": 0}
    out: list[tuple[int, Any]] = []
    for _ in range(settings.per_seed * settings.attempts):
        if counts["starts"] == settings.per_seed:
            break
        cand = perturb(atoms, rng, settings.rattle, settings.strain)
        if too_close(cand, settings.min_distance):
            counts["rejected_draws"] += 1
            continue
        counts["starts"] += 1
        if not settings.dynamics_steps:
            out.append((0, cand))
            continue
        for step, frame in trajectory(cand, driver, settings, rng):
            # an MD run can blow up (non-finite positions) or bring two atoms together
            if np.isfinite(frame.get_positions()).all() and not too_close(frame, settings.min_distance):
                out.append((step, frame))
            else:
                counts["rejected_frames"] += 1
    return out, counts


def seed_files(dataset) -> list[dict]:
    """Each file of the seed set with its size and SHA-256."""
    from kdcache.fs import file_sha256

    paths = getattr(dataset, "paths", None) or [dataset.path]
    return [{"path": str(Path(p).resolve()), "size": Path(p).stat().st_size, "sha256": file_sha256(p)} for p in paths]


def write_candidates(seed_data, out, settings: CandidateSettings, progress: Callable[[int], Any] | None = None,
                     driver: Driver | None = None) -> dict:
    """Draw candidates from every structure of ``seed_data`` into the LMDB ``out``.

    Args:
        seed_data: any dataset :func:`kdcache.data.open_dataset` reads (labels are ignored).
        out: the ``.lmdb`` file to write (appears only when complete).
        settings: how candidates are drawn.
        progress: called with 1 after each seed structure.
        driver: the calculator of the MD or relaxation; needed exactly when
            ``settings.dynamics_steps`` > 0.

    Returns:
        The provenance written into the file (see :func:`candidate_provenance`).

    Raises:
        ConfigError: settings out of range, or a driver without dynamics or dynamics without one.
        DataError: ``out`` is not a ``.lmdb`` file or is a file of the seed set, the dynamics'
            calculator failed on a seed's candidate, or no candidate passed the minimum-distance
            filter.
    """
    from kdcache.data import open_dataset
    from kdcache.data.atoms import sample_to_atoms
    from kdcache.data.lmdb_writer import atoms_to_record, write_lmdb

    settings.check()
    if (driver is None) != (settings.dynamics_steps == 0):
        raise ConfigError("--md-steps/--relax-steps need a calculator to move the atoms (--calculator ase:... or "
                          "--model CHECKPOINT)" if driver is None else
                          "--calculator/--model moves the candidates in MD or a relaxation: give --md-steps or "
                          "--relax-steps")
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
            "settings": settings.recorded(), "counts": counts}
    if driver is not None:
        meta["dynamics"] = driver.description
        counts["rejected_frames"] = 0

    def records():
        for i in range(len(dataset)):
            sample = dataset[i]
            try:
                cands, seed_counts = seed_candidates(sample_to_atoms(sample), i, settings, driver)
            except Exception as exc:  # the dynamics' calculator: name the seed it failed on
                if isinstance(exc, (ConfigError, DataError)):
                    raise
                raise DataError(seed_data, i, None, f"the calculator of the MD/relaxation failed on a candidate of "
                                f"this seed: {type(exc).__name__}: {exc}") from None
            counts["rejected_draws"] += seed_counts["rejected_draws"]
            if driver is not None:
                counts["rejected_frames"] += seed_counts["rejected_frames"]
            if seed_counts["starts"] < settings.per_seed:
                counts["seeds_short"].append(i)
            sid = int(sample[K.SID].reshape(-1)[0]) if K.SID in sample else i
            for k, (step, cand) in enumerate(cands):
                rec = atoms_to_record(cand, sid=sid, fid=k)  # no labels: a teacher gives them
                rec["seed_index"] = i
                if settings.dynamics_steps:
                    rec["dynamics_step"] = step
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
