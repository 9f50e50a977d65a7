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


#: statistics whose sign says in which direction the metric goes with the rating
DIRECTIONAL = {"r", "rho", "r_partial", "b"}


def supports_fluency(estimate: float, higher_is_more_fluent: bool | None, statistic: str = "r") -> str:
    """Whether a relation goes the way fluency theory predicts (more fluent ↔ higher rating)."""
    if statistic not in DIRECTIONAL or higher_is_more_fluent is None or not math.isfinite(estimate) or estimate == 0:
        return "–"
    return "yes" if (estimate > 0) == higher_is_more_fluent else "no"


def relations_table(strongest: pd.DataFrame, directions: dict[str, Any], alpha: float = 0.05) -> Table:
    """A compact rich table of analysis rows (already sorted), with FDR significance and the fluency direction.

    The checkpoint column appears only when the rows come from several checkpoints; a comparison of two
    checkpoints (``r_diff``, ``rho_diff``: estimate r_A − r_B, checkpoint ``A−B``) names its statistic in
    the test column so that it is not read as a correlation.
    """
    several = strongest["checkpoint"].nunique() > 1
    grouped = "group" in strongest.columns and strongest["group"].nunique() > 1
    table = Table(title="Strongest relations with the rating", caption="p_fdr: Benjamini–Hochberg across all "
                  f"tests of the run; * < {alpha}. fluent?: the direction processing-fluency theory predicts.")
    columns = ["test", *(["checkpoint"] if several else []), *(["group"] if grouped else []), "metric", "layer",
               "n", "estimate", "p", "p_fdr", "fluent?"]
    for col in columns:
        table.add_column(col, justify="right" if col in ("n", "estimate", "p", "p_fdr") else "left")
    for row in strongest.itertuples(index=False):
        direction = directions.get(row.metric, {}).get("higher_is_more_fluent")
        sig = isinstance(row.p_fdr, float) and row.p_fdr < alpha
        test = f"{row.analysis} {row.statistic}" if str(row.statistic).endswith("_diff") else row.analysis
        cells = [test, *([row.checkpoint] if several else []), *([row.group] if grouped else []), row.metric,
                 "(whole)" if pd.isna(row.layer) else row.layer, str(row.n),
                 f"{row.estimate:+.3f}" if math.isfinite(row.estimate) else "–", _fmt_p(row.p),
                 _fmt_p(row.p_fdr) + ("*" if sig else ""), supports_fluency(row.estimate, direction, row.statistic)]
        table.add_row(*cells, style="bold" if sig else None)
    return table


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
