"""The compiled path of every model: same weights, same outputs, the body compiled.

:func:`fast_model` returns a *view* of a :class:`~kdcache.models.base.PotentialModel`: the same
class, the same submodules and parameters (shared, not copied: an optimiser step on one is a step
on the other; ``state_dict``, checkpoints, ``predict`` and the feature hand-out are unchanged),
whose forward runs:

1. the graph work eagerly — :meth:`~kdcache.models.base.PotentialModel.make_graph`: radius graphs,
   symmetrisation, triplets, everything with data-dependent shapes and host syncs — plus what
   :meth:`~kdcache.models.base.PotentialModel.fast_graph` adds for the compiled body alone (PaiNN
   and SchNet: atom pairs, so radial filters run once per pair,
   :func:`kdcache.models.common.with_edge_pairs`);
2. :meth:`~kdcache.models.base.PotentialModel.body` (edge geometry, message passing, heads)
   compiled by ``torch.compile`` (inductor, ``fullgraph``: no graph breaks, no host syncs) with
   dynamic shapes. Gradient forces ``-dE/dpos`` are taken *inside* the compiled region with
   ``torch.func.vjp``, so training differentiates the forces again (a force loss) through one
   compiled forward and backward (AOTAutograd cannot differentiate a compiled backward twice:
   for the same reason a loss on Hessian-vector products of gradient forces, ``kdcache.hessian``
   with ``create_graph``, needs the eager model);
   where the outputs are not differentiated and no feature is requested (MD, evaluation), the
   body also gets the model's :meth:`~kdcache.models.base.PotentialModel.fast_inference_weights`
   (SchNet: its folded residual stream, :func:`kdcache.models.schnet.fold_residual_stream`);
   Inside, radial bases flush near-subnormal values to zero
   (:func:`kdcache.models.radial.subnormals_flushed`: on x86 they made the basis projection's
   matmuls up to ~70x slower); the eager path does not;
3. energies per structure, units and features as the eager path (the base class).

The eager model stays the reference: outputs agree to float32 round-off, about 1e-6 of the largest
value of each output (``tests/models/test_fast.py``).

Compilation: one compiled graph per model, gradient mode (inference / training), dtype and thread
count of the generated kernels (:data:`GENERATED_KERNEL_THREADS`); every
feature is computed whatever the request (the students compute them anyway), except that a
model with inference weights (SchNet) compiles inference without features once more. Atom, edge, triplet
and structure counts are symbolic, so a new batch reuses it, with two exceptions: sizes 0 and 1
would specialise it (such graphs — a single atom, no quadruplets — run eagerly), and inductor picks
a few kernels by size (an outer product of at most 32 elements; float sums over more than 4096
elements are accumulated in chunks), so a batch on the other side of such a threshold (16 atoms, a
few thousand edges) compiles once more; within one side nothing recompiles. Inductor's FX graph
cache and the AOTAutograd cache make a second process cheap; they live under
``TORCHINDUCTOR_CACHE_DIR``, set here (unless the user set it) to
``$XDG_CACHE_HOME/kdcache/inductor`` (default ``~/.cache/kdcache/inductor``).

Precision (``precision=``):

* ``"float32"`` (default): the model's own dtype throughout (float64 models stay float64); agrees
  with the eager path to round-off.
* ``"tf32"``: on CUDA, float32 matmuls with TF32 inputs (10-bit mantissa) while the model runs;
  a no-op on the CPU. Not measured here (no GPU); expect errors of ~1e-3 of the largest force,
  above the float32 tolerance: for screening and MD, not for parity checks.
* ``"bf16"``: ``torch.autocast`` to bfloat16 (matmuls in bf16, what follows them too, the results
  cast back to the model's dtype). Measured on painn-tiny (CPU, random weights, a slab and a
  molecule): energies within 4e-3 relative, forces within 3.5e-2 of the largest force (2.3e-2 in
  RMS). Far outside the float32 tolerance: for throughput-bound inference only, and on a CPU
  without bf16 instructions it is not faster.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from kdcache import keys as K
from kdcache.models.radial import subnormals_flushed

if TYPE_CHECKING:  # the base class imports the calculator, which imports this module: no import at run time
    from kdcache.models.base import PotentialModel

PRECISIONS = ("float32", "tf32", "bf16")

#: threads of inductor's *generated* CPU kernels (pointwise, reductions, gathers and scatters)
#: for the students (:attr:`~kdcache.models.base.PotentialModel.fast_kernels_threaded` False).
#: With more than one they accumulate every scatter (index_add: each message-passing
#: aggregation) through atomic float adds, and a gather-multiply-scatter of PaiNN-small's size
#: ran 8x slower on 2 threads than on 1 (43 vs 5 ms; the whole model ran slower on 2 threads
#: than on 1). One thread for them; matrix products are ATen's (extern kernels) and keep all of
#: torch's intra-op threads. (CPU only: the setting does not touch CUDA code.) GemNet-OC's
#: generated kernels are mostly padded fills, without atomics: they take all threads (at 2
#: threads 1.52x the eager path against 1.17x on one); there its quadruplet sum runs over
#: buckets of edges, on one thread over the quadruplets, see
#: :meth:`~kdcache.models.gemnet_oc.model.GemNetOC.fast_graph`).
GENERATED_KERNEL_THREADS = 1

#: one compiled entry per model instance, gradient mode and size regime, all of the same kernel
#: function: dynamo's default limit of 8 would silently fall back to eager in a process that
#: holds a teacher and students (or a test session)
RECOMPILE_LIMIT = 64


def inductor_cache_dir() -> Path:
    """Where inductor's on-disk caches live: ``TORCHINDUCTOR_CACHE_DIR``, which this sets (unless
    the user did) to ``$XDG_CACHE_HOME/kdcache/inductor`` (default ``~/.cache/kdcache/inductor``).

    torch writes its own default (a per-user directory under /tmp, cleared on reboot) into the
    variable the first time anything asks for it — importing torch_geometric does — so that
    value counts as unset.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(base) / "kdcache" / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def _kernel(model: PotentialModel, pos: torch.Tensor, atomic_numbers: torch.Tensor, graph: dict,
            wanted: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The compiled region: the body and, for gradient forces, ``-d(total energy)/dpos``."""
    if not model.gradient_forces:
        return model.body(pos, atomic_numbers, graph, wanted)

    def energy(p: torch.Tensor):
        out = model.body(p, atomic_numbers, graph, wanted)
        return model.total_energy(out[K.ATOM_ENERGY], graph), out

    total, vjp, out = torch.func.vjp(energy, pos, has_aux=True)
    (grad,) = vjp(torch.ones_like(total))
    return {**out, K.FORCES: -grad}


def _tiny(pos: torch.Tensor, graph: dict) -> bool:
    """True when a size the compiled code treats as dynamic is 0 or 1 (which it would specialise:
    one more compilation for a single atom, an empty quadruplet graph, ...)."""
    if pos.shape[0] < 2:
        return True
    for value in torch.utils._pytree.tree_leaves(graph):
        if isinstance(value, torch.Tensor) and any(d < 2 for d in value.shape):
            return True
        if isinstance(value, int) and not isinstance(value, bool) and value < 2:
            return True
    return False


class FastPath:
    """The compiled forward of a :func:`fast_model` view (see the module docstring).

    Holds no model state, so a deep copy of a view (an EMA copy) shares it.

    Args:
        precision: ``"float32"``, ``"tf32"`` or ``"bf16"`` (module docstring: tolerances).
        kernel_threads: threads of the generated CPU kernels (:data:`GENERATED_KERNEL_THREADS`),
            fixed in the compiled code.
        inductor_options: more inductor options (the model's
            :attr:`~kdcache.models.base.PotentialModel.fast_inductor_options`).
    """

    def __init__(self, precision: str = "float32", kernel_threads: int = GENERATED_KERNEL_THREADS,
                 inductor_options: dict | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.precision = precision
        self.kernel_threads = int(kernel_threads)
        self.compiled_calls = 0  # forwards that ran the compiled body
        self.eager_calls = 0  # forwards too small for it (see _tiny), run eagerly
        inductor_cache_dir()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.inductor_options = dict(inductor_options or {})
        self.kernel = torch.compile(_kernel, dynamic=True, fullgraph=True,
                                    options={"cpp.threads": self.kernel_threads, **self.inductor_options})

    def __deepcopy__(self, memo) -> "FastPath":
        return self

    def _precision(self, device: torch.device):
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        if self.precision == "tf32" and device.type == "cuda":
            return _tf32()
        return contextlib.nullcontext()

    def __call__(self, model: PotentialModel, batch, features: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """:meth:`PotentialModel.forward` of ``model``, compiled (same arguments, same results)."""
        wanted = model.check_features(features)
        keep_graph = model._caller_differentiates(batch)
        inputs = model.prepare_inputs(batch, autograd_forces=False)
        graph = model.fast_graph(inputs, model.make_graph(inputs))
        if _tiny(inputs.pos, graph):
            self.eager_calls += 1
            return eager_model(model)(batch, features)
        self.compiled_calls += 1
        # every feature, whatever the request: one compiled graph per gradient mode (the
        # students compute them anyway; the base class hands out the requested ones) ...
        features = tuple(model.available_features)
        if keep_graph:
            model.forget_inference_weights()  # training: the weights may change, even uncounted
        elif not wanted and self.precision != "bf16":
            # ... except where none is wanted and nothing differentiates: the inference weights
            # (not under bf16 autocast, whose measured tolerance is the unfolded body's)
            inference_weights = model.fast_inference_weights()
            if inference_weights:
                for weight in torch.utils._pytree.tree_leaves(inference_weights):
                    torch._dynamo.mark_static(weight)  # sizes of weights, not of the batch
                graph, features = {**graph, **inference_weights}, ()
        # the graph of the outputs only where the caller differentiates them (as the eager path)
        with torch.set_grad_enabled(keep_graph):
            with _compile_settings(), subnormals_flushed(), self._precision(inputs.pos.device):
                body = self.kernel(model, inputs.pos, inputs.atomic_numbers, graph, features)
            dtype = inputs.pos.dtype
            body = {k: v.to(dtype) if v.is_floating_point() else v for k, v in body.items()}
            out = model._outputs(inputs, body, wanted, keep_graph)
        if not keep_graph:
            out = {k: v.detach() for k, v in out.items()}
        return out


@contextlib.contextmanager
def _compile_settings():
    """Dynamo settings for the kernel (read when it traces; cheap to enter at every call)."""
    # Sizes may coincide in one batch (edges of two graphs, atoms and edges) and not in the
    # next: one symbol per size (no "duck" sharing), or the next batch recompiles. Python floats
    # are the models' constants: symbolic ones are specialised after all, at the price of
    # tracing everything twice.
    with torch.fx.experimental._config.patch(use_duck_shape=False), \
            torch._dynamo.config.patch(specialize_float=True):
        yield


@contextlib.contextmanager
def _tf32():
    """TF32 CUDA matmuls while the model runs, the process's setting restored after."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def fast_model(model: PotentialModel, precision: str = "float32") -> PotentialModel:
    """The compiled view of a model (module docstring): same weights, same outputs.

    Args:
        model: a :class:`~kdcache.models.base.PotentialModel` that implements ``make_graph`` and
            ``body`` (every kdcache architecture does). Already a view: returned as it is when
            the precision matches.
        precision: ``"float32"`` (default), ``"tf32"`` or ``"bf16"`` (tolerances: module docstring).

    Returns:
        A shallow copy of ``model`` (same class, shared submodules, parameters and buffers) whose
        forward is compiled.

    Raises:
        TypeError: the model's body is not split into ``make_graph`` and ``body``.
    """
    if not callable(getattr(model, "splits_body", None)):
        raise TypeError(f"fast_model needs a PotentialModel, not {type(model).__name__}")
    if not model.splits_body():
        raise TypeError(f"{type(model).__name__} implements compute() only: it has no compiled path")
    if model.fast_path is not None and model.fast_path.precision == precision:
        return model
    view = copy.copy(model)  # new attribute dict; _modules/_parameters/_buffers shared
    # threaded kernels: torch's threads now, fixed in the compiled code (and in its cache key)
    threads = torch.get_num_threads() if model.fast_kernels_threaded else GENERATED_KERNEL_THREADS
    view.fast_path = FastPath(precision, threads, model.fast_inductor_options)
    return view


def eager_model(model: PotentialModel) -> PotentialModel:
    """The eager view of a model (itself when it is not a :func:`fast_model` view)."""
    if model.fast_path is None:
        return model
    view = copy.copy(model)
    view.fast_path = None
    return view


__all__ = ["FastPath", "PRECISIONS", "eager_model", "fast_model", "inductor_cache_dir"]
