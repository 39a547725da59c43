"""A recipe with the `hessian` strategy names how many probes stage one stores, and a recipe never
names code (`py:` adapter teachers are refused like `ase:` calculators)."""

from typer.testing import CliRunner

from kdcache.cli.main import app

RECIPE = """name: h
out: {out}
data:
  demo: {{num_train: 8, num_val: 4, num_test: 4, seed: 0}}
teacher: {teacher}
{store}students:
  preset: painn-tiny
  train: {{max_steps: 2, batch_size: 4}}
strategies:
  - {{name: hessian}}
"""


def _validate(tmp_path, teacher="{preset: schnet-tiny, train: {max_steps: 2, batch_size: 4}}", store=""):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out", teacher=teacher, store=store))
    return CliRunner().invoke(app, ["pipeline", "validate", str(path)])


def test_hessian_needs_its_probe_count(tmp_path):
    bad = _validate(tmp_path)
    assert bad.exit_code == 1 and "strategies[0]" in bad.output
    assert "hessian_probes" in bad.output and "Traceback" not in bad.output
    ok = _validate(tmp_path, store="store: {options: {hessian_probes: 2}}\n")
    assert ok.exit_code == 0, ok.output
    assert "baseline, hessian" in ok.output


def test_recipe_refuses_an_adapter_teacher(tmp_path):
    res = _validate(tmp_path, teacher="{preset: 'py:os:getcwd'}", store="store: {options: {hessian_probes: 2}}\n")
    assert res.exit_code == 1 and "names no module to import" in res.output and "py:os:getcwd" in res.output
