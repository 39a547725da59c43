"""Every kind of bad input gives a DataError naming file, sample index and field; CLI exits 1."""

from __future__ import annotations

import math
import os
import pickle

import lmdb
import pytest
import torch
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.data import open_dataset
from kdcache.data.lmdb_writer import write_lmdb
from kdcache.errors import DataError

from .conftest import make_record

BAD_INDEX = 2  # the bad record sits in the middle: earlier samples read fine

N = 4
BAD_RECORDS = {
    "missing pos": ({"pos": None}, "pos"),
    "missing atomic_numbers": ({"atomic_numbers": None}, "atomic_numbers"),
    "missing cell": ({"cell": None}, "cell"),
    "nan pos": ({"pos": torch.tensor([[0.0, 0, 0], [1, math.nan, 0], [0, 1, 0], [1, 1, 1]])}, "pos"),
    "inf pos": ({"pos": torch.tensor([[0.0, 0, 0], [1, math.inf, 0], [0, 1, 0], [1, 1, 1]])}, "pos"),
    "inf cell": ({"cell": torch.tensor([[[math.inf, 0, 0], [0, 6.0, 0], [0, 0, 6.0]]])}, "cell"),
    "nan energy": ({"y": math.nan}, "energy"),
    "inf forces": ({"force": torch.full((N, 3), math.inf)}, "forces"),
    "natoms mismatch": ({"natoms": N + 1}, "natoms"),
    "element 0": ({"atomic_numbers": torch.tensor([29.0, 0.0, 29.0, 8.0])}, "atomic_numbers"),
    "element 119": ({"atomic_numbers": torch.tensor([29.0, 119.0, 29.0, 8.0])}, "atomic_numbers"),
    "element 8.5": ({"atomic_numbers": torch.tensor([29.0, 8.5, 29.0, 8.0])}, "atomic_numbers"),
    "empty structure": ({"pos": torch.zeros(0, 3), "atomic_numbers": torch.zeros(0), "natoms": 0,
                         "tags": torch.zeros(0), "fixed": torch.zeros(0), "force": torch.zeros(0, 3)}, "pos"),
    "forces [N,2]": ({"force": torch.zeros(N, 2)}, "forces"),
    "forces [N-1,3]": ({"force": torch.zeros(N - 1, 3)}, "forces"),
    "tags length": ({"tags": torch.zeros(N - 1, dtype=torch.long)}, "tags"),
    "fixed length": ({"fixed": torch.zeros(N + 2)}, "fixed"),
    "pos not [N,3]": ({"pos": torch.zeros(N, 2)}, "pos"),
}


def _write_with_bad(path, override, pyg1=False):
    recs = [make_record(n=N, seed=i) for i in range(4)]
    recs[BAD_INDEX] = make_record(n=N, seed=BAD_INDEX, **override)
    write_lmdb(path, recs, pyg1=pyg1)


def _cli(*args):
    result = CliRunner().invoke(app, list(args))
    text = result.output + (getattr(result, "stderr", "") if result.stderr_bytes is not None else "")
    return result.exit_code, text


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_bad_record(tmp_path, name):
    override, field = BAD_RECORDS[name]
    path = tmp_path / "bad.lmdb"
    _write_with_bad(path, override, pyg1=(name == "nan pos"))
    ds = open_dataset(path)
    ds[BAD_INDEX - 1]  # neighbours are fine
    with pytest.raises(DataError) as err:
        ds[BAD_INDEX]
    e = err.value
    assert (e.path, e.index, e.field) == (str(path), BAD_INDEX, field)
    msg = str(e)
    assert str(path) in msg and f"sample {BAD_INDEX}" in msg and repr(field) in msg

    code, text = _cli("data", "info", str(path))
    assert code == 1
    assert f"error: file {path}, sample {BAD_INDEX}, field {field!r}" in text


def test_allow_list_refuses_code(tmp_path):
    """A value whose pickle calls os.system is refused before anything runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.lmdb"
    write_lmdb(path, [make_record(seed=0)])
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        # the attack hidden inside an otherwise normal Data object
        txn.put(b"0", pickle.dumps(make_record(seed=0, tags=Evil()), protocol=-1))
    env.close()
    ds = open_dataset(path)
    with pytest.raises(DataError) as err:
        ds[0]
    assert err.value.index == 0 and err.value.path == str(path)
    assert "system" in str(err.value) and "allow-list" in str(err.value)
    assert not marker.exists()

    code, text = _cli("data", "info", str(path))
    assert code == 1 and f"error: file {path}, sample 0" in text and "allow-list" in text
    assert not marker.exists()


@pytest.mark.parametrize("qualname", [("builtins", "eval"), ("subprocess", "Popen"), ("torch", "load"),
                                      ("torch.serialization", "load"), ("numpy", "load")])
def test_allow_list_globals(qualname):
    from kdcache.data.safe_pickle import safe_loads

    payload = b"\x80\x04c" + f"{qualname[0]}\n{qualname[1]}\n".encode() + b"."
    with pytest.raises(DataError, match="allow-list"):
        safe_loads(payload, "f.lmdb", 7)


def test_corrupt_value(tmp_path):
    path = tmp_path / "c.lmdb"
    write_lmdb(path, [make_record(seed=i) for i in range(3)])
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"1", txn.get(b"1")[:50])  # a cut-off pickle
    env.close()
    with pytest.raises(DataError) as err:
        open_dataset(path)[1]
    assert err.value.index == 1 and "unpickle" in str(err.value)


def test_length_key_beyond_entries(tmp_path):
    path = tmp_path / "short.lmdb"
    write_lmdb(path, [make_record(seed=i) for i in range(3)])
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"length", pickle.dumps(5))
    env.close()
    ds = open_dataset(path)
    assert len(ds) == 5
    with pytest.raises(DataError, match="missing") as err:
        ds[4]
    assert err.value.index == 4


def test_truncated_lmdb(tmp_path):
    path = tmp_path / "trunc.lmdb"
    write_lmdb(path, [make_record(n=40, seed=i) for i in range(60)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated|not a readable|corrupt") as err:
        open_dataset(path)
    assert err.value.path == str(path)
    code, text = _cli("data", "info", str(path))
    assert code == 1 and f"error: file {path}" in text


@pytest.mark.parametrize("content", [b"", b"garbage" * 1000, os.urandom(20000)])
def test_not_an_lmdb(tmp_path, content):
    path = tmp_path / "junk.lmdb"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        open_dataset(path)[0]
    assert err.value.path == str(path)


def test_missing_path_and_unknown_kind(tmp_path):
    with pytest.raises(DataError, match="no such"):
        open_dataset(tmp_path / "none.lmdb")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown dataset kind"):
        open_dataset(tmp_path / "x.csv")
    code, text = _cli("data", "info", str(tmp_path / "nothing.lmdb"))
    assert code == 1 and "error: file" in text
