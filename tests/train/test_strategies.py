"""Strategy parsing, student maps, losses and refusals (no training)."""

from __future__ import annotations

import pytest
import torch

from kdcache import keys as K
from kdcache.errors import ConfigError
from kdcache.train.data import JoinedDataset, random_rotation, rotate_sample, target_key
from kdcache.train.objective import DistillationObjective
from kdcache.train.strategies import (
    Term,
    build_map,
    check_student,
    force_l2mae,
    parse_strategy,
    resolve_store_keys,
)


def test_parse_strategy_forms():
    assert parse_strategy("v2v", 100.0) == [Term("v2v", 100.0)]
    assert parse_strategy("none") == []
    assert parse_strategy("n2n:100,v2v:10") == [Term("n2n", 100.0), Term("v2v", 10.0)]
    assert parse_strategy(["n2n:2", {"v2v": 3}, {"name": "vanilla2", "weight": 4}]) == [
        Term("n2n", 2.0), Term("v2v", 3.0), Term("vanilla2", 4.0)]
    assert parse_strategy(["e2n"], default_weight=7) == [Term("e2n", 7.0)]
    for bad in ("foo", "n2n:x", "n2n,n2n", "v2v:-1"):
        with pytest.raises(ConfigError):
            parse_strategy(bad)


def test_store_key_resolution_and_refusals():
    gemnet_keys = (K.NODE, K.E2N, K.E2V, K.ENERGY, K.FORCES, K.ATOM_ENERGY)
    painn_keys = (K.NODE, K.VECTOR, K.ENERGY, K.FORCES, K.ATOM_ENERGY)
    terms = parse_strategy("v2v,n2n,vanilla1,vanilla2")
    got = resolve_store_keys(terms, gemnet_keys, teacher_name="gemnet_oc")
    assert got == {"v2v": (K.E2V,), "n2n": (K.NODE,), "vanilla1": (K.ENERGY, K.FORCES), "vanilla2": (K.ATOM_ENERGY,)}
    assert resolve_store_keys(parse_strategy("v2v"), painn_keys, teacher_name="painn") == {"v2v": (K.VECTOR,)}
    with pytest.raises(ConfigError, match="e2n"):  # a PaiNN store has no edge features
        resolve_store_keys(parse_strategy("e2n"), painn_keys, teacher_name="painn")
    with pytest.raises(ConfigError, match="vanilla1"):
        resolve_store_keys(parse_strategy("vanilla1"), (K.NODE, K.ENERGY), teacher_name="gemnet_oc")
    with pytest.raises(ConfigError, match="--store"):
        resolve_store_keys(parse_strategy("n2n"), None)
    assert resolve_store_keys([], None) == {}


def test_student_refusals():
    from kdcache.models.presets import build_preset

    schnet = build_preset("schnet-tiny")
    with pytest.raises(ConfigError, match="vector"):
        check_student(parse_strategy("v2v"), schnet)
    check_student(parse_strategy("n2n,e2n,vanilla1,vanilla2"), schnet)  # fine
    with pytest.raises(ConfigError, match="identity"):
        build_map("scalar", "identity", 16, 32, term="n2n")
    with pytest.raises(ConfigError, match="scalar"):
        build_map("vector", "mlp", 16, 32, term="v2v")
    assert isinstance(build_map("scalar", "identity", 8, 8), torch.nn.Identity)


def test_vector_map_is_bias_free_and_equivariant():
    torch.manual_seed(0)
    m = build_map("vector", "linear", 5, 7)
    assert [n for n, _ in m.named_parameters()] == ["linear.weight"]
    x = torch.randn(4, 3, 5)
    rot = random_rotation(torch.Generator().manual_seed(1), torch.float32)
    rotated_then_mapped = m(torch.einsum("ij,ajd->aid", rot, x))
    mapped_then_rotated = torch.einsum("ij,ajd->aid", rot, m(x))
    torch.testing.assert_close(rotated_then_mapped, mapped_then_rotated, atol=1e-5, rtol=1e-5)


def test_force_l2mae_uses_free_atoms_only():
    pred = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    true = torch.zeros(3, 3)
    assert force_l2mae(pred, true).item() == pytest.approx((5 + 0 + 1) / 3)
    free = torch.tensor([True, False, True])
    assert force_l2mae(pred, true, free).item() == pytest.approx(3.0)


def test_unhandled_augmentation_is_refused(train_set):
    with pytest.raises(ConfigError, match="jitter"):
        JoinedDataset(train_set, None, (), augment=["jitter"])


def test_rotation_moves_targets_with_the_structure(train_set, store):
    joined = JoinedDataset(train_set, store, (K.VECTOR, K.E2V, K.FORCES, K.NODE), augment=["rotate"], seed=3)
    plain = JoinedDataset(train_set, store, (K.VECTOR, K.E2V, K.FORCES, K.NODE))
    a, b = joined[2], plain[2]
    # recover the rotation from positions (least squares) and check everything else follows it
    rot = torch.linalg.lstsq(b[K.POSITIONS].double(), a[K.POSITIONS].double()).solution.T
    torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=rot.dtype), atol=1e-5, rtol=0)
    turn = lambda t: torch.einsum("ij,aj...->ai...", rot.float(), t)  # noqa: E731
    for key in (K.VECTOR, K.E2V, K.FORCES):
        torch.testing.assert_close(a[target_key(key)], turn(b[target_key(key)]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[K.FORCES], turn(b[K.FORCES]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[target_key(K.NODE)], b[target_key(K.NODE)])  # invariant
    # same (seed, epoch, index) -> same rotation; another epoch -> another one
    torch.testing.assert_close(joined[2][K.POSITIONS], a[K.POSITIONS])
    joined.set_epoch(1)
    assert not torch.allclose(joined[2][K.POSITIONS], a[K.POSITIONS])


def test_v2v_loss_unchanged_when_batch_and_targets_rotate(train_set, store):
    """Equivariance of the student + student map: the v2v loss of a rotated batch (targets rotated
    along) equals the loss of the original batch."""
    from . import kd_helpers as H
    from kdcache.models.presets import build_preset
    from kdcache.train.data import collate

    torch.manual_seed(0)
    # no neighbour cap: with a cap, ties among equal distances of the lattice may be broken
    # differently after a rotation, which changes the graph, not the map under test
    student = build_preset(H.STUDENT, **{**H.STUDENT_OVERRIDES, "max_neighbors": 1000}).double()
    terms = parse_strategy("v2v", 1.0)
    objective = DistillationObjective(student, terms, {"v2v": (K.VECTOR,)},
                                      {"v2v": build_map("vector", "linear", 16, 16)}, "mse").double()
    keys = (K.VECTOR, K.FORCES)
    plain = JoinedDataset(train_set, store, keys)
    def as_double(samples):
        for s in samples:
            for k in (K.POSITIONS, K.CELL, K.FORCES, target_key(K.VECTOR), target_key(K.FORCES)):
                s[k] = s[k].double()
        return samples

    batch = collate(as_double(plain.__getitems__([0, 1])))
    rot = random_rotation(torch.Generator().manual_seed(5))
    samples = as_double(plain.__getitems__([0, 1]))
    for s in samples:
        rotate_sample(s, rot, keys)
    rotated = collate(samples)
    with torch.no_grad():
        l0, l1 = objective(batch), objective(rotated)
    assert l0["v2v"].item() > 0
    for name in ("v2v", "energy", "forces", "loss"):
        assert l1[name].item() == pytest.approx(l0[name].item(), rel=1e-8, abs=1e-12), name


class _Stub(torch.nn.Module):
    """A 'student' whose raw outputs are set by the test (with a real Normalizer)."""

    available_features = (K.NODE,)

    def __init__(self, out, mean, std):
        super().__init__()
        from kdcache.models.base import Normalizer

        self.out = out
        self.normalizer = Normalizer(mean, std)
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, batch, features=()):
        return {k: v * self.w for k, v in self.out.items()}


def test_teacher_labels_go_through_the_students_normalisation():
    """vanilla1/vanilla2 targets are physical (eV, eV/Å); the loss compares them in raw units."""
    from torch_geometric.data import Data

    mean, std = -10.0, 2.0
    natoms = torch.tensor([2, 1])
    t_energy = torch.tensor([-12.0, -6.0])  # eV
    t_forces = torch.tensor([[2.0, 0, 0], [0, 4.0, 0], [0, 0, 6.0]])  # eV/Å
    t_atom = torch.tensor([-7.0, -5.0, -6.0])  # eV, sums to the energies
    batch = Data(natoms=natoms, batch=torch.tensor([0, 0, 1]), energy=t_energy, forces=t_forces,
                 fixed=torch.tensor([False, False, True]))
    batch[target_key(K.ENERGY)], batch[target_key(K.FORCES)] = t_energy, t_forces
    batch[target_key(K.ATOM_ENERGY)] = t_atom
    raw = {K.ENERGY: (t_energy - mean) / std, K.FORCES: t_forces / std,
           K.ATOM_ENERGY: (t_atom - mean / natoms[batch.batch]) / std}
    terms = parse_strategy("vanilla1,vanilla2")
    keys = {"vanilla1": (K.ENERGY, K.FORCES), "vanilla2": (K.ATOM_ENERGY,)}
    parts = DistillationObjective(_Stub(raw, mean, std), terms, keys)(batch)
    for name in ("energy", "forces", "vanilla1", "vanilla2"):
        assert parts[name].item() == pytest.approx(0.0, abs=1e-6), name
    # wrong forces on the fixed atom only: no force loss; on a free atom: L2 error / std, averaged
    off = dict(raw)
    off[K.FORCES] = raw[K.FORCES] + torch.tensor([[0, 0, 0], [0, 0, 0], [9.0, 0, 0]])
    assert DistillationObjective(_Stub(off, mean, std), terms, keys)(batch)["vanilla1"].item() == pytest.approx(0.0, abs=1e-6)
    off[K.FORCES] = raw[K.FORCES] + torch.tensor([[3.0, 4.0, 0], [0, 0, 0], [0, 0, 0]])
    parts = DistillationObjective(_Stub(off, mean, std), terms, keys, force_coef=100.0)(batch)
    assert parts["vanilla1"].item() == pytest.approx(100.0 * 5.0 / 2)
    assert parts["forces"].item() == pytest.approx(5.0 / 2)


def test_each_strategy_has_its_own_default_lambda():
    from kdcache.train import TrainConfig
    from kdcache.train.strategies import STRATEGIES

    got = {t.name: t.weight for t in parse_strategy(",".join(STRATEGIES))}
    assert got == {name: spec.default_lambda for name, spec in STRATEGIES.items()}
    assert got["v2v"] == 30.0 and got["vanilla2"] == 100.0 and got["vanilla1"] == 1.0
    # --lambda still overrides for every strategy named without a weight; an explicit one wins
    assert [t.weight for t in parse_strategy("n2n,v2v:3", 0.5)] == [0.5, 3.0]
    assert TrainConfig(strategy="v2v").terms == [Term("v2v", 30.0)]
