"""Readable terminal output: the strongest relations of a run and the id-matching report."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fluency.core.inputs.ratings import MatchReport


def _fmt_p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return f"{p:.0e}" if p < 1e-3 else f"{p:.3f}"


def supports_fluency(estimate: float, higher_is_more_fluent: bool | None, directional: bool = True) -> str:
    """Whether a relation goes the way fluency theory predicts (more fluent ↔ higher rating): only for
    statistics whose analysis declares them ``directional``."""
    if not directional or higher_is_more_fluent is None or not math.isfinite(estimate) or estimate == 0:
        return "–"
    return "yes" if (estimate > 0) == higher_is_more_fluent else "no"


#: the title of each section of non-correlation effect sizes
SECTION_TITLES = {"coefficient": "Regression coefficients", "r2": "Prediction of the rating (R²)",
                  "difference": "Differences between checkpoints", "descriptive": "Descriptive estimates (no test)"}


def relations_table(rows: pd.DataFrame, directions: Mapping[str, Any], effects: Mapping[tuple[str, str], Any],
                    title: str = "Strongest relations with the rating", alpha: float = 0.05) -> Table:
    """A compact rich table of analysis rows (already sorted), with FDR significance and the fluency direction.

    ``effects`` (``{(analysis, statistic): EffectSize}``) says which statistics are directional and how they
    are labelled; the test column names the statistic. The checkpoint and group columns appear only when
    the rows come from several (the checkpoint column always for differences: it names the pair A−B).
    """
    several = rows["checkpoint"].nunique() > 1 or any(  # a difference names its pair "A−B", even a single one
        getattr(effects.get((r.analysis, r.statistic)), "kind", None) == "difference"
        for r in rows.itertuples(index=False))
    grouped = "group" in rows.columns and rows["group"].nunique() > 1
    directional = any(getattr(effects.get((r.analysis, r.statistic)), "directional", False)
                      for r in rows.itertuples(index=False))
    adjusted = "estimate_adj" in rows.columns and bool(rows["estimate_adj"].notna().any())
    in_sample = "r2_in_sample" in rows.columns and bool(rows["r2_in_sample"].notna().any())
    one_n = adjusted and rows["n"].nunique() == 1  # to fit 80 columns: n in the caption, raw p in the tables
    ceiling = "of_ceiling" in rows.columns  # --rater-ratings: r² or R² as a fraction of the noise ceiling
    table = Table(title=title, caption="p_fdr: Benjamini–Hochberg across all tests of the run; "
                  f"* < {alpha}." + (" fluent?: the direction processing-fluency theory predicts." if directional
                                      else "") + (adjusted_caption(rows) if adjusted else "")
                  + (f" n = {rows['n'].iloc[0]}." if one_n else "")
                  + (" in-sample: OLS R² on all images, as published in-sample figures are." if in_sample else ""))
    columns = ["test", *(["checkpoint"] if several else []), *(["group"] if grouped else []), "metric", "layer",
               *([] if one_n else ["n"]), *(["raw", "p_fdr", "adj.", "p_fdr "] if adjusted else
                                             ["estimate", "p", "p_fdr"]),
               *(["in-sample"] if in_sample else []), *(["fluent?"] if directional else [])]
    if ceiling:
        table.caption += f" %: {CEILING_NOTE}."
    for col in columns:
        table.add_column(col, justify="left" if col in ("test", "checkpoint", "group", "metric", "layer", "fluent?")
                         else "right")
    for row in rows.itertuples(index=False):
        effect = effects.get((row.analysis, row.statistic))
        direction = directions.get(row.metric, {}).get("higher_is_more_fluent")
        sig = isinstance(row.p_fdr, float) and row.p_fdr < alpha
        cells = [effect.title if effect is not None and effect.label else f"{row.analysis} {row.statistic}",
                 *([row.checkpoint] if several else []), *([row.group] if grouped else []), row.metric,
                 "(whole)" if pd.isna(row.layer) else row.layer, *([] if one_n else [str(row.n)]),
                 _fmt_estimate(row.estimate) + (f" {_fmt_fraction(row.of_ceiling)}" if ceiling and
                                                 math.isfinite(row.of_ceiling) else ""),
                 *([] if adjusted else [_fmt_p(row.p)]), _fmt_fdr(row.p_fdr, alpha)]
        if adjusted:
            cells += [_fmt_estimate(row.estimate_adj), _fmt_fdr(getattr(row, "p_adj_fdr", math.nan), alpha)]
        if in_sample:
            cells.append(_fmt_estimate(getattr(row, "r2_in_sample", math.nan)))
        if directional:
            cells.append(supports_fluency(row.estimate, direction, getattr(effect, "directional", False)))
        table.add_row(*cells, style="bold" if sig else None)
    return table


def _fmt_estimate(value: float) -> str:
    return f"{value:+.3f}" if isinstance(value, float) and math.isfinite(value) else "–"


def _fmt_fdr(p: float, alpha: float) -> str:
    return _fmt_p(p) + ("*" if isinstance(p, float) and p < alpha else "")


def adjusted_caption(rows: pd.DataFrame) -> str:
    """What the ``adj.`` column holds: the relation controlling for the run's covariates (named)."""
    names = next((str(c) for c in rows.get("covariates", pd.Series(dtype=object)).dropna() if c), "")
    ridge = bool((rows["analysis"] == "ridge").any())
    return (" adj.: controlling for " + (names.replace(",", ", ") if names else "the covariates")
            + (" (ΔR² over them: the R² the metric adds)" if ridge else
               " (partial r; Spearman's on ranks); – for a covariate itself") + ".")


#: what the summary's and the report's ceiling column means
CEILING_NOTE = "r² (or R²) as a share of the noise ceiling (the mean rating's reliability)"


def _fmt_fraction(value: float) -> str:
    """A share as a percentage: ``4%``, ``100%``, ``-3%``."""
    return f"{100 * value:.0f}%" if isinstance(value, float) and math.isfinite(value) else "–"


def print_reliability(console: Console, record: Mapping[str, Any] | None) -> None:
    """A short section on the mean rating's reliability (``--rater-ratings``): the noise ceiling of the run
    and of each subgroup, both estimates with their 95% intervals."""
    if not record:
        return
    groups = record.get("groups") or {}
    whole = groups.get("all") or {}
    if whole.get("ceiling") is None:
        console.print(f"Noise ceiling: not estimated ({escape(str(whole.get('note', '')))})")
        return
    console.print(f"[bold]Noise ceiling[/bold] (reliability of the mean rating): {whole['n_raters']} raters, "
                  f"{whole['n_images']} images, {100 * whole['missing']:.0f}% of cells unrated")
    console.print(f"  split-half, Spearman–Brown ({whole['split_half_n_splits']} splits): "
                  f"{whole['ceiling']:.3f}, 95% CI {whole['split_half_ci_low']:.3f}–{whole['split_half_ci_high']:.3f}")
    if whole.get("icc_panel") is not None:
        console.print(f"  ICC(C,k), k = {whole['icc_k']:.0f}: {whole['icc_panel']:.3f}, 95% CI "
                      f"{whole['icc_panel_low']:.3f}–{whole['icc_panel_high']:.3f}; one rater, ICC(C,1): "
                      f"{whole['icc_single']:.3f}")
    for label, g in groups.items():
        if label != "all":
            value = f"{g['ceiling']:.3f}" if g.get("ceiling") is not None else escape(str(g.get("note", "–")))
            console.print(f"  {escape(label)}: {value}")
    if whole.get("note"):
        console.print(f"  note: {escape(whole['note'])}")
    console.print("  A perfect model's r² with the mean rating is at most the ceiling; the tables show each "
                  "r² and R² also as a percentage of it.")


def print_unreadable(console: Console, unreadable: Mapping[str, str], limit: int = 10) -> None:
    """Print the image files a run left out because they cannot be decoded, with the decoder's reason."""
    if not unreadable:
        return
    n = len(unreadable)
    console.print(f"[yellow]{n} image{'s' if n > 1 else ''} cannot be read and {'were' if n > 1 else 'was'} "
                  "left out of metrics and analyses (--strict stops instead):[/yellow]")
    for rel, why in list(unreadable.items())[:limit]:
        console.print(f"  [yellow]•[/yellow] {escape(rel)}: {escape(why)}", highlight=False)
    if n > limit:
        console.print(f"  … and {n - limit} more (see manifest.json)")


def print_matching(console: Console, report: MatchReport | None) -> None:
    """Print the id-matching report when anything did not match."""
    if report is None or report.ok:
        return
    console.print(f"[yellow]Ratings ↔ images ({report.mode} ids):[/yellow]")
    for line in report.summary_lines():
        console.print(f"  [yellow]•[/yellow] {escape(line)}", highlight=False)
    console.print("  Unmatched images and unusable rows are left out of the analyses (use --strict to stop instead).")


def store_table(info: Mapping[str, Any]) -> Table:
    """``fluency store info``: one row per layer (shape, dtype, values per image), the rest as the caption."""
    model, prov = info.get("model") or {}, info.get("provenance") or {}
    source = prov.get("source") or "run"
    origin = (f"imported from {prov.get('imported_from')} (sha256 {str(prov.get('source_sha256', ''))[:12]}…)"
              if source == "imported" else f"checkpoint {prov.get('checkpoint', '?')} "
              f"(sha256 {str(prov.get('checkpoint_sha256', ''))[:12]}…)")
    table = Table(title=f"{info['path']}: {info['rows']} images, format {info['format_version']}",
                  caption=f"model {model.get('architecture') or '?'}; default layers "
                          f"{', '.join(model.get('default_metric_layers') or []) or '-'}; {origin}; "
                          f"fluency {prov.get('fluency_version', '?')}", caption_justify="left")
    for column in ("layer", "shape", "dtype", "values", "rows"):
        table.add_column(column, justify="right" if column in ("values", "rows") else "left")
    for name, layer in (info.get("layers") or {}).items():
        size = 1
        for s in layer["shape"]:
            size *= int(s)
        table.add_row(name, "×".join(map(str, layer["shape"])), layer["dtype"], f"{size:,}", f"{layer['rows']:,}")
    return table
