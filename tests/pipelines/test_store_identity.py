"""The pipeline notices a replaced store: its store stage extracts it again, and the students and
evaluations built on a store whose identity changed run again (`kdcache pipeline run`)."""

import shutil

import yaml
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.pipeline import backends
from kdcache.store.format import recorded_identity

runner = CliRunner()

STORE_STAGE = "store (extract teacher features)"
DEPENDENT = ["student n2n (n2n (λ=1))", "eval n2n (test split)", "report"]


def _recipe(tmp_path):
    from kdcache.models.checkpoint import save_checkpoint
    from kdcache.models.presets import build_preset

    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, build_preset("painn-tiny"))  # a given teacher: nothing to train
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "identity", "device": "cpu",
        "data": {"demo": {"num_train": 8, "num_val": 4, "num_test": 4, "seed": 0}},
        "teacher": {"checkpoint": str(teacher)},
        "store": {"dtype": "float32", "batch_size": 4},
        "students": {"preset": "painn-tiny", "train": {"max_steps": 1, "batch_size": 4, "eval_every": 1,
                                                       "progress": False}},
        "strategies": [{"name": "n2n", "lambda": 1.0}],
        "eval": {"batch_size": 4},
        "report": {"plots": False, "cka_samples": 4, "parity_samples": 4},
    }))
    return recipe


def _run(recipe, out) -> tuple[list[str], str]:
    """The stages a `kdcache pipeline run` ran, and its output."""
    res = runner.invoke(app, ["pipeline", "run", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    ran = [line[len("run: "):].split(" -> ")[0] for line in res.output.splitlines() if line.startswith("run: ")]
    return ran, res.output


def test_replaced_store_is_extracted_again_and_dependents_rerun(tmp_path, monkeypatch):
    recipe, out = _recipe(tmp_path), tmp_path / "run"
    ran, _ = _run(recipe, out)
    assert STORE_STAGE in ran and DEPENDENT[0] in ran
    store = out / "store" / "teacher.zarr"
    original = recorded_identity(store)
    assert original is not None

    # a store from another teacher put in its place
    other = tmp_path / "other.zarr"
    res = runner.invoke(app, ["extract", "--teacher", "painn-tiny", "--seed", "1", "--data", str(out / "data" / "train.lmdb"),
                              "--out", str(other), "--dtype", "float32", "--batch-size", "4", "--device", "cpu",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert recorded_identity(other) not in (None, original)
    shutil.rmtree(store)
    shutil.copytree(other, store)
    ran, output = _run(recipe, out)
    assert f"rerun: {STORE_STAGE}: teacher.zarr was replaced (its identity is {recorded_identity(other)[:12]}" in output
    # extracted again as the recipe says: the same bytes as before, so what was trained on it stands
    assert ran == [STORE_STAGE] and recorded_identity(store) == original

    # an extraction that does not reproduce the same bytes (here: another dtype) gives another
    # identity: everything built on the store runs again, nothing else
    real = backends.extract
    monkeypatch.setattr(backends, "extract", lambda *a, **kw: real(*a[:5], "float16", *a[6:], **kw))
    shutil.rmtree(store)
    shutil.copytree(other, store)
    ran, _ = _run(recipe, out)
    assert recorded_identity(store) not in (original, recorded_identity(other))
    assert ran == [STORE_STAGE] + DEPENDENT
    monkeypatch.undo()
    assert _run(recipe, out)[0] == []  # and then it is up to date
