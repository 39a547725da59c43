"""Linear centred kernel alignment (CKA) between two sets of per-atom features.

CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc
(Kornblith et al., 2019). It compares representations of different widths, is 1 for X vs X,
and is unchanged by orthogonal transforms and isotropic scaling of either side, which is why the
paper uses it to compare teacher and student features. For one-dimensional features it is the
squared Pearson correlation.
"""

from __future__ import annotations

import numpy as np
import torch


def linear_cka(x, y) -> float:
    """Linear CKA of two feature matrices with the same rows (atoms).

    Args:
        x: ``[n, p]`` features (numpy or torch; vector features ``[n, 3, p]`` are flattened to
            ``[n, 3p]``).
        y: ``[n, q]`` features of the same ``n`` atoms.

    Returns:
        CKA in [0, 1]; ``nan`` if either side is constant.
    """
    x = _as_matrix(x)
    y = _as_matrix(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same atoms on both sides, got {x.shape[0]} and {y.shape[0]} rows")
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    # the p x q / p x p / q x q form costs O(n (p+q)^2), not O(n^2): fine for many atoms
    cross = np.linalg.norm(y.T @ x) ** 2
    nx = np.linalg.norm(x.T @ x)
    ny = np.linalg.norm(y.T @ y)
    if nx == 0 or ny == 0:
        return float("nan")
    return float(cross / (nx * ny))


def _as_matrix(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    return a.reshape(a.shape[0], -1)
