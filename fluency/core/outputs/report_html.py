"""HTML building blocks of the report: page style and script, figures, figure grids, tables, provenance.

Figures are shown at their natural pixel size (never scaled down, so the text sizes chosen in
:mod:`fluency.core.outputs.figures` hold on screen); one wider than its column scrolls sideways in its
own box. Each is a link to a full-window view of itself (CSS ``:target``, no script, no second copy of
the image); Escape or × closes it.
"""

from __future__ import annotations

import base64
import html
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

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
document.addEventListener('keydown', function (e) {
  if (e.key === 'Escape' && location.hash.indexOf('#fig-') === 0) { location.hash = '#_'; }
});
"""
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 2em;max-width:1400px}
table{border-collapse:collapse;font-size:12px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{cursor:pointer;background:#f0f0f0}td:first-child,th:first-child{text-align:left}
table.facts th{cursor:auto;text-align:left}table.facts td{text-align:left}
.sig{font-weight:bold}figcaption{font-size:12px;color:#444;max-width:60em}
figure{margin:.5em 0;max-width:100%;overflow-x:auto;box-sizing:border-box}
figure>a>img{display:block;max-width:none;cursor:zoom-in}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(410px,1fr));gap:.5em 1em;align-items:start}
.flow{display:flex;flex-wrap:wrap;gap:.5em 1.5em;align-items:flex-start}
figure .close{display:none}
figure:target{position:fixed;inset:0;z-index:10;margin:0;padding:2.5em 1em 1em;max-width:none;overflow:auto;
background:rgba(30,30,30,.94)}
figure:target>a>img{margin:0 auto;background:#fff;cursor:auto}figure:target figcaption{color:#eee;margin:1em auto}
figure:target .close{display:block;position:fixed;top:.2em;right:.6em;color:#fff;font-size:28px;
text-decoration:none}
details{margin:1em 0}summary{cursor:pointer}summary h2{display:inline}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:11px;max-height:40em}
.warnings{border:2px solid #d9a400;background:#fff8e1;padding:.2em 1em;margin:1em 0}.warnings h2{margin:.4em 0}"""

#: columns that hold counts: shown as integers (never "240.0")
COUNT_COLUMNS = frozenset({"n", "count", "n_images", "n_raters", "missing", "n_features", "images", "n_unreadable"})
#: table headers that say what a column is (the column's own name otherwise)
HEADERS = {"estimate_adj": "adj. (given covariates)", "p_adj": "p adj.", "p_adj_fdr": "p_fdr adj.",
           "r2_covariates": "CV R² of covariates", "r2": "R² (in-sample)", "r2_adj": "adj. R² (in-sample)",
           "r2_in_sample": "R² (in-sample OLS)", "r2_adj_in_sample": "adj. R² (in-sample OLS)"}


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` in pixels from a PNG's header."""
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def figure(path: Path, caption: str | None = None) -> str:
    """One embedded PNG at its natural size, a link to a full-window view of itself, with its caption.

    The figure's id is ``fig-<file stem>`` (stems are unique in the figures folder)."""
    data = path.read_bytes()
    width, height = png_size(data)
    ident = f"fig-{html.escape(path.stem)}"
    note = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure id="{ident}"><a class="close" href="#_" title="close (Esc)">×</a>'
            f'<a href="#{ident}" title="full size"><img alt="{html.escape(path.stem)}" width="{width}" '
            f'height="{height}" src="data:image/png;base64,{base64.b64encode(data).decode()}"></a>{note}</figure>')


def grid(items: Sequence[str], kind: str = "flow") -> str:
    """Figures side by side: ``"grid"`` (equal columns, for figures of one size) or ``"flow"`` (each at its
    own width, wrapping)."""
    return f'<div class="{kind}">{"".join(items)}</div>' if items else ""


def cell(column: str, value: Any) -> str:
    """One table cell: counts as integers, other numbers to 4 decimals (3 significant digits when tiny)."""
    if isinstance(value, (bool, np.bool_)) or value is None or isinstance(value, str):
        return f"<td>{html.escape('–' if value is None else str(value))}</td>"
    if isinstance(value, (int, np.integer)):
        return f'<td data-v="{int(value)}">{int(value)}</td>'
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not np.isfinite(v):
            return f'<td data-v="{v}">–</td>'
        if column in COUNT_COLUMNS and v == int(v):
            return f'<td data-v="{int(v)}">{int(v)}</td>'
        text = f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
        return f'<td data-v="{v}">{text}</td>'
    return f"<td>{html.escape('–' if pd.isna(value) else str(value))}</td>"


def table(df: pd.DataFrame, columns: Sequence[str], table_id: str) -> str:
    """A sortable table of ``columns``; rows with p_fdr < 0.05 in bold."""
    head = "".join(f"<th>{html.escape(HEADERS.get(c, c))}</th>" for c in columns)
    rows = []
    for record in df.to_dict("records"):
        sig = isinstance(record.get("p_fdr"), float) and record["p_fdr"] < 0.05
        cells = "".join(cell(c, record.get(c)) for c in columns)
        rows.append(f'<tr{" class=sig" if sig else ""}>{cells}</tr>')
    return (f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _facts_table(rows: Sequence[tuple[str, str]], table_id: str, heads: tuple[str, str] = ("", "")) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    head = f"<thead><tr><th>{html.escape(heads[0])}</th><th>{html.escape(heads[1])}</th></tr></thead>"
    return f'<table class="facts" id="{table_id}">{head}<tbody>{body}</tbody></table>'


def _code(value: Any) -> str:
    return f"<code>{html.escape(str(value))}</code>"


def _stimuli(description: dict[str, Any]) -> str:
    """The stimulus set in one line: generator or folders, image count, rating column."""
    if description.get("kind") == "embedded":
        where = f"embedded generator {_code(description.get('generator', '?'))}, seed {description.get('seed', '?')}"
    elif description.get("images"):
        where = f"images {_code(description['images'])}"
    else:
        where = "from an activation store or a previous run"
    if description.get("ratings"):
        where += f", ratings {_code(description['ratings'])}"
    count = description.get("n_images")
    return (where + (f"; {int(count)} images" if isinstance(count, (int, float)) else "")
            + (f"; rating column {_code(description['rating_column'])}" if description.get("rating_column") else ""))


def _checkpoints(checkpoints: list[Any]) -> str:
    """One line per checkpoint: label, sha256 prefix, architecture, epoch, path."""
    lines = []
    for c in checkpoints:
        if not isinstance(c, dict):
            continue
        arch = (c.get("architecture") or {}).get("name") if isinstance(c.get("architecture"), dict) else None
        bits = [f"<b>{html.escape(str(c.get('label', '?')))}</b>",
                f"sha256 {_code(str(c.get('sha256') or '?')[:12])}…" if c.get("sha256") else "",
                html.escape(str(arch)) if arch else "",
                f"epoch {c['epoch']}" if c.get("epoch") is not None else "", _code(c["path"]) if c.get("path") else ""]
        lines.append(" · ".join(b for b in bits if b))
    return "<br>".join(lines) or "–"


def warnings_box(manifest: Mapping[str, Any]) -> str:
    """The run's warnings about its checkpoints (``manifest["warnings"]``) in one box, or "" without any."""
    found = manifest.get("warnings")
    items = [w for w in (found if isinstance(found, list) else []) if isinstance(w, Mapping)
             and isinstance(w.get("message"), str)]
    if not items:
        return ""
    rows = "".join(f"<li><b>{html.escape(str(w.get('kind', '')))}</b>: {html.escape(w['message'])}</li>"
                   for w in items)
    return (f"<div class='warnings' id='warnings'><h2>Warnings</h2><ul>{rows}</ul><p>The user guide's "
            "&ldquo;Warnings&rdquo; section says how each is decided and what to do.</p></div>")


def provenance_facts(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The key facts of a run's manifest as ``(field, HTML)`` rows."""
    versions = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    inputs = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}
    command = manifest.get("command")
    by = (manifest.get("subgroups") or {}).get("by") if isinstance(manifest.get("subgroups"), dict) else None
    options = config.get("options") or []
    rows = [("fluency version", html.escape(str(versions.get("fluency", "?")))),
            ("date", html.escape(" → ".join(str(manifest[k]) for k in ("started", "finished") if manifest.get(k))
                                 or "?")),
            ("command", _code(" ".join(map(str, command))) if isinstance(command, list) and command else
             "the Python API (<code>fluency.run</code> or <code>fluency.measure</code>)"),
            ("checkpoints", _checkpoints((inputs.get("checkpoints") or []))),
            ("stimuli", _stimuli(inputs.get("stimuli") or {}) if isinstance(inputs.get("stimuli"), dict) else "–"),
            ("metrics", html.escape(", ".join(map(str, manifest.get("metrics") or [])) or "–")),
            ("analyses", html.escape(", ".join(map(str, manifest.get("analyses") or [])) or "none")),
            ("options", html.escape(", ".join(map(str, options))) if isinstance(options, list) and options
             else "defaults"),
            ("subgroups (--by)", html.escape(", ".join(map(str, by))) if by else "none"),
            ("seed", html.escape(str(config.get("seed", "?")))),
            ("device", html.escape(str(manifest.get("device", "?")))),
            ("software", html.escape(", ".join(f"{k} {v}" for k, v in versions.items()
                                               if k not in ("fluency", "plugins", "platform")) or "?"))]
    return rows


def provenance(manifest: dict[str, Any]) -> str:
    """A collapsed section: the key facts as a table, and the whole manifest as JSON in a nested collapsed
    block (``<pre id="manifest">``)."""
    return ('<details id="provenance"><summary><h2>Provenance</h2></summary>'
            "<p>Where these results come from (from <code>manifest.json</code>).</p>"
            + _facts_table(provenance_facts(manifest), "table-provenance", ("field", "value"))
            + "<details><summary>The whole manifest (JSON)</summary>"
            f'<pre id="manifest">{html.escape(json.dumps(manifest, indent=2, default=str))}</pre></details></details>')
