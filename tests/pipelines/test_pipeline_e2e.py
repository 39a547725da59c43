"""A tiny recipe end to end: demo data -> tiny GemNet-OC teacher -> store -> PaiNN students ->
eval -> report. The report's numbers must equal a separate `kdcache eval` of the same checkpoints;
a second run must skip every stage; adding a strategy must run only that student."""

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.pipeline.report import read_csv
from kdcache.pipeline.runner import run_pipeline

TINY = {
    "name": "tiny",
    "device": "cpu",
    "data": {"demo": {"num_train": 8, "num_val": 4, "num_test": 4, "seed": 0}},
    "teacher": {"preset": "gemnet-oc-tiny", "train": {"max_steps": 2, "batch_size": 4, "progress": False,
                                                      "deterministic": False}},  # GemNet-OC: ~30x faster on CPU
    "store": {"dtype": "float32", "batch_size": 4},
    "students": {"preset": "painn-tiny", "train": {"max_steps": 2, "batch_size": 4, "eval_every": 1,
                                                   "progress": False}},
    "strategies": [{"name": "n2n", "lambda": 1.0}],
    "eval": {"batch_size": 4},
    "report": {"cka_samples": 4, "parity_samples": 4},
}


@pytest.mark.slow
def test_tiny_recipe_end_to_end(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    logs: list[str] = []
    first = run_pipeline(recipe, out=out, log=logs.append)
    assert first.ran == ["data (demo)", "teacher (train)", "store (extract teacher features)",
                         "student baseline (no distillation)", "student n2n (n2n (λ=1))", "eval teacher (test split)",
                         "eval baseline (test split)", "eval n2n (test split)",
                         "throughput (inference, interleaved repeats)", "report"]
    assert (out / "store" / "teacher.zarr").is_dir()

    # the report's numbers are those of a separate `kdcache eval` of the same checkpoints
    rows = {r["run"]: r for r in read_csv(out / "report" / "report.csv")}
    assert set(rows) == {"teacher", "baseline", "n2n"}
    ckpts = {"teacher": out / "teacher" / "best.pt", "baseline": out / "students" / "baseline" / "best.pt",
             "n2n": out / "students" / "n2n" / "best.pt"}
    runner = CliRunner()
    evals = {}
    for name, ckpt in ckpts.items():
        res = runner.invoke(app, ["eval", str(ckpt), "--data", str(out / "data" / "test.lmdb"), "--json",
                                  "--batch-size", "4", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        evals[name] = json.loads(res.output.strip().splitlines()[-1])
        for key in ("energy_mae", "force_mae", "force_cos", "efwt"):
            assert float(rows[name][key]) == pytest.approx(evals[name][key], rel=1e-9, abs=1e-12), (name, key)
    for key in ("energy_mae", "force_mae"):
        t, b, d = (evals[n][key] for n in ("teacher", "baseline", "n2n"))
        gap = float(rows["n2n"][f"gap_closed_{key}"])
        if t < b:  # a gap to close
            assert gap == pytest.approx((b - d) / (b - t), rel=1e-9)
        else:
            assert np.isnan(gap)

    md = (out / "report" / "report.md").read_text()
    assert "| n2n (painn-tiny) | n2n (λ=1) |" in md
    for png in ("val_energy_mae.png", "parity.png", "cka.png"):
        assert (out / "report" / png).read_bytes()[:4] == b"\x89PNG"
    cka = np.loadtxt(out / "report" / "cka.csv", delimiter=",", skiprows=1)
    assert cka.shape == (2, 2) and np.all((cka > 0) & (cka <= 1 + 1e-9))
    assert any("share of the student-teacher gap closed" in line for line in logs)

    # a second run skips every stage and prints the same table
    logs2: list[str] = []
    second = run_pipeline(recipe, out=out, log=logs2.append)
    assert second.ran == []
    assert sum(line.startswith("skip: ") for line in logs2) == 10
    assert [r.metrics for r in second.rows] == [r.metrics for r in first.rows]

    # an interrupted stage resumes: the trainer continues from the run's last.pt (here: already at
    # its last step, so it only confirms), and nothing downstream changes
    stage = out / "students" / "n2n" / "stage.json"
    rec = json.loads(stage.read_text())
    stage.write_text(json.dumps({**rec, "status": "running"}))
    logs3: list[str] = []
    resumed = run_pipeline(recipe, out=out, log=logs3.append)
    assert resumed.ran == ["student n2n (n2n (λ=1))"] and "resume: student n2n (n2n (λ=1)) (interrupted earlier)" in logs3
    assert json.loads(stage.read_text())["status"] == "done"

    # adding a strategy trains only that student (plus its evaluation and the report)
    recipe.write_text(yaml.safe_dump({**TINY, "strategies": TINY["strategies"] + [{"name": "vanilla2", "lambda": 1.0}]}))
    third = run_pipeline(recipe, out=out, log=[].append)
    assert third.ran == ["student vanilla2 (vanilla2 (λ=1))", "eval vanilla2 (test split)", "report"]
    assert [r["run"] for r in read_csv(out / "report" / "report.csv")] == ["teacher", "baseline", "n2n", "vanilla2"]
