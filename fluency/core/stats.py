"""Statistics shared by every analysis: multiple-testing correction across a run."""

from __future__ import annotations

import numpy as np
from statsmodels.stats.multitest import multipletests


def fdr_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values; NaN entries (no test) stay NaN and are not counted."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="fdr_bh")[1]
    return out
