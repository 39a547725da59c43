"""The contract the base class owns, with the same rules for every architecture: gradient modes
(what is detached, when gradient forces keep their graph), the feature hand-out, the input checks,
unknown constructor arguments, and which model module may import which."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Batch, Data

from kdcache import keys as K
from kdcache.errors import DataError
from kdcache.models.gemnet_oc import GemNetOC
from kdcache.models.presets import build_preset, preset_config
from kdcache.models.registry import build_model

#: (preset, overrides): every architecture, both force modes where it has two
CASES = [
    ("painn-tiny", {"hidden_channels": 8, "num_layers": 1, "num_rbf": 4}),
    ("painn-tiny", {"hidden_channels": 8, "num_layers": 1, "num_rbf": 4, "direct_forces": False}),
    ("schnet-tiny", {"hidden_channels": 8, "num_filters": 6, "num_interactions": 1, "num_gaussians": 4}),
    ("gemnet-oc-tiny", {"num_blocks": 1}),
    ("gemnet-oc-tiny", {"num_blocks": 1, "direct_forces": False}),
]
IDS = ["painn-direct", "painn-gradient", "schnet", "gemnet-oc-direct", "gemnet-oc-gradient"]


def _model(preset: str, overrides: dict):
    torch.manual_seed(0)
    return build_preset(preset, **overrides).double()


def _batch() -> Batch:
    """A 4-atom crystal and a 3-atom molecule (OC20-like tags, so GemNet-OC has quadruplets)."""
    g = torch.Generator().manual_seed(0)
    cell = torch.tensor([[4.0, 0.0, 0.0], [0.5, 4.2, 0.0], [0.0, 0.3, 4.4]], dtype=torch.float64)
    crystal = Data(pos=torch.rand(4, 3, generator=g, dtype=torch.float64) @ cell,
                   atomic_numbers=torch.tensor([29, 29, 8, 1]), cell=cell[None],
                   pbc=torch.ones(1, 3, dtype=torch.bool), natoms=torch.tensor([4]), tags=torch.tensor([1, 1, 2, 2]))
    molecule = Data(pos=torch.tensor([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [0.0, 1.2, 0.3]], dtype=torch.float64),
                    atomic_numbers=torch.tensor([6, 8, 1]), cell=torch.zeros(1, 3, 3, dtype=torch.float64),
                    pbc=torch.zeros(1, 3, dtype=torch.bool), natoms=torch.tensor([3]), tags=torch.tensor([2, 2, 2]))
    return Batch.from_data_list([crystal, molecule])


@pytest.mark.parametrize("preset, overrides", CASES, ids=IDS)
def test_gradient_modes_follow_one_rule(preset, overrides):
    """Detached exactly when the caller cannot differentiate; the forces' graph kept when it can."""
    model, batch = _model(preset, overrides).eval(), _batch()
    feats = model.available_features
    with torch.no_grad():
        ref = model(batch, features=feats)
    assert ref[K.FORCES].shape == (7, 3) and float(ref[K.FORCES].abs().max()) > 0
    assert not any(v.requires_grad for v in ref.values())

    # trainable weights, grad on (eval mode too): forces differentiable w.r.t. the weights
    out = model(batch, features=feats)
    assert out[K.FORCES].requires_grad and out[K.ENERGY].requires_grad
    weight = next(p for p in model.parameters() if p.requires_grad)
    (g,) = torch.autograd.grad(out[K.FORCES].square().sum(), weight, allow_unused=True)
    assert g is not None and bool(torch.isfinite(g).all())
    for key in ref:
        assert torch.allclose(out[key].detach().to(ref[key].dtype), ref[key], rtol=1e-12, atol=1e-12), key

    # frozen weights, positions without grad (stage one): nothing to differentiate, all detached
    model.requires_grad_(False)
    frozen = model(batch, features=feats)
    assert not any(v.requires_grad for v in frozen.values())
    assert torch.allclose(frozen[K.FORCES], ref[K.FORCES], rtol=1e-12, atol=1e-12)

    # the caller's own positions: forces are -dE/dpos w.r.t. exactly those
    batch.pos = batch.pos.clone().requires_grad_(True)
    out = model(batch)
    if model.gradient_forces:
        (grad,) = torch.autograd.grad(out[K.ENERGY].sum(), batch.pos)
        torch.testing.assert_close(out[K.FORCES], -grad)
    else:
        assert out[K.FORCES].requires_grad  # the direct head depends on the positions too


@pytest.mark.parametrize("preset, overrides", CASES, ids=IDS)
def test_features_are_handed_out_only_on_request(preset, overrides):
    model, batch = _model(preset, overrides).eval(), _batch()
    with torch.no_grad():
        plain = model(batch)
        assert set(plain) == {K.ENERGY, K.ATOM_ENERGY, K.FORCES}
        every = model(batch, features=model.available_features)
    assert set(every) == {K.ENERGY, K.ATOM_ENERGY, K.FORCES, *model.available_features,
                          *(K.FEATURE_COMPANIONS[K.EDGE] if K.EDGE in model.available_features else ())}
    assert every[K.NODE].shape[0] == 7
    # asking for features changes no number
    for key in plain:
        assert torch.equal(plain[key], every[key]), key
    if K.EDGE in every:
        n_edges = every[K.EDGE].shape[0]
        assert every[K.EDGE_INDEX].shape == (2, n_edges) and every[K.EDGE_VECTOR].shape == (n_edges, 3)
        assert every[K.CELL_OFFSET].shape == (n_edges, 3)
    lacking = next(k for k in K.FEATURE_KEYS if k not in model.available_features)
    with pytest.raises(ValueError, match=lacking):
        model(batch, features=(lacking,))


@pytest.mark.parametrize("preset, overrides", CASES[::2], ids=IDS[::2])
def test_input_precision_and_element_range(preset, overrides):
    """Positions follow the model's precision; an element outside the embedding names the field."""
    model = _model(preset, overrides).float().eval()
    batch = _batch()  # float64 positions and cells into a float32 model
    with torch.no_grad():
        out = model.predict(batch)
    assert out[K.ENERGY].dtype == torch.float32 and out[K.FORCES].shape == (7, 3)
    for bad in (0, model.max_atomic_number + 1):
        wrong = _batch()
        wrong.atomic_numbers[5] = bad
        with pytest.raises(DataError, match=rf"field 'atomic_numbers': atomic numbers must lie in "
                                            rf"1\.\.{model.max_atomic_number}"):
            model(wrong)


def test_energy_only_models_predict_without_forces():
    model = _model("painn-tiny", {**CASES[0][1], "regress_forces": False}).eval()
    with torch.no_grad():
        out = model.predict(_batch())
    assert set(out) == {K.ENERGY, K.ATOM_ENERGY} and out[K.ENERGY].shape == (2,)


@pytest.mark.parametrize("preset", ["painn-tiny", "schnet-tiny", "gemnet-oc-tiny"])
def test_every_model_refuses_unknown_arguments(preset):
    """One rule for all: an unknown constructor argument is an error that names it."""
    name, config = preset_config(preset)
    with pytest.raises(TypeError, match=r"takes no argument\(s\) \['wings'\]"):
        build_model(name, **config, wings=2)
    if name == "gemnet_oc":  # used to warn and carry on
        with pytest.raises(TypeError, match="wings"):
            GemNetOC(**config, wings=2)


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that a file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package))
    return found


def test_models_reach_no_loader_and_no_other_model():
    """A model never imports the checkpoint loader (which builds models: the old cycle), and SchNet
    needs nothing from PaiNN (shared helpers live in common.py). The package-wide cycle check is
    tests/test_layers.py."""
    root = Path(__file__).resolve().parents[2] / "kdcache" / "models"
    for path in (root / "painn.py", root / "schnet.py", root / "gemnet_oc" / "model.py", root / "registry.py"):
        assert "kdcache.models.checkpoint" not in _imports(path, "kdcache.models"), path
    assert "kdcache.models.painn" not in _imports(root / "schnet.py", "kdcache.models")
