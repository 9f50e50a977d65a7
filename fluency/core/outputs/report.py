"""``fluency report RUN_DIR``: one self-contained HTML page per run.

Figures are PNG files in ``RUN_DIR/figures/`` (and SVG copies of the heatmaps), embedded in
the page as base64 so the file can be mailed or archived and opened without a network; tables
are sortable by clicking a header (a few lines of inline JavaScript); provenance comes from
``manifest.json``.

Figures that need the model (reconstruction grids, latent interpolation strips, training curves) are
written by ``fluency run`` (:mod:`fluency.core.outputs.run_figures`) and embedded when present; the 2-D
projection of the latent means is drawn here from ``latents/<checkpoint>.parquet``, so this command can
redraw it without the model: PCA always, UMAP too when the optional ``umap-learn`` is installed.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fluency.core.outputs import figures
from fluency.core.outputs.report_html import (CSS, SORT_JS, figure as _img, grid, provenance, table as _table,
                                              warnings_box)
from fluency.core.atomic import atomic_write_text
from fluency.core.errors import FluencyError, error_text
from fluency.core.memory import release_memory
from fluency.core.plugin.analysis import EffectSize
from fluency.core.run.analyse import read_effects
from fluency.core.run.ceiling import with_ceiling
from fluency.core.run.folder import MANIFEST, outputs, read_manifest, run_status, write_manifest, writing
from fluency.core.run.replicates import COLUMNS as REPLICATE_COLUMNS, aggregate, configurations
from fluency.core.plugin.metric_columns import MetricColumns, as_columns, output_order
from fluency.core.run.tables import read_metric_columns


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N×2 scores, explained-variance ratios)`` of the first two principal components, by SVD.

    Each component's sign makes its largest-magnitude loading positive, so the figure is deterministic;
    the scores equal scikit-learn's ``PCA(2).fit_transform`` up to that sign.
    """
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, len(s))
    components = vt[:k] * np.where(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]
    scores = np.zeros((len(x), 2))
    scores[:, :k] = centred @ components.T
    total = float((s ** 2).sum())
    ratio = np.zeros(2)
    ratio[:k] = (s[:k] ** 2) / total if total > 0 else 0.0
    return scores, ratio


def _umap_2d(x: np.ndarray) -> np.ndarray | None:
    """UMAP embedding (seeded) when the optional ``umap-learn`` is installed, else None."""
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        return None
    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, len(x) - 1)), random_state=0)
    return np.asarray(reducer.fit_transform(np.asarray(x, dtype=np.float32)))


#: most images a latent projection draws; larger runs draw a seeded random sample (the caption says so)
MAX_PROJECTED = 5000


def _model_views(run: Path, label: str, manifest: dict[str, Any], ratings: pd.DataFrame | None,
                 rating_col: str) -> list[str]:
    """The HTML of one checkpoint's model figures: reconstructions, training curves, latent projections,
    interpolation strips (those written by the run are embedded; the projections are drawn here), side by
    side."""
    fig_dir = run / "figures"
    captions = ((manifest.get("figures") or {}).get("checkpoints") or {}).get(label) or {}
    parts: list[str] = []
    notes: list[str] = []
    for name, fallback in ((f"recon-{label}.png", f"Images (top), reconstructions with z = μ ({label})."),
                           (f"curves-{label}.png", f"Training curves ({label}), from the checkpoint's history.")):
        if (fig_dir / name).exists():
            parts.append(_img(fig_dir / name, captions.get(f"figures/{name}", fallback)))
    latents = run / "latents" / f"{label}.parquet"
    if latents.exists():
        table = _read_parquet(latents, ["image_id"])
        n_images = len(table)
        if n_images > MAX_PROJECTED:  # a seeded sample: the picture of 100,000 points is no clearer
            rows = np.sort(np.random.default_rng(0).choice(n_images, MAX_PROJECTED, replace=False))
            table = table.iloc[rows].reset_index(drop=True)
        of = f"a random sample of {len(table)} of the {n_images}" if n_images > len(table) else f"all {n_images}"
        x = table[[c for c in table.columns if c.startswith("mu_")]].to_numpy(np.float64)
        if len(x) >= 3 and x.shape[1] >= 1:
            ids = table["image_id"].astype(str)
            by = (manifest.get("subgroups") or {}).get("by") or []
            values = groups = None
            colour = "no ratings"
            if ratings is not None:
                rated = ratings.assign(image_id=ratings["image_id"].astype(str)).drop_duplicates("image_id")
                rated = rated.set_index("image_id").reindex(ids)
                if by and all(c in rated.columns for c in by):
                    groups = [", ".join(f"{c}={v}" for c, v in zip(by, row)) if not any(pd.isna(v) for v in row) else
                              "no rating" for row in rated[by].itertuples(index=False)]
                    colour = f"coloured by {', '.join(by)}"
                elif rating_col in rated.columns:
                    values = rated[rating_col].to_numpy(float)
                    colour = f"coloured by {rating_col}"
            scores, ratio = pca_2d(x)
            projections = [("pca", scores, (f"PC1 ({ratio[0]:.1%} of variance)", f"PC2 ({ratio[1]:.1%} of variance)"),
                            "PCA")]
            embedding = _umap_2d(x)
            if embedding is not None:
                projections.append(("umap", embedding, ("UMAP 1", "UMAP 2"), "UMAP (umap-learn, random_state=0)"))
            for key, coords, axes, method in projections:
                stem = fig_dir / f"latents-{key}-{label}"
                figures.latent_projection(coords, [stem.with_suffix(".png"), stem.with_suffix(".svg")],
                                          f"{label}: {method} of the latent means (n = {len(x)}), {colour}", axes,
                                          values, rating_col, groups)
                parts.append(_img(stem.with_suffix(".png"),
                                  f"2-D {method} projection of the latent means μ of {of} images "
                                  f"({x.shape[1]} dimensions), {colour}."))
            if embedding is None:
                notes.append("<p>UMAP: install the optional extra <code>fluency[umap]</code> (umap-learn) to add "
                             "a UMAP projection.</p>")
    k = 0
    while (fig_dir / f"interp-{label}-{k}.png").exists():
        name = f"interp-{label}-{k}.png"
        parts.append(_img(fig_dir / name, captions.get(f"figures/{name}", f"Latent interpolation ({label}).")))
        k += 1
    return [f"<h2>Model views ({html.escape(label)})</h2>", grid(parts), *notes] if parts else []


#: section headings of the effect-size views, by kind
_HEADINGS = {"correlation": "Correlations with the rating", "coefficient": "Regression coefficients",
             "difference": "Differences between checkpoints", "descriptive": "Descriptive estimates",
             "r2": "Cross-validated prediction"}
_FDR_NOTE = "* : Benjamini–Hochberg p_fdr < 0.05 across every test of the run."


def _overall(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of every image (group "all"), not those of a ``--by`` subgroup."""
    return table[table.get("group", pd.Series("all", index=table.index)).fillna("all") == "all"]


def _distinct(table: pd.DataFrame) -> pd.Series:
    """Which rows are tests of their own (not marked ``same_as`` another output's test)."""
    if "same_as" not in table.columns:
        return pd.Series(True, index=table.index)
    return table["same_as"].fillna("").astype(str).eq("")


def _heatmap_caption(effect: EffectSize) -> str:
    """What a heatmap of ``effect`` shows, where its intervals are, what the star means."""
    if effect.kind == "difference":
        return ("Difference between the checkpoints' statistics, per pair (A−B), metric × layer; * marks "
                "p_fdr < 0.05 by the analysis' test (for pearson and spearman the dependent-correlation test, "
                "Steiger 1980, which accounts for both sharing the rating).")
    return (f"{effect.title}, metric × layer, one panel per checkpoint; the colour is the estimate. "
            f"{_FDR_NOTE} Confidence intervals are in the analysis table (ci_low, ci_high).")


def _r2_caption(manifest: dict[str, Any], name: str) -> str:
    """How the R² bars and their error bars were computed (folds and repeats from the run's options)."""
    options = (manifest.get("options") or {}).get(f"analysis.{name}") or {}
    folds, repeats = options.get("folds", "K"), options.get("repeats", "R")
    return (f"Bars: cross-validated R² of the pooled out-of-fold predictions ({folds}-fold, averaged over {repeats} "
            f"shuffles). Error bars: ± 1 SD of the per-fold R² over the {folds} × {repeats} folds — a spread "
            "of the folds, not a confidence interval; p (permutation test) is in the table.")


def _effect_views(analyses: dict[str, pd.DataFrame], effects: dict[tuple[str, str], EffectSize],
                  fig_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """A metric × layer heatmap of every declared effect size that asks for one (colour scale from its
    ``range``, labelled with its title), and cross-validated R² bars for ``kind="r2"``, grouped by kind."""
    views: dict[str, list[str]] = {}
    for (name, statistic), effect in effects.items():
        table = analyses.get(name)
        if table is None:
            continue
        table = _overall(table[table["statistic"] == statistic])
        if not len(table) or not table["estimate"].notna().any():
            continue
        stem = f"heatmap-{name}" if effect.kind == "correlation" else f"heatmap-{name}-{statistic}"
        if effect.kind == "r2":
            figures.r2_bars(table, fig_dir / f"{name}-r2.png", effect.title)
            views.setdefault("r2", []).append(_img(fig_dir / f"{name}-r2.png", _r2_caption(manifest, name)))
        elif effect.heatmap:
            figures.correlation_heatmap(table, [fig_dir / f"{stem}.png", fig_dir / f"{stem}.svg"],
                                        f"{name}: {effect.title}", value_range=effect.range,
                                        colour_label=effect.title)
            views.setdefault(effect.kind, []).append(_img(fig_dir / f"{stem}.png", _heatmap_caption(effect)))
            if "estimate_adj" in table.columns and table["estimate_adj"].notna().any():
                adjusted = table.assign(estimate=table["estimate_adj"], p_fdr=table.get("p_adj_fdr", np.nan))
                names = ", ".join(str(next(iter(table.get("covariates", pd.Series(dtype=object)).dropna()),
                                           "the covariates")).split(","))
                figures.correlation_heatmap(adjusted, [fig_dir / f"{stem}-adjusted.png",
                                                       fig_dir / f"{stem}-adjusted.svg"],
                                            f"{name}: {effect.title} given the covariates", value_range=effect.range,
                                            colour_label=f"{effect.title} given the covariates")
                views[effect.kind].append(_img(fig_dir / f"{stem}-adjusted.png",
                                               f"The same relations controlling for {names} (partial correlation; "
                                               "Spearman's on ranks); * : p_adj_fdr < 0.05, same family."))
    out: list[str] = []
    for kind, images in views.items():
        out += [f"<h2>{_HEADINGS.get(kind, kind)}</h2>", grid(images)]
    return out


def _subgroup_views(analyses: dict[str, pd.DataFrame], effects: dict[tuple[str, str], EffectSize],
                    fig_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """With ``--by``: per correlation and checkpoint, a subgroup × layer heatmap per metric."""
    by = (manifest.get("subgroups") or {}).get("by") or []
    images: list[str] = []
    for (name, statistic), effect in effects.items():
        table = analyses.get(name)
        if effect.kind != "correlation" or table is None or "group" not in table.columns:
            continue
        table = table[(table["statistic"] == statistic) & table["estimate"].notna() & _distinct(table)]
        if table["group"].fillna("all").nunique() < 2:
            continue
        for checkpoint in sorted(table["checkpoint"].unique()):
            stem = f"subgroups-{name}-{checkpoint}"
            figures.subgroup_heatmap(table[table["checkpoint"] == checkpoint],
                                     fig_dir / f"{stem}.png",
                                     f"{name}: {effect.title} by {', '.join(by) or 'subgroup'} — {checkpoint}",
                                     effect.title, effect.range)
            images.append(_img(fig_dir / f"{stem}.png",
                               f"{effect.title} with the rating within each subgroup ({checkpoint}); the first row "
                               f"is every image; n per group in the row label. {_FDR_NOTE} A metric whose test repeats "
                               "another's (same_as in the table) is left out."))
    return ["<h2>Subgroups</h2>", grid(images)] if images else []


def _replicate_views(analyses: dict[str, pd.DataFrame], effects: dict[tuple[str, str], EffectSize],
                     fig_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """With replicate models (two or more checkpoints of one configuration): per correlation and R², the mean ±
    SD over each configuration's models, dot and whisker, and the table of every test aggregated."""
    table = aggregate(analyses, manifest, effects)
    if not len(table):
        return []
    images = []
    for (name, statistic), effect in effects.items():
        rows = table[(table["analysis"] == name) & (table["statistic"] == statistic) & (table["group"] == "all")
                     & table["mean"].notna()]
        if effect.kind not in ("correlation", "r2") or not len(rows):
            continue
        stem = f"replicates-{name}-{statistic}"
        figures.replicate_dots(rows, fig_dir / f"{stem}.png", f"{name}: {effect.title}")
        images.append(_img(fig_dir / f"{stem}.png", f"{effect.title} of every image with the rating: per test, the "
                                                    "mean over each configuration's models ± 1 SD (ddof = 1)."))
    models = "; ".join(f"<b>{html.escape(c)}</b>: {', '.join(html.escape(m) for m in labels)}"
                       for c, labels in configurations(manifest).items())
    return ["<h2>Replicate models</h2>",
            f"<p>Checkpoints trained from different seeds of one configuration ({models}) are analysed one by one, "
            "then each test is summarised over a configuration's models: mean, SD (ddof = 1), min and max of the "
            "estimate; mean r² (of r for correlations, the mean R² for cross-validated R²); the number of models "
            "whose test has p_fdr &lt; 0.05 of those tested. The table is analyses-replicates.parquet.</p>",
            grid(images), _table(table, list(REPLICATE_COLUMNS), "table-replicates")]


def metric_correlations(metrics: pd.DataFrame | MetricColumns, checkpoint: str) -> dict[str, pd.DataFrame]:
    """Spearman correlation over images between the metric columns of one checkpoint, per layer (whole-image
    metrics as the layer ``(whole)``); layers with fewer than two metrics are left out."""
    columns = as_columns(metrics)
    mine = [k for k in columns.outputs() if k[0] == checkpoint]
    out: dict[str, pd.DataFrame] = {}
    for layer in dict.fromkeys(k[2] for k in mine):
        outputs = sorted((k for k in mine if k[2] == layer), key=lambda k: k[1])
        if len({k[1] for k in outputs}) >= 2:
            wide = columns.wide(outputs).set_axis(pd.Index([k[1] for k in outputs], name="metric"), axis=1)
            out["(whole)" if layer is None else layer] = wide.corr(method="spearman")
    return out


def _metric_correlation_views(metrics: MetricColumns, fig_dir: Path) -> list[str]:
    """Per checkpoint, the metric × metric Spearman correlations of every layer, with why they matter."""
    images = []
    for checkpoint in sorted({k[0] for k in metrics.outputs()}):
        matrices = metric_correlations(metrics, checkpoint)
        if not matrices:
            continue
        stem = f"metric-correlations-{checkpoint}"
        figures.metric_correlation_matrix(matrices, fig_dir / f"{stem}.png",
                                          f"Correlations between metrics over images — {checkpoint}")
        n = len(metrics.select(k for k in metrics.outputs() if k[0] == checkpoint).image_ids())
        images.append(_img(fig_dir / f"{stem}.png", f"Spearman ρ between the metrics over the {n} images, one "
                                                   f"panel per layer ({checkpoint})."))
    if not images:
        return []
    return ["<h2>Correlations between metrics</h2>",
            "<p>Do the metrics agree about which images are processed fluently? Metrics meant to measure the "
            "same thing should correlate in the direction theory expects: the Gini index (higher = sparser) and "
            "the L-epsilon count (higher = more active units, less sparse) should correlate negatively. A "
            "positive correlation between them means they rank the images differently (e.g. a layer whose few "
            "strong units also raise the count above ε), so read their relations with the rating together.</p>",
            grid(images)]


def _scatter_views(analyses: dict[str, pd.DataFrame], effects: dict[tuple[str, str], EffectSize],
                   metrics: MetricColumns, ratings: pd.DataFrame, rating_col: str, fig_dir: Path,
                   top: int, manifest: dict[str, Any]) -> list[str]:
    """Scatter plots of the ``top`` strongest correlations with the rating (every image; one per distinct
    test: a row that is the same test as another, ``same_as``, is left out), side by side."""
    table = pd.concat(analyses.values(), ignore_index=True)
    correlation = np.array([getattr(effects.get((a, str(s))), "kind", None) == "correlation"
                            for a, s in zip(table["analysis"], table["statistic"])], dtype=bool)
    table = _overall(table[correlation & table["p"].notna() & _distinct(table)]).sort_values("p").drop_duplicates(
        ["checkpoint", "metric", "layer"]).head(top)
    images = []
    for k, row in enumerate(table.to_dict("records")):
        layer = None if pd.isna(row["layer"]) else str(row["layer"])
        joined = metrics.rows(checkpoint=row["checkpoint"], metric=row["metric"], layer=layer).merge(
            ratings[["image_id", rating_col]], on="image_id")
        label = f"{row['metric']}" + ("" if pd.isna(row["layer"]) else f" @ {row['layer']}")
        figures.scatter(joined["value"].to_numpy(float), joined[rating_col].to_numpy(float),
                        fig_dir / f"scatter-{k}.png", label, rating_col,
                        f"{row['checkpoint']}: {row['statistic']} = {row['estimate']:+.3f}, "
                        f"p_fdr = {row.get('p_fdr', np.nan):.2g}, n = {len(joined)}")
        level = ((manifest.get("options") or {}).get(f"analysis.{row['analysis']}") or {}).get("ci", 0.95)
        ci = (f" {level:.0%} percentile bootstrap interval of {row['statistic']} over images: [{row['ci_low']:.3f}, {row['ci_high']:.3f}]."
              if np.isfinite(row.get("ci_low", np.nan)) and np.isfinite(row.get("ci_high", np.nan)) else "")
        images.append(_img(fig_dir / f"scatter-{k}.png", f"{row['analysis']}: {label} against {rating_col}, "
                                                         f"{len(joined)} images; red: least-squares line.{ci}"))
    return ["<h2>Strongest relations</h2>", grid(images, "grid")] if images else []


def _reliability_view(manifest: dict[str, Any]) -> list[str]:
    """The noise ceiling section (``--rater-ratings``): both reliability estimates per group, and how to read
    the ``of_ceiling`` column of the analysis tables."""
    record = manifest.get("reliability")
    if not isinstance(record, dict) or not isinstance(record.get("groups"), dict):
        return []
    rows = pd.DataFrame([{"group": label, **g} for label, g in record["groups"].items() if isinstance(g, dict)])
    columns = [c for c in ["group", "n_images", "n_raters", "missing", "ratings_per_image", "ceiling",
                           "split_half_ci_low", "split_half_ci_high", "split_half_split_low", "split_half_split_high",
                           "icc_panel", "icc_panel_low", "icc_panel_high", "icc_single", "icc_raters", "note"]
               if c in rows.columns]
    source = (record.get("rater_ratings") or {}).get("path", "")
    agree = record.get("r_mean_vs_ratings")
    return ["<h2>Noise ceiling</h2>",
            f"<p>Reliability of the mean rating from {html.escape(str(source))}. <b>ceiling</b>: split-half "
            "reliability with the Spearman–Brown correction to the full panel, mean over random rater splits "
            "(split_half_ci_*: 95% bootstrap interval over images; split_half_split_*: 2.5–97.5 percentiles over "
            "splits). <b>icc_panel</b>: ICC(C,k) (McGraw &amp; Wong 1996; Shrout &amp; Fleiss' ICC(3,k)), "
            "consistency of the mean of k ratings, with its F-based 95% interval; icc_single: ICC(C,1), one "
            "rater. A perfect model's r² with the mean rating is at most the ceiling; the analysis tables' "
            "<b>of_ceiling</b> column gives r² (correlations) or R² as a fraction of it (as Brain-Score "
            "normalises predictivity by the noise ceiling)."
            + (f" The mean of the per-rater table correlates r = {agree:.4f} with the analysed rating."
               if isinstance(agree, (int, float)) else "") + "</p>",
            _table(rows, columns, "table-reliability")]


#: the manifest fields the report reads and their types ("[]": each item of a list, "{}": each value of a dict);
#: an absent field takes the report's default
_MANIFEST_FIELDS: list[tuple[tuple[str, ...], type]] = [
    (("run_id",), str), (("status",), str), (("metrics", "[]"), str), (("analyses", "[]"), str),
    (("inputs", "stimuli", "rating_column"), str), (("inputs", "checkpoints", "[]", "label"), str),
    (("inputs", "checkpoints", "[]", "replicate"), dict),
    (("figures", "checkpoints", "{}", "{}"), str), (("subgroups", "by", "[]"), str),
    (("analysis_effects", "{}", "[]"), dict), (("warnings", "[]"), dict)]
#: the columns the report reads from each kind of table
_ANALYSIS_COLUMNS = ("analysis", "checkpoint", "metric", "layer", "statistic", "estimate", "p")


def _wrong_type(value: Any, path: tuple[str, ...], kind: type, item: bool = False) -> bool:
    """Whether ``value`` (a manifest field; an ``item`` of a list or dict) breaks the shape ``path``/``kind`` of
    :data:`_MANIFEST_FIELDS`. A field that is absent or null takes the report's default; an item cannot be null."""
    if value is None:
        return item
    if not path:
        return not isinstance(value, kind)
    head, rest = path[0], path[1:]
    if head in ("[]", "{}"):
        items = value if head == "[]" and isinstance(value, list) else \
            value.values() if head == "{}" and isinstance(value, dict) else None
        return items is None or any(_wrong_type(v, rest, kind, item=True) for v in items)
    return not isinstance(value, dict) or _wrong_type(value.get(head), rest, kind)


def _manifest(run: Path) -> dict[str, Any]:
    """The run's manifest with every field the report reads checked: a damaged one is one line naming it."""
    manifest = read_manifest(run)
    wrong = [".".join(p for p in path if p not in ("[]", "{}")) for path, kind in _MANIFEST_FIELDS
             if _wrong_type(manifest, path, kind)]
    if wrong:
        raise FluencyError(f"{run / MANIFEST}: damaged: {', '.join(wrong)} not as fluency writes it")
    return manifest


def _read_parquet(path: Path, columns: Sequence[str] = ()) -> pd.DataFrame:
    """A table of the run; one that cannot be read, or lacks ``columns``, is one line naming the file."""
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # pyarrow and pandas raise many types for a damaged file
        raise FluencyError(f"{path}: unreadable or damaged ({error_text(exc, 160)})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise FluencyError(f"{path}: damaged: no column(s) {missing}")
    return table


#: scatter plots of the strongest relations the report draws
TOP_SCATTER = 6


def build_report(run_dir: str | Path, top_scatter: int = TOP_SCATTER) -> Path:
    """Write ``RUN_DIR/report.html`` (and the figures it embeds) and return its path.

    A missing or damaged manifest, metric table, analysis, ratings or latent table, or activation store is a
    :class:`FluencyError` naming the file."""
    run = Path(run_dir)
    if not (run / MANIFEST).exists():
        raise FluencyError(f"report: {run} is not a fluency run folder (no {MANIFEST})")
    manifest = _manifest(run)
    status, note = run_status(run, manifest)  # before the lock: a killed run's stale lock says who wrote it
    with writing(run, "fluency report"):
        pending = bool(manifest.get("report_pending"))  # the run stopped while writing its report
        if pending:  # its results are complete: so is the run, once the report is written
            manifest = {k: v for k, v in manifest.items() if k not in ("report_pending", "error")}
            manifest["status"], status, note = "complete", "complete", ""
        path = _build(run, manifest, status, note, top_scatter)
        if pending:
            write_manifest(run, {**manifest, "outputs": outputs(run)})
        return path


def write_report(run_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """The report of a run that is finishing (``fluency run``'s last step; the caller holds the folder's lock)."""
    return _build(Path(run_dir), dict(manifest), str(manifest.get("status", "complete")), "", TOP_SCATTER)


def _covariates_note(manifest: dict[str, Any]) -> str:
    """One paragraph: which low-level covariates the relations are controlled for, or that they are raw."""
    record = manifest.get("covariates")
    if not isinstance(record, dict) or not record.get("columns"):
        return ("<p>Relations are <b>raw</b>: not controlled for low-level image statistics (run without "
                "<code>--no-covariates</code>, with the images, to add them).</p>") if manifest.get("analyses") else ""
    names = ", ".join(html.escape(str(c)) for c in record["columns"])
    return (f"<p>Every relation is shown raw and controlling for the low-level covariates of "
            f"<code>{html.escape(str(record.get('plugin', 'image-stats')))}</code> ({names}): columns "
            "<i>adj.</i> (partial correlation, Spearman's on ranks; for ridge ΔR², the cross-validated R² the "
            "metric adds over the covariates alone, with its own permutation p). Adjusted tests are in the same "
            "Benjamini–Hochberg family as the raw ones (<i>p_fdr adj.</i>). "
            + ("The covariates were requested as metrics and are tested raw too; never against themselves."
               if record.get("requested") else "The covariates are not tested themselves; their values are in "
               "metrics.parquet.") + "</p>")


def metric_summary(metrics: MetricColumns) -> pd.DataFrame:
    """Per output (sorted; whole-model outputs after a metric's layers): ``count`` of finite values, ``mean``,
    ``std`` (n − 1), ``min``, ``max``, as pandas' ``describe`` gives them."""
    rows = []
    for key in sorted(metrics.outputs(), key=output_order):
        values = metrics.values(key).to_numpy(float)
        values = values[~np.isnan(values)]
        n = len(values)
        rows.append({"checkpoint": key[0], "metric": key[1], "layer": key[2], "count": float(n),
                     "mean": values.mean() if n else np.nan, "std": values.std(ddof=1) if n > 1 else np.nan,
                     "min": values.min() if n else np.nan, "max": values.max() if n else np.nan})
    return pd.DataFrame(rows, columns=["checkpoint", "metric", "layer", "count", "mean", "std", "min", "max"])


def _build(run: Path, manifest: dict[str, Any], status: str, note: str, top_scatter: int) -> Path:
    """Write the page and the figures it embeds (the caller holds the run folder's lock)."""
    fig_dir = run / "figures"
    parts = [f"<h1>fluency run {html.escape(manifest.get('run_id') or run.name)}</h1>",
             f"<p>Status: <b>{html.escape(status)}</b>{html.escape(f' ({note})' if note else '')}. Metrics: "
             f"{html.escape(', '.join(manifest.get('metrics') or []))}. Analyses: "
             f"{html.escape(', '.join(manifest.get('analyses') or []) or 'none')}. Click a figure for a "
             "full-window view.</p>", warnings_box(manifest)]
    metrics = read_metric_columns(run / "metrics.parquet") if (run / "metrics.parquet").exists() else None
    analyses = {p.stem: _read_parquet(p, _ANALYSIS_COLUMNS) for p in sorted((run / "analyses").glob("*.parquet"))}
    ratings = _read_parquet(run / "ratings.parquet", ["image_id"]) if (run / "ratings.parquet").exists() else None
    rating_col = ((manifest.get("inputs") or {}).get("stimuli") or {}).get("rating_column") or "rating"

    try:
        effects = read_effects(manifest, list(analyses))
    except (KeyError, TypeError, ValueError) as exc:
        raise FluencyError(f"{run / MANIFEST}: damaged: analysis_effects ({error_text(exc, 160)})") from None
    parts += _reliability_view(manifest)
    parts.append(_covariates_note(manifest))
    parts += _effect_views(analyses, effects, fig_dir, manifest)
    if analyses and metrics is not None and ratings is not None:
        parts += _scatter_views(analyses, effects, metrics, ratings, rating_col, fig_dir, top_scatter, manifest)
        release_memory()  # each figure's freed memory back before the next one's (core/memory.py)
    if metrics is not None:
        parts += _metric_correlation_views(metrics, fig_dir)
        release_memory()
    parts += _subgroup_views(analyses, effects, fig_dir, manifest)
    parts += _replicate_views(analyses, effects, fig_dir, manifest)
    for store in sorted((run / "activations").glob("*/_COMPLETE.json")):
        from fluency.core.run.store import ActivationStore

        label = store.parent.name
        figures.activation_histograms(ActivationStore(store.parent), fig_dir / f"activations-{label}.png")
        release_memory()
        parts += [f"<h2>Activations ({html.escape(label)})</h2>",
                  _img(fig_dir / f"activations-{label}.png",
                       "Per layer, the mean activation of each unit over the images (top; y: number of units) and "
                       "of each image over the units (bottom; y: number of images), from the activation store.")]
    labels = [c["label"] for c in (manifest.get("inputs") or {}).get("checkpoints") or [] if c.get("label")]
    labels += [p.stem for p in sorted((run / "latents").glob("*.parquet")) if p.stem not in labels]
    for label in labels:
        parts += _model_views(run, label, manifest, ratings, rating_col)
        release_memory()
    for name, table in analyses.items():
        table = with_ceiling(table, effects, manifest)  # --rater-ratings: r² or R² over the noise ceiling
        columns = [c for c in ["group", "checkpoint", "metric", "layer", "n", "statistic", "estimate", "of_ceiling",
                               "ci_low", "ci_high", "r_a", "r_b", "r_ab", "r2_fold_mean", "r2_fold_sd", "se", "r2",
                               "r2_adj", "r2_in_sample", "r2_adj_in_sample", "p", "p_t", "p_wilcoxon", "mean_a",
                               "mean_b", "sd_diff", "d_z", "r_rb", "p_fdr", "estimate_adj", "r2_covariates", "p_adj",
                               "p_adj_fdr", "note"]
                   if c in table.columns]
        parts += [f"<h2>Analysis: {html.escape(name)}</h2>", _table(table, columns, f"table-{name}")]
    if metrics is not None:
        summary = metric_summary(metrics)
        parts += ["<h2>Metric summary</h2>",
                  _table(summary, ["checkpoint", "metric", "layer", "count", "mean", "std", "min", "max"],
                         "table-metrics")]
    parts.append(provenance(manifest))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fluency report</title><style>{CSS}</style>"
            f"</head><body>{''.join(parts)}<script>{SORT_JS}</script></body></html>")
    atomic_write_text(run / "report.html", page)
    return run / "report.html"
