"""`kdcache extract` (stage one) and `kdcache store info|verify`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.common import user_errors

app = typer.Typer(help="Inspect and check feature stores.", no_args_is_help=True)


@user_errors
def extract(
    data: Path = typer.Option(..., "--data", help="Dataset: an .lmdb file, a folder of .lmdb files, or an ASE/xyz file."),
    out: Path = typer.Option(..., "--out", help="The store to write (a folder, e.g. teacher.zarr)."),
    teacher: Optional[str] = typer.Option(
        None, "--teacher", help="Preset name (gemnet-oc, painn-big, schnet, *-tiny ...). Optional with a checkpoint, "
        "whose own model configuration always wins. Without --checkpoint: randomly initialised (demo only). "
        "Or any ASE calculator, ase:MODULE:FACTORY[:JSON-KWARGS], e.g. ase:ase.calculators.emt:EMT or "
        "'ase:tblite.ase:TBLite:{\"method\": \"GFN2-xTB\"}': it stores energies, forces and, where the "
        "calculator gives them, per-atom energies (this imports MODULE and runs its code)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Teacher checkpoint (Open Catalyst or kdcache)."),
    features: Optional[str] = typer.Option(
        None, "--features", help="Comma list of node,e2n,e2v,vector,atom_energy,outputs (default: all the teacher has). "
        "PaiNN: node,vector; GemNet-OC: node,e2n,e2v; SchNet: node."),
    dtype: str = typer.Option("float16", "--dtype", help="Hidden-feature dtype: float16, bfloat16 or float32."),
    label_dtype: str = typer.Option("float32", "--label-dtype", help="Energies/forces dtype: float32 or float64."),
    codec: str = typer.Option("none", "--codec", help="none (fastest reads), zstd or blosc-lz4."),
    batch_size: int = typer.Option(16, "--batch-size", help="Samples per teacher forward (keep it when resuming)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if present)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N samples."),
    shard_atoms: int = typer.Option(65536, "--shard-atoms", help="Atoms per shard file."),
    chunk_atoms: int = typer.Option(128, "--chunk-atoms", help="Atoms per inner chunk (divides --shard-atoms)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store instead of resuming it."),
    seed: int = typer.Option(0, "--seed", help="Initialisation seed of a teacher without checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    teacher_dtype: str = typer.Option("float32", "--teacher-dtype", help="Precision the teacher runs in: float32 or float64."),
    workers: int = typer.Option(1, "--workers", help="Processes an ASE calculator teacher runs in (default 1); "
                                "a resume may change it."),
):
    """Stage one: run a teacher once over a dataset into a Zarr feature store.

    Re-running the same command resumes an interrupted extraction. Under
    `torchrun --nproc-per-node N --no-python kdcache extract ...` every rank writes its own shards.
    """
    from kdcache.store.extract import extract as run
    from kdcache.teachers.calculator import CalculatorSpec, is_calculator_spec

    if is_calculator_spec(teacher):
        # parsed here, on the command line: the one place a calculator spec (which imports and
        # runs a module) is accepted from (kdcache.teachers.calculator)
        teacher = CalculatorSpec.parse(teacher)
    res = run(
        data=data, out=out, teacher=teacher, checkpoint=str(checkpoint) if checkpoint else None,
        features=features.split(",") if features else None, dtype=dtype, label_dtype=label_dtype, codec=codec,
        batch_size=batch_size, device=device, limit=limit, shard_atoms=shard_atoms, chunk_atoms=chunk_atoms,
        overwrite=overwrite, seed=seed, progress=progress, teacher_dtype=teacher_dtype, workers=workers,
    )
    if res.rank == 0:
        typer.echo(
            f"{res.path}: {res.num_samples} samples; {res.groups_written} group(s) written by rank 0 in "
            f"{res.seconds_total:.1f} s (waiting for writes: {100 * res.write_share:.1f}% of the time; "
            f"writer thread busy {res.seconds_write:.1f} s)"
        )


@app.command("info")
@user_errors
def info(
    store: Path = typer.Argument(..., help="The store folder."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
):
    """What a store holds: samples, arrays, sizes, teacher and dataset provenance."""
    from kdcache.store.verify import human_bytes, store_info

    d = store_info(store)
    if as_json:
        typer.echo(json.dumps(d, indent=2, sort_keys=True))
        return
    t = d["teacher"]
    config = d.get("teacher_config") or {}
    if "module" in config and "factory" in config:  # an ASE calculator teacher
        version = f"{config.get('package')} {config.get('version') or '(version unknown)'}"
        teacher_lines = [f"teacher     {t.get('name')} {json.dumps(config.get('kwargs') or {})} ({version})"]
    else:
        teacher_lines = [f"teacher     {t.get('name')} (preset {t.get('preset')}), checkpoint {t.get('checkpoint')}",
                         f"            checkpoint sha256 {t.get('checkpoint_sha256')}"]
    lines = [
        f"store       {d['path']}",
        f"complete    {'yes' if d['complete'] else 'NO'} ({d['samples_done']}/{d['num_samples']} samples)",
        f"atoms       {d['num_atoms']} (atom axis {d['atom_axis']}, padding {100 * d['padding_fraction']:.2f}%)",
        f"layout      shards of {d['shard_atoms']} atoms, chunks of {d['chunk_atoms']}, codec {d['codec']}",
        f"size        {human_bytes(d['size_bytes'])}",
        f"identity    {d['identity'] or 'none (unfinished, or a format 1 store without checksums)'}",
        *teacher_lines,
        f"graph       {json.dumps(d['graph'])}",
        f"dataset     {json.dumps({k: v for k, v in (d['dataset'] or {}).items() if k != 'files'})}",
        "arrays:",
    ]
    for k, a in d["arrays"].items():
        bpa = f", {a['bytes_per_atom']} B/atom" if a["bytes_per_atom"] else ""
        lines.append(f"  {k:<12} {str(a['shape']):<18} {a['dtype']}{bpa}")
    for w in d["warnings"]:
        lines.append(f"WARNING: {w}")
    typer.echo("\n".join(lines))


@app.command("verify")
@user_errors
def verify(
    store: Path = typer.Argument(..., help="The store folder."),
    data: Optional[Path] = typer.Option(None, "--data", help="The dataset the store should come from (checks every "
                                        "stored sample's structure hash against it)."),
    quick: bool = typer.Option(False, "--quick", help="Check that every data file is there with its size and shard "
                               "index, without hashing the per-atom shards' contents."),
    progress: bool = typer.Option(False, "--progress/--no-progress"),
):
    """Is the store complete and intact (every data file equal to what was written: size and
    checksum), and, with --data, made from this dataset with every stored sample matching it?"""
    from kdcache.store.extract import open_data
    from kdcache.store.verify import verify_store

    rep = verify_store(store, open_data(data) if data is not None else None, quick=quick, progress=progress)
    typer.echo("\n".join(rep.lines()))
    if not rep.ok:
        raise typer.Exit(code=1)
