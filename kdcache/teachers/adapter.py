"""Any torch module as a stage-one teacher: ``kdcache extract --teacher py:MODULE:FUNCTION[:JSON-KWARGS]``.

``FUNCTION(**kwargs)`` from ``MODULE`` returns a ``torch.nn.Module`` that follows the *adapter
contract* (docs/adapter-teachers.md):

- ``forward(batch, features)``: ``batch`` is a kdcache batch (a PyG batch with the fields of
  :mod:`kdcache.keys`: ``pos [N, 3]`` Å, ``atomic_numbers [N]``, ``cell [S, 3, 3]``, ``pbc [S, 3]``,
  ``natoms [S]``, ``batch [N]``, ``tags [N]``); ``features`` is the tuple of the names of
  ``available_features`` asked for. It returns a dict, in physical units:

  - ``energy`` ``[S]`` eV (required);
  - ``forces`` ``[N, 3]`` eV/Å exactly when ``direct_forces`` is True (otherwise kdcache takes
    ``-dE/dpos`` by autograd);
  - ``atom_energy`` ``[N]`` eV, when ``available_features`` lists it (then always);
  - each asked-for hidden feature: ``node`` / ``e2n`` ``[N, d]``, ``vector`` / ``e2v`` ``[N, 3, d]``.
- ``available_features`` (optional attribute, default none): what the dict can hold besides energy
  and forces, among ``node, e2n, vector, e2v, atom_energy``.
- ``direct_forces`` (optional attribute, default False): True says forward returns forces itself
  (a direct head, or forces the module differentiates itself), so kdcache does not track
  gradients with respect to the positions.

Features can also be taken from any submodule by path (``--feature node=interactions.2``,
:mod:`kdcache.teachers.hooks`); the paths are those of the module FUNCTION returns. Weights are
the function's business (a checkpoint path among its keyword arguments, say); the store records
the weights' SHA-256, so a resume with other weights is refused.

Like an ``ase:`` spec (:mod:`kdcache.teachers.spec`), a ``py:`` spec imports and runs the code it
names, so :func:`kdcache.store.extract.resolve_teacher` takes it only as an :class:`AdapterSpec`
object (what ``kdcache extract`` parses from its command line), never from a string setting.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from kdcache import keys as K
from kdcache.errors import ConfigError
from kdcache.teachers.hooks import FEATURE_SHAPES, check_per_atom
from kdcache.teachers.spec import CodeSyntax

PREFIX = "py:"
SYNTAX = CodeSyntax(PREFIX, "adapter teacher", "py:MODULE:FUNCTION[:JSON-KWARGS], e.g. py:my_teachers:make",
                    '{"checkpoint": "teacher.pt"}')
#: what an adapter's ``available_features`` may list
ADAPTER_FEATURES = (*FEATURE_SHAPES, K.ATOM_ENERGY)


def is_adapter_spec(text: Any) -> bool:
    """Whether a ``--teacher`` value names an adapter module (``py:...``)."""
    return SYNTAX.matches(text)


@dataclass(frozen=True)
class AdapterSpec:
    """Which module to build: ``FUNCTION(**kwargs)`` from ``MODULE``.

    Args:
        module: the module to import (``my_teachers``; found as Python finds it: installed, or on
            ``PYTHONPATH``).
        function: a function or class of it, or a dotted path inside it.
        kwargs: its keyword arguments (JSON types).
    """

    module: str
    function: str
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "AdapterSpec":
        """``py:MODULE:FUNCTION[:JSON-KWARGS]`` as a spec.

        Raises:
            ConfigError: not of that form, or keyword arguments that are not a JSON object.
        """
        return cls(*SYNTAX.split(text))

    @property
    def name(self) -> str:
        """``py:MODULE:FUNCTION`` (without the keyword arguments)."""
        return f"{PREFIX}{self.module}:{self.function}"

    def build(self) -> nn.Module:
        """Import the module and call the function (this runs their code).

        Raises:
            ConfigError: it does not import, has no such function, the call fails or gives no
                torch module.
        """
        module = SYNTAX.call(self.name, self.module, self.function, self.kwargs)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"adapter teacher {self.name}: {self.function}(...) gave a {type(module).__name__}, "
                              "not a torch.nn.Module")
        return module


class AdapterModel(nn.Module):
    """kdcache's model contract (:class:`kdcache.models.base.PotentialModel`'s ``forward`` /
    ``predict``, ``available_features``, ``name``) around an adapter module.

    An adapter speaks physical units, so its normaliser is the identity and ``predict`` is
    ``forward``. Its outputs are checked (shapes, presence) and, as a model's, detached unless
    the caller differentiates (positions that require grad).

    Args:
        module: what the adapter function returned.
        name: the teacher's name (``py:MODULE:FUNCTION``), for messages.

    Raises:
        ConfigError: ``available_features`` names something else than :data:`ADAPTER_FEATURES`.
    """

    def __init__(self, module: nn.Module, name: str):
        from kdcache.models.base import Normalizer

        super().__init__()
        self.module = module
        self.name = name
        declared = tuple(getattr(module, "available_features", ()) or ())
        unknown = [f for f in declared if f not in ADAPTER_FEATURES]
        if unknown:
            raise ConfigError(f"adapter teacher {name}: available_features lists {unknown}; an adapter can offer "
                              f"{', '.join(ADAPTER_FEATURES)}")
        self.available_features = tuple(k for k in FEATURE_SHAPES if k in declared)
        self.offers_atom_energy = K.ATOM_ENERGY in declared
        self.direct_forces = bool(getattr(module, "direct_forces", False))
        #: as a model's: forces always, as -dE/dpos unless the adapter gives them
        self.regress_forces, self.gradient_forces = True, not self.direct_forces
        self.normalizer = Normalizer()  # identity: stage one reads physical units through it

    @property
    def hook_root(self) -> nn.Module:
        """Where ``--feature`` paths start: the adapter's own module."""
        return self.module

    def forward(self, batch, features: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Energies ``[S]`` (eV), forces ``[N, 3]`` (eV/Å), per-atom energies (when offered) and
        the requested features of a batch.

        Args:
            batch: a kdcache batch.
            features: names of :attr:`available_features`.

        Raises:
            ConfigError: a feature the adapter does not offer, or an output that breaks the
                contract (missing, misshapen), naming the adapter.
        """
        wanted = set(features)
        lacking = sorted(wanted - set(self.available_features))
        if lacking:
            raise ConfigError(f"adapter teacher {self.name} has no feature(s) {lacking}; it offers "
                              f"{list(self.available_features)}")
        asked = tuple(k for k in self.available_features if k in wanted)
        asked += (K.ATOM_ENERGY,) if self.offers_atom_energy else ()
        pos = batch[K.POSITIONS]
        keep_graph = torch.is_grad_enabled() and pos.requires_grad
        if not self.direct_forces and not pos.requires_grad:
            # forces as -dE/dpos need positions to differentiate by; a shallow copy, so that the
            # caller's batch keeps its own
            batch = copy.copy(batch)
            batch[K.POSITIONS] = pos = pos.detach().requires_grad_(True)
        with torch.set_grad_enabled(torch.is_grad_enabled() or not self.direct_forces):
            raw = self.module(batch, asked)
            out = self._checked(raw, batch, asked)
            if K.FORCES not in out:
                (grad,) = torch.autograd.grad(out[K.ENERGY].sum(), pos, create_graph=keep_graph)
                out[K.FORCES] = -grad
        return out if keep_graph else {k: v.detach() for k, v in out.items()}

    #: an adapter's outputs are in physical units already (its normaliser is the identity)
    predict = forward

    def _checked(self, raw: Any, batch, asked: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The contract's keys of what the module returned, each checked."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"adapter teacher {self.name}: forward must return a dict (energy, forces, features), "
                              f"got a {type(raw).__name__}")
        n, s = int(batch[K.POSITIONS].shape[0]), int(batch[K.NATOMS].reshape(-1).shape[0])
        if self.direct_forces != (K.FORCES in raw):
            # the two kinds of forces differ (-dE/dpos is conservative, its Jacobian symmetric):
            # the adapter says which it gives
            raise ConfigError(f"adapter teacher {self.name}: " + (
                "direct_forces is True but forward returned no 'forces'" if self.direct_forces else
                "forward returned 'forces' but does not set direct_forces = True; set it (kdcache then uses "
                "those forces), or return no forces (kdcache takes -dE/dpos)"))
        shapes = {K.ENERGY: (s,), K.FORCES: (n, 3), K.ATOM_ENERGY: (n,)}
        out = {}
        for key in (K.ENERGY, K.FORCES, *asked):
            if key == K.FORCES and not self.direct_forces:
                continue  # taken by autograd
            if key not in raw:
                raise ConfigError(f"adapter teacher {self.name}: forward returned no {key!r} (returned "
                                  f"{sorted(raw)}); it was asked for {list(asked)}")
            value = raw[key]
            where = f"adapter teacher {self.name}: {key!r}"
            if key in FEATURE_SHAPES:
                out[key] = check_per_atom(key, value, n, where)
                continue
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shapes[key]:
                got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ConfigError(f"{where} must be a tensor of shape {list(shapes[key])}, got {got}")
            out[key] = value
        return out


class AdapterTeacher:
    """An adapter module as a teacher, with what the store's provenance and identity need.

    Builds the module once, on ``device`` in eval mode: a spec that does not build fails before
    any store is made.

    Args:
        spec: which module.
        device: where it runs.
    """

    #: a graph kdcache cannot know
    graph: dict = {}
    warnings: tuple = ()

    def __init__(self, spec: AdapterSpec, device: torch.device):
        from kdcache.models.torchfile import weights_sha256
        from kdcache.teachers.calculator import package_info

        self.spec, self.name = spec, spec.name
        module = spec.build()
        self.module_class = f"{type(module).__module__}.{type(module).__qualname__}"
        self.weights_sha256 = weights_sha256(module)
        self.adapter = AdapterModel(module, spec.name).to(device).eval()
        #: what runs: the adapter, or a :class:`~kdcache.teachers.hooks.HookedTeacher` around it
        self.model: nn.Module = self.adapter
        self.package = package_info(spec.module)
        self.feature_modules: dict[str, str] = {}

    def _config(self) -> dict:
        return {"module": self.spec.module, "function": self.spec.function, "kwargs": self.spec.kwargs}

    def identity(self) -> dict:
        """What decides the stored values (a resume must present the same): the function, its
        arguments, the source and version of its package, the weights, the hooked features."""
        d = {"name": self.name, "kind": "adapter", "weights_sha256": self.weights_sha256,
             "config": {**self._config(), "version": self.package["version"],
                        "module_sha256": self.package["module_sha256"]}}
        if self.feature_modules:
            d["feature_modules"] = self.feature_modules
        return d

    def describe(self) -> dict:
        """The teacher's provenance (``kdcache store info``)."""
        adapter = self.adapter
        d = {"name": self.name, "kind": "adapter", "preset": None, "checkpoint": None, "checkpoint_sha256": None,
             "weights_sha256": self.weights_sha256,
             "config": {**self._config(), "class": self.module_class,
                        "available_features": [*adapter.available_features,
                                               *([K.ATOM_ENERGY] if adapter.offers_atom_energy else [])],
                        "direct_forces": adapter.direct_forces, **self.package}}
        if self.feature_modules:
            d["feature_modules"] = self.feature_modules
        return d
