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

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kdcache.errors import CheckpointError
from kdcache.models import MODEL_CLASSES, build_model
from kdcache.models.base import Normalizer, PotentialModel

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


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# scale factors
# ---------------------------------------------------------------------------------------------


def scale_factor_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Scale-factor submodules by the name a scale file uses for them.

    A scale factor is any submodule holding a 0-dim ``scale_factor`` tensor; its key is its
    ``name`` attribute when set (GemNet-OC), else its module path (PaiNN).
    """
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        sf = getattr(module, "scale_factor", None)
        if isinstance(sf, torch.Tensor) and sf.dim() == 0:
            found[getattr(module, "name", None) or path] = module
    return found


def _read_scale_file(scale_file) -> dict[str, float]:
    if isinstance(scale_file, Mapping):
        raw = dict(scale_file)
    else:
        path = Path(scale_file)
        if not path.is_file():
            raise CheckpointError(f"scale file {path}: no such file")
        try:
            if path.suffix == ".json":
                raw = json.loads(path.read_text())
            elif path.suffix == ".pt":
                raw = read_checkpoint(path, what="scale file")
            else:
                raise CheckpointError(f"scale file {path}: unsupported extension {path.suffix!r} (.json or .pt)")
        except CheckpointError:
            raise
        except Exception as exc:  # unreadable JSON
            raise CheckpointError(f"scale file {path}: cannot be read ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"scale file {path}: expected a mapping of names to numbers")
    raw.pop("comment", None)  # old JSON scale files carry the model name there
    out = {}
    for k, v in raw.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"scale file {scale_file}: entry {k!r} is not a number") from exc
    return out


def apply_scale_file(model: nn.Module, scale_file) -> list[str]:
    """Set a model's scale factors from a JSON/.pt file or a dict ``{name: value}``.

    Every scale factor of the model must be present. Entries the model does not have are
    ignored (older files name factors of removed layers). Returns the names set.
    """
    values = _read_scale_file(scale_file)
    modules = scale_factor_modules(model)
    missing = sorted(set(modules) - set(values))
    if missing:
        raise CheckpointError(f"scale file {scale_file}: no value for scale factor(s) {missing}")
    with torch.no_grad():
        for name, module in modules.items():
            module.scale_factor.fill_(values[name])
    return sorted(modules)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike, mmap: bool = False, what: str = "checkpoint") -> dict:
    """The contents of a torch file, read as data only: the one way kdcache opens a ``.pt`` a
    user names (checkpoints, scale files, runs to resume).

    ``weights_only=True`` makes torch refuse any pickled global outside tensors and plain
    containers, so a file that would run code when unpickled is an error instead.

    Args:
        path: the file.
        mmap: map the tensors' storage instead of reading it (cheap when only metadata such as
            the model name is wanted); ignored for old non-zip files, which cannot be mapped.
        what: what the file is, for messages.

    Returns:
        The top-level dict.

    Raises:
        CheckpointError: missing file, unreadable or code-carrying file, or not a dict at the top.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
    try:
        with warnings.catch_warnings():
            # torch warns on stderr about any pickle protocol above 2 before refusing or reading
            # the file; the outcome (data or a named error) is all a user needs
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:
        raise CheckpointError(f"{what} {path}: cannot be read as a weights-only torch file ({_load_problem(exc)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{what} {path}: expected a dict at the top level, found {type(ckpt).__name__}")
    return ckpt


def _load_problem(exc: Exception) -> str:
    """One line from torch's load error: the reason, without torch's advice.

    torch wraps the weights-only unpickler's own one-line reason (which it keeps as the
    exception's context) in paragraphs that advise ``weights_only=False`` or allowlisting
    globals, i.e. running the file's code, which kdcache never does: only the reason's first
    sentence is kept.

    Args:
        exc: what ``torch.load`` raised.

    Returns:
        The reason, e.g. ``"... refused it: Trying to load unsupported GLOBAL posix.system whose
        module posix is blocked; a checkpoint is data, never code"``.
    """
    refused = isinstance(exc, pickle.UnpicklingError) and isinstance(exc.__context__, pickle.UnpicklingError)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc.__context__ if refused else exc))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    # the first sentence names the global or opcode; what follows is advice
    reason = re.split(r"(?<=\.)\s", first, maxsplit=1)[0].rstrip(".")
    if refused:
        return f"the weights-only unpickler refused it: {reason}; a checkpoint is data, never code"
    return f"{type(exc).__name__}: {reason}"


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):  # DataParallel adds one, DDP-in-DataParallel two
            key = key[len("module.") :]
        out[key] = value
    return out


def _build(path: Path, name: Any, config: Any) -> PotentialModel:
    if not isinstance(name, str) or name.lower().replace("-", "_") not in MODEL_CLASSES:
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
    scale_keys = {f"{p}.scale_factor" if p else "scale_factor" for p in _module_paths_with_scale(model)}
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


def _module_paths_with_scale(model: nn.Module) -> list[str]:
    return [
        p
        for p, m in model.named_modules()
        if isinstance(getattr(m, "scale_factor", None), torch.Tensor) and getattr(m, "scale_factor").dim() == 0
    ]


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
) -> LoadedModel:
    """Restore a model from an Open Catalyst or a kdcache checkpoint.

    Args:
        path: the checkpoint file.
        device: where to put the model (default: CPU).
        dtype: floating dtype of the model (default: as stored).
        scale_file: scale factors (JSON/.pt/dict) for checkpoints that do not carry them.

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
        name, config = ckpt.get("model"), ckpt.get("config")
        model = _build(path, name, config)
        missing_scales = _load_weights(path, model, ckpt.get("state_dict"), allow_missing_scales=False)
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
        extra = dict(ckpt.get("extra") or {})
        source = KDCACHE_FORMAT
    elif "state_dict" in ckpt and "config" in ckpt:
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
        state = _strip_module_prefix(ckpt["state_dict"])
        missing_scales = _load_weights(path, model, state, allow_missing_scales=True)
        used_ema = _apply_ema(path, model, ckpt.get("ema"))
        scale_dict = ckpt.get("scale_dict")
        if missing_scales:
            source_of_scales = scale_dict or scale_file
            if not source_of_scales:
                raise CheckpointError(
                    f"checkpoint {path}: scale factors {missing_scales} are not in the checkpoint; pass scale_file="
                )
            apply_scale_file(model, source_of_scales)
        elif scale_dict:
            apply_scale_file(model, scale_dict)  # the reference lets a checkpoint's scale_dict win
        model.normalizer = _ocp_normalizer(path, ckpt.get("normalizers"), cfg.get("dataset"))
        source = OCP_FORMAT
    else:
        raise CheckpointError(
            f"checkpoint {path}: neither a kdcache checkpoint (format='kdcache') nor an Open Catalyst one "
            f"(state_dict + config); top-level keys: {sorted(map(str, ckpt))}"
        )

    if scale_file is not None and source == KDCACHE_FORMAT:
        apply_scale_file(model, scale_file)
    if dtype is not None:
        model = model.to(dtype=dtype)
    model = model.to(device or "cpu")
    model.eval()
    return LoadedModel(
        model=model,
        name=model.name,
        config=dict(model.config),
        sha256=digest,
        source_format=source,
        path=str(path),
        used_ema=used_ema,
        extra=extra,
    )


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
