"""`kdcache eval --fast` gives the eager metrics to float32 round-off (the compiled model,
kdcache.models.fast), and its JSON stays valid when no batch is left to time. By default (auto)
a small set runs eagerly and says nothing; one whose eager time pays for a compile runs compiled,
and says so on stderr."""

import json

from typer.testing import CliRunner

from kdcache.cli.main import app


def test_eval_fast_matches_eager(tmp_path):
    runner = CliRunner()
    data = tmp_path / "demo"
    assert runner.invoke(app, ["data", "demo", str(data), "--num-train", "8", "--num-val", "4",
                               "--num-test", "6"]).exit_code == 0
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--student", "painn-tiny", "--data", str(data / "train.lmdb"),
                              "--max-steps", "2", "--batch-size", "4", "--out", str(run), "--no-progress"])
    assert res.exit_code == 0, res.output
    args = ["eval", str(run / "last.pt"), "--data", str(data / "test.lmdb"), "--json", "--batch-size", "3"]
    eager = json.loads(runner.invoke(app, args).output)
    fast = json.loads(runner.invoke(app, args + ["--fast"]).output)
    assert eager["num_samples"] == fast["num_samples"] == 6
    for k in ("energy_mae", "force_mae", "force_cos"):
        assert abs(fast[k] - eager[k]) <= 1e-4 * max(1.0, abs(eager[k])), (k, fast[k], eager[k])
    assert fast["energy_mae"] > 0  # a real comparison, not two empty sets
    assert eager["fast"] is False and fast["fast"] is True


def test_eval_auto_weighs_the_eager_time(tmp_path, monkeypatch):
    from kdcache.models import fast as F
    from kdcache.models import fast_auto as A

    runner = CliRunner()
    data = tmp_path / "demo"
    assert runner.invoke(app, ["data", "demo", str(data), "--num-train", "8", "--num-val", "2",
                               "--num-test", "4"]).exit_code == 0
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--student", "painn-tiny", "--data", str(data / "train.lmdb"), "--max-steps",
                               "1", "--batch-size", "4", "--out", str(run), "--no-progress"]).exit_code == 0
    args = ["eval", str(run / "last.pt"), "--data", str(data / "test.lmdb"), "--json", "--batch-size", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and json.loads(res.stdout)["fast"] is False and not res.stderr
    made = []
    monkeypatch.setattr(A, "MIN_BATCHES", 4)
    monkeypatch.setattr(A, "eager_batch_seconds", lambda run, device: 100.0)  # 4 x 100 s eager: pays
    monkeypatch.setattr(F, "fast_model", lambda m: made.append(m) or m)  # no compile in this test
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and json.loads(res.stdout)["fast"] is True and made
    assert "eval: fast path: on (auto: 4 batches x 100000 ms eager" in res.stderr
    res = runner.invoke(app, args + ["--no-fast"])
    assert json.loads(res.stdout)["fast"] is False and not res.stderr
