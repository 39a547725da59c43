"""Extraction across processes: `kill -9` then resume, and two gloo ranks under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kdcache.errors import StoreError
from kdcache.store import FeatureStore
from kdcache.store.writer import PROGRESS_DIR

from .test_stats import assert_stats_match_stored_arrays
from .conftest import REPO, SLOW_WRITES, assert_stores_equal, painn_cli_args, run_cli


def test_kill_9_then_resume_equals_uninterrupted(painn_ref_store, mol_lmdb, painn_ckpt, tmp_path):
    out = tmp_path / "killed.zarr"
    args = painn_cli_args(mol_lmdb, painn_ckpt, out)
    proc = subprocess.Popen([sys.executable, str(SLOW_WRITES), "0.4", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = out / PROGRESS_DIR
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # wait until at least two groups are in, then kill
            if progress.is_dir() and len(list(progress.glob("group-*.npz"))) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"extraction ended before it could be killed: {proc.stderr.read().decode()}")
            time.sleep(0.05)
        else:
            pytest.fail("no progress within 120 s")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(out)
    # the same command again continues and finishes
    r = run_cli(*args)
    assert "group(s) written" in r.stdout
    assert_stores_equal(out, painn_ref_store)
    assert not (out / PROGRESS_DIR).exists()


def test_two_gloo_ranks_equal_single_process(painn_ref_store, mol_lmdb, painn_ckpt, tmp_path):
    out = tmp_path / "two.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "kdcache.cli.main", *painn_cli_args(mol_lmdb, painn_ckpt, out)]
    # same intra-op threads as the reference run (torchrun would set 1): CPU reductions may
    # group differently with another thread count, and the comparison is bit for bit
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = FeatureStore.open(out)
    assert store.provenance["extraction"]["world_size"] == 2
    assert_stores_equal(out, painn_ref_store)
    assert_stats_match_stored_arrays(out)
