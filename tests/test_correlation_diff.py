"""Comparing checkpoints: the test of the difference between two dependent (overlapping) correlations.

r(metric under A, rating) and r(metric under B, rating) share the rating and the images, so their
difference is tested with Steiger's (1980) Z (or Williams' t, Meng, Rosenthal & Rubin's 1992 Z), which
uses r_AB. Expected values are written out by hand from the published formulas (explicit arithmetic
with ``math`` and ``scipy.stats``, not the implementation); a simulation of the sampling variance
checks the covariance formula itself; Monte Carlo gives the size under H0 and the power against a
planted difference, and shows that the independent-samples Fisher test is miscalibrated here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from statsmodels.stats.multitest import multipletests

import fluency
from fluency.core.plugin.analysis import AnalysisData
from fluency.core.stats import compare_dependent_correlations, dependent_correlation_test
from fluency.plugins.default_correlation import Partial, Pearson, Spearman


# --- known answers, by hand from the formulas ---------------------------------------------------------------

def steiger_by_hand(r1: float, r2: float, rx: float, n: int) -> tuple[float, float]:
    """Steiger (1980) eq. 14/15: Z = (z1 − z2) √(n − 3) / √(2 − 2 s̄), s̄ = ψ / (1 − r̄²)², r̄ = (r1 + r2)/2,
    ψ = rx (1 − 2 r̄²) − ½ r̄² (1 − 2 r̄² − rx²)."""
    rb = (r1 + r2) / 2
    psi = rx * (1 - 2 * rb * rb) - 0.5 * rb * rb * (1 - 2 * rb * rb - rx * rx)
    s_bar = psi / (1 - rb * rb) ** 2
    z1 = 0.5 * math.log((1 + r1) / (1 - r1))
    z2 = 0.5 * math.log((1 + r2) / (1 - r2))
    z = (z1 - z2) * math.sqrt(n - 3) / math.sqrt(2 - 2 * s_bar)
    return z, 2 * stats.norm.sf(abs(z))


def williams_by_hand(r1: float, r2: float, rx: float, n: int) -> tuple[float, float]:
    """Williams' T2 (Steiger 1980 eq. 7), t with n − 3 df."""
    det = 1 - r1 * r1 - r2 * r2 - rx * rx + 2 * r1 * r2 * rx
    rb = (r1 + r2) / 2
    t = (r1 - r2) * math.sqrt((n - 1) * (1 + rx) / (2 * (n - 1) / (n - 3) * det + rb * rb * (1 - rx) ** 3))
    return t, 2 * stats.t.sf(abs(t), n - 3)


def meng_by_hand(r1: float, r2: float, rx: float, n: int) -> tuple[float, float]:
    """Meng, Rosenthal & Rubin (1992): Z = (z1 − z2) √[(n − 3) / (2 (1 − rx) h)], r̄² = (r1² + r2²)/2,
    f = min(1, (1 − rx) / (2 (1 − r̄²))), h = (1 − f r̄²) / (1 − r̄²)."""
    r2bar = (r1 * r1 + r2 * r2) / 2
    f = min(1.0, (1 - rx) / (2 * (1 - r2bar)))
    h = (1 - f * r2bar) / (1 - r2bar)
    z = (math.atanh(r1) - math.atanh(r2)) * math.sqrt((n - 3) / (2 * (1 - rx) * h))
    return z, 2 * stats.norm.sf(abs(z))


BY_HAND = {"steiger": steiger_by_hand, "williams": williams_by_hand, "meng": meng_by_hand}
#: (r_jk, r_jh, r_kh, n): the configurations of Steiger's (1980) case-A example, Meng et al.'s (1992)
#: example, a textbook case, a negative r_kh and an f = 1 case of Meng's formula
CASES = [(0.4, 0.5, 0.1, 103), (0.63, -0.03, -0.19, 15), (0.3, 0.4, 0.5, 100), (0.55, 0.35, 0.6, 80),
         (0.2, -0.3, -0.4, 40), (0.5, 0.2, -0.9, 50)]


@pytest.mark.parametrize("method", ["steiger", "williams", "meng"])
@pytest.mark.parametrize("case", CASES)
def test_agrees_with_the_formulas_written_out_by_hand(method: str, case: tuple[float, float, float, int]) -> None:
    assert dependent_correlation_test(*case, method) == pytest.approx(BY_HAND[method](*case), rel=1e-12)


def test_fixed_numbers() -> None:
    """Four-decimal values of the formulas on r = .3 vs .4, r_kh = .5, n = 100 (hand arithmetic: z(.3) = .30952,
    z(.4) = .42365, r̄ = .35, ψ = .5·.755 − ½·.1225·.505 = .34657, s̄ = .34657/.87750² = .45008,
    Z = −.11413·√97/√(2 − .90016) = −1.0718)."""
    z, p = dependent_correlation_test(0.3, 0.4, 0.5, 100)
    assert round(z, 4) == -1.0718 and round(p, 4) == 0.2838
    assert round(dependent_correlation_test(0.3, 0.4, 0.5, 100, "williams")[0], 4) == -1.0767
    assert round(dependent_correlation_test(0.3, 0.4, 0.5, 100, "meng")[0], 4) == -1.0707
    # swapping the two correlations flips the sign and keeps p
    z2, p2 = dependent_correlation_test(0.4, 0.3, 0.5, 100)
    assert z2 == pytest.approx(-z) and p2 == pytest.approx(p)


def test_steiger_variance_matches_simulation() -> None:
    """The covariance formula itself: over 20,000 seeded samples (n = 200) the variance of
    √(n − 3)·(z_jk − z_jh) is Steiger's 2 − 2 s̄ (evaluated at the population ρ) within 5 %."""
    rho, rho_x, n = 0.4, 0.6, 200
    a, b, _ = simulated_correlations(rho, rho, rho_x, n, 20_000, seed=1)
    empirical = np.var(np.sqrt(n - 3) * (np.arctanh(a) - np.arctanh(b)))
    psi = rho_x * (1 - 2 * rho**2) - 0.5 * rho**2 * (1 - 2 * rho**2 - rho_x**2)
    assert empirical == pytest.approx(2 - 2 * psi / (1 - rho**2) ** 2, rel=0.05)
    assert empirical < 0.6 * 2  # far below the independent-samples variance 2 that the naive test assumes


def test_degenerate_cases_are_explicit() -> None:
    for method in ("steiger", "williams", "meng"):
        assert dependent_correlation_test(0.4, 0.4, 1.0, 50, method) == (0.0, 1.0)  # the same variable twice
        assert dependent_correlation_test(0.4, 0.4, 1 - 1e-14, 50, method) == (0.0, 1.0)
        assert all(math.isnan(v) for v in dependent_correlation_test(0.4, 0.3, 0.5, 3, method))
        assert all(math.isnan(v) for v in dependent_correlation_test(math.nan, 0.3, 0.5, 30, method))
    assert all(math.isnan(v) for v in dependent_correlation_test(1.0, 0.3, 0.5, 30))  # Fisher z undefined
    assert dependent_correlation_test(1.0, 1.0, 0.5, 30) == (0.0, 1.0)  # equal, if perfect, correlations
    with pytest.raises(ValueError, match="method"):
        dependent_correlation_test(0.4, 0.3, 0.5, 30, "fisher")


def test_compare_dependent_correlations_on_data() -> None:
    """From raw values: pairwise-complete cases, ranks for Spearman, and the degenerate cases."""
    rng = np.random.default_rng(5)
    y = rng.normal(size=60)
    a = 0.5 * y + rng.normal(size=60)
    b = 0.6 * a + 0.8 * rng.normal(size=60)
    a_missing, y_missing = a.copy(), y.copy()
    a_missing[[0, 7]] = np.nan
    y_missing[3] = np.inf
    got = compare_dependent_correlations(y_missing, a_missing, b)
    keep = np.ones(60, bool)
    keep[[0, 3, 7]] = False
    r_a, r_b, r_ab = (stats.pearsonr(u, v)[0] for u, v in ((a[keep], y[keep]), (b[keep], y[keep]),
                                                           (a[keep], b[keep])))
    assert got.n == 57 and (got.r_a, got.r_b, got.r_ab) == pytest.approx((r_a, r_b, r_ab), rel=1e-12)
    assert got.difference == pytest.approx(r_a - r_b, abs=1e-14)
    assert (got.statistic, got.p) == pytest.approx(steiger_by_hand(r_a, r_b, r_ab, 57), rel=1e-10)
    difference, statistic, p = got[:3]  # (difference, z, two-sided p) first
    assert (difference, statistic, p) == (got.difference, got.statistic, got.p)
    ranked = compare_dependent_correlations(y, a, b, rank=True)
    rho = stats.spearmanr(np.column_stack([y, a, b])).statistic
    assert (ranked.r_a, ranked.r_b, ranked.r_ab) == pytest.approx((rho[0, 1], rho[0, 2], rho[1, 2]), rel=1e-12)
    assert ranked.p == pytest.approx(steiger_by_hand(rho[0, 1], rho[0, 2], rho[1, 2], 60)[1], rel=1e-10)
    # identical variables, an affine copy, a monotone copy under ranks: no difference, p = 1, no division by 0
    assert compare_dependent_correlations(y, a, a)[:3] == (0.0, 0.0, 1.0)
    assert compare_dependent_correlations(y, a, 3 * a + 1)[1:3] == (0.0, 1.0)
    assert compare_dependent_correlations(y, a, np.exp(a), rank=True)[:3] == (0.0, 0.0, 1.0)
    # b = −a: a real difference 2 r_a with variance 4/(n − 3) of z_a − z_b, finite
    neg = compare_dependent_correlations(y, a, -a)
    assert neg.difference == pytest.approx(2 * neg.r_a)
    assert neg.statistic == pytest.approx(2 * math.atanh(neg.r_a) * math.sqrt(57) / 2)
    # |r_a| = 1 (Fisher z infinite), a constant variable, too few complete cases: NaN, not an exception
    assert math.isnan(compare_dependent_correlations(y, 2 * y, b).p)
    assert math.isnan(compare_dependent_correlations(y, np.ones(60), b).p)
    few = compare_dependent_correlations(y[:5], a[:5], np.array([1.0, 2.0, np.nan, np.nan, 3.0]))
    assert few.n == 3 and math.isnan(few.p)


# --- Monte Carlo: size under H0, power against a planted difference ---------------------------------------

def simulated_correlations(r_jk: float, r_jh: float, r_kh: float, n: int, sims: int, seed: int,
                           rank: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample correlations (r_jk, r_jh, r_kh) of ``sims`` seeded trivariate-normal samples of size n
    (vectorised; ``rank``: Spearman's, the correlations of the ranks)."""
    corr = np.array([[1, r_jk, r_jh], [r_jk, 1, r_kh], [r_jh, r_kh, 1]])
    x = np.random.default_rng(seed).standard_normal((sims, n, 3)) @ np.linalg.cholesky(corr).T
    if rank:
        x = stats.rankdata(x, axis=1)
    x = x - x.mean(1, keepdims=True)
    cov = np.einsum("sni,snj->sij", x, x)
    sd = np.sqrt(np.einsum("sii->si", cov))
    r = cov / sd[:, :, None] / sd[:, None, :]
    return r[:, 0, 1], r[:, 0, 2], r[:, 1, 2]


def rejection_rate(r_jk: float, r_jh: float, r_kh: float, n: int, method: str, sims: int = 2000,
                   seed: int = 0, rank: bool = False) -> tuple[float, np.ndarray]:
    a, b, c = simulated_correlations(r_jk, r_jh, r_kh, n, sims, seed, rank)
    p = np.array([dependent_correlation_test(x, y, z, n, method)[1] for x, y, z in zip(a, b, c)])
    return float((p < 0.05).mean()), p


def naive_fisher_p(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """The independent-samples Fisher z test (wrong for dependent correlations: it assumes r_kh = 0)."""
    return 2 * stats.norm.sf(np.abs(np.arctanh(a) - np.arctanh(b)) / np.sqrt(2 / (n - 3)))


@pytest.mark.parametrize("method", ["steiger", "williams", "meng"])
@pytest.mark.parametrize(("rho", "r_kh"), [(0.3, 0.8), (0.3, 0.2), (0.0, 0.9), (0.5, 0.5)])
def test_size_under_h0_is_nominal(method: str, rho: float, r_kh: float) -> None:
    """Equal correlations with the rating (given r_kh), n = 100, 2000 seeded simulations: rejection at α = .05
    within [0.035, 0.065] (± 3 binomial SE), p-values ~ uniform."""
    rate, p = rejection_rate(rho, rho, r_kh, 100, method)
    assert 0.035 <= rate <= 0.065
    assert stats.kstest(p, "uniform").pvalue > 1e-3


def test_size_of_the_spearman_version() -> None:
    """Applied to Spearman coefficients (the large-sample approximation) the size is still near nominal."""
    rate, _ = rejection_rate(0.3, 0.3, 0.8, 100, "steiger", rank=True)
    assert 0.035 <= rate <= 0.065


def test_the_independent_fisher_test_is_miscalibrated() -> None:
    """Under H0 with r_kh = .8 the naive independent-samples test almost never rejects (far below α):
    it ignores that the two correlations move together. That is why the dependent test is used."""
    a, b, _ = simulated_correlations(0.3, 0.3, 0.8, 100, 2000, 0)
    assert float((naive_fisher_p(a, b, 100) < 0.05).mean()) < 0.01
    assert 0.035 <= rejection_rate(0.3, 0.3, 0.8, 100, "steiger")[0] <= 0.065  # the same samples, dependent test


@pytest.mark.parametrize("method", ["steiger", "williams", "meng"])
def test_power_against_a_planted_difference(method: str) -> None:
    """ρ_A = .5, ρ_B = .2, ρ_AB = .5, n = 100: the dependent test rejects in more than 80 % of 2000 samples."""
    rate, _ = rejection_rate(0.5, 0.2, 0.5, 100, method)
    assert rate > 0.8


def test_power_beats_the_independent_test() -> None:
    """ρ = .5 vs .3 with r_kh = .7, n = 100: the dependent test detects it most of the time; the
    independent-samples Fisher z test misses most of it."""
    rate, _ = rejection_rate(0.5, 0.3, 0.7, 100, "steiger")
    a, b, _ = simulated_correlations(0.5, 0.3, 0.7, 100, 2000, 0)
    assert rate > 0.75 and float((naive_fisher_p(a, b, 100) < 0.05).mean()) < 0.5


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
    from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
    from fluency.core.plugin.manager import PluginManager

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
        "spearman.n_boot=0"], by=["clutter"], out=tmp_path / "run", progress=False, store=False, figures=False)
    layers = {"enc1", "enc2", "enc3", "enc4", "enc5", "all"}
    groups = [g["group"] for g in result.manifest["subgroups"]["groups"] if g["analysed"]]
    assert len(groups) > 2  # "all" and at least two clutter levels
    for name, statistic in (("pearson", "r_diff"), ("spearman", "rho_diff")):
        table = result.analyses[name]
        every_group = table[table.statistic == statistic]
        assert sorted(every_group.group.unique()) == sorted(groups)  # compared within each subgroup too
        assert (every_group.groupby("group").size() == 3 * len(layers)).all()
        diff = every_group[every_group.group == "all"]
        assert set(diff.checkpoint) == {"default−same", "default−noisy", "noisy−same"}
        assert set(diff.layer) == layers and len(diff) == 3 * len(layers) and (diff.n == 240).all()
        same = diff[diff.checkpoint == "default−same"]
        assert (same.estimate == 0).all() and (same.p == 1).all()
        noisy = diff[diff.checkpoint == "default−noisy"]
        assert noisy.p.between(0, 1).all() and (noisy.estimate != 0).any()
        assert noisy.r_ab.between(-1, 1).all() and (noisy.r_ab < 1).any()
        saved = pd.read_parquet(result.path / "analyses" / f"{name}.parquet")
        assert (saved.statistic == statistic).sum() == len(every_group)
        # each r_diff is the difference of the two checkpoints' r rows (no image is missing here)
        plain = table[table.statistic == statistic[:-5]].set_index(["group", "checkpoint", "layer"])["estimate"]
        for row in every_group[every_group.checkpoint == "default−noisy"].itertuples():
            expected = plain[row.group, "default", row.layer] - plain[row.group, "noisy", row.layer]
            assert row.estimate == pytest.approx(expected, abs=1e-12)
            assert (row.r_a, row.r_b) == pytest.approx((plain[row.group, "default", row.layer],
                                                        plain[row.group, "noisy", row.layer]), abs=1e-12)
    every = pd.concat(result.analyses.values(), ignore_index=True)
    tested = every["p"].notna() & (every["same_as"] == "")
    adjusted = every["p_adj"].notna() & (every["same_as"] == "")  # the covariate-adjusted tests: the same family
    family = multipletests(np.concatenate([every.loc[tested, "p"], every.loc[adjusted, "p_adj"]]), method="fdr_bh")[1]
    assert np.allclose(every.loc[tested, "p_fdr"], family[:tested.sum()], rtol=1e-12, atol=0)  # one BH over all
    assert np.allclose(every.loc[adjusted, "p_adj_fdr"], family[tested.sum():], rtol=1e-12, atol=0)
    assert every.loc[~tested, "p_fdr"].isna().all()
    assert np.isfinite(every.loc[every.statistic.str.endswith("_diff"), "p_fdr"]).all()
    from rich.console import Console

    from fluency.core.outputs.report import build_report
    from fluency.core.outputs.summary import relations_table

    console = Console(record=True, width=200)
    effects = result.effects()
    console.print(relations_table(result.strongest(None), result.manifest["metric_columns"], effects))
    assert "r_A − r_B" not in console.export_text()  # a comparison is not ranked with the correlations
    console.print(relations_table(result.sections(None)["difference"], result.manifest["metric_columns"], effects))
    text = console.export_text()
    assert "r_A − r_B" in text and "rho_A − rho_B" in text and "default−noisy" in text
    page = build_report(result.path).read_text()
    assert (result.path / "figures" / "heatmap-pearson-r_diff.png").exists()
    assert 'alt="heatmap-pearson-r_diff"' in page
    assert "<th>r_ab</th>" in page
