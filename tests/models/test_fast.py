"""The compiled path (kdcache.models.fast) against the eager reference: same outputs to float32
round-off on a periodic slab and on a molecule, no recompilation for a new batch size, the same
training gradients (gradient forces differentiated again), and the same weights.

Compilation dominates the time of this file: one model per architecture (the tiny presets, one
or two blocks), compiled once per gradient mode and shared by the tests (module-scoped fixtures);
inductor's on-disk cache (``~/.cache/kdcache/inductor``) makes a second run much cheaper.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111, molecule
from ase.collections import s22
from torch_geometric.data import Batch

from kdcache import keys as K
from kdcache.calculator import atoms_to_batch
from kdcache.models.checkpoint import load_checkpoint, save_checkpoint
from kdcache.models.fast import eager_model, fast_model
from kdcache.models.presets import build_preset

#: architecture -> (preset, overrides): the tiny presets, fewer blocks (compile time grows with them)
MODELS = {
    "painn": ("painn-tiny", {"num_layers": 2}),
    "schnet": ("schnet-tiny", {"num_interactions": 2}),
    "gemnet_oc": ("gemnet-oc-tiny", {"num_blocks": 1}),
}


# Both structures have more than 16 atoms: inductor picks some kernels by size (an outer product
# of <= 32 elements, a float sum of > 4096), and a batch on the other side of such a threshold
# compiles once more. Within one side, no new size recompiles.
def _slab():
    """A dense Pt(111) slab with an O adatom, OC20 tags: the neighbour limits cut (30 of ~40 within 6 Å)."""
    slab = fcc111("Pt", size=(2, 2, 4), vacuum=5.0)
    add_adsorbate(slab, "O", 1.8, "fcc")
    slab.set_tags([0] * 8 + [1] * 8 + [2])
    slab.rattle(0.05, seed=1)
    return slab


def _molecule():
    """The s22 pyrazine dimer (20 atoms, no cell)."""
    mol = s22["Pyrazine_dimer"].copy()
    mol.set_tags([2] * len(mol))  # quadruplets for GemNet-OC's OC20 tags
    mol.rattle(0.03, seed=2)
    return mol


def _batch(*atoms) -> Batch:
    return Batch.from_data_list([atoms_to_batch(a).get_example(0) for a in atoms])


#: GemNet-OC's generated kernels take torch's threads; on one its quadruplet sum is ragged, on
#: more bucketed (tests/models/test_quadruplet_sums.py): both layouts are compiled here, the
#: plain "gemnet_oc" view on two threads
ONE_THREAD = "gemnet_oc-one-thread"


@pytest.fixture(scope="module", params=[*MODELS, ONE_THREAD], ids=[*MODELS, ONE_THREAD])
def models(request):
    """(eager, fast) of one architecture: the fast one a view of a copy (same initial weights)."""
    preset, overrides = MODELS[request.param.removesuffix("-one-thread")]
    torch.manual_seed(0)
    eager = build_preset(preset, **overrides)
    eager.normalizer.energy_std.fill_(2.0)
    threads = torch.get_num_threads()
    try:
        if request.param.startswith("gemnet_oc"):  # the view's generated kernels: fixed when it is made
            torch.set_num_threads(1 if request.param == ONE_THREAD else 2)
        fast = fast_model(copy.deepcopy(eager))
    finally:
        torch.set_num_threads(threads)
    if request.param.startswith("gemnet_oc"):
        assert fast.fast_path.kernel_threads == (1 if request.param == ONE_THREAD else 2)
    return eager, fast


def _close(fast: torch.Tensor, eager: torch.Tensor, key: str) -> None:
    """Equal to float32 round-off: relative to the largest value of the output."""
    assert fast.shape == eager.shape and fast.dtype == eager.dtype, key
    scale = float(eager.abs().max()) if eager.numel() else 1.0
    torch.testing.assert_close(fast, eager, rtol=0, atol=2e-5 * max(scale, 1.0), msg=key)


@pytest.mark.parametrize("structures", ["slab", "molecule", "slab+molecule"])
def test_outputs_equal_eager(models, structures):
    eager, fast = models
    eager.eval(), fast.eval()
    atoms = {"slab": [_slab()], "molecule": [_molecule()], "slab+molecule": [_slab(), _molecule()]}[structures]
    batch = _batch(*atoms)
    features = eager.available_features
    compiled = fast.fast_path.compiled_calls
    with torch.no_grad():
        ref = eager(batch, features=features)
        out = fast(batch, features=features)
        phys_ref, phys = eager.predict(batch), fast.predict(batch)
    assert fast.fast_path.compiled_calls == compiled + 2  # not the eager fallback
    assert set(out) == set(ref)
    for key in ref:
        _close(out[key], ref[key], key)
        assert not out[key].requires_grad, key
    for key in (K.ENERGY, K.FORCES):
        _close(phys[key], phys_ref[key], key)
    assert float(ref[K.FORCES].abs().max()) > 1e-3  # the comparison is not of zeros


def test_new_batch_size_does_not_recompile(models):
    eager, fast = models
    fast.eval()
    with torch.no_grad():
        fast(_batch(_slab(), _molecule()))  # compiled (or cached) for this mode
        frames, compiled = torch._dynamo.utils.counters["frames"]["ok"], fast.fast_path.compiled_calls
        out = fast(_batch(_slab(), _slab(), _molecule()))  # other atom, edge and structure counts
        assert torch._dynamo.utils.counters["frames"]["ok"] == frames
        assert fast.fast_path.compiled_calls == compiled + 1
    with torch.no_grad():
        ref = eager(_batch(_slab(), _slab(), _molecule()))
    _close(out[K.FORCES], ref[K.FORCES], K.FORCES)


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(batch, features=(K.NODE,))
    loss = (out[K.ENERGY].square().mean() + out[K.FORCES].square().mean() + 1e-2 * out[K.NODE].square().mean())
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["painn", "schnet"])
def test_training_gradients_equal_eager(arch):
    """Loss and every weight's gradient as eager; SchNet's forces are -dE/dpos, so its force loss
    differentiates a gradient again (through the compiled region)."""
    preset, overrides = MODELS[arch]
    torch.manual_seed(0)
    eager = build_preset(preset, **overrides).train()
    fast = fast_model(eager)  # a view: the very same parameters
    assert [p.data_ptr() for p in fast.parameters()] == [p.data_ptr() for p in eager.parameters()]
    batch = _batch(_slab(), _molecule())
    loss_e, grads_e = _loss_and_grads(eager, batch)
    loss_f, grads_f = _loss_and_grads(fast, batch)
    assert fast.fast_path.compiled_calls == 1
    assert loss_f == pytest.approx(loss_e, rel=1e-5)
    assert grads_f.keys() == grads_e.keys() and len(grads_e) > 5
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-5 * max(float(g.abs().max()), 1e-3),
                                   msg=name)
    # an optimiser step through the view moves the eager model's weights too
    with torch.no_grad():
        before = eager(batch)[K.ENERGY]
    torch.optim.SGD(fast.parameters(), lr=1e-3).step()
    with torch.no_grad():
        after_e, after_f = eager(batch), fast(batch)
    assert not torch.equal(after_e[K.ENERGY], before)
    _close(after_f[K.ENERGY], after_e[K.ENERGY], K.ENERGY)


def test_view_shares_weights_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    eager = build_preset("schnet-tiny").eval()
    fast = fast_model(eager)
    assert type(fast) is type(eager) and fast.fast_path is not None and eager.fast_path is None
    assert fast_model(fast) is fast and eager_model(fast).fast_path is None and eager_model(eager) is eager
    assert fast.state_dict().keys() == eager.state_dict().keys()
    path = save_checkpoint(tmp_path / "m.pt", fast)
    loaded = load_checkpoint(path, fast=True)
    assert loaded.model.fast_path is not None and load_checkpoint(path).model.fast_path is None
    for (name, a), b in zip(eager.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    # an EMA-style deep copy stays a working view (it shares the stateless compiled kernel)
    twin = copy.deepcopy(fast)
    assert twin.fast_path is fast.fast_path and twin.embedding.weight.data_ptr() != fast.embedding.weight.data_ptr()


def test_bad_arguments():
    model = build_preset("schnet-tiny")
    with pytest.raises(ValueError, match="precision"):
        fast_model(model, precision="fp8")
    with pytest.raises(TypeError, match="PotentialModel"):
        fast_model(torch.nn.Linear(2, 2))


def test_single_atom_runs_eagerly():
    """Sizes 0 and 1 would specialise the compiled code: such graphs take the eager path."""
    model = fast_model(build_preset("schnet-tiny").eval())
    single = molecule("H2")[:1]
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    with torch.no_grad():
        out = model(_batch(single))
    assert out[K.FORCES].shape == (1, 3) and torch.all(out[K.FORCES] == 0)
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames and model.fast_path.eager_calls == 1
    assert np.isfinite(float(out[K.ENERGY][0]))
