"""The ``paired`` analysis: each metric's per-image values compared between checkpoints on the same images.

Oracles written independently of the plugin: ``scipy.stats.ttest_rel`` (p and its own confidence
interval) and the interval by hand from ``scipy.stats.t``; ``scipy.stats.wilcoxon`` on the two vectors
and the exact signed-rank distribution enumerated over every sign pattern; d_z and the rank-biserial
correlation in numpy (the latter also from scipy's one-sided T₊); statsmodels' Benjamini–Hochberg for the
run-wide family. End to end: two checkpoints (the shipped model and a perturbed copy) through the CLI
(``--json``, the report) and the user guide's commands (two models trained with Adam and with SAM).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from scipy import stats
from statsmodels.stats.multitest import multipletests

from fluency.core.plugin.analysis import AnalysisData
from fluency.plugins.default_paired import Paired, rank_biserial


def paired_data(values: dict[str, np.ndarray], metric: str = "gini", layer: str | None = "enc1") -> AnalysisData:
    """An analysis input with one (metric, layer) measured under each checkpoint of ``values``."""
    n = len(next(iter(values.values())))
    ids = [f"img{k}" for k in range(n)]
    frames = [pd.DataFrame({"image_id": ids, "checkpoint": ck, "metric": metric, "layer": layer, "value": v})
              for ck, v in values.items()]
    return AnalysisData(pd.concat(frames, ignore_index=True), pd.DataFrame({"image_id": ids, "rating": 0.0}),
                        "rating")


def one_row(values: dict[str, np.ndarray], **options) -> pd.Series:
    out = Paired(**options).run(paired_data(values))
    assert len(out) == 1
    return out.iloc[0]


def test_agrees_with_scipy_and_the_formulas_by_hand() -> None:
    rng = np.random.default_rng(3)
    a = rng.gamma(2.0, size=40)  # skewed, as sparsity and error metrics are
    b = a * 0.9 + rng.normal(scale=0.4, size=40)
    a[[1, 7]], b[[4, 7]] = np.nan, np.inf  # dropped pairwise: 37 images left
    # "sam" sorts after "adam": the pair is adam−sam, the difference adam − sam
    row = one_row({"sam": b, "adam": a})
    keep = np.isfinite(a) & np.isfinite(b)
    x, y = a[keep], b[keep]
    d = x - y
    n = len(d)
    assert row.checkpoint == "adam−sam" and row.statistic == "mean_diff" and row.n == n == 37
    assert row.estimate == pytest.approx(np.mean(x) - np.mean(y), rel=1e-12)
    assert (row.mean_a, row.mean_b) == pytest.approx((np.mean(x), np.mean(y)), rel=1e-12)
    t_rel = stats.ttest_rel(x, y)
    assert row.p_t == pytest.approx(t_rel.pvalue, rel=1e-9) and row.p == row.p_t  # the family's p: the t-test
    ci = t_rel.confidence_interval(0.95)
    assert (row.ci_low, row.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    sd = np.sqrt(np.sum((d - d.mean()) ** 2) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert (row.ci_low, row.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-9)
    assert row.sd_diff == pytest.approx(sd, rel=1e-12) and row.d_z == pytest.approx(d.mean() / sd, rel=1e-12)
    assert row.p_wilcoxon == pytest.approx(stats.wilcoxon(x, y).pvalue, rel=1e-9)
    t_plus = stats.wilcoxon(d, alternative="greater").statistic  # T₊, the sum of the positive ranks
    assert row.r_rb == pytest.approx(2 * t_plus / (n * (n + 1) / 2) - 1, rel=1e-12)
    assert "t = " in row.note and "36 df" in row.note
    wil = one_row({"sam": b, "adam": a}, test="wilcoxon", ci=0.9)
    assert wil.p == wil.p_wilcoxon == row.p_wilcoxon and wil.p_t == row.p_t
    assert (wil.ci_low, wil.ci_high) == pytest.approx(tuple(t_rel.confidence_interval(0.9)), rel=1e-9)


def test_signed_rank_p_is_the_exact_distribution_enumerated() -> None:
    """n = 10 distinct non-zero differences: p = P(|T₊ − n(n+1)/4| ≥ observed) over all 2¹⁰ equally likely
    sign patterns of the ranks 1…10 (the exact null; no scipy)."""
    d = np.array([0.8, -0.3, 1.9, 2.4, -0.05, 1.1, 0.6, -1.4, 3.0, 0.2])
    ranks = np.argsort(np.argsort(np.abs(d))) + 1.0
    observed = ranks[d > 0].sum()
    null = np.array([ranks[np.array(signs, bool)].sum() for signs in itertools.product([0, 1], repeat=10)])
    centre = 10 * 11 / 4
    exact = np.mean(np.abs(null - centre) >= abs(observed - centre) - 1e-12)
    row = one_row({"a": d, "b": np.zeros(10)})
    assert row.p_wilcoxon == pytest.approx(exact, rel=1e-12)
    assert row.r_rb == pytest.approx((observed - (55 - observed)) / 55, rel=1e-12)


def test_rank_biserial_with_ties_and_zeros_by_hand() -> None:
    # non-zero |d| = 1, 2, 2, 3 → ranks 1, 2.5, 2.5, 4; T₊ = 1 + 2.5 + 4 = 7.5, T₋ = 2.5 → r = 5/10
    assert rank_biserial(np.array([1.0, -2.0, 2.0, 0.0, 3.0])) == 0.5
    assert rank_biserial(np.array([1.0, 2.0])) == 1.0 and math.isnan(rank_biserial(np.zeros(3)))


def test_identical_models_give_zero_and_no_test() -> None:
    """scipy's signed-rank test has no answer when every difference is 0 (NaN, or an error in older
    versions): the row says so, with estimate 0 and p NaN, and leaves the FDR family."""
    v = np.random.default_rng(0).normal(size=60)
    row = one_row({"a": v, "b": v.copy()})
    assert row.estimate == 0 and (row.ci_low, row.ci_high) == (0, 0) and row.n == 60
    assert all(math.isnan(row[c]) for c in ("p", "p_t", "p_wilcoxon", "d_z", "r_rb"))
    assert "identical values" in row.note
    shift = one_row({"a": v + 0.5, "b": v})  # a constant difference: no sd, so no t; the signed-rank test holds
    assert shift.estimate == pytest.approx(0.5) and math.isnan(shift.p) and math.isnan(shift.d_z)
    assert shift.p_wilcoxon == pytest.approx(stats.wilcoxon(v + 0.5, v).pvalue) and shift.r_rb == 1.0
    assert "constant difference" in shift.note
    zeros = one_row({"a": np.r_[v[:20] + 1.0, v[20:]], "b": v})  # 40 zero differences: out of the signed ranks
    assert "40 zero differences" in zeros.note and zeros.p_wilcoxon == pytest.approx(
        stats.wilcoxon(np.r_[v[:20] + 1.0, v[20:]], v).pvalue)


def test_too_few_shared_images_three_checkpoints_and_missing_layers() -> None:
    few = one_row({"a": np.array([1.0, 2.0, np.nan, 4.0]), "b": np.array([1.5, np.nan, 3.0, 4.1])})
    assert few.n == 2 and math.isnan(few.p) and "fewer than 3" in few.note
    assert few.estimate == pytest.approx(np.mean([1.0 - 1.5, 4.0 - 4.1]))
    rng = np.random.default_rng(1)
    data = paired_data({c: rng.normal(size=12) for c in ("c", "a", "b")})
    whole = paired_data({"a": rng.normal(size=12), "b": rng.normal(size=12)}, metric="recon-l2", layer=None)
    enc2 = paired_data({"a": rng.normal(size=12), "c": rng.normal(size=12)}, layer="enc2")  # no b at enc2
    out = Paired().run(AnalysisData(pd.concat([data.metrics, whole.metrics, enc2.metrics]), data.ratings, "rating"))
    assert sorted(zip(out.metric, out.layer.fillna("-"), out.checkpoint)) == [
        ("gini", "enc1", "a−b"), ("gini", "enc1", "a−c"), ("gini", "enc1", "b−c"), ("gini", "enc2", "a−c"),
        ("recon-l2", "-", "a−b")]


# --- end to end -----------------------------------------------------------------------------------------------

def perturbed_checkpoint(path: Path) -> None:
    """The shipped model with seeded weight noise, as a second checkpoint."""
    from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
    from fluency.core.plugin.manager import PluginManager

    loaded = load_checkpoint(DEFAULT_CHECKPOINT, PluginManager(autoload=False))
    info = {k: v for k, v in loaded.info.items() if k not in ("format", "format_version", "architecture")}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.3 * p.std().nan_to_num() * torch.randn_like(p))
    save_checkpoint(path, loaded.model, "vae-small", **info, note="perturbed weights")


def test_default_analyses_add_paired_for_two_or_more_checkpoints() -> None:
    from fluency.core.run.analyse import default_analyses

    assert default_analyses(1) == ["pearson", "spearman"]
    assert default_analyses(2) == default_analyses(3) == ["pearson", "spearman", "paired"]


def test_two_checkpoints_paired_rows_in_the_family_json_and_report(tmp_path: Path) -> None:
    from fluency.cli import cli
    from fluency.core.inputs import demo
    from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT

    demo.export(tmp_path / "demo", n=16)
    perturbed_checkpoint(tmp_path / "noisy.pt")
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["run", "--images", str(tmp_path / "demo/images"), "--ratings",
                                   str(tmp_path / "demo/ratings.csv"), "--checkpoint", str(DEFAULT_CHECKPOINT),
                                   "--checkpoint", str(tmp_path / "noisy.pt"), "--metric", "gini,recon-error",
                                   "--analysis", "pearson,paired", "-o", "pearson.n_boot=0", "--no-figures",
                                   "--no-store", "--no-covariates", "--out", str(run), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["analysis_effects"]["paired"][0]["kind"] == "difference"
    paired = pd.read_parquet(run / "analyses" / "paired.parquet")
    metrics = pd.read_parquet(run / "metrics.parquet")
    keys = metrics[["metric", "layer"]].drop_duplicates()
    assert len(paired) == len(keys) == 9 and set(paired.checkpoint) == {"default−noisy"}  # gini ×6, recon ×3
    for row in paired.itertuples():
        sel = metrics[(metrics.metric == row.metric) & (metrics.layer.isna() if pd.isna(row.layer)
                                                       else metrics.layer == row.layer)]
        wide = sel.pivot(index="image_id", columns="checkpoint", values="value")
        a, b = wide["default"].to_numpy(), wide["noisy"].to_numpy()
        assert row.n == 16 and row.estimate == pytest.approx(np.mean(a - b), rel=1e-9, abs=1e-15)
        assert row.p == row.p_t == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-6)
        assert row.p_wilcoxon == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-9)
    tables = [pd.read_parquet(run / "analyses" / f"{name}.parquet") for name in ("pearson", "paired")]
    every = pd.concat(tables, ignore_index=True)
    ok = every["p"].notna().to_numpy()
    assert ok.sum() == len(every)  # no NaN test here: all enter one family
    assert np.allclose(every["p_fdr"], multipletests(every["p"], method="fdr_bh")[1], rtol=1e-12)
    summary = json.loads(res.stdout)
    shown = [r for r in summary["other_effects"]["difference"] if r["analysis"] == "paired"]
    assert shown and all(r["statistic"] == "mean_diff" and r["checkpoint"] == "default−noisy" for r in shown)
    first = paired[(paired.metric == shown[0]["metric"])
                   & (paired.layer.fillna("-") == (shown[0]["layer"] or "-"))].iloc[0]
    # --json writes 10 decimal places (pandas' to_json)
    assert shown[0]["estimate"] == pytest.approx(first.estimate, abs=1e-10) and shown[0]["n"] == 16
    assert shown[0]["p_fdr"] == pytest.approx(first.p_fdr, abs=1e-10)
    assert {"ci_low", "ci_high", "d_z", "r_rb", "p_wilcoxon"} <= set(shown[0])
    page = (run / "report.html").read_text()
    assert "<h2>Analysis: paired</h2>" in page
    assert all(f"<th>{c}</th>" in page for c in ("p_t", "p_wilcoxon", "d_z", "r_rb", "mean_a", "mean_b"))


def test_the_user_guides_paired_commands_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fluency.cli import cli

    text = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text(encoding="utf-8")
    section = text[text.index("### Paired differences between checkpoints"):text.index("## Pretrained brain models")]
    (block,) = [b.split("```", 1)[0] for b in section.split("```bash\n")[1:]]
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 4
    monkeypatch.chdir(tmp_path)
    for command in commands:
        args = command.split("#", 1)[0].split()
        assert args[0] == "fluency", command
        res = CliRunner().invoke(cli, args[1:], catch_exceptions=False)
        assert res.exit_code == 0, (command, res.output)
    out = " ".join(res.stdout.split())  # the terminal summary of the last command, the run
    assert "Differences between checkpoints" in out and "Δ mean" in out and "adam−sam" in out
    run = tmp_path / "runs/adam-vs-sam"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["analyses"] == ["pearson", "spearman", "paired"]  # added: the run has two checkpoints
    paired = pd.read_parquet(run / "analyses" / "paired.parquet")
    assert set(paired.checkpoint) == {"adam−sam"} and (paired.n == 16).all() and paired.p.between(0, 1).all()
