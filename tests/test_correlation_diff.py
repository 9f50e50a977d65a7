"""Comparing checkpoints: the test of the difference between two dependent (overlapping) correlations.

r(metric under A, rating) and r(metric under B, rating) share the rating and the images, so their
difference is tested with Steiger's (1980) Z (or Williams' t, Meng et al.'s Z), which uses r_AB.
Known answers come from the papers and from depcor (Silver, Hittner & May 2006, Applied Psychological
Measurement 30, 152–153), a FORTRAN implementation independent of this one; a Monte-Carlo check gives
the size under H0 and the power against a planted difference.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import fluency
from fluency.core.analysis import AnalysisData
from fluency.core.stats import dependent_correlation_test, fdr_bh
from fluency.plugins.default_correlation import Partial, Pearson, Spearman


# --- known answers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "statistic", "p"), [("steiger", -1.0718, 0.2838), ("williams", -1.0767, 0.2843),
                                                        ("meng", -1.0707, 0.2843)])
def test_depcor_known_answers(method: str, statistic: float, p: float) -> None:
    """depcor's printed values for r_jk = .3, r_jh = .4, r_kh = .5, n = 100 (4 decimals)."""
    z, pv = dependent_correlation_test(0.3, 0.4, 0.5, 100, method)
    assert round(z, 4) == statistic and round(pv, 4) == p


def test_steiger_1980_case_a() -> None:
    """Steiger (1980, p. 249), case A: r_jk = .4, r_jh = .5, r_kh = .1, n = 103. The paper prints Z = −.8913
    from a covariance rounded to .0042; the unrounded formula gives −0.8887185 (as R's cocor)."""
    z, p = dependent_correlation_test(0.4, 0.5, 0.1, 103)
    assert z == pytest.approx(-0.8887185, abs=1e-7)
    assert z == pytest.approx(-0.8913, abs=0.003)
    assert p == pytest.approx(2 * stats.norm.sf(0.8887185), abs=1e-7)


def test_meng_rosenthal_rubin_1992_example_and_may_hittner_table() -> None:
    """Meng et al. (1992): r = .63 vs −.03, r_x = −.19, N = 15 → Z = 1.68, one-sided p = .047; and
    May & Hittner (1997)'s Meng Z for r = .5 vs .2, n = 50, over r_kh."""
    z, p = dependent_correlation_test(0.63, -0.03, -0.19, 15, "meng")
    assert round(z, 2) == 1.68 and round(p / 2, 3) == 0.047
    for r_kh, expected in [(0.0, 1.62), (0.3, 1.91), (0.5, 2.245), (0.8, 3.50)]:
        assert round(dependent_correlation_test(0.5, 0.2, r_kh, 50, "meng")[0], 3) == pytest.approx(expected, abs=5e-3)


def test_by_hand_from_the_published_formulas() -> None:
    """Steiger's eq. 14 and Williams' T2 written out on a fixed example (r = .55, .35, r_kh = .6, n = 80)."""
    r1, r2, rx, n = 0.55, 0.35, 0.6, 80
    rb = (r1 + r2) / 2
    psi = rx * (1 - 2 * rb**2) - 0.5 * rb**2 * (1 - 2 * rb**2 - rx**2)
    z = (math.atanh(r1) - math.atanh(r2)) * math.sqrt(n - 3) / math.sqrt(2 - 2 * psi / (1 - rb**2) ** 2)
    assert dependent_correlation_test(r1, r2, rx, n) == pytest.approx((z, 2 * stats.norm.sf(abs(z))), rel=1e-12)
    det = 1 - r1**2 - r2**2 - rx**2 + 2 * r1 * r2 * rx
    t = (r1 - r2) * math.sqrt((n - 1) * (1 + rx) / (2 * (n - 1) / (n - 3) * det + rb**2 * (1 - rx) ** 3))
    assert dependent_correlation_test(r1, r2, rx, n, "williams") == pytest.approx((t, 2 * stats.t.sf(abs(t), n - 3)),
                                                                                   rel=1e-12)
    # swapping the two correlations flips the sign and keeps p
    z2, p2 = dependent_correlation_test(r2, r1, rx, n)
    assert z2 == pytest.approx(-z) and p2 == pytest.approx(2 * stats.norm.sf(abs(z)))


def test_degenerate_cases_are_explicit() -> None:
    for method in ("steiger", "williams", "meng"):
        assert dependent_correlation_test(0.4, 0.4, 1.0, 50, method) == (0.0, 1.0)  # the same variable twice
        assert dependent_correlation_test(0.4, 0.4, 1 - 1e-14, 50, method) == (0.0, 1.0)
        assert all(math.isnan(v) for v in dependent_correlation_test(0.4, 0.3, 0.5, 3, method))
        assert all(math.isnan(v) for v in dependent_correlation_test(math.nan, 0.3, 0.5, 30, method))
    assert all(math.isnan(v) for v in dependent_correlation_test(1.0, 0.3, 0.5, 30))  # Fisher z undefined
    with pytest.raises(ValueError, match="method"):
        dependent_correlation_test(0.4, 0.3, 0.5, 30, "fisher")


# --- Monte Carlo: size under H0, power against a planted difference ---------------------------------------

def simulated_correlations(r_jk: float, r_jh: float, r_kh: float, n: int, sims: int,
                           seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample correlations (r_jk, r_jh, r_kh) of ``sims`` seeded trivariate-normal samples of size n."""
    corr = np.array([[1, r_jk, r_jh], [r_jk, 1, r_kh], [r_jh, r_kh, 1]])
    x = np.random.default_rng(seed).standard_normal((sims, n, 3)) @ np.linalg.cholesky(corr).T
    x = x - x.mean(1, keepdims=True)
    cov = np.einsum("sni,snj->sij", x, x)
    sd = np.sqrt(np.einsum("sii->si", cov))
    r = cov / sd[:, :, None] / sd[:, None, :]
    return r[:, 0, 1], r[:, 0, 2], r[:, 1, 2]


def rejection_rate(r_jk: float, r_jh: float, r_kh: float, n: int, method: str, sims: int = 2000,
                   seed: int = 0) -> tuple[float, np.ndarray]:
    a, b, c = simulated_correlations(r_jk, r_jh, r_kh, n, sims, seed)
    p = np.array([dependent_correlation_test(x, y, z, n, method)[1] for x, y, z in zip(a, b, c)])
    return float((p < 0.05).mean()), p


@pytest.mark.parametrize("method", ["steiger", "williams", "meng"])
@pytest.mark.parametrize(("rho", "r_kh", "n"), [(0.3, 0.8, 100), (0.0, 0.9, 60)])
def test_size_under_h0_is_nominal(method: str, rho: float, r_kh: float, n: int) -> None:
    rate, p = rejection_rate(rho, rho, r_kh, n, method)
    assert 0.03 <= rate <= 0.07
    assert stats.kstest(p, "uniform").pvalue > 1e-3  # p-values ~ uniform under H0


def test_power_against_a_planted_difference_beats_the_independent_test() -> None:
    """ρ = .5 vs .3 with r_kh = .7, n = 100: the dependent test detects it most of the time; the
    independent-samples Fisher z test (wrong here: it ignores r_kh) misses most of it."""
    rate, _ = rejection_rate(0.5, 0.3, 0.7, 100, "steiger")
    a, b, _ = simulated_correlations(0.5, 0.3, 0.7, 100, 2000, 0)
    independent = 2 * stats.norm.sf(np.abs(np.arctanh(a) - np.arctanh(b)) / np.sqrt(2 / 97))
    assert rate > 0.75 and float((independent < 0.05).mean()) < 0.5


# --- the analyses -------------------------------------------------------------------------------------------

def two_checkpoints(n: int = 80, seed: int = 3, same: bool = False) -> AnalysisData:
    """A metric at two layers under checkpoints A and B (correlated), one rating, the same images."""
    rng = np.random.default_rng(seed)
    ids = [f"img{i}" for i in range(n)]
    rating = rng.normal(size=n)
    frames = []
    for layer in ("enc1", "enc2"):
        base = 0.5 * rating + rng.normal(size=n)
        values = {"A": base, "B": base if same else base + rng.normal(scale=0.8, size=n) + 0.3 * rating}
        for ck, v in values.items():
            frames.append(pd.DataFrame({"image_id": ids, "checkpoint": ck, "metric": "gini", "layer": layer,
                                        "value": np.exp(v)}))  # monotone: Spearman differs from Pearson
    return AnalysisData(pd.concat(frames, ignore_index=True), pd.DataFrame({"image_id": ids, "beauty": rating}),
                        "beauty")


@pytest.mark.parametrize(("cls", "rank", "statistic"), [(Pearson, False, "r_diff"), (Spearman, True, "rho_diff")])
def test_correlation_analyses_add_one_diff_row_per_metric_layer_and_pair(cls, rank: bool, statistic: str) -> None:
    data = two_checkpoints()
    out = cls(n_boot=0).run(data)
    plain, diff = out[out.statistic == statistic[:-5]], out[out.statistic == statistic]
    assert len(plain) == 4 and len(diff) == 2 and set(diff.checkpoint) == {"A−B"}
    wide = data.joined().pivot_table(index=["layer", "image_id"], columns="checkpoint", values="value")
    rating = data.ratings.set_index("image_id")["beauty"]
    for row in diff.itertuples():
        a, b = wide.loc[row.layer, "A"], wide.loc[row.layer, "B"]
        y = rating.loc[a.index]
        if rank:
            a, b, y = stats.rankdata(a), stats.rankdata(b), stats.rankdata(y)
        r_a, r_b, r_ab = stats.pearsonr(a, y)[0], stats.pearsonr(b, y)[0], stats.pearsonr(a, b)[0]
        est = plain.set_index(["checkpoint", "layer"])["estimate"]
        assert row.estimate == pytest.approx(est["A", row.layer] - est["B", row.layer], abs=1e-12)
        assert row.estimate == pytest.approx(r_a - r_b, abs=1e-12)
        assert row.p == pytest.approx(dependent_correlation_test(r_a, r_b, r_ab, 80)[1], rel=1e-9)
        assert row.n == 80 and "Steiger" in row.note
        independent = 2 * stats.norm.sf(abs(np.arctanh(r_a) - np.arctanh(r_b)) / np.sqrt(2 / 77))
        assert row.p != pytest.approx(independent, rel=1e-3)  # not the independent-samples test
    assert (cls(n_boot=0, diff_test="williams").run(data).query(f"statistic == '{statistic}'")["note"]
            .str.contains("Williams").all())
    assert not (cls(n_boot=0, diff_test="none").run(data).statistic == statistic).any()


def test_identical_checkpoints_give_no_difference_and_p_one() -> None:
    for cls in (Pearson, Spearman):
        diff = cls(n_boot=0).run(two_checkpoints(same=True)).query("statistic.str.endswith('_diff')")
        assert len(diff) == 2 and (diff.estimate == 0).all() and (diff.p == 1).all()


def test_three_checkpoints_all_pairs_missing_layers_and_partial() -> None:
    data = two_checkpoints()
    c = data.metrics[data.metrics.checkpoint == "B"].assign(checkpoint="C")
    c = c[c.layer == "enc1"]  # C has no enc2
    data = AnalysisData(pd.concat([data.metrics, c]), data.ratings, "beauty")
    diff = Pearson(n_boot=0).run(data).query("statistic == 'r_diff'")
    assert sorted(zip(diff.layer, diff.checkpoint)) == [("enc1", "A−B"), ("enc1", "A−C"), ("enc1", "B−C"),
                                                        ("enc2", "A−B")]
    bc = diff[diff.checkpoint == "B−C"].iloc[0]  # C's values are B's: the degenerate case
    assert (bc.estimate, bc.p) == (0.0, 1.0)
    partial = Partial(covariates=["face_age"]).run(AnalysisData(data.metrics, data.ratings.assign(
        face_age=np.arange(80.0)), "beauty"))
    assert not partial.statistic.str.endswith("_diff").any()


def test_too_few_shared_images_is_reported() -> None:
    data = two_checkpoints(n=6)
    metrics = data.metrics.copy()
    metrics.loc[(metrics.checkpoint == "B") & metrics.image_id.isin(["img0", "img1", "img2"]), "value"] = np.nan
    diff = Pearson(n_boot=0).run(AnalysisData(metrics, data.ratings, "beauty")).query("statistic == 'r_diff'")
    assert diff["p"].isna().all() and diff["note"].str.contains("fewer than").all() and (diff.n == 3).all()


# --- end to end ---------------------------------------------------------------------------------------------

def test_run_over_checkpoints_compares_them_and_corrects_every_test(tmp_path: Path) -> None:
    from fluency.core.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
    from fluency.core.plugins import PluginManager

    loaded = load_checkpoint(DEFAULT_CHECKPOINT, PluginManager(autoload=False))
    info = {k: v for k, v in loaded.info.items() if k not in ("format", "format_version", "architecture")}
    save_checkpoint(tmp_path / "same.pt", loaded.model, "vae-small", **info, note="the same weights, another file")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.3 * p.std().nan_to_num() * torch.randn_like(p))
    save_checkpoint(tmp_path / "noisy.pt", loaded.model, "vae-small", **info, note="perturbed weights")
    result = fluency.run(metrics=["gini"], analyses=["pearson", "spearman"], checkpoints=[
        DEFAULT_CHECKPOINT, tmp_path / "same.pt", tmp_path / "noisy.pt"], options=["pearson.n_boot=0",
        "spearman.n_boot=0"], out=tmp_path / "run", progress=False, store=False, figures=False)
    layers = {"enc1", "enc2", "enc3", "enc4", "enc5", "all"}
    for name, statistic in (("pearson", "r_diff"), ("spearman", "rho_diff")):
        table = result.analyses[name]
        diff = table[table.statistic == statistic]
        assert set(diff.checkpoint) == {"default−same", "default−noisy", "noisy−same"}
        assert set(diff.layer) == layers and len(diff) == 3 * len(layers) and (diff.n == 240).all()
        same = diff[diff.checkpoint == "default−same"]
        assert (same.estimate == 0).all() and (same.p == 1).all()
        noisy = diff[diff.checkpoint == "default−noisy"]
        assert noisy.p.between(0, 1).all() and (noisy.estimate != 0).any()
        saved = pd.read_parquet(result.path / "analyses" / f"{name}.parquet")
        assert (saved.statistic == statistic).sum() == len(diff)
    every = pd.concat(result.analyses.values(), ignore_index=True)
    assert np.allclose(every["p_fdr"], fdr_bh(every["p"].to_numpy(float)), equal_nan=True)
    assert np.isfinite(every.loc[every.statistic.str.endswith("_diff"), "p_fdr"]).all()
    r = result.analyses["pearson"]
    r_of = {(row.checkpoint, row.layer): row.estimate for row in r[r.statistic == "r"].itertuples()}
    for row in r[(r.statistic == "r_diff") & (r.checkpoint == "default−noisy")].itertuples():
        assert row.estimate == pytest.approx(r_of[("default", row.layer)] - r_of[("noisy", row.layer)], abs=1e-12)
    from fluency.core.report import build_report

    page = build_report(result.path).read_text()
    assert (result.path / "figures" / "heatmap-pearson-diff.png").exists() and 'alt="heatmap-pearson-diff"' in page
