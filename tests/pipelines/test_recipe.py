"""Recipe schema: defaults, and errors that name the recipe file and the offending key."""

import textwrap
from pathlib import Path

import pytest

from kdcache.errors import ConfigError
from kdcache.pipeline.recipe import load_recipe, parse_recipe
from kdcache.pipeline.runner import resolve_store_features

BASE = {
    "data": {"demo": {"num_train": 8}},
    "teacher": {"preset": "gemnet-oc-tiny", "train": {"max_steps": 2}},
    "students": {"preset": "painn-tiny", "train": {"max_steps": 3, "batch_size": 2, "lr": "1e-3"}},
    "strategies": ["n2n", {"name": "v2v", "lambda": 2, "train": {"lr": 1e-3}},
                   {"name": "mix", "terms": {"n2n": 1, "vanilla2": 0.5}, "loss": "huber"}],
}


def _with(**changes):
    import copy

    raw = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[leaf] = value
    return raw


def test_defaults_and_resolution():
    r = parse_recipe(BASE, "pipelines/x.yaml")
    assert r.name == "x" and str(r.out) == "runs/x" and r.device == "auto"
    assert r.data.demo == {"num_train": 8, "num_val": 40, "num_test": 40, "num_pool": 0, "seed": 0}
    assert r.eval == {"batch_size": 16, "fast": "auto"}  # kdcache eval's default: the compiled path where it pays
    assert parse_recipe(_with(eval={"fast": False}), "pipelines/x.yaml").eval["fast"] is False
    assert [s.name for s in r.strategies] == ["n2n", "v2v", "mix"]
    assert r.strategies[1].terms == {"v2v": 2.0} and r.strategies[2].strategy_string == "n2n:1,vanilla2:0.5"
    # per-strategy settings override the students' settings, which override the recipe seed
    # per-strategy settings override the students' settings ("1e-3", a YAML string, is a number)
    assert r.student_train(None) == {"seed": 0, "max_steps": 3, "batch_size": 2, "lr": 1e-3}
    assert r.student_train(r.strategies[1]) == {"seed": 0, "max_steps": 3, "batch_size": 2, "lr": 1e-3}
    # auto: all the teacher can give, so that adding a strategy later keeps the store
    assert resolve_store_features(r, "gemnet_oc") == ("node", "e2n", "e2v", "atom_energy", "outputs")
    assert resolve_store_features(r, "painn") == ("node", "vector", "atom_energy", "outputs")
    assert resolve_store_features(r, None) == ("node", "e2v", "atom_energy")  # unknown teacher: what is read


@pytest.mark.parametrize("changes, key, words", [
    ({"teacher__train__max_steps": "ten"}, "teacher.train.max_steps", "expected int"),
    ({"students__train__lr": "fast"}, "students.train.lr", "expected int or float"),
    ({"students__train__bogus": 1}, "students.train.bogus", "unknown training setting"),
    ({"students__train__store": "x"}, "students.train.store", "set by the pipeline"),
    ({"strategies__1__name": "v2v", "strategies__1__lambda": -1}, "strategies[1].lambda", ">= 0"),
    ({"strategies__1__loss": "l3"}, "strategies[1].loss", "not one of"),
    ({"strategies__2__terms": {"k2k": 1}}, "strategies[2].terms.k2k", "unknown strategy"),
    ({"store": {"dtype": "int8"}}, "store.dtype", "not one of"),
    ({"data": {"train": "a"}}, "data.val", "is required"),
    ({"teacher": {"preset": "gemnet-oc-tiny"}}, "teacher", "checkpoint"),
    ({"colour": "blue"}, "colour", "unknown key"),
    ({"students__train__scheduler": "cosine"}, "students.train.scheduler", "not one of"),  # stage two's own rule
    ({"eval": {"fast": "yes"}}, "eval.fast", "true, false or 'auto'"),
    ({"students__train__fast": 1}, "students.train.fast", "true, false or 'auto'"),
    ({"store": {"options": {"fast": "on"}}}, "store.options.fast", "true, false or 'auto'"),
])
def test_errors_name_file_and_key(changes, key, words):
    with pytest.raises(ConfigError) as exc:
        parse_recipe(_with(**changes), "pipelines/bad.yaml")
    msg = str(exc.value)
    assert "pipelines/bad.yaml" in msg and repr(key) in msg and words in msg, msg


def test_duplicate_names_and_store_that_cannot_serve():
    raw = _with(strategies=["n2n", {"name": "n2n", "lambda": 3}])
    with pytest.raises(ConfigError, match="repeated"):
        parse_recipe(raw, "r.yaml")
    r = parse_recipe(_with(store={"features": ["node"]}), "r.yaml")
    with pytest.raises(ConfigError, match=r"'store.features'.*v2v.*e2v"):
        resolve_store_features(r, "gemnet_oc")
    with pytest.raises(ConfigError, match="schnet teacher has no"):
        resolve_store_features(parse_recipe(_with(store={"features": ["e2n"]}), "r.yaml"), "schnet")


def test_env_placeholders_and_yaml_file(tmp_path, monkeypatch):
    f = tmp_path / "p.yaml"
    f.write_text(textwrap.dedent("""
        data: {train: "${KD_T}/train", val: "${KD_T}/val", test: "${KD_MISSING:-fallback}/test"}
        teacher: {preset: painn-tiny, checkpoint: "${KD_CK}"}
        students: {preset: schnet-tiny}
    """))
    monkeypatch.setenv("KD_T", "/d")
    monkeypatch.delenv("KD_CK", raising=False)
    with pytest.raises(ConfigError, match=r"'teacher.checkpoint'.*KD_CK is not set"):
        load_recipe(f)
    r = load_recipe(f, strict=False)  # validating a template: placeholders stay
    assert (r.data.train, r.data.test, r.teacher.checkpoint) == ("/d/train", "fallback/test", "${KD_CK}")
    (tmp_path / "bad.yaml").write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(tmp_path / "none.yaml")


def test_cli_run_refuses_a_bad_recipe_before_running(tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli.main import app

    f = tmp_path / "r.yaml"
    f.write_text("data: {demo: {}}\nteacher: {preset: gemnet-oc-tiny, train: {max_steps: 1}}\n"
                 "students: {preset: painn-tiny}\nstrategies: [{name: x2y}]\n")
    res = CliRunner().invoke(app, ["pipeline", "run", str(f), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1
    assert f"recipe {f}: key 'strategies[0].name': unknown strategy 'x2y'" in res.output
    assert not (tmp_path / "run").exists()  # nothing ran
