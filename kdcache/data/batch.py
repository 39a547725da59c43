"""Samples into one PyG batch, checked: the one place both stages collate.

Stage one needs structures only, so a batch whose samples do not all carry a label simply leaves
that label out. Training and evaluation ``require`` the labels; a sample without one is a
:class:`~kdcache.errors.DataError` naming its file, its dataset index and the field.

Samples hold float32 (:func:`kdcache.data.sample.make_sample`), so a value that is finite in
the file's float64 but beyond float32's range arrives here as infinity. Every floating-point
structure field, and every required label, costs one ``torch.isfinite(...).all()`` over the
batch; only when that fails are the samples searched for the culprit.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from kdcache import keys as K
from kdcache.errors import DataError

#: the labels a sample may carry; a teacher needs none of them
LABELS = (K.ENERGY, K.FORCES)
#: floating-point structure fields, checked in every batch
STRUCTURE_FLOATS = (K.POSITIONS, K.CELL)


def sample_file(dataset, index: int | None):
    """The file sample ``index`` of ``dataset`` came from (for error messages).

    Args:
        dataset: a kdcache dataset, or a wrapper of one (``Subset``, ``JoinedDataset``: anything
            with a ``dataset`` attribute), or None.
        index: the global dataset index, or None.

    Returns:
        The file (one ``.lmdb`` of a folder, the extxyz, ...), else the dataset's path, else its
        class name.
    """
    while dataset is not None and not hasattr(dataset, "file_of") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if dataset is None:
        return "<batch>"
    if index is not None and hasattr(dataset, "file_of"):
        return dataset.file_of(index)
    return getattr(dataset, "path", None) or type(dataset).__name__


def dataset_index(sample, position: int) -> int:
    """A sample's global dataset index (``sample_index``), else its position in the batch."""
    value = getattr(sample, K.SAMPLE_INDEX, None)
    return int(value.reshape(-1)[0]) if value is not None else int(position)


def _without(sample, fields: Sequence[str]):
    out = copy.copy(sample)  # shallow: the tensors are shared, the original keeps its fields
    for f in fields:
        if getattr(out, f, None) is not None:
            del out[f]
    return out


def require_fields(sample, dataset, fields: Sequence[str], position: int = 0) -> None:
    """Refuse a sample that lacks one of ``fields``.

    Args:
        sample: a kdcache sample.
        dataset: where it came from (names the file).
        fields: what it must carry (e.g. :data:`LABELS`).
        position: its position in a batch; used only when it has no ``sample_index``.

    Raises:
        DataError: naming the file, the dataset index and the first missing field.
    """
    for field in fields:
        if getattr(sample, field, None) is None:
            idx = dataset_index(sample, position)
            raise DataError(sample_file(dataset, idx), idx, field,
                            f"missing: training and evaluation need {' and '.join(map(repr, fields))} "
                            "on every sample")


def non_finite_error(dataset, index: int, field: str, count: int, dtype: torch.dtype) -> DataError:
    """The error of ``count`` NaN/infinite values of ``field`` in sample ``index`` (held as ``dtype``)."""
    name = str(dtype).replace("torch.", "")
    return DataError(sample_file(dataset, index), index, field,
                     f"{count} value(s) are NaN or infinite in {name} "
                     f"(finite values beyond ±{torch.finfo(dtype).max:.3g} overflow {name})")


def require_finite(sample, dataset, fields: Sequence[str] = (*STRUCTURE_FLOATS, *LABELS), position: int = 0) -> None:
    """Refuse a sample with a NaN or infinite value in one of ``fields`` (those it carries): the
    one finiteness rule, applied per sample by ``kdcache data convert`` and, to find the culprit
    of a bad batch, by :func:`collate`.

    Args:
        sample: a kdcache sample.
        dataset: where it came from (names the file).
        fields: the fields to check; absent and non-floating-point ones are skipped.
        position: its position in a batch or dataset; used only when it has no ``sample_index``.

    Raises:
        DataError: naming the file, the dataset index, the field and how many values are bad.
    """
    for field in fields:
        value = getattr(sample, field, None)
        if value is None or not value.is_floating_point():
            continue
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise non_finite_error(dataset, dataset_index(sample, position), field, bad, value.dtype)


def collate(samples: list, dataset=None, require: Sequence[str] = ()):
    """One batch of kdcache samples, with their values checked.

    Args:
        samples: kdcache samples (``Sample`` with ``sample_index``).
        dataset: where they came from, to name the file in errors (see :func:`sample_file`).
        require: fields every sample must have, e.g. :data:`LABELS` to train or evaluate. A
            label not required that some samples lack is left out of the batch (a teacher
            needs no labels).

    Returns:
        A PyG ``Batch``.

    Raises:
        DataError: naming file, dataset index (not the position in the batch) and field: a
            required field is missing, or a structure field or required label is NaN or
            infinite (e.g. a float64 value beyond float32's range).
    """
    from torch_geometric.data import Batch

    for pos, s in enumerate(samples):
        require_fields(s, dataset, require, pos)
    partial = [f for f in LABELS if f not in require
               and len({getattr(s, f, None) is None for s in samples}) > 1]
    if partial:
        samples = [_without(s, partial) for s in samples]
    batch = Batch.from_data_list(samples)
    for field in (*STRUCTURE_FLOATS, *require):
        value = getattr(batch, field, None)
        if value is None or not value.is_floating_point() or bool(torch.isfinite(value).all()):
            continue
        for pos, s in enumerate(samples):  # only now: find the culprit
            require_finite(s, dataset, (field,), pos)
        raise AssertionError(f"no sample holds the non-finite {field!r} of the batch")  # pragma: no cover
    return batch
