"""Non-finite numbers through `kdcache train` / `kdcache eval`: values that overflow float32, a loss
that turns NaN or infinite, weights or predictions that do. Each ends with one error line naming
the file / sample / field or the step and the samples, exit code 1, and checkpoints that stay
finite."""

from __future__ import annotations

import csv
import math
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.errors import NumericalError
from kdcache.models.checkpoint import load_checkpoint

from . import kd_helpers as H

NUM = 6
BAD = 4  # the sample that gets the bad value


def write_molecules(path, edit=None):
    """``NUM`` labelled 4-atom molecules; ``edit(i, record)`` may change record ``i`` (float64 fields
    stay float64 in the file, so a 1e39 is finite there)."""
    from ase import Atoms

    from kdcache.data.lmdb_writer import atoms_to_record, write_lmdb

    rng = np.random.default_rng(7)
    recs = []
    for i in range(NUM):
        atoms = Atoms(numbers=rng.choice([1, 6, 8], size=4), positions=rng.uniform(0, 3.0, size=(4, 3)),
                      cell=np.eye(3) * 10.0, pbc=False)
        rec = atoms_to_record(atoms, energy=float(rng.normal()), forces=rng.normal(size=(4, 3)))
        if edit is not None:
            edit(i, rec)
        recs.append(rec)
    write_lmdb(path, recs)
    return path


def set_value(field, value):
    """An ``edit`` that puts ``value`` into one entry of ``field`` of sample ``BAD`` (as float64)."""

    def edit(i, rec):
        if i != BAD:
            return
        if field == "y":
            rec["y"] = value
        else:
            t = torch.as_tensor(rec[field], dtype=torch.float64).clone()
            t[1, 2] = value
            rec[field] = t

    return edit


def kdcache(*args):
    """(exit code, output, error lines) of one `kdcache` command run in this process."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    out = res.output
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    return res.exit_code, out, errors


def train(data, out, *extra):
    return kdcache("train", "--student", H.STUDENT, "--data", data, "--out", out, "--batch-size", 2,
                   "--no-progress", *extra)


def assert_finite_checkpoint(path):
    """The checkpoint loads as a model and all of its weights, raw and EMA, are finite."""
    loaded = load_checkpoint(path)
    assert all(torch.isfinite(v).all() for v in loaded.model.state_dict().values() if v.is_floating_point())
    state = torch.load(path, map_location="cpu", weights_only=True)["extra"]["trainer_state"]
    assert all(torch.isfinite(v).all() for v in state["objective"].values() if v.is_floating_point())
    return state


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_molecules(tmp_path_factory.mktemp("good") / "good.lmdb")


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, good):
    out = tmp_path_factory.mktemp("run") / "run"
    code, text, _ = train(good, out, "--max-steps", 1)
    assert code == 0, text
    return out / "last.pt"


# force and energy are finite in the file's float64 but not in float32; positions too
@pytest.mark.parametrize("field, name, value", [("force", "forces", 1e39), ("y", "energy", -1e39),
                                                 ("pos", "pos", 1e40)])
def test_values_beyond_float32_are_named(tmp_path, good_checkpoint, field, name, value):
    data = write_molecules(tmp_path / "bad.lmdb", set_value(field, value))
    expected = f"error: file {data}, sample {BAD}, field '{name}': 1 value(s) are NaN or infinite in float32"
    code, text, errors = train(data, tmp_path / "run", "--max-steps", 3)
    assert code == 1 and len(errors) == 1 and errors[0].startswith(expected), text
    assert not (tmp_path / "run" / "last.pt").exists()
    code, text, errors = kdcache("eval", good_checkpoint, "--data", data, "--batch-size", 4)
    assert code == 1 and len(errors) == 1 and errors[0].startswith(expected), text
    assert "nan" not in text.lower().replace("nan or infinite", "")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, good):
    # 1e30 is finite in float32, but its square (the force loss) is not
    data = write_molecules(tmp_path / "big.lmdb", set_value("force", 1e30))
    out = tmp_path / "run"
    code, text, errors = train(data, out, "--max-steps", NUM, "--eval-every", 1, "--val", good)
    assert code == 1 and len(errors) == 1, text
    m = re.match(r"error: step (\d+): the training loss is inf \(forces inf\) on the batch of samples \[([\d, ]+)\] "
                 rf"of {re.escape(str(data))}; training stopped, (.+) keeps the weights of step (\d+)\.", errors[0])
    assert m, errors[0]
    step, samples = int(m.group(1)), [int(s) for s in m.group(2).split(",")]
    assert BAD in samples and len(samples) == 2
    assert step >= 2, "the test needs a checkpoint before the bad batch (change BAD or the seed)"
    assert m.group(3) == str(out / "last.pt") and int(m.group(4)) == step - 1
    # on disk: the state of the step before, finite, and loadable by eval
    assert assert_finite_checkpoint(out / "last.pt")["step"] == step - 1
    assert_finite_checkpoint(out / "best.pt")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, step))
    assert all(math.isfinite(float(v)) for r in rows for k, v in r.items() if v and k != "epoch")
    code, text, _ = kdcache("eval", out / "last.pt", "--data", good, "--json")
    assert code == 0 and "nan" not in text.lower(), text


def test_a_huge_learning_rate_stops_before_nan_weights_are_saved(tmp_path, good):
    out = tmp_path / "run"
    code, text, errors = train(good, out, "--max-steps", 5, "--eval-every", 1, "--lr", 1e6)
    assert code == 1 and len(errors) == 1, text
    m = re.match(r"error: step (\d+): the training loss is nan .* on the batch of samples \[[\d, ]+\]", errors[0])
    assert m, errors[0]
    assert assert_finite_checkpoint(out / "last.pt")["step"] == int(m.group(1)) - 1
    # finite is not good: the kept weights are not offered as a fallback
    assert (f"{out / 'last.pt'} keeps the weights of step {int(m.group(1)) - 1}. They may already be diverging "
            "(then `kdcache eval` of it fails on NaN predictions). Lower --lr or clip_grad (--config)") in errors[0]


def test_nan_weights_are_never_saved(tmp_path, good):
    from kdcache.train import TrainConfig
    from kdcache.train.trainer import Trainer

    cfg = TrainConfig.from_dict(dict(student=H.STUDENT, student_overrides=H.STUDENT_OVERRIDES, data=str(good),
                                     out=str(tmp_path / "run"), max_steps=1, batch_size=2, progress=False))
    trainer = Trainer(cfg)
    trainer.fit()
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with torch.no_grad():  # what an overflowing gradient does to a finite-loss step
        next(trainer.objective.parameters()).view(-1)[0] = math.nan
    for action in (trainer.save, trainer._checkpoint_point):
        with pytest.raises(NumericalError, match=r"step 1: the weights became NaN or infinite \(the gradients of "
                           r"the batch of samples \[\d+, \d+\].* keeps the weights of step 1"):
            action()
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert len(list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))) == 1  # no NaN row


def test_eval_of_a_model_that_predicts_nan_is_an_error(tmp_path, good):
    from kdcache.models.checkpoint import save_checkpoint
    from kdcache.models.presets import build_preset

    model = build_preset(H.STUDENT, **H.STUDENT_OVERRIDES)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
    save_checkpoint(tmp_path / "nan.pt", model)
    code, text, errors = kdcache("eval", tmp_path / "nan.pt", "--data", good, "--batch-size", 4)
    assert code == 1 and len(errors) == 1, text
    assert "nan" not in text.lower().replace("nan or infinite", ""), text
    assert re.search(r"NaN or infinite .*samples \[0, 1, 2, 3\]", errors[0]), errors[0]
