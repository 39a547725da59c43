"""`kdcache extract` on outputs it cannot use: an existing file, a folder that is not a store, a
read-only file system, a disk that fills up (then resumed once there is space)."""

from __future__ import annotations

import errno
import re

import pytest
from ..fs_faults import fail_writes
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.errors import StoreError
from kdcache.store import FeatureStore
from kdcache.store.lock import lock_path

from .conftest import assert_stores_equal, painn_cli_args


def _last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_is_an_existing_file(mol_lmdb, painn_ckpt, tmp_path, overwrite):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    args = painn_cli_args(mol_lmdb, painn_ckpt, out) + (["--overwrite"] if overwrite else [])
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1
    assert _last_line(res) == f"error: --out {out}: an existing file is there, where a folder is needed; choose another path"
    assert out.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_never_deletes_a_folder_that_is_not_a_store(mol_lmdb, painn_ckpt, tmp_path):
    out = tmp_path / "results"
    (out / "paper.tex").parent.mkdir()
    (out / "paper.tex").write_text("months of work")
    res = CliRunner().invoke(app, painn_cli_args(mol_lmdb, painn_ckpt, out) + ["--overwrite"])
    assert res.exit_code == 1
    assert _last_line(res) == (f"error: {out} is a folder but not a feature store; --overwrite replaces only stores: "
                               "remove it yourself or choose another --out")
    assert (out / "paper.tex").read_text() == "months of work"


def test_an_empty_folder_becomes_the_store(painn_ref_store, mol_lmdb, painn_ckpt, tmp_path):
    out = tmp_path / "made_by_hand.zarr"
    out.mkdir()
    res = CliRunner().invoke(app, painn_cli_args(mol_lmdb, painn_ckpt, out))
    assert res.exit_code == 0, res.output
    assert_stores_equal(out, painn_ref_store)


def test_read_only_file_system(mol_lmdb, painn_ckpt, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    fail_writes(monkeypatch, ro, errno.EROFS)
    res = CliRunner().invoke(app, painn_cli_args(mol_lmdb, painn_ckpt, ro / "s.zarr"))
    assert res.exit_code == 1
    assert _last_line(res) == (f"error: cannot write {lock_path(ro / 's.zarr')}: Read-only file system "
                               "(choose an output on a writable file system)")
    assert "Traceback" not in res.output and not any(ro.iterdir())


def test_full_disk_then_resume(painn_ref_store, mol_lmdb, painn_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "disk" / "s.zarr"
    args = painn_cli_args(mol_lmdb, painn_ckpt, out)
    # room for the empty store and a few groups, not for all of them
    stored = sum(p.stat().st_size for p in painn_ref_store.rglob("*") if p.is_file())
    fail_writes(monkeypatch, out.parent, errno.ENOSPC, capacity=int(0.8 * stored))
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1
    assert _last_line(res) == (f"error: cannot write {out}: No space left on device "
                               "(free some space, then run the same command again)")
    assert "Traceback" not in res.output
    if out.exists():  # nothing half-written presents itself as complete
        with pytest.raises(StoreError, match="incomplete"):
            FeatureStore.open(out)
    monkeypatch.undo()  # space freed
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    written = int(re.search(r"(\d+) group\(s\) written", res.output).group(1))
    assert 0 < written < 7  # it resumed: the groups in before the disk filled were kept
    assert_stores_equal(out, painn_ref_store)
    assert not list(out.rglob("*.partial"))  # the torn shard file was cleared away
    verified = CliRunner().invoke(app, ["store", "verify", str(out), "--data", str(mol_lmdb)])
    assert verified.exit_code == 0, verified.output
