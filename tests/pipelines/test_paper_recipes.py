"""Every recipe shipped in pipelines/ validates: settings parse (recipe schema and stage two's own
configuration), presets build on the meta device, strategies fit teacher, student and store."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from kdcache.pipeline.recipe import load_recipe
from kdcache.pipeline.validate import validate_recipe

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted((ROOT / "pipelines").glob("*/*.yaml"))
#: configurations of the paper: (teacher preset, student preset, runs)
EXPECTED = {
    "oc20/different": ("gemnet-oc", "painn-big", {"n2n", "e2n", "v2v", "vanilla1", "vanilla2"}),
    "oc20/same": ("painn-big", "painn-small", {"n2n", "v2v", "vanilla1", "vanilla2"}),
    "oc20/similar": ("painn-big", "schnet", {"n2n", "vanilla1", "vanilla2"}),
    "coll/different": ("gemnet-oc-coll", "painn-coll-big", {"n2n", "e2n", "v2v", "vanilla1", "vanilla2"}),
    "coll/same": ("painn-coll-big", "painn-coll-small", {"n2n", "v2v", "vanilla1", "vanilla2"}),
    "coll/similar": ("painn-coll-big", "schnet-coll", {"n2n", "vanilla1", "vanilla2"}),
}
#: parameter counts of the paper's models (presets docstring; GemNet-OC 38.9 M, PaiNN-big 20.1 M,
#: PaiNN-small 3.7 M, SchNet 9.1 M)
PARAMS_M = {"gemnet-oc": 38.9, "painn-big": 20.1, "painn-small": 3.7, "schnet": 9.1}


def test_every_paper_configuration_has_a_recipe():
    assert {f"{p.parent.name}/{p.stem}" for p in PAPER} == set(EXPECTED)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_recipe_validates(path):
    key = f"{path.parent.name}/{path.stem}"
    teacher, student, runs = EXPECTED[key]
    recipe = load_recipe(path, strict=False)
    assert recipe.teacher.checkpoint and recipe.teacher.train is None  # a pretrained teacher
    assert recipe.data.demo is None and "${" in (path.read_text())     # user data placeholders
    s = validate_recipe(recipe, check_files=False)
    assert (s["teacher"]["preset"], s["students"]["preset"]) == (teacher, student)
    assert s["teacher"]["built_on"] == "meta" and s["students"]["built_on"] == "meta"
    assert runs <= set(s["runs"]) and s["runs"][0] == "baseline"
    for name in (teacher, student):
        if name in PARAMS_M:
            info = s["teacher"] if name == teacher else s["students"]
            assert info["params"] / 1e6 == pytest.approx(PARAMS_M[name], abs=0.05)
    # a PaiNN teacher serves v2v from its own vector features, GemNet-OC from e2v
    if "v2v" in runs:
        assert ("vector" if teacher.startswith("painn") else "e2v") in s["store_features"]


def test_demo_recipe_validates_and_cli_reports_missing_files(tmp_path):
    s = validate_recipe(ROOT / "pipelines" / "demo.yaml")
    assert s["teacher"]["preset"] == "gemnet-oc-tiny" and s["students"]["preset"] == "painn-tiny"
    assert s["runs"] == ["baseline", "n2n", "e2n", "v2v", "vanilla1", "vanilla2"]
    runner = CliRunner()
    ok = runner.invoke(app, ["pipeline", "validate", str(ROOT / "pipelines/oc20/different.yaml"), "--no-check-files"])
    assert ok.exit_code == 0 and "38.864 M parameters" in ok.output
    bad = runner.invoke(app, ["pipeline", "validate", str(ROOT / "pipelines/coll/same.yaml")],
                        env={"COLL_TRAIN": str(tmp_path / "nowhere")})
    assert bad.exit_code == 1
    assert "coll/same.yaml" in bad.output and "'data.train'" in bad.output and "does not exist" in bad.output
