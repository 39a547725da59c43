"""Linear CKA: exact values, invariances, and the reasons the report can trust it."""

import numpy as np
import pytest
import torch

from kdcache.pipeline.cka import linear_cka


def test_identical_features_give_one():
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_transform_and_scale():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 6))
    y = x @ rng.normal(size=(6, 4)) + 0.3 * rng.normal(size=(60, 4))
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    assert linear_cka(x, 7.5 * y @ q) == pytest.approx(base, rel=1e-10)
    q6, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x @ q6, y) == pytest.approx(base, rel=1e-10)
    # but not to a general (non-orthogonal) linear map
    assert linear_cka(x @ np.diag([1, 1, 1, 1, 1, 50.0]), y) != pytest.approx(base, rel=1e-3)


def test_known_value_one_dimensional_is_squared_correlation():
    # x = [1, 2, 3], y = [1, 4, 9]: centred dot 8, |x|^2 = 2, |y|^2 = 294/9 -> 64 / (2 * 294 / 9) = 48/49
    assert linear_cka([1.0, 2.0, 3.0], [1.0, 4.0, 9.0]) == pytest.approx(48 / 49, rel=1e-12)


def test_known_value_small_matrix():
    # X = I_3 columns centred; Y = first column only: Xc^T Xc = C (centering matrix, eigenvalues 1,1,0),
    # ||C||_F = sqrt(2); Yc = c1 (first column of C), ||Yc^T Yc|| = |c1|^2 = 2/3,
    # ||Yc^T Xc||^2 = |C c1|^2 = |c1|^2 = 2/3 -> CKA = (2/3) / (sqrt(2) * 2/3) = 1/sqrt(2)
    x = np.eye(3)
    y = np.eye(3)[:, :1]
    assert linear_cka(x, y) == pytest.approx(1 / np.sqrt(2), rel=1e-12)


def test_torch_input_vector_features_and_errors():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(20, 3, 5))
    assert linear_cka(torch.tensor(v), v.reshape(20, 15)) == pytest.approx(1.0)
    assert np.isnan(linear_cka(np.ones((5, 2)), rng.normal(size=(5, 2))))
    with pytest.raises(ValueError, match="same atoms"):
        linear_cka(np.ones((5, 2)), np.ones((4, 2)))
