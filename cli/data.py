"""`kdcache data info|convert|demo|sample`: look at, convert, generate and perturb datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import user_errors

app = typer.Typer(
    help="Datasets: inspect (info), convert ASE-readable files to OC20 LMDB (convert), "
    "generate the embedded EMT demo data (demo), draw unlabelled candidate structures from a seed set (sample).",
    no_args_is_help=True,
)

ENERGY_KEY_HELP = (
    "Energy used as the target for ASE-read files (extxyz/db/traj). COLL: 'energy' (total, "
    "default) or 'atomization_energy'. Ignored for LMDBs."
)


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


@app.command("info")
@user_errors
def info(
    path: Path = typer.Argument(..., help="An .lmdb file, a folder of .lmdb files, .xyz/.extxyz, .db or .traj."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    energy_key: Optional[str] = typer.Option(None, "--energy-key", help=ENERGY_KEY_HELP),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Only read the first N samples."),
):
    """Print what a dataset holds: samples, atoms, elements, energy and force statistics, periodicity.

    Reads every sample once (and so checks them all): a bad sample stops with an error naming the file, the sample index and the field.
    """
    from kdcache.data import dataset_statistics, open_dataset

    ds = open_dataset(path, energy_key=energy_key)
    stats = dataset_statistics(ds, progress=not json_out, max_samples=max_samples)
    stats = {"path": str(path), **ds.fingerprint(), **stats}
    if json_out:
        typer.echo(json.dumps(stats))
        return
    from ase.data import chemical_symbols

    elements = ", ".join(f"{chemical_symbols[z]}({z})" for z in stats["elements"])
    typer.echo(f"dataset        {path} ({stats['kind']}, {len(stats['files'])} file(s))")
    typer.echo(f"samples        {stats['num_samples']}")
    typer.echo(f"atoms          {stats['num_atoms']} total; per sample min {stats['atoms_min']}, "
               f"mean {stats['atoms_mean']:.1f}, max {stats['atoms_max']}")
    typer.echo(f"elements       {elements}")
    typer.echo(f"energy (eV)    mean {_fmt(stats['energy_mean'])}, std {_fmt(stats['energy_std'])}, "
               f"min {_fmt(stats['energy_min'])}, max {_fmt(stats['energy_max'])}; "
               f"per atom mean {_fmt(stats['energy_per_atom_mean'])}")
    typer.echo(f"forces (eV/Å)  component RMS {_fmt(stats['force_rms'])}, max |F| {_fmt(stats['force_max'])}")
    typer.echo(f"periodic       {stats['periodic']}")
    typer.echo(f"fixed atoms    {100 * stats['fixed_fraction']:.1f} %")
    typer.echo(f"labelled       energy {stats['labelled']['energy']}, forces {stats['labelled']['forces']} samples")


@app.command("convert")
@user_errors
def convert(
    src: Path = typer.Argument(..., help="Source: .xyz/.extxyz (e.g. COLL), ASE .db, .traj, or an LMDB."),
    dst: Path = typer.Argument(..., help="The OC20-format .lmdb file to write."),
    energy_key: Optional[str] = typer.Option(None, "--energy-key", help=ENERGY_KEY_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
):
    """Convert a dataset into one OC20-format LMDB (keeps sid, fid, tags and fixed atoms).

    Every sample is checked on the way (positions, cell, energy and forces must be finite in
    float32); the output file appears only when complete.
    """
    from tqdm import tqdm

    from kdcache.data import open_dataset
    from kdcache.data.batch import require_finite
    from kdcache.data.lmdb_writer import sample_to_record, write_lmdb
    from kdcache.errors import DataError

    if dst.suffix != ".lmdb" or dst.is_dir():
        raise DataError(dst, None, None, "destination must be a .lmdb file" + (", not a folder" if dst.is_dir() else ""))
    if dst.exists() and not overwrite:
        raise DataError(dst, None, None, "destination exists; pass --overwrite to replace it")
    ds = open_dataset(src, energy_key=energy_key)

    def records():
        for i in range(len(ds)):
            sample = ds[i]
            require_finite(sample, ds, position=i)  # the rule training applies to every batch
            yield sample_to_record(sample)

    with tqdm(total=len(ds), desc="converting", unit="sample") as bar:
        n = write_lmdb(dst, records(), progress=bar.update)
    typer.echo(f"wrote {n} samples to {dst}")


@app.command("demo")
@user_errors
def demo(
    out: Path = typer.Argument(..., help="Folder for train.lmdb, val.lmdb and test.lmdb."),
    num_train: int = typer.Option(2000, "--num-train", help="Training structures."),
    num_val: int = typer.Option(200, "--num-val", help="Validation structures."),
    num_test: int = typer.Option(200, "--num-test", help="Test structures."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes for EMT labelling (default: up to 2)."),
    num_pool: int = typer.Option(0, "--num-pool", help=(
        "Also write pool.lmdb: this many structures of other systems WITHOUT labels (seeds for `kdcache data "
        "sample`, structures for a teacher to label).")),
):
    """Generate the embedded demo data: OC20-style slabs with adsorbates labelled by ASE's EMT.

    Metals Al, Ni, Cu, Pd, Ag, Pt, Au on fcc(111)/(100)/(110) with small adsorbates (O, H, N, C, OH, CO, NO, CHx, NHx, H2O, N2), tags 0/1/2, subsurface atoms fixed, periodic cells with vacuum, displaced geometries; 20-80 atoms each. Every split holds other systems. Deterministic for a seed.
    """
    from kdcache.data.demo import write_demo
    from kdcache.errors import ConfigError

    if min(num_train, num_val, num_test, num_pool) < 0:
        raise ConfigError("--num-train/--num-val/--num-test/--num-pool must not be negative")
    paths = write_demo(out, num_train, num_val, num_test, seed=seed, progress=True, workers=workers,
                       num_pool=num_pool)
    for split, p in paths.items():
        typer.echo(f"{split:5s} {p}")


@app.command("sample")
@user_errors
def sample(
    seed_data: Path = typer.Argument(..., help="Seed structures: an .lmdb file or folder, .xyz/.extxyz, .db or .traj "
                                     "(labels are ignored)."),
    out: Path = typer.Option(..., "--out", help="The OC20-format .lmdb file of candidates to write (no labels)."),
    per_seed: int = typer.Option(4, "--per-seed", help="Candidates per seed structure."),
    rattle: float = typer.Option(0.05, "--rattle", help="Gaussian displacement of each free atom's coordinates (Å, "
                                 "standard deviation); fixed atoms are not rattled."),
    strain: float = typer.Option(0.0, "--strain", help="Largest component of a random symmetric strain of cell and "
                                 "positions (0.02: ±2 %)."),
    min_distance: float = typer.Option(0.5, "--min-distance", help="Refuse candidates with two atoms closer than "
                                       "this (Å, periodic images included); drawn again instead."),
    attempts: int = typer.Option(10, "--attempts", help="Draws per wanted candidate before a seed gives up on it."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same file)."),
    md_steps: int = typer.Option(0, "--md-steps", help="After the perturbation, run this many steps of MD (Langevin; "
                                 "velocity Verlet with --md-friction 0) with --calculator or --model."),
    md_temperature: float = typer.Option(300.0, "--md-temperature", help="MD temperature (K): the thermostat's and "
                                         "the starting Maxwell-Boltzmann velocities'."),
    md_timestep: float = typer.Option(1.0, "--md-timestep", help="MD time step (fs)."),
    md_friction: float = typer.Option(0.01, "--md-friction", help="Langevin friction (1/fs); 0: NVE velocity Verlet."),
    relax_steps: int = typer.Option(0, "--relax-steps", help="Instead of MD: relax this many steps with "
                                    "--relax-optimizer (stops early below --relax-fmax)."),
    relax_optimizer: str = typer.Option("FIRE", "--relax-optimizer", help="FIRE or BFGS (ase.optimize)."),
    relax_fmax: float = typer.Option(0.05, "--relax-fmax", help="A relaxation stops once every force is below this "
                                     "(eV/Å)."),
    keep_every: int = typer.Option(0, "--keep-every", help="Keep a frame of the MD or relaxation every M steps, each a "
                                   "candidate (0: the last frame only)."),
    calculator: Optional[str] = typer.Option(None, "--calculator", help="The ASE calculator of the MD or relaxation, "
                                             "ase:MODULE:FACTORY[:JSON-KWARGS], e.g. ase:ase.calculators.emt:EMT "
                                             "(imports MODULE and runs its code)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Or a kdcache (or Open Catalyst) checkpoint that runs "
                                         "the MD or relaxation."),
    device: Optional[str] = typer.Option(None, "--device", help="Where --model runs (default: cuda when present)."),
):
    """Draw candidate structures from a seed set (rattles, strains, a minimum-distance filter,
    optionally a short MD run or relaxation of each), for a teacher to label once:
    `kdcache extract --teacher ... --data OUT`, then `kdcache train --labels teacher`.

    Deterministic for a --seed (with a deterministic calculator); the provenance (seed files and their SHA-256,
    settings, the calculator, counts) is kept in the file.
    """
    from tqdm import tqdm

    from kdcache.data.candidates import CandidateSettings, Driver, write_candidates
    from kdcache.errors import ConfigError
    from kdcache.teachers.calculator import CalculatorSpec

    settings = CandidateSettings(per_seed=per_seed, rattle=rattle, strain=strain, min_distance=min_distance,
                                 seed=seed, attempts=attempts, md_steps=md_steps, md_temperature=md_temperature,
                                 md_timestep=md_timestep, md_friction=md_friction, relax_steps=relax_steps,
                                 relax_optimizer=relax_optimizer, relax_fmax=relax_fmax, keep_every=keep_every)
    settings.check()  # before a calculator or model is built
    if calculator is not None and model is not None:
        raise ConfigError("--calculator and --model: give one (the calculator of the MD or relaxation)")
    driver = None
    if calculator is not None:
        # parsed here, on the command line: a calculator spec imports and runs its module
        driver = Driver.from_spec(CalculatorSpec.parse(calculator, "--calculator"))
    elif model is not None:
        driver = Driver.from_checkpoint(model, device)
    with tqdm(desc="seed structures", unit="structure") as bar:
        meta = write_candidates(seed_data, out, settings, progress=bar.update, driver=driver)
    c = meta["counts"]
    frames = f"; {c['rejected_frames']} MD/relaxation frames dropped by it" if settings.dynamics_steps else ""
    typer.echo(f"wrote {c['candidates']} candidates from {c['seed_structures']} seed structures to {out} "
               f"({c['rejected_draws']} draws rejected by the {min_distance} Å minimum distance{frames}; "
               f"{len(c['seeds_short'])} seed structure(s) gave fewer than {per_seed})")
