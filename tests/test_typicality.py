"""Typicality: a planted outlier is less typical than a prototype; fits are saved and reused; groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fluency.core.plugin.metric import MetricBatch
from fluency.plugins.default_typicality import Typicality, fit_gaussian, log_likelihood


def test_gaussian_log_likelihood_matches_scipy() -> None:
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) @ np.array([[2, 0, 0], [0.5, 1, 0], [0, 0, 0.3]])
    g = fit_gaussian(x, dims=3, eps=0.0)
    ref = multivariate_normal(x.mean(0), np.cov(x, rowvar=False)).logpdf(x[:5])
    assert np.allclose(log_likelihood(x[:5], g), ref, rtol=1e-8)


def _batches(outlier: bool = True):
    """40 smooth images around a prototype and, last, one noise image."""
    rng = np.random.default_rng(1)
    base = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 4, 16, 16)
    acts = base + 0.05 * torch.from_numpy(rng.normal(size=(40, 4, 16, 16))).float()
    acts[0] = base[0]  # the prototype
    if outlier:
        acts = torch.cat([acts, torch.from_numpy(rng.uniform(size=(1, 4, 16, 16))).float()])
    ids = [f"i{k}" for k in range(len(acts))]
    return ids, acts


def run_metric(metric: Typicality, ids, acts) -> pd.Series:
    for start in range(0, len(ids), 16):
        sl = slice(start, start + 16)
        metric.compute(MetricBatch(ids[sl], torch.zeros(len(ids[sl]), 3, 8, 8), {"enc1": acts[sl]}))
    ((got_ids, values),) = metric.finish()
    return pd.Series(values.as_numpy(), index=got_ids)


def test_planted_outlier_is_less_typical_than_the_prototype() -> None:
    ids, acts = _batches()
    scores = run_metric(Typicality(layers=["enc1"], dims=5), ids, acts)
    assert scores.idxmin() == ids[-1]
    assert scores[ids[0]] > scores.median() > scores[ids[-1]]


def test_fit_is_saved_and_reused(tmp_path: Path) -> None:
    ids, acts = _batches()
    first = Typicality(layers=["enc1"], dims=5)
    scores = run_metric(first, ids, acts)
    torch.save(first.state(), tmp_path / "fit.pt")
    reused = run_metric(Typicality(layers=["enc1"], dims=5, fit=str(tmp_path / "fit.pt")), ids[:10], acts[:10])
    assert np.allclose(reused.to_numpy(), scores[ids[:10]].to_numpy())


def test_per_group_gaussians(tmp_path: Path) -> None:
    """With groups, each image is scored under its own group's PCA Gaussian: the known answer is scikit-learn's
    PCA of that group's responses and scipy's Gaussian log-density of the image's components (variances floored
    by eps · their mean), computed here independently of the metric."""
    from scipy.stats import multivariate_normal
    from sklearn.decomposition import PCA

    from fluency.core.errors import FluencyError

    ids, acts = _batches(outlier=False)
    acts[20:] = acts[20:] + 3.0  # a second, shifted group
    table = pd.DataFrame({"image_id": ids, "sex": ["f"] * 20 + ["m"] * 20})
    table.to_csv(tmp_path / "g.csv", index=False)
    pooled = run_metric(Typicality(layers=["enc1"], dims=3), ids, acts)
    grouped = run_metric(Typicality(layers=["enc1"], dims=3, groups=str(tmp_path / "g.csv"), group_columns=["sex"]),
                         ids, acts)
    features = acts.flatten(1).double().numpy()  # 4×16×16 = 1024 ≤ max_features: no pooling
    for rows in (slice(0, 20), slice(20, 40)):
        pca = PCA(n_components=3, svd_solver="full").fit(features[rows])
        variances = pca.explained_variance_ + 1e-3 * pca.explained_variance_.mean()
        expected = multivariate_normal(np.zeros(3), np.diag(variances)).logpdf(pca.transform(features[rows]))
        assert np.allclose(grouped.to_numpy()[rows], expected, rtol=1e-9, atol=1e-9)
    assert grouped.mean() > pooled.mean()  # each image is more typical of its own group
    failing = Typicality(layers=["enc1"], groups=str(tmp_path / "g.csv"), group_columns=["sex2"])
    with pytest.raises(FluencyError, match=r"needs columns \['image_id', 'sex2'\] \(missing \['sex2'\]\)"):
        run_metric(failing, ids, acts)
    assert failing.state() is None  # a failed fit leaves nothing to save with the run
