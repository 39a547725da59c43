"""Every recipe shipped in pipelines/ validates: settings parse (recipe schema and stage two's own
configuration), presets build on the meta device, strategies fit teacher, student and store.

The six paper recipes carry the paper's own figures (Ekström Kelvinius et al., NeurIPS 2023):
λ of Table 6 (a copy in tests/fixtures/paper_table6.csv, so that a clone tests on its own) and the
model and training settings of Tables 3-5; a value the tables do not give says so in the recipe.
"""

import csv
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.models.presets import preset_config
from kdcache.pipeline.recipe import load_recipe
from kdcache.pipeline.validate import validate_recipe

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted(p for group in ("oc20", "coll") for p in (ROOT / "pipelines" / group).glob("*.yaml"))
TABLE6 = Path(__file__).resolve().parents[1] / "fixtures" / "paper_table6.csv"
#: configurations of the paper: (teacher preset, student preset)
EXPECTED = {
    "oc20/different": ("gemnet-oc", "painn-big"),
    "oc20/same": ("painn-big", "painn-small"),
    "oc20/similar": ("painn-big", "schnet"),
    "coll/different": ("gemnet-oc-coll", "painn-coll-big"),
    "coll/same": ("painn-coll-big", "painn-coll-small"),
    "coll/similar": ("painn-coll-big", "schnet-coll"),
}
#: the paper's names of each configuration's (teacher, student), as Table 6 writes them
PAPER_PAIR = {"different": ("GemNet-OC", "PaiNN-big"), "same": ("PaiNN-big", "PaiNN-small"),
              "similar": ("PaiNN-big", "SchNet")}
#: parameter counts of the paper's models (presets docstring; GemNet-OC 38.9 M, PaiNN-big 20.1 M,
#: PaiNN-small 3.7 M, SchNet 9.1 M)
PARAMS_M = {"gemnet-oc": 38.9, "painn-big": 20.1, "painn-small": 3.7, "schnet": 9.1}

#: Table 3: GemNet-OC, settings shared by OC20 and COLL (the COLL cell of max_neighbors_qint is
#: unreadable in the source, so only OC20 checks it)
_GEMNET = dict(num_spherical=7, num_radial=128, num_blocks=4, emb_size_trip_in=64, emb_size_trip_out=64,
               emb_size_quad_in=32, emb_size_quad_out=32, emb_size_aint_in=64, emb_size_aint_out=64,
               emb_size_rbf=16, emb_size_cbf=16, emb_size_sbf=32, num_before_skip=2, num_after_skip=2,
               num_concat=1, num_atom=3, cutoff=12.0, cutoff_qint=12.0, cutoff_aeaint=12.0, cutoff_aint=12.0,
               max_neighbors=30, max_neighbors_aeaint=20, max_neighbors_aint=1000, rbf={"name": "gaussian"},
               cbf={"name": "spherical_harmonics"}, sbf={"name": "legendre_outer"}, quad_interaction=True,
               atom_edge_interaction=True, edge_atom_interaction=True, atom_interaction=True,
               direct_forces=True, activation="silu")
#: Table 4: PaiNN, shared settings
_PAINN = dict(num_rbf=128, cutoff=12.0, max_neighbors=50, direct_forces=True)
#: Tables 3-5: constructor arguments of every preset the recipes use
MODEL_TABLES = {
    "gemnet-oc": {**_GEMNET, "emb_size_atom": 256, "emb_size_edge": 512, "max_neighbors_qint": 8},
    "gemnet-oc-coll": {**_GEMNET, "emb_size_atom": 128, "emb_size_edge": 256},
    "painn-big": {**_PAINN, "hidden_channels": 512, "num_layers": 6},
    "painn-small": {**_PAINN, "hidden_channels": 256, "num_layers": 4},
    "painn-coll-big": {**_PAINN, "hidden_channels": 256, "num_layers": 6},
    "painn-coll-small": {**_PAINN, "hidden_channels": 128, "num_layers": 4},
    "schnet": dict(hidden_channels=1024, num_filters=256, num_interactions=5, num_gaussians=200, cutoff=6.0),
    "schnet-coll": dict(hidden_channels=128, num_filters=128, num_interactions=6, num_gaussians=50, cutoff=12.0),
}
_COEFS = dict(energy_coef=1.0, force_coef=100.0)
_PAINN_TRAIN = dict(batch_size=32, ema_decay=0.999, clip_grad=10.0, **_COEFS)
_COLL_SCHEDULE = dict(lr=1e-3, scheduler="warmup_exp", warmup_steps=3750, decay_rate=0.01)
#: Tables 4-5: the students' training settings, by (dataset, architecture)
TRAIN_TABLES = {
    ("oc20", "painn"): dict(_PAINN_TRAIN, lr=1e-4, scheduler="warmup_step", warmup_steps=0, lr_gamma=0.45,
                            lr_milestones=[160000, 320000, 480000, 640000]),
    ("coll", "painn"): dict(_PAINN_TRAIN, **_COLL_SCHEDULE),
    ("oc20", "schnet"): dict(_COEFS, batch_size=192, lr=1e-4, scheduler="warmup_step", warmup_steps=31250,
                             warmup_factor=0.1, lr_gamma=0.1, lr_milestones=[52083, 83333, 104166]),
    ("coll", "schnet"): dict(_COEFS, batch_size=32, **_COLL_SCHEDULE),
}
#: students' settings that are kdcache's own (no paper source to name): validation cadence, loaders
KDCACHE_OWN = {"eval_every", "num_workers"}


def _key(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def _table6(dataset: str, config: str) -> dict[str, float]:
    """Table 6's λ of one configuration: strategy -> λ."""
    rows = csv.DictReader(line for line in TABLE6.read_text().splitlines() if not line.startswith("#"))
    teacher, student = PAPER_PAIR[config]
    return {r["strategy"]: float(r[dataset]) for r in rows if (r["teacher"], r["student"]) == (teacher, student)}


def test_every_paper_configuration_has_a_recipe():
    assert {_key(p) for p in PAPER} == set(EXPECTED)


@pytest.mark.parametrize("path", PAPER, ids=_key)
def test_paper_recipe_validates(path):
    teacher, student = EXPECTED[_key(path)]
    recipe = load_recipe(path, strict=False)
    assert recipe.teacher.checkpoint and recipe.teacher.train is None  # a pretrained teacher
    assert recipe.data.demo is None and "${" in (path.read_text())     # user data placeholders
    s = validate_recipe(recipe, check_files=False)
    assert (s["teacher"]["preset"], s["students"]["preset"]) == (teacher, student)
    assert s["teacher"]["built_on"] == "meta" and s["students"]["built_on"] == "meta"
    assert set(_table6(path.parent.name, path.stem)) <= set(s["runs"]) and s["runs"][0] == "baseline"
    for name in (teacher, student):
        if name in PARAMS_M:
            info = s["teacher"] if name == teacher else s["students"]
            assert info["params"] / 1e6 == pytest.approx(PARAMS_M[name], abs=0.05)
    # a PaiNN teacher serves v2v from its own vector features, GemNet-OC from e2v
    if "v2v" in s["runs"]:
        assert ("vector" if teacher.startswith("painn") else "e2v") in s["store_features"]
    # the command validates it too (data and checkpoints are the user's: not checked here)
    result = CliRunner().invoke(app, ["pipeline", "validate", str(path), "--no-check-files"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("path", PAPER, ids=_key)
def test_paper_recipe_lambdas_are_table6(path):
    paper = _table6(path.parent.name, path.stem)
    recipe = load_recipe(path, strict=False)
    singles = {s.name: s.terms.get(s.name) for s in recipe.strategies if len(s.terms) == 1}
    assert singles == paper  # every strategy of the table, with its λ, and no other
    for s in recipe.strategies:  # a combination weights each term with the table's single λ
        assert {k: paper[k] for k in s.terms} == s.terms, s.name
    # Table 6's λ are for the raw feature MSE with a learned linear student map (Appendix D)
    for s in recipe.strategies:
        train = recipe.student_train(s)
        assert (train["feature_norm"], train["student_map"], s.loss) == ("none", "linear", "mse"), s.name


@pytest.mark.parametrize("path", PAPER, ids=_key)
def test_paper_recipe_settings_are_tables_3_to_5(path):
    recipe = load_recipe(path, strict=False)
    for preset in (recipe.teacher.preset, recipe.student.preset):
        arch, config = preset_config(preset)
        assert {k: config[k] for k in MODEL_TABLES[preset]} == MODEL_TABLES[preset], preset
    assert not recipe.student.overrides and not recipe.teacher.overrides  # the presets are the tables'
    arch = preset_config(recipe.student.preset)[0]
    table = TRAIN_TABLES[(path.parent.name, arch)]
    train = recipe.student_train(None)
    assert {k: train.get(k) for k in table} == table
    assert all(not s.train for s in recipe.strategies)  # every run trains with the same settings
    # whatever the tables do not give says so where it is set
    text = path.read_text()
    assert "(assumed)" not in text
    students = text[text.index("\nstudents:"):text.index("\nstrategies:")]
    for key in set(train) - set(table) - KDCACHE_OWN - {"seed", "feature_norm", "student_map"}:
        line = re.search(rf"^ +{key}:.*$", students, re.M).group(0)
        assert "(not in the tables)" in line, line


def test_demo_recipe_validates_and_cli_reports_missing_files(tmp_path):
    s = validate_recipe(ROOT / "pipelines" / "demo.yaml")
    assert s["teacher"]["preset"] == "gemnet-oc-tiny" and s["students"]["preset"] == "painn-tiny"
    assert s["runs"] == ["baseline", "n2n", "e2n", "v2v"] and s["seeds"] == [0, 1, 2]
    # the size of the shipped teacher checkpoint's own model, not of the preset
    from kdcache.models.checkpoint import load_checkpoint

    shipped = load_checkpoint(ROOT / "pipelines" / "demo" / "teacher.pt").model
    assert s["teacher"]["params"] == sum(p.numel() for p in shipped.parameters())
    assert s["teacher"]["built_on"] == "checkpoint"
    runner = CliRunner()
    ok = runner.invoke(app, ["pipeline", "validate", str(ROOT / "pipelines/oc20/different.yaml"), "--no-check-files"])
    assert ok.exit_code == 0 and "38.864 M parameters" in ok.output
    bad = runner.invoke(app, ["pipeline", "validate", str(ROOT / "pipelines/coll/same.yaml")],
                        env={"COLL_TRAIN": str(tmp_path / "nowhere")})
    assert bad.exit_code == 1
    assert "coll/same.yaml" in bad.output and "'data.train'" in bad.output and "does not exist" in bad.output
