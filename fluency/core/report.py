"""``fluency report RUN_DIR``: one self-contained HTML page per run.

Figures are PNG files in ``RUN_DIR/figures/`` (and SVG copies of the heatmaps), embedded in
the page as base64 so the file can be mailed or archived and opened without a network; tables
are sortable by clicking a header (a few lines of inline JavaScript); provenance comes from
``manifest.json``.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fluency.core import figures
from fluency.core.atomic import atomic_write_text
from fluency.core.errors import FluencyError

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0], i = th.cellIndex;
    var asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
    Array.from(body.rows).sort(function (a, b) {
      var x = a.cells[i].dataset.v || a.cells[i].textContent, y = b.cells[i].dataset.v || b.cells[i].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    }).forEach(function (r) { body.appendChild(r); });
  });
});
"""
CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;
font-size:12px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}th{cursor:pointer;
background:#f0f0f0}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.5em 0}
.sig{font-weight:bold}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:11px}"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></figure>'


def _table(df: pd.DataFrame, columns: list[str], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in columns:
            v = r.get(c)
            if isinstance(v, float):
                text = "–" if not np.isfinite(v) else (f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}")
                cells.append(f'<td data-v="{v}">{text}</td>')
            else:
                cells.append(f"<td>{html.escape('–' if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))}</td>")
        sig = isinstance(r.get("p_fdr"), float) and r.get("p_fdr") < 0.05
        rows.append(f'<tr{" class=sig" if sig else ""}>{"".join(cells)}</tr>')
    return f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def build_report(run_dir: str | Path, top_scatter: int = 6) -> Path:
    """Write ``RUN_DIR/report.html`` (and the figures it embeds) and return its path."""
    run = Path(run_dir)
    if not (run / "manifest.json").exists():
        raise FluencyError(f"report: {run} is not a fluency run folder (no manifest.json)")
    manifest = json.loads((run / "manifest.json").read_text())
    fig_dir = run / "figures"
    parts = [f"<h1>fluency run {html.escape(manifest.get('run_id', run.name))}</h1>",
             f"<p>Status: <b>{html.escape(str(manifest.get('status')))}</b>. Metrics: "
             f"{html.escape(', '.join(manifest.get('metrics', [])))}. Analyses: "
             f"{html.escape(', '.join(manifest.get('analyses', [])) or 'none')}.</p>"]
    metrics = pd.read_parquet(run / "metrics.parquet") if (run / "metrics.parquet").exists() else None
    analyses = {p.stem: pd.read_parquet(p) for p in sorted((run / "analyses").glob("*.parquet"))}
    ratings = pd.read_parquet(run / "ratings.parquet") if (run / "ratings.parquet").exists() else None
    rating_col = manifest.get("inputs", {}).get("stimuli", {}).get("rating_column", "rating")

    correlations = [n for n, t in analyses.items() if t["statistic"].isin(["r", "rho", "r_partial"]).any()]
    if correlations:
        parts.append("<h2>Correlations with the rating</h2><p>* : Benjamini–Hochberg p_fdr &lt; 0.05 across "
                     "every test of the run.</p>")
        for name in correlations:
            table = analyses[name]
            table = table[table.get("group", pd.Series("all", index=table.index)).fillna("all") == "all"]
            figures.correlation_heatmap(table, fig_dir / f"heatmap-{name}.png", name)
            figures.correlation_heatmap(table, fig_dir / f"heatmap-{name}.svg", name)
            parts.append(_img(fig_dir / f"heatmap-{name}.png"))
    if "ridge" in analyses and analyses["ridge"]["estimate"].notna().any():
        ridge = analyses["ridge"][analyses["ridge"].get("group", "all") == "all"]
        figures.r2_bars(ridge, fig_dir / "ridge-r2.png")
        parts += ["<h2>Cross-validated prediction (ridge)</h2>", _img(fig_dir / "ridge-r2.png")]
    if analyses and metrics is not None and ratings is not None:
        table = pd.concat(analyses.values(), ignore_index=True)
        table = table[table["statistic"].isin(["r", "rho"]) & table["p"].notna()].sort_values("p").drop_duplicates(
            ["checkpoint", "metric", "layer"]).head(top_scatter)
        if len(table):
            parts.append("<h2>Strongest relations</h2>")
        for k, row in enumerate(table.itertuples()):
            sel = (metrics["metric"] == row.metric) & (metrics["checkpoint"] == row.checkpoint)
            sel &= metrics["layer"].isna() if pd.isna(row.layer) else metrics["layer"] == row.layer
            joined = metrics[sel].merge(ratings[["image_id", rating_col]], on="image_id")
            label = f"{row.metric}" + ("" if pd.isna(row.layer) else f" @ {row.layer}")
            figures.scatter(joined["value"].to_numpy(float), joined[rating_col].to_numpy(float),
                            fig_dir / f"scatter-{k}.png", label, rating_col,
                            f"{row.checkpoint}: {row.statistic} = {row.estimate:+.3f}, p_fdr = {row.p_fdr:.2g}")
            parts.append(_img(fig_dir / f"scatter-{k}.png"))
    for store in sorted((run / "activations").glob("*/_COMPLETE.json")):
        from fluency.core.store import ActivationStore

        label = store.parent.name
        figures.activation_histograms(ActivationStore(store.parent), fig_dir / f"activations-{label}.png")
        parts += [f"<h2>Activations ({html.escape(label)})</h2>", _img(fig_dir / f"activations-{label}.png")]
    for name, table in analyses.items():
        columns = [c for c in ["group", "checkpoint", "metric", "layer", "n", "statistic", "estimate", "ci_low",
                               "ci_high", "r2_fold_mean", "r2_fold_sd", "se", "r2", "p", "p_fdr", "note"]
                   if c in table.columns]
        parts += [f"<h2>Analysis: {html.escape(name)}</h2>", _table(table, columns, f"table-{name}")]
    if metrics is not None:
        summary = metrics.groupby(["checkpoint", "metric", "layer"], dropna=False)["value"].describe().reset_index()
        parts += ["<h2>Metric summary</h2>",
                  _table(summary, ["checkpoint", "metric", "layer", "count", "mean", "std", "min", "max"],
                         "table-metrics")]
    parts += ["<h2>Provenance</h2>", f"<pre>{html.escape(json.dumps(manifest, indent=2, default=str))}</pre>"]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fluency report</title><style>{CSS}</style>"
            f"</head><body>{''.join(parts)}<script>{SORT_JS}</script></body></html>")
    atomic_write_text(run / "report.html", page)
    return run / "report.html"
