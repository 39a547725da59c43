"""Reading and writing model checkpoints.

Two layouts are read:

* **Open Catalyst** (``"ocp"``): ``state_dict`` (keys prefixed ``module.``), ``config`` with
  ``model`` (registry name) and ``model_attributes`` (constructor arguments), ``normalizers``
  (``target`` / ``grad_target`` mean and std) and optionally ``ema`` — whose shadow parameters
  replace the trained ones, as the reference does at evaluation time — and ``scale_dict``.
* **kdcache** (``"kdcache"``): ``{"format": "kdcache", "model", "config", "state_dict",
  "normalizer", ...}``, written by :func:`save_checkpoint`; the model is rebuilt from the file
  alone.

Files are read with ``torch.load(..., weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kdcache.errors import CheckpointError
from kdcache.models.base import Normalizer, PotentialModel
from kdcache.models.registry import MODEL_CLASSES, build_model, is_model_name
# one home each, below every model (a model's constructor applies a scale file without importing
# this loader); re-exported here, where callers have always found them
from kdcache.models.scaling import apply_scale_file, holds_scale_factor, scale_factor_modules
from kdcache.models.torchfile import file_sha256, read_checkpoint

KDCACHE_FORMAT = "kdcache"
OCP_FORMAT = "ocp"
#: constructor arguments of Open Catalyst configs that name files, not architecture
_FILE_ARGS = ("scale_file",)


@dataclass
class LoadedModel:
    """A model restored from a checkpoint.

    Args:
        model: the model (eval mode, normaliser set from the checkpoint).
        name: registry name (``gemnet_oc``, ``painn``, ``schnet``).
        config: constructor arguments the model was built with.
        sha256: hex digest of the checkpoint file.
        source_format: ``"ocp"`` or ``"kdcache"``.
        path: the file.
        used_ema: True when EMA shadow weights replaced the trained weights.
        extra: anything else the file carried (kdcache: the ``extra`` of :func:`save_checkpoint`).
    """

    model: PotentialModel
    name: str
    config: dict
    sha256: str
    source_format: str
    path: str
    used_ema: bool = False
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):  # DataParallel adds one, DDP-in-DataParallel two
            key = key[len("module.") :]
        out[key] = value
    return out


def _build(path: Path, name: Any, config: Any) -> PotentialModel:
    if not is_model_name(name):
        raise CheckpointError(f"checkpoint {path}: unknown model {name!r}; known: {sorted(MODEL_CLASSES)}")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"checkpoint {path}: model configuration is missing or not a mapping")
    config = {k: v for k, v in config.items() if k not in _FILE_ARGS}
    try:
        return build_model(name, **config)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint {path}: configuration does not fit model {name!r}: {exc}") from exc


def _load_weights(path: Path, model: nn.Module, state_dict: Mapping[str, Any], allow_missing_scales: bool) -> list[str]:
    """Strict load that names every problem. Returns missing scale-factor keys (if allowed)."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"checkpoint {path}: 'state_dict' is missing or not a mapping")
    expected = model.state_dict()
    scale_keys = {f"{p}.scale_factor" if p else "scale_factor"
                  for p, m in model.named_modules() if holds_scale_factor(m)}
    # The normaliser is restored from the checkpoint's own entry, never from state_dict keys
    # (Open Catalyst checkpoints keep it apart from the model).
    missing = [k for k in expected if k not in state_dict and not k.startswith("normalizer.")]
    unexpected = [k for k in state_dict if k not in expected]
    missing_scales = [k for k in missing if k in scale_keys]
    missing_other = [k for k in missing if k not in scale_keys]
    if not allow_missing_scales:
        missing_other += missing_scales
        missing_scales = []
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    not_tensors = [k for k in expected if k in state_dict and not isinstance(state_dict[k], torch.Tensor)]
    problems = []
    if missing_other:
        problems.append(f"missing keys {missing_other}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    if not_tensors:
        problems.append(f"non-tensor entries {not_tensors}")
    if problems:
        raise CheckpointError(f"checkpoint {path}: state_dict does not fit {type(model).__name__}: " + "; ".join(problems))
    # Load at the stored precision: copying float64 weights into a float32 model and converting
    # afterwards would lose the digits float64 parity needs.
    # (normaliser buffers are always float64 and say nothing about the weights' precision)
    stored = next((v.dtype for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                   and not k.startswith("normalizer.")), None)
    if stored is not None:
        model.to(dtype=stored)
    model.load_state_dict({k: v for k, v in state_dict.items()}, strict=False)
    return missing_scales


def _apply_ema(path: Path, model: nn.Module, ema: Any) -> bool:
    """Copy EMA shadow parameters onto the trainable parameters (same order as the reference:
    ``model.parameters()`` restricted to ``requires_grad``)."""
    if not isinstance(ema, Mapping) or ema.get("shadow_params") is None:
        return False
    shadow = ema["shadow_params"]
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not isinstance(shadow, (list, tuple)) or len(shadow) != len(params):
        n = len(shadow) if isinstance(shadow, (list, tuple)) else "?"
        raise CheckpointError(f"checkpoint {path}: EMA has {n} shadow parameters, model has {len(params)} trainable ones")
    bad = [
        f"{name}: ema {tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__} vs model {tuple(p.shape)}"
        for name, s, p in zip(names, shadow, params)
        if not isinstance(s, torch.Tensor) or s.shape != p.shape
    ]
    if bad:
        raise CheckpointError(f"checkpoint {path}: EMA shadow parameters do not fit the model: {bad}")
    with torch.no_grad():
        for s, p in zip(shadow, params):
            p.copy_(s)
    return True


def _ocp_normalizer(path: Path, normalizers: Any, dataset_cfg: Any) -> Normalizer:
    def get(group_keys, stat):
        if isinstance(normalizers, Mapping):
            for g in group_keys:
                entry = normalizers.get(g)
                if isinstance(entry, Mapping):
                    for s in stat:
                        if s in entry:
                            return float(entry[s])
        return None

    mean = get(("target", "energy"), ("mean",))
    std = get(("target", "energy"), ("std", "stdev", "rmsd"))
    fstd = get(("grad_target", "forces"), ("std", "stdev", "rmsd"))
    if mean is None and isinstance(dataset_cfg, Mapping) and dataset_cfg.get("normalize_labels"):
        mean, std = dataset_cfg.get("target_mean"), dataset_cfg.get("target_std")
        fstd = dataset_cfg.get("grad_target_std", std)
    if mean is None or std is None:
        return Normalizer()  # un-normalised training: raw = physical
    return Normalizer(mean, std, fstd)


def load_checkpoint(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    scale_file: str | os.PathLike | Mapping | None = None,
    fast: bool = False,
) -> LoadedModel:
    """Restore a model from an Open Catalyst or a kdcache checkpoint.

    Args:
        path: the checkpoint file.
        device: where to put the model (default: CPU).
        dtype: floating dtype of the model (default: as stored).
        scale_file: scale factors (JSON/.pt/dict) for checkpoints that do not carry them.
        fast: return the compiled path (:func:`kdcache.models.fast.fast_model`: same weights and
            outputs, the body compiled on first use); False: the eager model, the reference.

    Returns:
        A :class:`LoadedModel` (model in eval mode, normaliser set).

    Raises:
        CheckpointError: unreadable file, unknown model, keys missing/unexpected/mis-shaped.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    digest = file_sha256(path)
    used_ema = False
    extra: dict = {}
    if ckpt.get("format") == KDCACHE_FORMAT:
        model, extra = _from_kdcache(path, ckpt)
        if scale_file is not None:
            apply_scale_file(model, scale_file)
        source = KDCACHE_FORMAT
    elif "state_dict" in ckpt and "config" in ckpt:
        model, used_ema = _from_ocp(path, ckpt, scale_file)
        source = OCP_FORMAT
    else:
        raise CheckpointError(
            f"checkpoint {path}: neither a kdcache checkpoint (format='kdcache') nor an Open Catalyst one "
            f"(state_dict + config); top-level keys: {sorted(map(str, ckpt))}"
        )
    if dtype is not None:
        model = model.to(dtype=dtype)
    model = model.to(device or "cpu")
    model.eval()
    if fast:
        from kdcache.models.fast import fast_model  # torch.compile only for those who ask for it

        model = fast_model(model)
    return LoadedModel(model=model, name=model.name, config=dict(model.config), sha256=digest,
                       source_format=source, path=str(path), used_ema=used_ema, extra=extra)


def _from_kdcache(path: Path, ckpt: dict) -> tuple[PotentialModel, dict]:
    """A kdcache checkpoint's model (weights, normaliser) and its ``extra``.

    Args:
        path: the file (for messages).
        ckpt: its contents.
    """
    model = _build(path, ckpt.get("model"), ckpt.get("config"))
    _load_weights(path, model, ckpt.get("state_dict"), allow_missing_scales=False)
    norm = dict(ckpt.get("normalizer") or {})
    # per-element references ride in the state_dict; files written before they existed
    # lack the key and load with zeros (= the normalisation they were trained with)
    atom_ref = norm.pop("atom_ref", None)
    if atom_ref is None:
        atom_ref = (ckpt.get("state_dict") or {}).get("normalizer.atom_ref")
    try:
        model.normalizer = Normalizer(**{k: float(v) for k, v in norm.items()}, atom_ref=atom_ref)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: bad 'normalizer' entry {norm!r}") from exc
    return model, dict(ckpt.get("extra") or {})


def _from_ocp(path: Path, ckpt: dict, scale_file) -> tuple[PotentialModel, bool]:
    """An Open Catalyst checkpoint's model (weights, EMA, scale factors, normaliser).

    Args:
        path: the file (for messages).
        ckpt: its contents.
        scale_file: scale factors for a checkpoint that carries none.

    Returns:
        The model and whether EMA shadow weights replaced the trained ones.
    """
    cfg = ckpt["config"]
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"checkpoint {path}: 'config' is not a mapping")
    name = cfg.get("model")
    if isinstance(name, Mapping):  # newer layout: model: {name: ..., **attrs}
        attrs = {k: v for k, v in name.items() if k != "name"}
        name = name.get("name")
    else:
        attrs = cfg.get("model_attributes")
    model = _build(path, name, attrs)
    missing_scales = _load_weights(path, model, _strip_module_prefix(ckpt["state_dict"]), allow_missing_scales=True)
    used_ema = _apply_ema(path, model, ckpt.get("ema"))
    scale_dict = ckpt.get("scale_dict")
    if missing_scales:
        if not (scale_dict or scale_file):
            raise CheckpointError(
                f"checkpoint {path}: scale factors {missing_scales} are not in the checkpoint; pass scale_file="
            )
        apply_scale_file(model, scale_dict or scale_file)
    elif scale_dict:
        apply_scale_file(model, scale_dict)  # the reference lets a checkpoint's scale_dict win
    model.normalizer = _ocp_normalizer(path, ckpt.get("normalizers"), cfg.get("dataset"))
    return model, used_ema


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, model: PotentialModel, extra: Mapping | None = None) -> Path:
    """Write a kdcache checkpoint atomically (temporary file, then rename).

    The file holds ``{"format": "kdcache", "model": name, "config": ..., "state_dict": ...,
    "normalizer": ..., "extra": ...}``: enough to rebuild the model with :func:`load_checkpoint`.
    ``extra`` must be plain data (numbers, strings, lists, dicts, tensors).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": KDCACHE_FORMAT,
        "model": model.name,
        "config": dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "normalizer": model.normalizer.as_dict(),
        "extra": dict(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # serialised in memory, then written: torch's zip writer reports a full disk as an
            # opaque RuntimeError, a plain write as OSError(ENOSPC)
            buf = io.BytesIO()
            torch.save(payload, buf)
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


__all__ = [
    "KDCACHE_FORMAT", "OCP_FORMAT", "LoadedModel", "apply_scale_file", "file_sha256", "load_checkpoint",
    "read_checkpoint", "save_checkpoint", "scale_factor_modules",
]
