"""`kdcache extract` (stage one) and `kdcache store info|verify`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from kdcache import keys as K
from kdcache.settings import field_help, is_switch_or_auto
from kdcache.store import format as F
from kdcache.store.request import ExtractRequest, option_name

from .common import user_errors

app = typer.Typer(help="Inspect and check feature stores.", no_args_is_help=True)


def _features_help() -> str:
    """``--features``' help: what may be stored, and which strategy reads each (from the strategy
    table, :data:`kdcache.train.strategies.STRATEGIES`)."""
    from kdcache.train.strategies import STRATEGIES

    readers: dict[str, list[str]] = {}
    for spec in STRATEGIES.values():
        for key in spec.store_keys:
            readers.setdefault(key, []).append(spec.name)

    def described(choice: str) -> str:
        keys = (K.ENERGY, K.FORCES) if choice == F.OUTPUTS else (choice,)
        names = list(dict.fromkeys(n for k in keys for n in readers.get(k, ())))
        return f"{choice} ({', '.join(names)})" if names else choice

    return (f"{field_help(ExtractRequest.model_fields['features'])} Choose from "
            f"{', '.join(described(c) for c in F.FEATURE_CHOICES)} (in brackets: the strategies that use it). "
            f"{', '.join(F.HIDDEN_KEYS)} are the teacher's hidden features (stored in --dtype; a teacher offers "
            "those its model has), the others labels (stored in --label-dtype).")


def _option(setting: str, *decls: str, help: str | None = None, metavar: str | None = None):
    """The ``kdcache extract`` option of an :class:`ExtractRequest` field: its default, and its
    description and allowed values as help (the schema says them once)."""
    info = ExtractRequest.model_fields[setting]
    default = ... if info.is_required() else info.default
    if is_switch_or_auto(info.annotation):
        default = None  # neither --x nor --no-x: auto
    return typer.Option(default, *(decls or (option_name(setting),)), help=help or field_help(info), show_default=False,
                        metavar=metavar)


@user_errors
def extract(
    data: Path = _option("data"),
    out: Path = _option("out"),
    teacher: Optional[str] = _option("teacher"),
    checkpoint: Optional[Path] = _option("checkpoint"),
    features: Optional[str] = _option("features", help=_features_help()),
    dtype: str = _option("dtype"),
    label_dtype: str = _option("label_dtype"),
    codec: str = _option("codec"),
    batch_size: int = _option("batch_size"),
    device: Optional[str] = _option("device"),
    limit: Optional[int] = _option("limit"),
    shard_atoms: int = _option("shard_atoms"),
    chunk_atoms: int = _option("chunk_atoms"),
    overwrite: bool = _option("overwrite"),
    seed: int = _option("seed"),
    progress: bool = _option("progress", "--progress/--no-progress"),
    teacher_dtype: str = _option("teacher_dtype"),
    workers: int = _option("workers"),
    hessian_probes: int = _option("hessian_probes"),
    fast: Optional[bool] = _option("fast", "--fast/--no-fast"),
    feature_modules: Optional[list[str]] = _option("feature_modules", metavar="KEY=PATH"),
):
    """Stage one: run a teacher once over a dataset into a Zarr feature store.

    Re-running the same command resumes an interrupted extraction. Under
    `torchrun --nproc-per-node N --no-python kdcache extract ...` every rank writes its own shards.
    """
    from kdcache.store.extract import run_extract
    from kdcache.teachers.adapter import AdapterSpec, is_adapter_spec
    from kdcache.teachers.calculator import CalculatorSpec, is_calculator_spec

    # parsed here, on the command line: the one place a calculator or adapter spec (which
    # imports and runs a module) is accepted from (kdcache.teachers.spec)
    if is_calculator_spec(teacher):
        teacher = CalculatorSpec.parse(teacher)
    elif is_adapter_spec(teacher):
        teacher = AdapterSpec.parse(teacher)
    res = run_extract(ExtractRequest.of(
        data=data, out=out, teacher=teacher, checkpoint=checkpoint, features=features, dtype=dtype,
        label_dtype=label_dtype, codec=codec, batch_size=batch_size, device=device, limit=limit,
        shard_atoms=shard_atoms, chunk_atoms=chunk_atoms, overwrite=overwrite, seed=seed, progress=progress,
        teacher_dtype=teacher_dtype, workers=workers, hessian_probes=hessian_probes, feature_modules=feature_modules,
        fast="auto" if fast is None else fast))
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
    if "module" in config and ("factory" in config or "function" in config):  # an ASE calculator or an adapter
        version = f"{config.get('package')} {config.get('version') or '(version unknown)'}"
        teacher_lines = [f"teacher     {t.get('name')} {json.dumps(config.get('kwargs') or {})} ({version})"]
    else:
        teacher_lines = [f"teacher     {t.get('name')} (preset {t.get('preset')}), checkpoint {t.get('checkpoint')}",
                         f"            checkpoint sha256 {t.get('checkpoint_sha256')}"]
    if t.get("feature_modules"):  # hidden features taken by forward hooks (--feature)
        teacher_lines.append("hooked      " + ", ".join(f"{k} = {p}" for k, p in t["feature_modules"].items()))
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
    from kdcache.data import open_dataset
    from kdcache.store.verify import verify_store

    rep = verify_store(store, open_dataset(data) if data is not None else None, quick=quick, progress=progress)
    typer.echo("\n".join(rep.lines()))
    if not rep.ok:
        raise typer.Exit(code=1)
