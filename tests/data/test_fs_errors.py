"""`kdcache data demo`, `kdcache data convert` and `kdcache train` on outputs they cannot use: an
existing file where a folder goes, a read-only file system, a full disk. One named error line,
exit 1, nothing half-written under a final name, and the same command works once there is room."""

from __future__ import annotations

import contextlib
import errno

import lmdb
from ..fs_faults import fail_writes
from typer.testing import CliRunner

from kdcache.cli.main import app

# what lmdb itself says (seen on a read-only and on a full tmpfs)
LMDB_READ_ONLY = "Read-only file system"
LMDB_FULL = "mdb_txn_commit: Input/output error"


class _EnvFailingCommits:
    """An LMDB environment whose write transactions fail at commit, as on a full disk."""

    def __init__(self, env):
        self._env = env

    def begin(self, write: bool = False, **kw):
        txn = self._env.begin(write=write, **kw)
        if not write:
            return txn

        @contextlib.contextmanager
        def failing():
            yield txn
            txn.abort()
            raise lmdb.Error(LMDB_FULL)

        return failing()

    def __getattr__(self, name):
        return getattr(self._env, name)


def lmdb_fails(monkeypatch, root, how: str) -> None:
    """LMDB files opened under ``root`` fail: ``"read-only"`` at open, ``"full"`` at commit."""
    real_open = lmdb.open

    def fake_open(path, *args, **kwargs):
        if not str(path).startswith(str(root)):
            return real_open(path, *args, **kwargs)
        if how == "read-only":
            raise lmdb.Error(f"{path}: {LMDB_READ_ONLY}")
        return _EnvFailingCommits(real_open(path, *args, **kwargs))

    monkeypatch.setattr(lmdb, "open", fake_open)


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return result.output.strip().splitlines()[-1]


DEMO = ["--num-train", "3", "--num-val", "1", "--num-test", "1", "--workers", "1"]


def test_demo_into_an_existing_file(tmp_path):
    out = tmp_path / "demo"
    out.write_text("not a folder")
    res = CliRunner().invoke(app, ["data", "demo", str(out), *DEMO])
    assert _error_line(res) == (f"error: demo folder {out}: an existing file is there, where a folder is needed; "
                                "choose another path")
    assert out.read_text() == "not a folder"


def test_demo_on_a_read_only_file_system(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()  # the read-only mount
    new = tmp_path / "ro" / "demo"  # a folder that would have to be made on it
    fail_writes(monkeypatch, tmp_path / "ro", errno.EROFS)
    res = CliRunner().invoke(app, ["data", "demo", str(new), *DEMO])
    assert _error_line(res) == (f"error: cannot write {new}: Read-only file system "
                                "(choose an output on a writable file system)")
    monkeypatch.undo()

    existing = tmp_path / "ro2"  # a folder that is there: the LMDB cannot be created in it
    existing.mkdir()
    lmdb_fails(monkeypatch, existing, "read-only")
    res = CliRunner().invoke(app, ["data", "demo", str(existing), *DEMO])
    assert _error_line(res) == (f"error: cannot write {existing / 'train.lmdb'}: Read-only file system "
                                "(choose an output on a writable file system)")
    assert not any(existing.iterdir())


def test_convert_into_a_folder(coll_file, tmp_path):
    dst = tmp_path / "out.lmdb"
    dst.mkdir()
    res = CliRunner().invoke(app, ["data", "convert", str(coll_file), str(dst)])
    assert _error_line(res) == f"error: file {dst}: destination must be a .lmdb file, not a folder"


def test_convert_onto_a_full_disk_then_again(coll_file, tmp_path, monkeypatch):
    dst = tmp_path / "full" / "coll.lmdb"
    lmdb_fails(monkeypatch, dst.parent, "full")
    res = CliRunner().invoke(app, ["data", "convert", str(coll_file), str(dst)])
    assert _error_line(res) == (f"error: {dst}: writing the LMDB failed ({LMDB_FULL}; a full disk can show as this)")
    assert not any(dst.parent.iterdir())  # neither the file nor its temporary
    monkeypatch.undo()
    res = CliRunner().invoke(app, ["data", "convert", str(coll_file), str(dst)])
    assert res.exit_code == 0, res.output
    assert f"wrote 2 samples to {dst}" in res.output


def _train_args(demo_dir, out):
    return ["train", "--student", "painn-tiny", "--data", str(demo_dir / "train.lmdb"), "--strategy", "none",
            "--max-steps", "2", "--batch-size", "4", "--device", "cpu", "--no-progress", "--out", str(out)]


def test_train_into_an_existing_file(demo_dir, tmp_path):
    out = tmp_path / "run"
    out.write_text("not a folder")
    res = CliRunner().invoke(app, _train_args(demo_dir, out))
    assert _error_line(res) == f"error: --out {out}: an existing file is there, where a folder is needed; choose another path"
    assert out.read_text() == "not a folder"


def test_train_onto_a_full_disk_then_again(demo_dir, tmp_path, monkeypatch):
    out = tmp_path / "disk" / "run"
    # room for the configuration and the metrics, not for a checkpoint
    fail_writes(monkeypatch, out.parent, errno.ENOSPC, capacity=20_000)
    res = CliRunner().invoke(app, _train_args(demo_dir, out))
    assert _error_line(res) == (f"error: cannot write {out}: No space left on device "
                                "(free some space, then run the same command again)")
    assert not [p.name for p in out.iterdir() if p.suffix in (".pt", ".tmp")]  # no torn checkpoint
    monkeypatch.undo()
    res = CliRunner().invoke(app, _train_args(demo_dir, out))
    assert res.exit_code == 0, res.output
    assert (out / "last.pt").is_file()
