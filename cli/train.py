"""`kdcache train` and `kdcache eval`: thin wrappers around :mod:`kdcache.train` and
:mod:`kdcache.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.common import user_errors


@user_errors
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run configuration; options below override it."),
    student: Optional[str] = typer.Option(None, help="Student preset (painn-tiny, painn-big, schnet, ...) or model name."),
    data: Optional[str] = typer.Option(None, help="Training dataset (LMDB file/folder, ASE file)."),
    val: Optional[str] = typer.Option(None, help="Validation dataset (validated with EMA weights)."),
    store: Optional[str] = typer.Option(None, help="Feature store written by `kdcache extract` on --data."),
    strategy: Optional[str] = typer.Option(None, help="none, n2n, e2n, v2v, vanilla1, vanilla2, or weighted 'n2n:100,v2v:10'."),
    lambda_: Optional[float] = typer.Option(None, "--lambda", help="Weight of a strategy named without one (default: the strategy's own: n2n/e2n/v2v 30, vanilla1 1, vanilla2 100)."),
    feature_loss: Optional[str] = typer.Option(None, help="mse (default), mae or huber."),
    student_map: Optional[str] = typer.Option(None, help="linear (default), identity or mlp (scalar targets)."),
    feature_norm: Optional[str] = typer.Option(
        None, help="standard (default): compare with the teacher targets standardised by the store's "
        "per-channel statistics, so lambda is scale-free; none: the paper's raw feature MSE."),
    out: Optional[str] = typer.Option(None, help="Run folder (config, checkpoints, metrics). Re-run to resume."),
    max_steps: Optional[int] = typer.Option(None, help="Optimiser steps (precedes --epochs)."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the training data."),
    batch_size: Optional[int] = typer.Option(None, help="Structures per step and process."),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, cuda:1 (default: cuda when available)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    eval_every: Optional[int] = typer.Option(None, help="Validate and checkpoint every K steps (0: at the end)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Also write last.pt every K steps."),
    num_workers: Optional[int] = typer.Option(None, help="Data loader worker processes."),
    scheduler: Optional[str] = typer.Option(None, help="constant, warmup_step, warmup_exp or plateau."),
    energy_coef: Optional[float] = typer.Option(None, help="Energy loss coefficient (1)."),
    force_coef: Optional[float] = typer.Option(None, help="Force loss coefficient (100)."),
    atom_ref: Optional[str] = typer.Option(
        None, "--atom-ref", help="fit (default): per-element reference energies fitted on --data; none."),
    labels: Optional[str] = typer.Option(
        None, "--labels", help="Energies and forces to train on: reference (default; the dataset's), teacher (the "
        "store's teacher energy and forces: --data needs no labels), or both (a sample's own where it has them, "
        "the teacher's where not)."),
    rotate: Optional[bool] = typer.Option(None, "--rotate/--no-rotate", help="Random rotations (targets rotate along)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar."),
    deterministic: Optional[bool] = typer.Option(
        None, "--deterministic/--no-deterministic", help="Deterministic kernels (default; needed for bit-exact resume)."),
):
    """Stage two: train a student against stored teacher targets (the teacher is never loaded).

    Multi-process: `torchrun --nproc-per-node N --no-python kdcache train ...`.
    """
    from kdcache.fs import ensure_output_folder, naming_output
    from kdcache.train import TrainConfig
    from kdcache.train import train as run_training

    overrides = dict(student=student, data=data, val=val, store=store, strategy=strategy, lambda_=lambda_,
                     feature_loss=feature_loss, student_map=student_map, feature_norm=feature_norm, out=out, max_steps=max_steps,
                     epochs=epochs, batch_size=batch_size, seed=seed, device=device, lr=lr, eval_every=eval_every,
                     checkpoint_every=checkpoint_every, num_workers=num_workers, scheduler=scheduler,
                     energy_coef=energy_coef, force_coef=force_coef, atom_ref=atom_ref, labels=labels, progress=progress,
                     deterministic=deterministic)
    cfg = TrainConfig.load(config, overrides)
    if rotate is not None:
        others = [a for a in cfg.augment if a != "rotate"]
        cfg.augment = others + (["rotate"] if rotate else [])
    ensure_output_folder(cfg.out)
    with naming_output(cfg.out):  # a failed write (full disk) names the run folder
        result = run_training(cfg)
    typer.echo(f"trained {result['step']} steps; run folder {cfg.out}", err=True)


@user_errors
def evaluate(
    checkpoint: Path = typer.Argument(..., help="kdcache or Open Catalyst checkpoint."),
    data: str = typer.Option(..., help="Dataset with energy/force labels."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    batch_size: int = typer.Option(16, help="Structures per batch."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu (default: cuda when available)."),
    num_workers: int = typer.Option(0, help="Data loader worker processes."),
):
    """Energy MAE, force MAE, force cosine, EFwT and throughput of a checkpoint on a dataset."""
    from kdcache.evaluate import evaluate_checkpoint, format_table

    metrics = evaluate_checkpoint(checkpoint, data, batch_size=batch_size, device=device, num_workers=num_workers)
    if as_json:
        keys = ("energy_mae", "force_mae", "force_cos", "efwt", "samples_per_s", "force_l2mae", "num_samples")
        typer.echo(json.dumps({k: metrics[k] for k in keys}))
    else:
        typer.echo(format_table(metrics))
