"""Any ASE calculator as a stage-one teacher: ``kdcache extract --teacher ase:MODULE:FACTORY[:JSON]``.

``ase:ase.calculators.emt:EMT`` or ``ase:tblite.ase:TBLite:{"method": "GFN2-xTB"}``: the
calculator (``FACTORY(**kwargs)`` from ``MODULE``) runs once per structure of a dataset, and its
energy (eV), forces (eV/Å) and, where it gives them (``get_potential_energies``: EMT, tblite),
per-atom energies go into the same feature store as a model teacher's: they serve ``vanilla1``,
``vanilla2`` and ``kdcache train --labels teacher``. The store's writer, groups, progress markers,
lock and resume are those of every teacher (:mod:`kdcache.store.extract`); this module only says
what one group's values are.

Why a spec is an object, not a string setting: importing MODULE and calling FACTORY runs that
package's code, as running a script would. That is fine as a user's explicit choice on the
command line, so :mod:`kdcache.store.extract` takes a calculator teacher only as a
:class:`CalculatorSpec` (which ``kdcache extract --teacher`` parses) and refuses a *string* that
starts with ``ase:`` (a pipeline recipe's ``teacher.preset``, a store option): no file a user
names implicitly can make kdcache import a module.

Workers: calculators are single-structure and often slow. ``--workers N`` runs them in N
processes, each building its calculator once. They are *spawned*, not forked: a forked copy of a
process that holds OpenMP threads or a CUDA context (torch, and many calculators) can hang or
fail. Each structure is computed on its own (the calculator is reset before each, so no
restart guess carries over), so the stored values depend neither on N nor on where a resumed run
started.

This module imports numpy, ASE and :mod:`kdcache.errors` only at the top, so that a worker
process starts quickly; torch and the store are imported by the functions the main process runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from kdcache.errors import ConfigError, DataError
from kdcache.teachers.spec import CodeSyntax

PREFIX = "ase:"
#: how a calculator teacher is written (parsed, imported and called as every code teacher)
SYNTAX = CodeSyntax(PREFIX, "calculator teacher", "ase:MODULE:FACTORY[:JSON-KWARGS], e.g. ase:ase.calculators.emt:EMT",
                    '{"method": "GFN2-xTB"}')


def is_calculator_spec(text: Any) -> bool:
    """Whether a ``--teacher`` value names an ASE calculator (``ase:...``) rather than a preset."""
    return SYNTAX.matches(text)


@dataclass(frozen=True)
class CalculatorSpec:
    """Which calculator to build: ``FACTORY(**kwargs)`` from ``MODULE``.

    Args:
        module: the module to import (``ase.calculators.emt``).
        factory: a class or function of it, or a dotted path inside it (``EMT``).
        kwargs: keyword arguments of the factory (JSON types).
    """

    module: str
    factory: str
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, option: str = "--teacher") -> "CalculatorSpec":
        """``ase:MODULE:FACTORY[:JSON-KWARGS]`` as a spec (the JSON may itself hold colons).

        Args:
            text: the spec.
            option: the option it was given to, for messages.

        Raises:
            ConfigError: not of that form, or keyword arguments that are not a JSON object.
        """
        return cls(*SYNTAX.split(text, option))

    @property
    def name(self) -> str:
        """``ase:MODULE:FACTORY`` (without the keyword arguments)."""
        return f"{PREFIX}{self.module}:{self.factory}"

    def build(self):
        """Import the module and call the factory (this runs their code).

        Raises:
            ConfigError: the module does not import, has no such factory, or the factory fails
                or gives something that is not an ASE calculator.
        """
        calc = SYNTAX.call(self.name, self.module, self.factory, self.kwargs)
        if not all(callable(getattr(calc, m, None)) for m in ("get_potential_energy", "get_forces")):
            raise ConfigError(f"calculator teacher {self.name}: {self.factory}(...) gave a {type(calc).__name__}, "
                              "not an ASE calculator (no get_potential_energy/get_forces)")
        return calc


def package_info(module: str) -> dict:
    """The package a calculator comes from: its top-level name, distribution and version, and the
    module file with its SHA-256 (which tells apart two states of a local, unpackaged module).

    Args:
        module: the (imported) module's name.
    """
    import importlib.metadata as md

    top = module.split(".")[0]
    distribution = version = None
    for dist in md.packages_distributions().get(top, []):
        try:
            distribution, version = dist, md.version(dist)
            break
        except md.PackageNotFoundError:
            continue
    if version is None:
        version = getattr(sys.modules.get(top), "__version__", None)
    path = getattr(sys.modules.get(module), "__file__", None)
    digest = None
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return {"package": top, "distribution": distribution, "version": None if version is None else str(version),
            "module_file": path, "module_sha256": digest}


# --- one structure ----------------------------------------------------------------------------
def evaluate(calc, payload: tuple, per_atom: bool) -> tuple:
    """Run ``calc`` on one structure.

    Args:
        calc: the calculator.
        payload: ``(dataset index, ase.Atoms)``.
        per_atom: also ask for per-atom energies.

    Returns:
        ``(index, (energy, forces [n, 3], per-atom energies [n] or None), None)``, or
        ``(index, None, message)`` when the calculator raised: the main process names the sample.
    """
    index, atoms = payload
    try:
        reset = getattr(calc, "reset", None)
        if callable(reset):
            # forget the previous structure: a calculator that starts from its last result (an
            # SCF guess, as tblite's) would give values that depend on the order, the worker and
            # where a resumed run began
            reset()
        atoms.calc = calc
        energy = float(atoms.get_potential_energy())
        # the teacher's forces on every atom: the training loss leaves out fixed atoms itself
        forces = np.array(atoms.get_forces(apply_constraint=False), dtype=np.float64)
        energies = np.array(atoms.get_potential_energies(), dtype=np.float64) if per_atom else None
    except Exception as exc:
        return index, None, f"{type(exc).__name__}: {exc}"
    finally:
        atoms.calc = None
    return index, (energy, forces, energies), None


_WORKER: dict = {}


def _init_worker(spec: CalculatorSpec, per_atom: bool) -> None:
    """Build this worker process's calculator, once. A failure is kept and reported with every
    structure: an initializer that raises would only make the pool break without the reason."""
    _WORKER["per_atom"] = per_atom
    try:
        _WORKER["calc"] = spec.build()
    except Exception as exc:
        _WORKER["error"] = f"building the calculator in a worker process failed: {exc}"


def _work(payload: tuple) -> tuple:
    if "error" in _WORKER:
        return payload[0], None, _WORKER["error"]
    return evaluate(_WORKER["calc"], payload, _WORKER["per_atom"])


# --- the teacher ------------------------------------------------------------------------------
class CalculatorTeacher:
    """An ASE calculator as a teacher, with what the store's provenance and identity need.

    Builds the calculator once in this process: a spec that does not build fails before any
    store is made, and the calculator's class and properties are known.

    Args:
        spec: which calculator.
    """

    #: a calculator has no hidden features and no graph
    warnings: tuple = ()
    graph: dict = {}

    def __init__(self, spec: CalculatorSpec):
        self.spec = spec
        self.calc = spec.build()
        self.name = spec.name
        self.calculator_class = f"{type(self.calc).__module__}.{type(self.calc).__qualname__}"
        self.properties = [str(p) for p in (getattr(self.calc, "implemented_properties", None) or [])]
        self.package = package_info(spec.module)

    def identity(self) -> dict:
        """What decides the stored values (a resume must present the same): the calculator, its
        arguments, and the version and source of its package."""
        return {"name": self.name, "kind": "ase_calculator",
                "config": {"module": self.spec.module, "factory": self.spec.factory, "kwargs": self.spec.kwargs,
                           "version": self.package["version"], "module_sha256": self.package["module_sha256"]}}

    def describe(self) -> dict:
        """The teacher's provenance (``kdcache store info``)."""
        return {"name": self.name, "kind": "ase_calculator", "preset": None, "checkpoint": None,
                "checkpoint_sha256": None,
                "config": {"module": self.spec.module, "factory": self.spec.factory, "kwargs": self.spec.kwargs,
                           "calculator": self.calculator_class, "implemented_properties": self.properties,
                           **self.package}}

    def runner(self, features: Sequence[str] | None, dataset, workers: int = 1) -> "CalculatorRunner":
        """What computes the store's groups (see :class:`CalculatorRunner`)."""
        return CalculatorRunner(self, features, dataset, workers)


class CalculatorRunner:
    """Computes a calculator teacher's values for lists of samples, in this process or in
    ``workers`` spawned processes. Use as a context manager (it owns the processes).

    Args:
        teacher: the calculator teacher.
        features: subset of ``atom_energy, outputs`` (default: both where the calculator gives
            per-atom energies, else ``outputs``).
        dataset: where the samples come from (names the file in errors).
        workers: processes (1: compute in this process).
    """

    #: a whole group is handed out at once, so that no worker idles at batch ends
    batch_size = None
    #: no setting besides the teacher decides the values (batching and workers do not); see
    #: :meth:`kdcache.store.request.ExtractRequest.store_record`
    value_settings: tuple = ()

    def __init__(self, teacher: CalculatorTeacher, features: Sequence[str] | None, dataset, workers: int = 1):
        if int(workers) < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        self.teacher, self.dataset, self.workers = teacher, dataset, int(workers)
        self.keys, self.has_energy = self._resolve(features)
        self.per_atom = "atom_energy" in self.keys
        self.pool = None

    def _resolve(self, features: Sequence[str] | None) -> tuple[list[str], bool]:
        from kdcache import keys as K
        from kdcache.store import format as F

        offered = ([K.ATOM_ENERGY] if "energies" in self.teacher.properties else []) + [F.OUTPUTS]
        # names are checked by the request (kdcache.store.request.ExtractRequest)
        wanted = offered if features is None else list(features)
        lacking = [f for f in wanted if f not in offered]
        if lacking:
            raise ConfigError(f"calculator teacher {self.teacher.name} ({self.teacher.calculator_class}) cannot give "
                              f"{lacking}: it offers {offered} (its implemented properties: {self.teacher.properties})")
        keys = [k for k in F.PER_ATOM_KEYS if k in wanted or (k == K.FORCES and F.OUTPUTS in wanted)]
        if not keys:
            raise ConfigError("--features selects nothing; name atom_energy and/or outputs")
        return keys, F.OUTPUTS in wanted

    def row_shapes(self, dataset) -> dict[str, tuple]:
        from kdcache import keys as K

        return {k: {K.FORCES: (3,), K.ATOM_ENERGY: ()}[k] for k in self.keys}

    # --- processes --------------------------------------------------------------------------
    def __enter__(self) -> "CalculatorRunner":
        if self.workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                            initializer=_init_worker, initargs=(self.teacher.spec, self.per_atom))
        return self

    def __exit__(self, kind, exc, tb) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if kind is not None:
            # a failure (or Ctrl-C) should not wait for the structures still being computed,
            # which can take minutes each; ProcessPoolExecutor has no public way before 3.14
            stop = getattr(pool, "terminate_workers", None)
            if stop is not None:
                stop()
            else:
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)

    def _results(self, payloads: list[tuple]):
        if self.pool is None:
            for p in payloads:
                yield evaluate(self.teacher.calc, p, self.per_atom)
            return
        from concurrent.futures.process import BrokenProcessPool

        # a few structures per message: fewer round trips for fast calculators, and still
        # several messages per worker, so that the work evens out
        chunk = max(1, min(32, len(payloads) // (8 * self.workers)))
        done = 0
        try:
            for result in self.pool.map(_work, payloads, chunksize=chunk):
                done += 1
                yield result
        except BrokenProcessPool:
            from kdcache.data.batch import sample_file

            i = payloads[done][0]
            raise DataError(sample_file(self.dataset, i), i, None,
                            f"a worker process of calculator teacher {self.teacher.name} died (killed, out of "
                            "memory, or crashed in native code) while computing this sample or one next to it; "
                            "the groups already written are kept: run the same command again to resume") from None

    # --- one list of samples ----------------------------------------------------------------
    def __call__(self, items: list, ids: Sequence[int], advance: Callable[[int], Any]) -> dict:
        """The teacher's values of ``items`` (dataset samples ``ids``), in physical units.

        Args:
            items: kdcache samples.
            ids: their dataset indices.
            advance: called with 1 after each structure (a progress bar).

        Returns:
            ``forces [atoms, 3]``, ``atom_energy [atoms]`` (when stored) and ``energy [S]``, float64.

        Raises:
            DataError: naming the sample whose computation failed or gave a non-finite or
                misshapen value.
        """
        import torch

        from kdcache import keys as K
        from kdcache.data.atoms import sample_to_atoms
        from kdcache.data.batch import sample_file

        payloads = [(int(i), sample_to_atoms(s)) for i, s in zip(ids, items)]
        natoms = {i: len(a) for i, a in payloads}
        energy, forces, per_atom = [], [], []
        for i, result, error in self._results(payloads):
            where = sample_file(self.dataset, i)
            if error is not None:
                raise DataError(where, i, None, f"calculator teacher {self.teacher.name} failed: {error}")
            e, f, ae = result
            n = natoms[i]
            for name, value, shape in ((K.ENERGY, np.float64(e), ()), (K.FORCES, f, (n, 3)),
                                       (K.ATOM_ENERGY, ae, (n,))):
                if value is None:
                    continue
                if np.shape(value) != shape:
                    raise DataError(where, i, name, f"calculator teacher {self.teacher.name} gave shape "
                                    f"{list(np.shape(value))}, expected {list(shape)}")
                if not np.all(np.isfinite(value)):
                    raise DataError(where, i, name, f"calculator teacher {self.teacher.name} gave NaN or "
                                    "infinite values")
            energy.append(e)
            forces.append(f)
            if ae is not None:
                per_atom.append(ae)
            advance(1)
        out = {K.ENERGY: torch.tensor(energy, dtype=torch.float64),
               K.FORCES: torch.from_numpy(np.concatenate(forces) if forces else np.zeros((0, 3)))}
        if self.per_atom:
            out[K.ATOM_ENERGY] = torch.from_numpy(np.concatenate(per_atom) if per_atom else np.zeros(0))
        return out
