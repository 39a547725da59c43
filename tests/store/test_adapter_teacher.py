"""`kdcache extract --teacher py:MODULE:FUNCTION` and `--feature KEY=MODULE.PATH`: a torch module
that is none of kdcache's architectures (tests/store/tiny_adapter.py) as a teacher, its hidden
features taken by forward hooks, stored as a built-in teacher's are, and read by n2n and v2v."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from kdcache import keys as K
from kdcache.data import open_dataset
from kdcache.data.batch import collate
from kdcache.errors import ConfigError
from kdcache.store import FeatureStore
from kdcache.store.extract import extract

from . import tiny_adapter
from .conftest import LAYOUT, write_molecules
from .test_calculator_teacher import kdcache, stored_rows

ADAPTER = 'py:tests.store.tiny_adapter:make:{"hidden": 6, "seed": 3}'
HOOKS = ("--feature", "e2n=interactions.0", "--feature", "vector=vector_head")


def cli_extract(data, out, *extra, teacher=ADAPTER):
    return kdcache("extract", "--teacher", teacher, "--data", data, "--out", out, "--batch-size", 3,
                   "--dtype", "float32", "--label-dtype", "float64", "--shard-atoms", LAYOUT["shard_atoms"],
                   "--chunk-atoms", LAYOUT["chunk_atoms"], "--no-progress", *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_molecules(tmp_path_factory.mktemp("adapter") / "mol.lmdb", n=8, seed=4)


@pytest.fixture(scope="module")
def store(data):
    out = data.parent / "adapter.zarr"
    code, text, _ = cli_extract(data, out, *HOOKS)
    assert code == 0, text
    return out


def direct(sample) -> dict:
    """The adapter run by hand on one structure, its hooks registered here (not by kdcache)."""
    model = tiny_adapter.make(hidden=6, seed=3)
    caught = {}
    model.interactions[0].register_forward_hook(lambda m, i, o: caught.__setitem__(K.E2N, o))
    model.vector_head.register_forward_hook(lambda m, i, o: caught.__setitem__(K.VECTOR, o))
    batch = collate([sample])
    batch[K.POSITIONS] = batch[K.POSITIONS].requires_grad_(True)
    out = model(batch, (K.NODE,))
    (grad,) = torch.autograd.grad(out[K.ENERGY].sum(), batch[K.POSITIONS])
    return {K.ENERGY: out[K.ENERGY], K.FORCES: -grad, K.ATOM_ENERGY: out[K.ATOM_ENERGY], K.NODE: out[K.NODE],
            **caught}


def test_stored_values_are_the_modules_and_hooks_own(store, data):
    ds = open_dataset(data)
    want = [{k: v.detach().double().numpy() for k, v in direct(ds[i]).items()} for i in range(len(ds))]
    assert FeatureStore.open(store, dataset=ds).feature_keys == (K.NODE, K.E2N, K.VECTOR, K.ATOM_ENERGY, K.FORCES,
                                                                 K.ENERGY)
    # batches of 3 against one structure at a time: the same sums up to float32 rounding
    np.testing.assert_allclose(FeatureStore.open(store).energy, np.concatenate([w[K.ENERGY] for w in want]),
                               rtol=1e-5)
    for key in (K.NODE, K.E2N, K.VECTOR, K.ATOM_ENERGY, K.FORCES):
        expected = np.concatenate([w[key] for w in want])
        np.testing.assert_allclose(stored_rows(store, key), expected, rtol=1e-4, atol=1e-5, err_msg=key)
        assert np.abs(expected).max() > 0.05, key  # not a trivial zero
    assert stored_rows(store, K.VECTOR).shape[1:] == (3, 6)
    # the two hooked layers differ: each hook caught its own module
    assert not np.allclose(stored_rows(store, K.E2N), stored_rows(store, K.NODE), atol=1e-3)


def test_provenance_statistics_and_verify(store, data):
    store_obj = FeatureStore.open(store)
    teacher = store_obj.provenance["teacher"]
    cfg = teacher["config"]
    assert teacher["name"] == "py:tests.store.tiny_adapter:make" and teacher["kind"] == "adapter"
    assert (cfg["module"], cfg["function"], cfg["kwargs"]) == ("tests.store.tiny_adapter", "make",
                                                               {"hidden": 6, "seed": 3})
    assert cfg["module_sha256"] == hashlib.sha256(open(tiny_adapter.__file__, "rb").read()).hexdigest()
    assert cfg["class"] == "tests.store.tiny_adapter.TinyPotential" and cfg["version"] is None
    assert teacher["feature_modules"] == {"e2n": "interactions.0", "vector": "vector_head"}
    # hooked keys get the per-channel statistics of every hidden feature
    for key in (K.NODE, K.E2N, K.VECTOR):
        std = store_obj.standardizer(key)
        assert std is not None, key
    stats = store_obj.provenance["stats"][K.E2N]
    np.testing.assert_allclose(stats["mean"], stored_rows(store, K.E2N).mean(axis=0), rtol=1e-4, atol=1e-6)
    code, text, _ = kdcache("store", "verify", store, "--data", data)
    assert code == 0 and text.strip().endswith("OK"), text
    code, text, _ = kdcache("store", "info", store)
    assert code == 0 and "hooked      e2n = interactions.0, vector = vector_head" in text, text


@pytest.mark.parametrize("strategy, key", [("n2n", K.NODE), ("v2v", K.VECTOR)])
def test_students_train_from_the_adapters_features(store, data, tmp_path, strategy, key):
    out = tmp_path / strategy
    code, text, _ = kdcache("train", "--student", "painn-tiny", "--data", data, "--store", store, "--strategy",
                            strategy, "--max-steps", 2, "--batch-size", 4, "--device", "cpu", "--no-progress",
                            "--out", out)
    assert code == 0, text
    state = torch.load(out / "last.pt", weights_only=False, map_location="cpu")["extra"]["trainer_state"]
    assert dict(state["store_keys"]) == {strategy: (key,)}
    header, *rows = (out / "metrics.csv").read_text().splitlines()
    loss = float(rows[-1].split(",")[header.split(",").index(f"train_{strategy}")])
    assert np.isfinite(loss) and loss > 0


def test_hooks_on_a_built_in_teacher(data, tmp_path):
    from kdcache.models.presets import build_preset

    out = tmp_path / "painn.zarr"
    code, text, _ = cli_extract(data, out, "--feature", "vector=update_layers.1[1]", "--features", "outputs",
                                "--seed", 5, teacher="painn-tiny")
    assert code == 0, text
    torch.manual_seed(5)  # the teacher's initialisation (--seed)
    model = build_preset("painn-tiny").eval()
    caught = []
    model.update_layers[1].register_forward_hook(lambda m, i, o: caught.append(o[1]))
    ds = open_dataset(data)
    model(collate([ds[i] for i in range(len(ds))]))
    np.testing.assert_allclose(stored_rows(out, K.VECTOR), caught[0].detach().numpy(), rtol=1e-4, atol=1e-6)
    assert FeatureStore.open(out).feature_keys == (K.VECTOR, K.FORCES, K.ENERGY)  # --features outputs, plus the hook


@pytest.mark.parametrize("extra, message", [
    (("--feature", "node=interactions.5"), "--feature node=interactions.5: teacher py:tests.store.tiny_adapter:make "
     "has no module 'interactions.5'; closest: interactions.1, interactions.0"),
    (("--feature", "node=interactions.0.filter"), "--feature node=interactions.0.filter: output has shape [42, 6], "
     "but node is per atom, [atoms, d] with 7 atoms in this batch: hook a module whose output has one row per atom"),
    (("--feature", "vector=interactions.1"), "--feature vector=interactions.1: output has shape [7, 6], but vector "
     "is per atom, [atoms, 3, d]"),
    (("--feature", "node=embedding[1]"), "the module returns one Tensor, not a tuple; drop [1]"),
    (("--feature", "nodes=embedding"), "--feature: nodes=embedding: the key must be one of node, e2n, vector, e2v"),
    (("--features", "e2v"), "teacher 'py:tests.store.tiny_adapter:make' cannot give ['e2v']: it offers ['node', "
     "'atom_energy', 'outputs']"),
    (("--checkpoint", "x.pt"), "is an adapter; it takes no --checkpoint"),
], ids=["no-such-module", "not-per-atom", "not-a-vector", "not-a-tuple", "unknown-key", "feature", "checkpoint"])
def test_bad_features_are_named(data, tmp_path, extra, message):
    out = tmp_path / "bad.zarr"
    code, text, errors = cli_extract(data, out, *extra)
    assert code == 1 and len(errors) == 1 and message in errors[0], text
    assert not out.exists()


@pytest.mark.parametrize("teacher, message", [
    ("py:tests.store.tiny_adapter:not_a_module", "not_a_module(...) gave a dict, not a torch.nn.Module"),
    ("py:tests.store.tiny_adapter:make:{\"width\": 3}", "make(**{\"width\": 3}) failed (TypeError"),
    ("py:tests.store.no_such_adapter:make", "cannot import 'tests.store.no_such_adapter' (ModuleNotFoundError"),
], ids=["not-a-module", "call", "import"])
def test_bad_specs_are_named(data, tmp_path, teacher, message):
    code, text, errors = cli_extract(data, tmp_path / "bad.zarr", teacher=teacher)
    assert code == 1 and len(errors) == 1 and message in errors[0], text


def test_a_spec_from_a_string_setting_or_a_recipe_is_refused(data, tmp_path):
    # what a recipe's teacher.preset or a store option hands to extract(): never imported
    with pytest.raises(ConfigError, match="an adapter teacher imports and runs the module it names, so it is taken "
                                          "only from the command line"):
        extract(data, tmp_path / "s.zarr", teacher="py:tests.store.tiny_adapter:make", progress=False)
    assert not (tmp_path / "s.zarr").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nout: {tmp_path / 'runs'}\ndata: {{train: {data}, val: {data}, test: {data}}}\n"
                      f"teacher: {{preset: 'py:tests.store.tiny_adapter:make', checkpoint: {tmp_path / 't.pt'}}}\n"
                      "students: {preset: painn-tiny}\nstrategies: [n2n]\n")
    code, text, errors = kdcache("pipeline", "validate", recipe)
    assert code == 1 and len(errors) == 1 and "teacher.preset" in errors[0] and "py:tests" in errors[0], text


def test_resume_with_other_hooks_is_refused(store, data):
    from kdcache.errors import StoreError

    with pytest.raises(StoreError, match="different settings.*teacher"):
        from kdcache.teachers.adapter import AdapterSpec

        extract(data, store, teacher=AdapterSpec.parse(ADAPTER), feature_modules=["e2n=interactions.1",
                                                                                   "vector=vector_head"],
                batch_size=3, dtype="float32", label_dtype="float64", progress=False, **LAYOUT)


class Quadratic(torch.nn.Module):
    """E = Σ |pos|² per structure; with ``direct`` it also returns forces 3·pos of its own."""

    def __init__(self, direct: bool, declare: bool):
        super().__init__()
        self.direct, self.direct_forces = direct, declare

    def forward(self, batch, features=()):
        pos = batch[K.POSITIONS]
        energy = torch.zeros(batch[K.NATOMS].numel(), dtype=pos.dtype).index_add_(0, batch[K.BATCH],
                                                                                  (pos * pos).sum(-1))
        return {K.ENERGY: energy, **({K.FORCES: 3.0 * pos} if self.direct else {})}


def test_forces_by_autograd_or_the_adapters_own(data):
    from kdcache.teachers.adapter import AdapterModel

    ds = open_dataset(data)
    batch = collate([ds[0], ds[1]])
    pos = batch[K.POSITIONS]
    out = AdapterModel(Quadratic(direct=False, declare=False), "py:t:q").predict(batch)
    torch.testing.assert_close(out[K.FORCES], -2.0 * pos)  # -dE/dpos
    assert not out[K.FORCES].requires_grad and not batch[K.POSITIONS].requires_grad  # the caller's batch untouched
    out = AdapterModel(Quadratic(direct=True, declare=True), "py:t:q").predict(batch)
    assert torch.equal(out[K.FORCES], 3.0 * pos)
    with pytest.raises(ConfigError, match="returned 'forces' but does not set direct_forces = True"):
        AdapterModel(Quadratic(direct=True, declare=False), "py:t:q").predict(batch)
    with pytest.raises(ConfigError, match="direct_forces is True but forward returned no 'forces'"):
        AdapterModel(Quadratic(direct=False, declare=True), "py:t:q").predict(batch)


def test_the_docs_worked_example_runs(data, tmp_path, monkeypatch):
    import re
    import sys
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "adapter-teachers.md"
    module = next(b for b in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S) if "my_teacher.py" in b)
    (tmp_path / "my_teacher.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))  # what PYTHONPATH=. does for the command
    out = tmp_path / "adapter.zarr"
    code, text, _ = cli_extract(data, out, "--feature", "vector=vector_head", teacher='py:my_teacher:make:{"hidden": 8}')
    assert code == 0, text
    assert FeatureStore.open(out).feature_keys == (K.NODE, K.VECTOR, K.FORCES, K.ENERGY)
    code, text, _ = kdcache("train", "--student", "painn-tiny", "--data", data, "--store", out, "--strategy", "v2v",
                            "--max-steps", 1, "--batch-size", 4, "--device", "cpu", "--no-progress", "--out",
                            tmp_path / "v2v")
    assert code == 0, text
    sys.modules.pop("my_teacher", None)  # a module of this test's folder only
