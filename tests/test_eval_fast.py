"""`kdcache eval --fast` gives the eager metrics to float32 round-off (the compiled model,
kdcache.models.fast), and its JSON stays valid when no batch is left to time."""

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
