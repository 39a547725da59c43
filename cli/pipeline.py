"""`kdcache pipeline run|validate RECIPE.yaml` (logic in kdcache.pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import user_errors

app = typer.Typer(help="Whole distillation pipelines from one recipe (see docs/recipes.md).", no_args_is_help=True)


@app.command("run")
@user_errors
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML, e.g. pipelines/demo.yaml"),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default: the recipe's `out`, else runs/<name>)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: the recipe's, else auto)"),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1,
                             help="student runs trained side by side (processes; on a GPU they share it)"),
):
    """Sample unlabelled candidates of the training split (if asked), train the teacher (if asked),
    extract its store once (of the candidates too, as their labels), train the baseline and one
    student per strategy, evaluate all on the test split and write the report. Up-to-date stages
    are skipped; an interrupted run resumes."""
    from kdcache.pipeline.runner import run_pipeline

    run_pipeline(recipe, out=out, device=device, jobs=jobs)


@app.command("validate")
@user_errors
def validate(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    check_files: bool = typer.Option(True, "--check-files/--no-check-files",
                                     help="require data paths and the teacher checkpoint to exist"),
):
    """Check a recipe without running it: settings, presets (built on the meta device),
    strategy/store compatibility and (by default) that its files exist."""
    from kdcache.pipeline.validate import format_summary, validate_recipe

    typer.echo(format_summary(validate_recipe(recipe, check_files=check_files)))
