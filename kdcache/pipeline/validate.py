"""``kdcache pipeline validate``: everything about a recipe that can be checked without running it.

Settings parse (the recipe schema and stage two's own configuration), the presets exist and build
(on the meta device: no memory for weights), each strategy can be served by the teacher's
architecture and the student's, and (optionally) the data and checkpoint files exist.
"""

from __future__ import annotations

from pathlib import Path

from kdcache.errors import CheckpointError, ConfigError
from kdcache.pipeline import backends as B
from kdcache.pipeline.recipe import Recipe, load_recipe
from kdcache.pipeline.runner import CALCULATOR_FEATURES, resolve_store_features, run_folder
from kdcache.train.strategies import STRATEGIES


def validate_recipe(recipe: str | Path | Recipe, check_files: bool = True, build_models: bool = True) -> dict:
    """Check a recipe; return a summary (models with parameter counts, runs, store features).

    Args:
        recipe: a recipe file or a loaded recipe.
        check_files: require data paths and the teacher checkpoint to exist (and environment
            variables in them to be set), and the output folder not to be an existing file.
        build_models: build the teacher and student presets on the meta device.

    Raises:
        ConfigError: naming the recipe file and the key.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, strict=check_files)
    r = recipe

    def fail(key, msg):
        return ConfigError(f"recipe {r.path}: key {key!r}: {msg}")

    runs = ["baseline"] + [c.name for s in r.strategies for c in s.candidates()]
    summary: dict = {"name": r.name, "out": str(r.out), "runs": runs, "seeds": list(r.seeds)}
    teacher_arch = None
    if r.teacher.calculator is not None:
        # named by the recipe's fixed table; nothing is imported here
        summary["teacher"] = {"calculator": r.teacher.calculator, "spec": r.teacher.calculator_spec.name}
    if build_models:
        for key, spec in (("teacher", r.teacher), ("students", r.student)):
            if spec.preset is None:
                continue
            try:
                info = B.count_preset(spec.preset, **spec.overrides)
            except ConfigError as exc:
                raise fail(f"{key}.preset", str(exc)) from None
            except TypeError as exc:  # an override the constructor does not take
                raise fail(f"{key}.overrides", str(exc)) from None
            summary[key] = {"preset": spec.preset, **info}
        teacher_arch = summary.get("teacher", {}).get("name")
        student = summary.get("students")
        if student is not None:
            _check_student_features(r, student, fail)
    if check_files:
        run_folder(r)  # the output folder can be made (not an existing file)
        if r.teacher.calculator is not None:
            _check_calculator_package(r, fail)
        if r.data.demo is None:
            for k in ("train", "val", "test"):
                if not Path(getattr(r.data, k)).exists():
                    raise fail(f"data.{k}", f"{getattr(r.data, k)} does not exist")
        if r.teacher.checkpoint is not None:
            if not Path(r.teacher.checkpoint).is_file():
                raise fail("teacher.checkpoint", f"{r.teacher.checkpoint} does not exist")
            try:  # read as data only: a recipe's checkpoint is never code to run
                teacher_arch = B.checkpoint_model_name(r.teacher.checkpoint) or teacher_arch
                if build_models:  # the checkpoint's own model (size), not the preset's
                    summary["teacher"] = {"preset": r.teacher.preset or "(checkpoint)",
                                          **B.checkpoint_summary(r.teacher.checkpoint)}
            except CheckpointError as exc:
                raise fail("teacher.checkpoint", str(exc)) from None
    if r.store_sources():
        # the checkpoint's or built model's name, else the preset's (resolved by teacher_kind)
        feats = resolve_store_features(r, teacher_arch or r.teacher.preset)
        summary["store_features"] = ([f"auto (what the calculator gives of {', '.join(CALCULATOR_FEATURES)})"]
                                     if feats is None else list(feats))
        summary["stores"] = r.store_sources()
    return summary


def _check_calculator_package(r: Recipe, fail) -> None:
    """The calculator's package is installed (looked up, not imported: validating runs no code)."""
    import importlib.util

    top = r.teacher.calculator_spec.module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        raise fail("teacher.calculator", f"{r.teacher.calculator} needs the Python package {top!r}, which is not "
                                         f"installed (pip install {top})")


def _check_student_features(r: Recipe, student: dict, fail) -> None:
    """Each strategy's student feature (the strategy table) is one the student model offers."""
    for i, s in enumerate(r.strategies):
        for strategy in s.terms:
            feature = STRATEGIES[strategy].student_feature
            offered = list(student["features"])
            if feature is not None and feature not in offered:
                raise fail(f"strategies[{i}]", f"{strategy} needs a student with {feature} features; "
                                               f"{r.student.preset} ({student['name']}) has {offered}")


def format_summary(summary: dict) -> str:
    lines = [f"recipe {summary['name']}: ok (output {summary['out']})"]
    for key in ("teacher", "students"):
        if key in summary:
            m = summary[key]
            if "calculator" in m:
                lines.append(f"  {key:<8} calculator {m['calculator']} ({m['spec']})")
            else:
                lines.append(f"  {key:<8} {m['preset']:<16} {m['name']:<10} {m['params'] / 1e6:8.3f} M parameters")
    if "store_features" in summary:
        where = " and ".join({"train": "training split", "sampled": "sampled data"}[s] for s in summary["stores"])
        lines.append(f"  store    {', '.join(summary['store_features'])}; of the {where}")
    seeds = summary.get("seeds") or []
    per = f" x {len(seeds)} seeds ({', '.join(map(str, seeds))})" if len(seeds) > 1 else ""
    lines.append(f"  runs     {', '.join(summary['runs'])}{per}")
    return "\n".join(lines)
