"""`kdcache extract --teacher ase:MODULE:FACTORY[:JSON]`: any ASE calculator as a teacher. Its
stored values are the calculator's own, a partial run resumes (with another --workers) to the
same store, `kdcache store verify` passes, and a spec is taken from the command line only."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache import keys as K
from kdcache.errors import ConfigError, StoreError
from kdcache.store import FeatureStore
from kdcache.data import open_dataset
from kdcache.store.extract import extract
from kdcache.store.writer import StoreWriter
from kdcache.teachers.calculator import CalculatorSpec

from .conftest import LAYOUT, crash_on_group_write, assert_stores_equal, write_molecules

EMT = "ase:ase.calculators.emt:EMT"


def kdcache(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.output, [line for line in res.output.splitlines() if line.startswith("error:")]


def cli_extract(data, out, *extra):
    return kdcache("extract", "--teacher", EMT, "--data", data, "--out", out, "--label-dtype", "float64",
                   "--shard-atoms", LAYOUT["shard_atoms"], "--chunk-atoms", LAYOUT["chunk_atoms"], "--no-progress",
                   *extra)


def api_extract(data, out, **kw):
    return extract(data, out, teacher=CalculatorSpec.parse(EMT), label_dtype="float64", progress=False, **LAYOUT, **kw)


@pytest.fixture(scope="module")
def emt_data(tmp_path_factory):
    """10 small H/C/N/O molecules (EMT has parameters for these)."""
    return write_molecules(tmp_path_factory.mktemp("emt") / "mol.lmdb", n=10, seed=2)


@pytest.fixture(scope="module")
def emt_store(emt_data):
    out = emt_data.parent / "emt.zarr"
    code, text, _ = cli_extract(emt_data, out)
    assert code == 0, text
    return out


def direct(calc, sample):
    """The calculator run by hand on a sample's structure (as the dataset gives it)."""
    from ase import Atoms

    atoms = Atoms(numbers=sample[K.ATOMIC_NUMBERS].numpy(), positions=sample[K.POSITIONS].double().numpy(),
                  cell=sample[K.CELL].double().reshape(3, 3).numpy(), pbc=sample[K.PBC].reshape(-1).numpy())
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_potential_energies()


def test_stored_values_are_emts_own(emt_store, emt_data):
    from ase.calculators.emt import EMT as Emt

    ds = open_dataset(emt_data)
    store = FeatureStore.open(emt_store, dataset=ds)
    assert store.feature_keys == (K.ATOM_ENERGY, K.FORCES, K.ENERGY)
    calc = Emt()
    want = [direct(calc, ds[i]) for i in range(len(ds))]
    # stored bit for bit in float64 (--label-dtype float64)
    np.testing.assert_array_equal(store.energy, [w[0] for w in want])
    np.testing.assert_array_equal(stored_rows(emt_store, K.FORCES), np.concatenate([w[1] for w in want]))
    np.testing.assert_array_equal(stored_rows(emt_store, K.ATOM_ENERGY), np.concatenate([w[2] for w in want]))
    assert abs(want[0][0]) > 0.1 and np.abs(want[0][1]).max() > 0.1  # not a trivial zero
    # and training reads them (float32) through the store's reader
    got = store.read(list(range(len(ds))))
    np.testing.assert_array_equal(got[K.FORCES].numpy(), np.concatenate([w[1] for w in want]).astype(np.float32))


def stored_rows(path, key):
    """Every sample's rows of ``key`` as stored (float64), in sample order, padding left out."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    values = root[key][:]
    return np.concatenate([values[a : a + n] for a, n in zip(root["atom_start"][:], root["natoms"][:])])


def test_provenance_and_verify(emt_store, emt_data):
    import ase

    teacher = FeatureStore.open(emt_store).provenance["teacher"]
    assert teacher["name"] == EMT and teacher["kind"] == "ase_calculator" and teacher["checkpoint"] is None
    cfg = teacher["config"]
    assert (cfg["module"], cfg["factory"], cfg["kwargs"]) == ("ase.calculators.emt", "EMT", {})
    assert cfg["calculator"] == "ase.calculators.emt.EMT" and "energies" in cfg["implemented_properties"]
    assert (cfg["package"], cfg["version"]) == ("ase", ase.__version__) and len(cfg["module_sha256"]) == 64
    code, text, _ = kdcache("store", "verify", emt_store, "--data", emt_data)
    assert code == 0 and text.strip().endswith("OK"), text
    code, text, _ = kdcache("store", "info", emt_store)
    assert code == 0 and f"teacher     {EMT} {{}} (ase {ase.__version__})" in text, text


def test_partial_run_resumes_with_other_workers(emt_store, emt_data, tmp_path, monkeypatch):
    out = tmp_path / "partial.zarr"
    restore = crash_on_group_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        api_extract(emt_data, out)
    restore()
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(out)
    groups = StoreWriter.open(out).layout.num_groups
    assert len(StoreWriter.open(out).done_groups()) == 2
    # the values do not depend on the number of processes: resume in two worker processes
    code, text, _ = cli_extract(emt_data, out, "--workers", 2)
    assert code == 0, text
    assert f"{groups - 2} group(s) written" in text
    assert_stores_equal(out, emt_store)
    # other calculator arguments are other values: refused, naming the teacher
    with pytest.raises(StoreError, match="different settings.*teacher"):
        extract(emt_data, out, teacher=CalculatorSpec.parse(EMT + ':{"asap_cutoff": true}'), label_dtype="float64",
                progress=False, **LAYOUT)


def test_spec_as_a_string_setting_is_refused(emt_data, tmp_path):
    # a recipe's teacher.preset reaches extract() as a string: it must never import a module
    with pytest.raises(ConfigError, match="taken only from the command line"):
        extract(emt_data, tmp_path / "s.zarr", teacher=EMT, progress=False)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("teacher, features, message", [
    ("ase:no_such_module_kd:Calc", None, "cannot import 'no_such_module_kd' (ModuleNotFoundError"),
    (EMT + ":{bad", None, "the keyword arguments are not JSON"),
    (EMT + ":[1]", None, "must be a JSON object"),
    ("ase:ase.calculators.emt:NoSuch", None, "ase.calculators.emt has no 'NoSuch'"),
    ("ase:ase.calculators.singlepoint:SinglePointCalculator", None,
     "SinglePointCalculator(**{}) failed (TypeError"),
    ("ase:json:JSONDecoder", None, "gave a JSONDecoder, not an ASE calculator"),
    (EMT, "node", "cannot give ['node']: it offers ['atom_energy', 'outputs']"),
], ids=["module", "json", "not-an-object", "factory", "call", "not-a-calculator", "feature"])
def test_bad_specs_are_named(emt_data, tmp_path, teacher, features, message):
    out = tmp_path / "bad.zarr"
    args = ["extract", "--teacher", teacher, "--data", emt_data, "--out", out, "--no-progress"]
    code, text, errors = kdcache(*args, *(["--features", features] if features else []))
    assert code == 1 and len(errors) == 1 and message in errors[0], text
    assert not out.exists()


def test_calculator_failure_names_the_sample(tmp_path):
    from ase import Atoms

    from kdcache.data.lmdb_writer import atoms_to_record, write_lmdb

    frames = [Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.2]], cell=np.eye(3) * 8),
              Atoms("FeO", positions=[[0, 0, 0], [0, 0, 1.8]], cell=np.eye(3) * 8)]  # EMT knows no Fe
    data = tmp_path / "fe.lmdb"
    write_lmdb(data, [atoms_to_record(a) for a in frames])
    code, text, errors = kdcache("extract", "--teacher", EMT, "--data", data, "--out", tmp_path / "fe.zarr",
                                 "--no-progress")
    assert code == 1 and errors == [f"error: file {data}, sample 1: calculator teacher {EMT} failed: "
                                    "NotImplementedError: No EMT-potential for Fe"], text


def test_gfn2_xtb_through_tblite(tmp_path):
    tblite_ase = pytest.importorskip("tblite.ase")
    from ase.build import molecule

    from kdcache.data.lmdb_writer import atoms_to_record, write_lmdb

    frames = []
    for name in ("H2O", "CH4"):
        atoms = molecule(name)
        atoms.set_cell(np.eye(3) * 10.0)
        atoms.center()
        frames.append(atoms)
    data = tmp_path / "mol.lmdb"
    write_lmdb(data, [atoms_to_record(a) for a in frames])
    out = tmp_path / "xtb.zarr"
    code, text, _ = kdcache("extract", "--teacher", 'ase:tblite.ase:TBLite:{"method": "GFN2-xTB", "verbosity": 0}',
                            "--data", data, "--out", out, "--label-dtype", "float64", "--no-progress")
    assert code == 0, text
    ds = open_dataset(data)
    store = FeatureStore.open(out, dataset=ds)
    calc = tblite_ase.TBLite(method="GFN2-xTB", verbosity=0)
    want = [direct(calc, ds[i]) for i in range(2)]
    # tight, not bitwise: tblite's OpenMP sums may group differently from run to run
    np.testing.assert_allclose(store.energy, [w[0] for w in want], rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(stored_rows(out, K.FORCES), np.concatenate([w[1] for w in want]), atol=1e-7)
    np.testing.assert_allclose(stored_rows(out, K.ATOM_ENERGY), np.concatenate([w[2] for w in want]), atol=1e-7)
    assert store.provenance["teacher"]["config"]["kwargs"] == {"method": "GFN2-xTB", "verbosity": 0}
    assert -200 < store.energy[0] < -100  # GFN2-xTB's water: about -138 eV
