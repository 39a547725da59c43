"""Whole distillation pipelines from one recipe: teacher -> store -> students -> eval -> report.

Importing this package imports no model and no torch-heavy module; ``run_pipeline`` and
``validate_recipe`` load what they need when called.
"""

from kdcache.pipeline.recipe import Recipe, load_recipe, parse_recipe

__all__ = ["Recipe", "load_recipe", "parse_recipe", "run_pipeline", "validate_recipe"]


def run_pipeline(*args, **kwargs):
    from kdcache.pipeline.runner import run_pipeline as _run

    return _run(*args, **kwargs)


def validate_recipe(*args, **kwargs):
    from kdcache.pipeline.validate import validate_recipe as _validate

    return _validate(*args, **kwargs)
