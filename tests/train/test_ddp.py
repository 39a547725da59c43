"""Two gloo processes under torchrun: same weights on both ranks, one writer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def test_two_process_ddp(tmp_path, demo, store_path):
    script = Path(__file__).with_name("ddp_script.py")
    out, weights = tmp_path / "run", tmp_path / "weights"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(script), str(demo["train"]), str(demo["val"]), str(store_path), str(out), str(weights)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                              "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    r0 = torch.load(f"{weights}.rank0.pt", weights_only=True)
    r1 = torch.load(f"{weights}.rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 3
    assert r0["batches"] == 2  # 8 samples, 2 per rank and step -> 2 steps per epoch
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # rank 0 alone wrote: one metrics row per validation (steps 2 and 3), no duplicates
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "3"]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    state = ckpt["extra"]["trainer_state"]
    assert state["world_size"] == 2 and state["step"] == 3
    for k, v in state["objective"].items():
        assert torch.equal(v, r0["state"][k]), k
