"""Stage two through the command line: the teacher is never imported nor read; YAML + overrides."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from . import kd_helpers as H

BLOCKER = r'''
import sys, importlib.abc
BLOCKED = "kdcache.models.gemnet_oc"
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == BLOCKED or name.startswith(BLOCKED + "."):
            raise ImportError(f"teacher module {name} imported during training")
sys.meta_path.insert(0, Block())
sys.modules[BLOCKED] = None
from kdcache.cli.main import app
try:
    rc = app(sys.argv[1:], standalone_mode=False)
finally:
    loaded = sorted(m for m in sys.modules if m.startswith(BLOCKED) and sys.modules[m] is not None)
    print("TEACHER_MODULES", loaded, file=sys.stderr)
sys.exit(rc if isinstance(rc, int) else 0)
'''


def _run(args, cwd):
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_training_never_touches_the_teacher(tmp_path, demo, train_set, targets):
    teacher_ckpt = tmp_path / "teacher.pt"
    teacher_ckpt.write_bytes(b"teacher weights")
    store = H.write_store(tmp_path / "teacher.zarr", train_set, targets=targets, teacher_name="gemnet_oc",
                          teacher_checkpoint=teacher_ckpt)
    teacher_ckpt.unlink()  # a run that tried to read the teacher would fail
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "student": H.STUDENT, "student_overrides": H.STUDENT_OVERRIDES, "data": str(demo["train"]),
        "val": str(demo["val"]), "store": str(store), "strategy": ["v2v:10", {"n2n": 1}], "max_steps": 50,
        "batch_size": 4, "progress": False}))
    out = tmp_path / "run"
    res = _run(["train", "--config", str(config), "--max-steps", "2", "--lambda", "3", "--out", str(out), "--rotate"],
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "TEACHER_MODULES []" in res.stderr
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["max_steps"] == 2 and resolved["strategy"] == "v2v:10,n2n:1"  # CLI overrode the YAML
    assert resolved["augment"] == ["rotate"]
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,") and lines[1].startswith("2,")

    # evaluation of the trained student, JSON output
    res = _run(["eval", str(out / "best.pt"), "--data", str(demo["val"]), "--json", "--batch-size", "2"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"energy_mae", "force_mae", "force_cos", "efwt", "samples_per_s"} <= set(metrics)
    assert metrics["energy_mae"] > 0 and -1 <= metrics["force_cos"] <= 1 and metrics["samples_per_s"] > 0


def test_cli_refuses_with_a_message(tmp_path, demo):
    res = _run(["train", "--student", H.STUDENT, "--data", str(demo["train"]), "--strategy", "v2v",
                "--out", str(tmp_path / "r")], cwd=tmp_path)
    assert res.returncode == 1
    assert "error:" in res.stderr and "--store" in res.stderr
    assert "Traceback" not in res.stderr


# Long enough that the kill lands mid-run even on an idle machine (a tiny step takes ~20 ms).
MAX_STEPS = 60


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, demo, store_path):
    """SIGKILL a `kdcache train` process mid-run, re-run the same command: same final weights."""
    import os
    import signal
    import time

    import torch

    def command(out):
        return [sys.executable, "-m", "kdcache.cli.main", "train", "--student", H.STUDENT, "--data", str(demo["train"]),
                "--store", str(store_path), "--strategy", "v2v:10,vanilla1:1", "--max-steps", str(MAX_STEPS),
                "--batch-size", "2", "--checkpoint-every", "1", "--lr", "2e-3", "--out", str(out), "--no-progress"]

    config = tmp_path / "tiny.yaml"  # the tiny student's settings
    config.write_text(yaml.safe_dump({"student_overrides": H.STUDENT_OVERRIDES}))
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert subprocess.run(command(full) + ["--config", str(config)], capture_output=True, timeout=600).returncode == 0

    proc = subprocess.Popen(command(killed) + ["--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (killed / "last.pt").exists():
            try:
                step = torch.load(killed / "last.pt", weights_only=True)["extra"]["trainer_state"]["step"]
            except Exception:
                step = 0
            if step >= 2:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(killed / "last.pt", weights_only=True)["extra"]["trainer_state"]
    assert 2 <= state["step"] < MAX_STEPS, "the run finished before it could be killed"
    assert subprocess.run(command(killed) + ["--config", str(config)], capture_output=True, timeout=600).returncode == 0
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert b["extra"]["trainer_state"]["step"] == MAX_STEPS
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
