"""`kdcache train --fast`: the compiled student (kdcache.models.fast) trains to the eager numbers
within float32 round-off, writes the same checkpoint keys, resumes exactly, and a resume keeps
the setting; the hessian strategy, which differentiates the forces twice, is refused."""

import csv

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdcache.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    data = tmp_path_factory.mktemp("fast-train") / "demo"
    res = runner.invoke(app, ["data", "demo", str(data), "--num-train", "12", "--num-val", "4", "--num-test", "2"])
    assert res.exit_code == 0, res.output
    return data


def _train(demo, out, *extra):
    args = ["train", "--student", "painn-tiny", "--data", str(demo / "train.lmdb"), "--batch-size", "4",
            "--max-steps", "4", "--checkpoint-every", "2", "--out", str(out), "--no-progress", *extra]
    return runner.invoke(app, args)


def _losses(out):
    with open(out / "metrics.csv") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


def test_fast_training_matches_eager_and_resumes_exactly(demo, tmp_path):
    assert _train(demo, tmp_path / "eager").exit_code == 0
    res = _train(demo, tmp_path / "fast", "--fast")
    assert res.exit_code == 0, res.output
    eager, fast = _losses(tmp_path / "eager"), _losses(tmp_path / "fast")
    assert len(eager) == len(fast) >= 1
    for a, b in zip(eager, fast):
        assert abs(a - b) <= 1e-4 * abs(a), (eager, fast)
    we = torch.load(tmp_path / "eager" / "last.pt", weights_only=True)["state_dict"]
    wf = torch.load(tmp_path / "fast" / "last.pt", weights_only=True)["state_dict"]
    assert we.keys() == wf.keys()  # the same checkpoint format: the fast view shares the modules
    moved = max(float((wf[k] - we[k]).abs().max()) for k in we if we[k].is_floating_point())
    # round-off apart, but apart: the compiled path ran (an eager fallback would be bit-identical)
    assert 0 < moved < 1e-4
    # stop after 2 steps (a shorter run), resume to 4: the same weights as the straight run
    part = tmp_path / "part"
    assert _train(demo, part, "--fast", "--max-steps", "2").exit_code == 0
    res = _train(demo, part, "--fast")
    assert res.exit_code == 0, res.output
    wr = torch.load(part / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wr[k], wf[k]) for k in wf)
    # the compiled path decides the trajectory: a resume with --no-fast is refused, naming it
    res = _train(demo, part, "--no-fast", "--max-steps", "6")
    assert res.exit_code == 1 and "fast" in res.output and "Traceback" not in res.output
    # and the default (auto) keeps what the run chose, without timing anything
    res = _train(demo, part, "--max-steps", "5")
    assert res.exit_code == 0, res.output
    assert f"fast path: on (auto: kept from the run in {part})" in res.output
    assert yaml.safe_load((part / "config.yaml").read_text())["fast"] is True


def test_fast_refuses_the_hessian_strategy(demo, tmp_path):
    res = _train(demo, tmp_path / "h", "--fast", "--strategy", "hessian", "--store", str(tmp_path / "none.zarr"))
    assert res.exit_code == 1
    assert "hessian" in res.output and "--fast" in res.output and "compiled" in res.output
    assert "Traceback" not in res.output
