"""Distilling on structures without labels in a recipe (pipelines/synthetic.yaml): candidates drawn
from the training split by `kdcache data sample` (`data.sample`), labelled once by a teacher named
from kdcache's fixed calculator table (`teacher: {calculator: emt}`), a student trained on them
(`data: sampled`, `labels: teacher`) beside the baseline on the split's own labels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.errors import ConfigError
from kdcache.pipeline.recipe import CALCULATORS, load_recipe, parse_recipe
from kdcache.pipeline.report import read_csv
from kdcache.pipeline.runner import run_pipeline
from kdcache.pipeline.validate import validate_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "name": "tiny-synthetic",
    "device": "cpu",
    "seeds": [0, 1],
    "data": {"demo": {"num_train": 5, "num_val": 3, "num_test": 3, "seed": 0},
             "sample": {"per_seed": 3, "rattle": 0.04, "min_distance": 0.7, "seed": 0}},
    "teacher": {"calculator": "emt"},
    "store": {"dtype": "float32", "batch_size": 4},
    "students": {"preset": "painn-tiny", "train": {"max_steps": 2, "batch_size": 4, "progress": False}},
    "strategies": [{"name": "sampled", "strategy": "none", "data": "sampled", "train": {"labels": "teacher"}}],
    "eval": {"batch_size": 4},
    "report": {"plots": False, "cka_samples": 3, "parity_samples": 3},
}


def _with(**changes) -> dict:
    return {**TINY, **changes}


def test_shipped_recipe_validates():
    recipe = load_recipe(ROOT / "pipelines" / "synthetic.yaml")
    s = validate_recipe(recipe)
    assert s["teacher"] == {"calculator": "emt", "spec": "ase:ase.calculators.emt:EMT"}
    assert s["runs"] == ["baseline", "sampled-10x"] and len(s["seeds"]) >= 3
    assert s["stores"] == ["sampled"]  # the baseline reads no store
    (sampled,) = recipe.strategies
    assert (sampled.data, sampled.terms, recipe.labels(sampled), recipe.labels(None)) == \
        ("sampled", {}, "teacher", "reference")
    # about 10 x N teacher-labelled structures, drawn from the unlabelled pool of other systems
    demo, sample = recipe.data.demo, recipe.data.sample
    assert sample["seeds"] == "pool" and demo["num_pool"] * sample["per_seed"] == 10 * demo["num_train"]
    result = CliRunner().invoke(app, ["pipeline", "validate", str(ROOT / "pipelines" / "synthetic.yaml")])
    assert result.exit_code == 0 and "calculator emt" in result.output, result.output


def test_shipped_model_teacher_recipe_validates():
    """pipelines/synthetic-model.yaml: the same data, a model teacher, every strategy on the candidates."""
    recipe = load_recipe(ROOT / "pipelines" / "synthetic-model.yaml")
    s = validate_recipe(recipe)
    assert s["runs"] == ["baseline", "sampled-10x", "n2n", "v2v", "vanilla2", "hessian"] and len(s["seeds"]) >= 3
    assert s["stores"] == ["sampled"] and recipe.store.options["hessian_probes"] > 0
    assert all((x.data, recipe.labels(x)) == ("sampled", "teacher") for x in recipe.strategies)
    assert recipe.labels(None) == "reference"  # the baseline: the N labels alone
    assert recipe.data.demo == load_recipe(ROOT / "pipelines" / "synthetic.yaml").data.demo


@pytest.fixture
def tripwire(tmp_path, monkeypatch):
    """A module that leaves a file behind when it is imported (nothing may import it)."""
    (tmp_path / "kd_tripwire_calc.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
        "class Calc:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "imported"
    sys.modules.pop("kd_tripwire_calc", None)


@pytest.mark.parametrize("teacher, key, words", [
    ({"calculator": "kd_tripwire_calc"}, "teacher.calculator", "is not one of ['emt', 'gfn2-xtb']"),
    ({"calculator": "ase:kd_tripwire_calc:Calc"}, "teacher.calculator", "is not one of"),
    ({"preset": "ase:kd_tripwire_calc:Calc", "train": {}}, "teacher.preset", "a recipe names no module to import"),
    ({"calculator": "emt", "preset": "painn-tiny"}, "teacher.preset", "is not a model"),
])
def test_calculator_names_come_from_the_table(tripwire, teacher, key, words):
    with pytest.raises(ConfigError) as err:
        parse_recipe(_with(teacher=teacher), "r.yaml")
    assert f"key {key!r}" in str(err.value) and words in str(err.value)
    assert not tripwire.exists() and "kd_tripwire_calc" not in sys.modules
    # the table is data: each name gives a module and factory kdcache ships the name of
    assert {k: (v.module, v.factory) for k, v in CALCULATORS.items()} == {
        "emt": ("ase.calculators.emt", "EMT"), "gfn2-xtb": ("tblite.ase", "TBLite")}


def test_store_options_cannot_name_a_teacher(tripwire):
    with pytest.raises(ConfigError, match="store.options.teacher.*set by the recipe"):
        parse_recipe(_with(store={"options": {"teacher": "ase:kd_tripwire_calc:Calc"}}), "r.yaml")
    assert not tripwire.exists()


@pytest.mark.parametrize("changes, key, words", [
    ({"strategies": [{"name": "s", "strategy": "none", "data": "sampled"}]}, "strategies[0].data",
     "have no reference labels"),
    ({"data": {"demo": {}}}, "strategies[0].data", "there are no sampled data"),
    ({"data": {"demo": {}, "sample": {"rattle": 0}}}, "data.sample", "rattle and strain are both 0"),
    ({"data": {"demo": {}, "sample": {"strain": 0.6}}}, "data.sample", "strain must be in [0, 0.5)"),
    ({"data": {"demo": {}, "sample": {"per_seed": 0}}}, "data.sample.per_seed", "must be > 0"),
    ({"data": {"demo": {}, "sample": {"seeds": "pool"}}}, "data.sample.seeds", "`pool` needs unlabelled structures"),
    ({"data": {"demo": {}, "sample": {"seeds": "val"}}}, "data.sample.seeds", "is not one of"),
    ({"strategies": [{"name": "s", "strategy": "none", "lambda": 1}]}, "strategies[0].lambda", "has no λ"),
    ({"store": {"features": ["node"]}}, "store.features", "calculator teacher (emt) has no ['node']"),
    ({"strategies": [{"name": "n2n"}]}, "store.features", "'n2n' (run 'n2n') reads ['node'], which a calculator teacher (emt) does not give"),
])
def test_bad_sampled_recipes_name_the_key(changes, key, words):
    from kdcache.pipeline.runner import resolve_store_features

    with pytest.raises(ConfigError) as err:
        resolve_store_features(parse_recipe(_with(**changes), "r.yaml"), None)
    assert f"key {key!r}" in str(err.value) and words in str(err.value), str(err.value)


@pytest.mark.slow
def test_sampled_students_end_to_end(tmp_path):
    from kdcache.data import open_dataset
    from kdcache.data.candidates import candidate_provenance
    from kdcache.store import FeatureStore

    recipe = tmp_path / "syn.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    first = run_pipeline(recipe, out=out, log=lambda line: None)
    assert first.ran[:3] == ["data (demo)", "data (sample candidates of the training split)",
                             "store of the sampled data (teacher labels)"]
    assert not (out / "store").exists()  # the baseline reads the split's own labels, no store

    # N x per_seed candidates, without labels, labelled once by EMT
    cands = out / "sampled" / "candidates.lmdb"
    ds = open_dataset(cands)
    assert len(ds) == 5 * 3 == candidate_provenance(cands)["counts"]["candidates"]
    assert all(getattr(ds[i], "energy", None) is None and getattr(ds[i], "forces", None) is None
               for i in range(len(ds)))
    store = FeatureStore.open(out / "store-sampled" / "teacher.zarr", dataset=ds)
    assert store.provenance["teacher"]["name"] == "ase:ase.calculators.emt:EMT" and len(store.energy) == 15

    # the sampled student trained on the candidates and the teacher's labels (they have no others)
    for seed in (0, 1):
        cfg = yaml.safe_load((out / "students" / f"sampled_seed{seed}" / "config.yaml").read_text())
        assert (cfg["data"], cfg["labels"], cfg["strategy"]) == (str(cands), "teacher", "none")
        assert cfg["store"] == str(out / "store-sampled" / "teacher.zarr")
        base = yaml.safe_load((out / "students" / f"baseline_seed{seed}" / "config.yaml").read_text())
        assert (base["data"], base["labels"], base.get("store")) == (str(out / "data" / "train.lmdb"), "reference",
                                                                     None)

    # the calculator's own row: measured on the test split, it reproduces the EMT demo labels
    rows = {r["run"]: r for r in read_csv(out / "report" / "report.csv")}
    assert set(rows) == {"teacher", "baseline", "sampled"}
    assert float(rows["teacher"]["energy_mae"]) < 0.1 and float(rows["teacher"]["force_cos"]) > 0.999999
    assert rows["sampled"]["strategy"] == "none, sampled data, teacher labels"
    # gap closed against a zero-error teacher is the share of the baseline's error removed
    b, d = float(rows["baseline"]["energy_mae"]), float(rows["sampled"]["energy_mae"])
    t = float(rows["teacher"]["energy_mae"])
    assert float(rows["sampled"]["gap_closed_energy_mae"]) == pytest.approx((b - d) / (b - t), rel=1e-6)
    report = (out / "report" / "report.md").read_text()
    assert "it reproduces the test labels" in report and "15 candidates of the 5 training structures" in report

    # a second run is up to date throughout
    again = run_pipeline(recipe, out=out, log=lambda line: None)
    assert again.ran == []


def test_candidates_of_an_unlabelled_pool(tmp_path):
    """`data: {demo: {num_pool: M}, sample: {seeds: pool}}`: the seeds are M structures of other
    systems written without labels; the candidates are theirs, and only the teacher labels them."""
    from kdcache.data import open_dataset
    from kdcache.data.candidates import candidate_provenance

    recipe = tmp_path / "pool.yaml"
    recipe.write_text(yaml.safe_dump(_with(
        seeds=[0], data={"demo": {"num_train": 5, "num_val": 3, "num_test": 3, "num_pool": 4, "seed": 0},
                         "sample": {"seeds": "pool", "per_seed": 2, "rattle": 0.04, "min_distance": 0.7}},
        strategies=[*TINY["strategies"],
                    {"name": "slower", "strategy": "none", "data": "sampled", "train": {"labels": "teacher", "lr": 1e-4}}],
        report={**TINY["report"], "compare_to": "sampled"})))
    out = tmp_path / "run"
    first = run_pipeline(recipe, out=out, log=lambda line: None)
    assert first.ran[:2] == ["data (demo)", "data (sample candidates of the unlabelled pool)"]
    pool, train = open_dataset(out / "data" / "pool.lmdb"), open_dataset(out / "data" / "train.lmdb")
    assert len(pool) == 4 and all(getattr(pool[i], "energy", None) is None for i in range(4))
    assert not {int(pool[i].sid) for i in range(4)} & {int(train[i].sid) for i in range(5)}  # other systems
    cands = out / "sampled" / "candidates.lmdb"
    prov = candidate_provenance(cands)
    assert prov["counts"]["seed_structures"] == 4 and len(open_dataset(cands)) == 8
    assert prov["seed_data"]["path"] == str(out / "data" / "pool.lmdb")
    report = (out / "report" / "report.md").read_text()
    assert "8 candidates of the 4 unlabelled pool structures" in report
    # report.compare_to: a second table, the other run against `sampled` of the same seed
    assert "## Against sampled" in report
    compared = {r["run"]: r for r in read_csv(out / "report" / "report-vs-sampled.csv")}
    assert set(compared) == {"teacher", "sampled", "slower"} and compared["sampled"]["kind"] == "baseline"
    s, d, t = (float(compared[k]["energy_mae"]) for k in ("sampled", "slower", "teacher"))
    assert float(compared["slower"]["gap_closed_energy_mae"]) == pytest.approx((s - d) / (s - t), rel=1e-6)


@pytest.mark.slow
def test_a_model_teacher_labels_the_candidates(tmp_path):
    """The candidates' store can come from a built-in model teacher too (here trained in the
    pipeline on the N labels); a distillation strategy may train on the candidates as well."""
    from kdcache.store import FeatureStore

    recipe = tmp_path / "model.yaml"
    recipe.write_text(yaml.safe_dump(_with(
        seeds=[0], teacher={"preset": "painn-tiny", "train": {"max_steps": 2, "batch_size": 4, "progress": False}},
        strategies=[{"name": "sampled-v1", "strategy": "vanilla1", "data": "sampled", "train": {"labels": "teacher"}}])))
    out = tmp_path / "run"
    res = run_pipeline(recipe, out=out, log=lambda line: None)
    assert "store of the sampled data (teacher labels)" in res.ran and not (out / "store").exists()
    store = FeatureStore.open(out / "store-sampled" / "teacher.zarr")
    assert store.provenance["teacher"]["name"] == "painn"
    assert {"node", "vector", "energy", "forces"} <= set(store.feature_keys)  # `auto`: all a PaiNN teacher gives
    cfg = yaml.safe_load((out / "students" / "sampled-v1" / "config.yaml").read_text())
    assert (cfg["labels"], cfg["strategy"], cfg["store"]) == ("teacher", "vanilla1:1",
                                                              str(out / "store-sampled" / "teacher.zarr"))
    rows = {r["run"]: r for r in read_csv(out / "report" / "report.csv")}
    assert set(rows) == {"teacher", "baseline", "sampled-v1"} and rows["teacher"]["model"] == "painn-tiny"


def test_teacher_labels_may_come_from_the_students_settings():
    recipe = parse_recipe(_with(students={"preset": "painn-tiny", "train": {"labels": "teacher"}},
                                strategies=[{"name": "sampled", "strategy": "none", "data": "sampled"}]), "r.yaml")
    # every run then reads a store: the baseline the training split's, the sampled run the candidates'
    assert recipe.store_sources() == ["train", "sampled"]
    assert [recipe.labels(s) for s in (None, *recipe.strategies)] == ["teacher", "teacher"]


def test_compare_to_names_a_run_and_pairs_seeds_against_it():
    """`report: {compare_to: RUN}`: gap closed of every other run against RUN of the same seed."""
    from kdcache.pipeline import report as R

    with pytest.raises(ConfigError, match="report.compare_to.*'nope' is not a run"):
        parse_recipe(_with(report={"compare_to": "nope"}), "r.yaml")
    with pytest.raises(ConfigError, match="report.compare_to.*needs another run"):
        parse_recipe(_with(report={"compare_to": "sampled"}), "r.yaml")
    teacher = R.Row("teacher", "teacher", {"energy_mae": 10.0})
    rows = [teacher, R.Row.over_seeds("baseline", "baseline", [{"energy_mae": 200.0}, {"energy_mae": 300.0}], [0, 1]),
            R.Row.over_seeds("labels", "distilled", [{"energy_mae": 100.0}, {"energy_mae": 120.0}], [0, 1]),
            R.Row.over_seeds("extra", "distilled", [{"energy_mae": 90.0}, {"energy_mae": 98.0}], [0, 1])]
    R.add_gaps(rows)
    compared = {r.name: r for r in R.against(rows, "labels")}
    assert set(compared) == {"teacher", "labels", "extra"} and compared["labels"].kind == "baseline"
    # per seed (labels_s - extra_s) / (mean labels - teacher) = 10/100, 22/100
    assert compared["extra"].gap["energy_mae"] == pytest.approx(0.16)
    assert compared["extra"].gap_stats["energy_mae"].se == pytest.approx(0.06)
    assert rows[3].gap["energy_mae"] == pytest.approx((110 + 202) / 2 / 240)  # the baseline table is unchanged
