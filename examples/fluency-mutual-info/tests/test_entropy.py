"""Known answers for activation-entropy, and agreement with numpy.histogram + scipy.stats.entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fluency_mutual_info.plugin import histogram_entropy


def reference(row: np.ndarray, bins: int) -> float:
    """Independent computation: numpy's equal-width histogram over [min, max], scipy's entropy in bits."""
    counts, _ = np.histogram(row, bins=bins, range=(row.min(), row.max()))
    return float(stats.entropy(counts, base=2))


def test_uniform_is_log2_bins() -> None:
    x = torch.rand(2, 1_000_000, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(histogram_entropy(x, 64).numpy(), math.log2(64), atol=1e-3)


def test_constant_is_zero() -> None:
    x = torch.full((3, 100), 2.5)
    x[1] = 0.0
    assert histogram_entropy(x, 64).tolist() == [0.0, 0.0, 0.0]
    assert histogram_entropy(x, 64, miller_madow=True).tolist() == [0.0, 0.0, 0.0]


def test_two_equiprobable_values_is_one_bit() -> None:
    x = torch.tensor([[0.0, 1.0] * 500, [-3.0, 7.0] * 500])
    np.testing.assert_allclose(histogram_entropy(x, 64).numpy(), 1.0, atol=1e-12)


def test_scale_and_shift_invariance() -> None:
    x = torch.randn(4, 5000, generator=torch.Generator().manual_seed(1))
    h = histogram_entropy(x, 32)
    torch.testing.assert_close(histogram_entropy(x * 8.0, 32), h, rtol=0, atol=0)  # exact for powers of 2
    torch.testing.assert_close(histogram_entropy(x * 3.7 + 11.0, 32), h, rtol=0, atol=2e-3)


@pytest.mark.parametrize("bins", [2, 7, 64])
def test_matches_numpy_histogram_and_scipy(bins: int) -> None:
    g = torch.Generator().manual_seed(bins)
    x = torch.cat([torch.randn(3, 2000, generator=g), torch.relu(torch.randn(3, 2000, generator=g)),
                   torch.rand(2, 2000, generator=g) ** 3])
    expected = [reference(row, bins) for row in x.double().numpy()]
    np.testing.assert_allclose(histogram_entropy(x, bins).numpy(), expected, atol=1e-12)


def test_miller_madow_adds_m_minus_1_over_2n_ln2() -> None:
    x = torch.relu(torch.randn(5, 300, generator=torch.Generator().manual_seed(2)))
    plain, corrected = histogram_entropy(x, 16), histogram_entropy(x, 16, miller_madow=True)
    for row, h, hc in zip(x.double().numpy(), plain.tolist(), corrected.tolist(), strict=True):
        counts, _ = np.histogram(row, bins=16, range=(row.min(), row.max()))
        m = int((counts > 0).sum())
        assert hc - h == pytest.approx((m - 1) / (2 * 300 * math.log(2)), abs=1e-12)
