"""Hidden features of any torch teacher by module path: ``kdcache extract --feature node=interactions.2``.

As torchdistill names them, a feature is the output of a submodule, found by its path in the
teacher (``model.get_submodule("interactions.2")``) and caught by a forward hook during the
teacher's forward. ``KEY=PATH`` stores that output under the store key ``KEY``; ``KEY=PATH[i]``
takes element ``i`` of a module that returns a tuple (PaiNN's layers return ``(scalar,
vector)``). Then n2n (``node``) and v2v (``vector``) work with any architecture, built-in or an
adapter (:mod:`kdcache.teachers.adapter`), and the stored targets get the per-channel statistics
of every hidden feature (the store writer's).

The output must be per atom, one row per atom of the batch in the batch's order:

========================  ===================  ========================
key                       output shape         read by
========================  ===================  ========================
``node``, ``e2n``         ``[atoms, d]``       n2n, e2n
``vector``, ``e2v``       ``[atoms, 3, d]``    v2v
========================  ===================  ========================

The hooked module must run exactly once per forward: a module that does not run, or one called
several times (weights shared between steps), has no one output to store, and is refused.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from kdcache import keys as K
from kdcache.errors import ConfigError

#: what a hooked output of each store key must look like (``None``: the channels, any number)
FEATURE_SHAPES: dict[str, tuple] = {K.NODE: (None,), K.E2N: (None,), K.VECTOR: (3, None), K.E2V: (3, None)}
#: a module path (``interactions.2``, ``blocks.0.mlp``), optionally with a tuple index (``[1]``)
_PATH = re.compile(r"^(?P<path>(?:[A-Za-z_]\w*|\d+)(?:\.(?:[A-Za-z_]\w*|\d+))*)(?:\[(?P<index>\d+)\])?$")


def shape_text(key: str) -> str:
    """The per-atom shape ``key`` needs, as a message writes it (``[atoms, 3, d]``)."""
    return "[" + ", ".join(["atoms", *("d" if s is None else str(s) for s in FEATURE_SHAPES[key])]) + "]"


def check_per_atom(key: str, value: Any, num_atoms: int, where: str) -> torch.Tensor:
    """``value`` if it is a floating tensor of the per-atom shape of ``key`` (:data:`FEATURE_SHAPES`).

    Args:
        key: the store key.
        value: what the teacher gave.
        num_atoms: atoms in the batch.
        where: what gave it, for the message (``--feature node=interactions.2``).

    Raises:
        ConfigError: naming ``where``, the shape given and the shape needed.
    """
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        what = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise ConfigError(f"{where}: gives {what}; {key} must be a floating tensor {shape_text(key)}")
    want = FEATURE_SHAPES[key]
    shape = tuple(value.shape)
    if len(shape) != 1 + len(want) or shape[0] != num_atoms or any(w is not None and s != w
                                                                    for s, w in zip(shape[1:], want)):
        hint = ": hook a module whose output has one row per atom" if not shape or shape[0] != num_atoms else ""
        raise ConfigError(f"{where}: output has shape {list(shape)}, but {key} is per atom, {shape_text(key)} "
                          f"with {num_atoms} atoms in this batch{hint}")
    return value


def parse_feature_modules(value: Any) -> dict[str, str] | None:
    """``--feature`` values (``["node=interactions.2", ...]``) or a mapping as ``{key: path}``.

    Raises:
        ValueError: an item not of the form ``KEY=PATH``, an unknown key, a key given twice, or a
            path that is no module path.
    """
    if value is None:
        return None
    items = list(value.items()) if isinstance(value, Mapping) else None
    if items is None:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected KEY=MODULE.PATH items, got {value!r}")
        items = []
        for item in value:
            key, eq, path = str(item).partition("=")
            if not eq:
                raise ValueError(f"{item!r} is not KEY=MODULE.PATH, e.g. node=interactions.2")
            items.append((key, path))
    out: dict[str, str] = {}
    for key, path in items:
        key, path = str(key).strip(), str(path).strip()
        if key not in FEATURE_SHAPES:
            raise ValueError(f"{key}={path}: the key must be one of {', '.join(FEATURE_SHAPES)}")
        if key in out:
            raise ValueError(f"{key} is given twice ({out[key]} and {path})")
        if not _PATH.match(path):
            raise ValueError(f"{key}={path}: {path!r} is not a module path such as interactions.2 or "
                             "update_layers.1[1]")
        out[key] = path
    return out


@dataclass(frozen=True)
class HookPoint:
    """Where one hooked feature comes from.

    Args:
        key: the store key.
        spec: the path as given (``update_layers.1[1]``).
        module: the submodule.
        index: the element of a tuple output, or None.
    """

    key: str
    spec: str
    module: nn.Module
    index: int | None

    @property
    def where(self) -> str:
        return f"--feature {self.key}={self.spec}"

    @classmethod
    def find(cls, root: nn.Module, teacher: str, key: str, spec: str) -> "HookPoint":
        """The submodule of ``root`` that ``spec`` names.

        Raises:
            ConfigError: no such module (naming the path, with the closest module paths).
        """
        m = _PATH.match(spec)
        path, index = m["path"], (int(m["index"]) if m["index"] is not None else None)
        try:
            module = root.get_submodule(path)
        except AttributeError:
            names = [n for n, _ in root.named_modules() if n]
            close = difflib.get_close_matches(path, names, n=4, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            top = ", ".join(n for n, _ in root.named_children()) or "none"
            raise ConfigError(f"--feature {key}={spec}: teacher {teacher} has no module {path!r}{hint} (its top-level "
                              f"modules: {top})") from None
        return cls(key, spec, module, index)

    def take(self, outputs: list, num_atoms: int) -> torch.Tensor:
        """The feature from what the hook caught in one forward (detached: a target, never
        differentiated).

        Raises:
            ConfigError: the module ran not exactly once, its output is not a tensor (or the
                index does not fit it), or not per atom.
        """
        if len(outputs) != 1:
            why = ("did not run in the teacher's forward" if not outputs else
                   f"ran {len(outputs)} times in one forward (a module called more than once has no one output)")
            raise ConfigError(f"{self.where}: the module {why}; hook a module that runs once per forward")
        out = outputs[0]
        if isinstance(out, (tuple, list)):
            if self.index is None or self.index >= len(out):
                pick = f"{self.spec.split('[')[0]}[0]" if self.index is None else f"an index below {len(out)}"
                raise ConfigError(f"{self.where}: the module returns a {type(out).__name__} of {len(out)} outputs; "
                                  f"choose one, e.g. {pick}")
            out = out[self.index]
        elif self.index is not None:
            raise ConfigError(f"{self.where}: the module returns one {type(out).__name__}, not a tuple; drop "
                              f"[{self.index}]")
        return check_per_atom(self.key, out, num_atoms, self.where).detach()


def _catch(caught: list, module, inputs, output) -> None:
    caught.append(output)


class HookedTeacher(nn.Module):
    """A teacher model some of whose hidden features come from forward hooks (module docstring).

    It offers what ``model`` offers, plus the hooked keys (a hooked key replaces the model's own
    feature of that name); ``forward`` and ``predict`` are ``model``'s, with the hooked outputs
    added, and every other attribute is the model's. ``kdcache extract`` stores the hooked keys whatever ``--features`` says
    (:attr:`hooked_features`).

    Args:
        model: the teacher: a :class:`kdcache.models.base.PotentialModel`, or an
            :class:`kdcache.teachers.adapter.AdapterModel` (whose paths are those of the
            adapter's own module, :attr:`hook_root`).
        feature_modules: store key -> module path (:func:`parse_feature_modules`).
    """

    def __init__(self, model: nn.Module, feature_modules: Mapping[str, str]):
        super().__init__()
        self.model = model
        root = getattr(model, "hook_root", model)
        self.points = {k: HookPoint.find(root, model.name, k, p) for k, p in feature_modules.items()}
        self.name = model.name
        self.hooked_features = tuple(self.points)
        self.available_features = tuple(dict.fromkeys([*model.available_features, *self.points]))

    def __getattr__(self, name: str):
        # everything else is the model's (normalizer, regress_forces, gradient_forces, ...), so
        # that the runner sees the teacher it wraps
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__["_modules"].get("model")
            if model is None or name == "model":
                raise
            return getattr(model, name)

    def forward(self, batch, features: Iterable[str] = ()) -> dict:
        """The model's forward (raw units) with the hooked features."""
        return self._hooked(self.model, batch, features)

    def predict(self, batch, features: Iterable[str] = ()) -> dict:
        """The model's predict (physical units) with the hooked features."""
        return self._hooked(self.model.predict, batch, features)

    def _hooked(self, call, batch, features: Iterable[str]) -> dict:
        features = list(features)
        hooked = [k for k in features if k in self.points]
        caught: dict[str, list] = {k: [] for k in hooked}
        handles = [self.points[k].module.register_forward_hook(functools.partial(_catch, caught[k])) for k in hooked]
        try:
            out = dict(call(batch, [k for k in features if k not in self.points]))
        finally:
            for h in handles:
                h.remove()
        n = int(batch[K.POSITIONS].shape[0])
        for k in hooked:
            out[k] = self.points[k].take(caught[k], n)
        return out


def hook_features(teacher, feature_modules: Mapping[str, str] | None):
    """Give ``teacher`` (a model or adapter teacher: ``model``, ``feature_modules``) the features
    ``feature_modules`` names; they become part of its identity. No-op for none."""
    if feature_modules:
        teacher.model = HookedTeacher(teacher.model, feature_modules)
        teacher.feature_modules = dict(feature_modules)
    return teacher
