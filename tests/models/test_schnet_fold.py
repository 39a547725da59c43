"""SchNet's folded residual stream (kdcache.models.schnet.fold_residual_stream): the compiled
inference path's weights.

The algebra is checked eagerly in float64 against the reference implementation's outputs; the
compiled path is checked for using it exactly where nothing differentiates and no feature is
asked for, for agreeing with the eager model, and for forming it again after a weight changes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdcache import keys as K
from kdcache.models.fast import eager_model, fast_model
from kdcache.models.presets import build_preset
from kdcache.models.schnet import FOLDED, SchNet, fold_residual_stream

from .test_fast import _batch, _close, _molecule, _slab
from .test_schnet import _rel, loaded, ref  # noqa: F401 (fixtures)
from .test_painn import reference_batch


def _folded_outputs(model: SchNet, batch, pairs: bool = False) -> dict[str, torch.Tensor]:
    """Energy and -dE/dpos of the eager body run on the folded weights (``pairs``: on the fast
    path's graph, filters once per atom pair)."""
    inputs = model.prepare_inputs(batch)
    graph = model.make_graph(inputs)
    if pairs:
        graph = model.fast_graph(inputs, graph)
    graph = {**graph, FOLDED: fold_residual_stream(model)}
    body = model.body(inputs.pos, inputs.atomic_numbers, graph, ())
    assert set(body) == {K.ATOM_ENERGY}  # the atom features are never formed
    energy = model.structure_energy(body[K.ATOM_ENERGY], inputs)
    (grad,) = torch.autograd.grad(energy.sum(), inputs.pos)
    return {K.ENERGY: energy, K.ATOM_ENERGY: body[K.ATOM_ENERGY], K.FORCES: -grad}


def test_folded_body_equals_reference(ref, loaded):  # noqa: F811
    """Float64, the reference checkpoint: the folded algebra is the model's, to 1e-8."""
    model = loaded.model
    assert model.embedding.weight.dtype == torch.float64
    out = _folded_outputs(model, reference_batch(ref))
    for key in (K.ENERGY, K.ATOM_ENERGY, K.FORCES):
        assert _rel(out[key], ref[key]) < 1e-8, key


def _with_biases(model: SchNet) -> SchNet:
    """Nonzero biases (initialised to zero; the fold's tables carry them)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("interactions, readout, pairs", [(1, "sum", False), (3, "sum", False), (3, "mean", True)])
def test_folded_body_equals_unfolded(interactions, readout, pairs):
    """Random weights with nonzero biases, float64, slab and molecule; also the mean readout on
    the fast path's per-pair graph."""
    torch.manual_seed(1)
    model = _with_biases(build_preset("schnet-tiny", num_interactions=interactions, readout=readout).double())
    batch = _batch(_slab(), _molecule())
    batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
    folded, plain = _folded_outputs(model, batch, pairs), model(batch)
    for key in (K.ENERGY, K.ATOM_ENERGY, K.FORCES):
        torch.testing.assert_close(folded[key], plain[key].detach(), rtol=1e-10, atol=1e-10, msg=key)
    assert float(plain[K.FORCES].detach().abs().max()) > 1e-3


def test_folding_only_where_it_pays():
    """OC20's 1024-channel SchNet folds (5.2 M multiply-adds per atom against 7.1 M); COLL's
    128-channel one would read more weights folded than not, and does not fold."""
    assert build_preset("schnet").folding_pays()
    coll = build_preset("schnet-coll")
    assert not coll.folding_pays() and coll.fast_inference_weights() == {}
    tiny = build_preset("schnet-tiny")
    assert tiny.folding_pays()
    table, *stacks = tiny.fast_inference_weights()[FOLDED]
    assert table.shape == (100, 3 * 24 + 16) and [s.shape for s in stacks] == [(64, 32), (40, 32), (16, 32)]


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    eager = _with_biases(build_preset("schnet-tiny", num_interactions=2).eval())
    eager.normalizer.energy_std.fill_(2.0)
    return eager, fast_model(copy.deepcopy(eager))


def test_compiled_inference_uses_the_fold(tiny_pair, monkeypatch):
    """No feature, nothing differentiated: the compiled body runs on the fold (a spoiled fold
    shows in the energies), and agrees with the eager model; a feature request does without."""
    eager, fast = tiny_pair
    batch = _batch(_slab(), _molecule())
    with torch.no_grad():
        out, ref = fast.predict(batch), eager.predict(batch)
        for key in (K.ENERGY, K.FORCES):
            _close(out[key], ref[key], key)
        table, *stacks = fast.fast_inference_weights()[FOLDED]
        asked = []
        monkeypatch.setattr(fast, "fast_inference_weights",
                            lambda: asked.append(1) or {FOLDED: (table + 0.5, *stacks)})
        spoiled = fast.predict(batch)
        assert asked and float((spoiled[K.ENERGY] - ref[K.ENERGY]).abs().max()) > 1e-2
        asked.clear()
        with_node = fast(batch, features=(K.NODE,))
        assert not asked  # a feature request takes the unfolded body ...
        _close(with_node[K.ENERGY], eager(batch)[K.ENERGY], K.ENERGY)  # ... (no spoiled fold in it)
        _close(with_node[K.NODE], eager(batch, features=(K.NODE,))[K.NODE], K.NODE)


def test_training_does_not_fold(tiny_pair):
    """Weights that get gradients are not replaced by products formed without them."""
    _, fast = tiny_pair
    fast.train()
    fast.zero_grad()
    out = fast(_batch(_slab()))
    (out[K.ENERGY].sum() + out[K.FORCES].square().sum()).backward()
    for block in fast.interactions:
        assert block.lin.weight.grad is not None and float(block.lin.weight.grad.abs().max()) > 0
    fast.eval()


def test_fold_follows_weight_changes(tiny_pair):
    """An optimiser step or load_state_dict (in place) forms the fold again: no stale energies,
    and the compiled code is reused."""
    eager, fast = tiny_pair
    eager, fast = copy.deepcopy(eager), copy.deepcopy(fast)  # the module's pair stays as it was
    batch = _batch(_molecule())
    with torch.no_grad():
        before = fast.predict(batch)[K.ENERGY]
        frames = torch._dynamo.utils.counters["frames"]["ok"]
        torch.manual_seed(3)
        changed = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                   for k, v in eager.state_dict().items()}
        fast.load_state_dict(changed)
        eager.load_state_dict(changed)
        after, ref = fast.predict(batch), eager.predict(batch)
        assert torch._dynamo.utils.counters["frames"]["ok"] == frames
    assert float((after[K.ENERGY] - before).abs().max()) > 1e-3  # the change shows ...
    for key in (K.ENERGY, K.FORCES):
        _close(after[key], ref[key], key)  # ... as the eager model's
    optimizer = torch.optim.SGD(fast.parameters(), lr=1e-3)
    fast.train()
    out = fast(batch)
    out[K.ENERGY].sum().backward()
    optimizer.step()
    fast.eval()
    eager.load_state_dict(fast.state_dict())
    with torch.no_grad():
        _close(fast.predict(batch)[K.ENERGY], eager.predict(batch)[K.ENERGY], K.ENERGY)

    # writes torch does not count (param.data, fused optimisers): a training forward through
    # the view forgets the fold, and so does forget_inference_weights on any view of the model
    def uncounted_write():
        with torch.no_grad():
            fast.lin1.bias.data.add_(0.5)
            eager.load_state_dict(fast.state_dict())
            stale, ref = fast.predict(batch)[K.ENERGY], eager.predict(batch)[K.ENERGY]
        assert float((stale - ref).abs().max()) > 1e-3 * float(ref.abs().max())  # far beyond _close's tolerance

    uncounted_write()
    fast.train()
    fast(batch)  # outputs that can be differentiated: a training step
    fast.eval()
    with torch.no_grad():
        _close(fast.predict(batch)[K.ENERGY], eager.predict(batch)[K.ENERGY], K.ENERGY)
    uncounted_write()
    plain = eager_model(fast)  # another view (eager), the same kept fold
    plain.train()
    plain(batch)  # a training call of the eager view forgets it too
    plain.eval()
    with torch.no_grad():
        _close(fast.predict(batch)[K.ENERGY], eager.predict(batch)[K.ENERGY], K.ENERGY)
    uncounted_write()
    plain.forget_inference_weights()
    with torch.no_grad():
        _close(fast.predict(batch)[K.ENERGY], eager.predict(batch)[K.ENERGY], K.ENERGY)
