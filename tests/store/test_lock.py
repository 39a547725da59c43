"""One writer per store: the write lock, two `kdcache extract` on one --out, dead writers' leftovers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.errors import StoreError
from kdcache.store.extract import extract
from kdcache.store.lock import WriteLock, lock_path, read_holder
from kdcache.store.writer import PROGRESS_DIR, StoreWriter

from .conftest import PAINN_ARGS, REPO, SLOW_WRITES, assert_stores_equal, painn_cli_args


def test_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
    target = tmp_path / "sub" / "s.zarr"  # neither the store nor its folder exists yet
    first = WriteLock(target).acquire()
    holder = read_holder(lock_path(target))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    # flock conflicts between two open files even within one process
    with pytest.raises(StoreError) as exc:
        WriteLock(target).acquire()
    msg = str(exc.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()} since {holder['since']}" in msg
    assert str(target) in msg and "\n" not in msg
    first.release()
    assert not lock_path(target).exists()  # a clean exit leaves nothing behind
    with WriteLock(target) as again:
        assert again.held
    assert not lock_path(target).exists()


def test_lock_of_a_killed_holder_is_reclaimed(tmp_path):
    target = tmp_path / "s.zarr"
    code = ("import sys, time; from kdcache.store.lock import WriteLock; "
            f"WriteLock({str(target)!r}).acquire(); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=f"pid {proc.pid} "):
            WriteLock(target).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert lock_path(target).exists()  # the dead holder's file stays, its flock does not
        with WriteLock(target):
            assert read_holder(lock_path(target))["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait()


def test_two_extract_commands_on_one_store(painn_ref_store, mol_lmdb, painn_ckpt, tmp_path):
    out = tmp_path / "both.zarr"
    args = painn_cli_args(mol_lmdb, painn_ckpt, out)
    # 1 s after each of the 7 groups: the first is still writing when the second arrives
    first = subprocess.Popen([sys.executable, str(SLOW_WRITES), "1.0", *args], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while (read_holder(lock_path(out)) or {}).get("pid") != first.pid:  # not a fixed sleep
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first extraction never took the lock"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "kdcache.cli.main", *args], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert first.poll() is None, "the first extraction ended before the second one could be refused"
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: {out} is being written by pid {first.pid} on host {socket.gethostname()} since "
            f"{read_holder(lock_path(out))['since']} (lock {lock_path(out)}); wait for it to finish or stop it, "
            "then run the command again")
        assert "Traceback" not in second.stderr
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, stderr
    assert_stores_equal(out, painn_ref_store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.zarr"]  # no lock, no .creating-PID
    runner = CliRunner()
    verified = runner.invoke(app, ["store", "verify", str(out), "--data", str(mol_lmdb)])
    assert verified.exit_code == 0, verified.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "already complete (14 samples); nothing to do" in again.output


def test_leftovers_of_a_dead_writer_are_removed(painn_ref_store, mol_lmdb, painn_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "left.zarr"
    real_write_group = StoreWriter.write_group
    calls = []

    def dies_after_two(self, g, *a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the process were stopped mid-run
        calls.append(g)
        return real_write_group(self, g, *a, **kw)

    monkeypatch.setattr(StoreWriter, "write_group", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(mol_lmdb, out, checkpoint=str(painn_ckpt), progress=False, **PAINN_ARGS)
    monkeypatch.undo()
    assert not lock_path(out).exists()  # released on the way out
    # what writers killed at a bad moment leave: a store being created, a shard and a marker
    # half-written under their temporary names
    creating = tmp_path / f".{out.name}.creating-999999"
    (creating / "node").mkdir(parents=True)
    shard = next(p for p in (out / "node").rglob("*") if p.is_file())
    partial = shard.with_name(shard.name + ".424242.partial")
    partial.write_bytes(b"torn")
    marker_tmp = out / PROGRESS_DIR / "group-00000005.npz.424242.tmp"
    marker_tmp.write_bytes(b"torn")

    res = extract(mol_lmdb, out, checkpoint=str(painn_ckpt), progress=False, **PAINN_ARGS)
    assert res.resumed and res.groups_written == 5
    assert not creating.exists() and not partial.exists() and not marker_tmp.exists()
    assert_stores_equal(out, painn_ref_store)


def test_a_torchrun_job_is_refused_by_its_rank_0(mol_lmdb, painn_ckpt, tmp_path):
    out = tmp_path / "taken.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "kdcache.cli.main", *painn_cli_args(mol_lmdb, painn_ckpt, out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    with WriteLock(out):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0  # both ranks stop (none waits for the other), so torchrun returns
    assert f"error: {out} is being written by pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
    assert f"error: rank 0 could not lock {out}: StoreError: {out} is being written by pid {os.getpid()}" in proc.stderr
    assert not out.exists()
