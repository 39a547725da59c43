"""The `hessian` strategy: the student's −∂F/∂x·v for the probes of the store's samples against the
stored teacher's, in any rotated frame, and `kdcache extract --hessian-probes` → `kdcache train
--strategy hessian` through the CLI."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdcache import keys as K
from kdcache.cli.main import app
from kdcache.data.batch import collate
from kdcache.models.base import Normalizer
from kdcache.models.checkpoint import load_checkpoint, save_checkpoint
from kdcache.models.presets import build_preset
from kdcache.store import FeatureStore
from kdcache.store.extract import extract
from kdcache.train.data import JoinedDataset, target_key
from kdcache.train.objective import DistillationObjective
from kdcache.train.strategies import parse_strategy

from . import kd_helpers as H

PROBES = 2
#: (preset, overrides): a direct force head and gradient forces
TEACHERS = {"painn": ("painn-tiny", H.STUDENT_OVERRIDES), "schnet": ("schnet-tiny", H.SCHNET_OVERRIDES)}


def kdcache(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.output


def small_model(kind: str, seed: int):
    preset, overrides = TEACHERS[kind]
    torch.manual_seed(seed)
    model = build_preset(preset, **overrides)
    model.normalizer = Normalizer(energy_mean=-3.0, energy_std=2.0, forces_std=2.0)  # units are checked too
    return model


@pytest.fixture(scope="module")
def stores(tmp_path_factory, demo):
    """kind -> (teacher checkpoint, its store with hvp [N, 3, 2]) on the demo's 8 slabs."""
    folder = tmp_path_factory.mktemp("hvp")
    out = {}
    for kind in TEACHERS:
        ckpt = save_checkpoint(folder / f"{kind}.pt", small_model(kind, seed=3))
        store = folder / f"{kind}.zarr"
        extract(demo["train"], store, checkpoint=str(ckpt), features=["outputs"], dtype="float32", batch_size=8,
                hessian_probes=PROBES, progress=False)
        out[kind] = (ckpt, store)
    return out


def objective(student, store: FeatureStore, standard: bool = True) -> DistillationObjective:
    standardizers = {"hessian": store.standardizer(K.HVP)} if standard else {}
    return DistillationObjective(student, parse_strategy("hessian"), {"hessian": (K.HVP,)},
                                 standardizers=standardizers)


def batch_of(train_set, store: FeatureStore, rotate: bool, indices=(0, 3, 6)):
    joined = JoinedDataset(train_set, store, [K.HVP], augment=("rotate",) if rotate else (), seed=5)
    return collate(joined.__getitems__(list(indices)))


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_the_teacher_as_student_matches_its_products_in_any_frame(kind, stores, train_set):
    """The probes regenerated at training time are those of extraction, and the student's products
    are in the teacher's units: the teacher itself has (almost) zero loss, rotated or not."""
    ckpt, path = stores[kind]
    store = FeatureStore.open(path)
    batch = batch_of(train_set, store, rotate=False)
    assert bool(batch[K.FIXED].any()) and batch[target_key(K.HVP)].shape == (batch[K.POSITIONS].shape[0], 3, PROBES)
    scale = float(objective(small_model(kind, seed=4), store)(batch)["hessian"].detach())
    assert scale > 1e-2  # another model's products are far off
    teacher = load_checkpoint(ckpt).model
    for standard in (True, False):
        obj = objective(teacher, store, standard)
        for rotate in (False, True):
            loss = float(obj(batch_of(train_set, store, rotate))["hessian"].detach())
            assert loss < 1e-7 * scale, (standard, rotate, loss)


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_a_students_loss_is_unchanged_under_rotation_and_trains_its_weights(kind, stores, train_set):
    _, path = stores[kind]
    store = FeatureStore.open(path)
    obj = objective(small_model(kind, seed=11), store)
    plain, turned = batch_of(train_set, store, rotate=False), batch_of(train_set, store, rotate=True)
    assert not torch.allclose(plain[K.POSITIONS], turned[K.POSITIONS], atol=1e-2)
    assert not torch.allclose(plain[K.HVP_PROBES], turned[K.HVP_PROBES], atol=1e-2)
    losses = [obj(b)["hessian"] for b in (plain, turned)]
    assert float(losses[0].detach()) > 1e-3
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-4, atol=0.0)
    # the probes must turn with the structure: unturned probes against turned targets differ
    turned[K.HVP_PROBES] = plain[K.HVP_PROBES]
    off = float(obj(turned)["hessian"].detach())
    assert abs(off - float(losses[0].detach())) > 1e-2 * float(losses[0].detach())
    # create_graph: the term's gradient reaches the student's weights
    grads = torch.autograd.grad(losses[0], [p for p in obj.student.parameters() if p.requires_grad],
                                allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_cli_extract_with_probes_then_train_hessian(tmp_path, demo, store_path):
    store = tmp_path / "teacher.zarr"
    code, text = kdcache("extract", "--teacher", "painn-tiny", "--data", demo["train"], "--out", store,
                         "--features", "outputs", "--hessian-probes", PROBES, "--batch-size", 4, "--no-progress")
    assert code == 0, text
    opened = FeatureStore.open(store)
    assert K.HVP in opened.per_atom_keys and opened.provenance["request"]["hessian_probes"] == PROBES
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"student_overrides": H.STUDENT_OVERRIDES, "ema_decay": 0.0, "augment": ["rotate"]}))
    out = tmp_path / "run"
    code, text = kdcache("train", "-c", cfg, "--student", H.STUDENT, "--data", demo["train"], "--store", store,
                         "--strategy", "hessian", "--max-steps", 3, "--batch-size", 4,
                         "--out", out, "--no-progress")
    assert code == 0, text
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and float(rows[-1]["train_hessian"]) > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["strategy"] == "hessian:10"  # its default λ
    # a store without the products: refused, saying how to make them
    code, text = kdcache("train", "-c", cfg, "--student", H.STUDENT, "--data", demo["train"], "--store", store_path,
                         "--strategy", "hessian", "--max-steps", 1, "--out", tmp_path / "refused", "--no-progress")
    assert code == 1 and "extract with --hessian-probes K" in text, text
