"""Readable terminal output: the strongest relations of a run and the id-matching report."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from rich import box
from rich.cells import cell_len
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


#: the columns that hold names, which a narrow terminal shortens (a legend maps them back); "pair" is a
#: checkpoint pair ``A−B``, each side shortened as a checkpoint
NAME_COLUMNS = {"checkpoint": "checkpoint", "group": "group", "metric": "metric", "layer": "layer"}
PAIR = "−"  # how a difference row names its checkpoints: "A−B"
ELLIPSIS = "…"
#: the narrowest a shortened name gets; below it rich wraps the table instead
MIN_NAME_WIDTH = 8


def short_names(names: Iterable[str], width: int) -> dict[str, str]:
    """Every name → a form of at most ``width`` characters (at least 4), distinct from every other's.

    Names that fit stay as they are. Longer ones are cut with ``…`` around the part that tells them apart
    (what remains once their common start and end are removed: ``a-long-name-epoch-0010`` and
    ``…-0020`` become ``…epoch-0010`` and ``…epoch-0020``); if no cut keeps them distinct they are numbered.
    The same names and width always give the same forms, so one mapping serves a whole summary.
    """
    names = list(dict.fromkeys(names))
    width = max(width, 4)
    long = [n for n in names if len(n) > width]
    if not long:
        return {n: n for n in names}
    fitting = {n for n in names if len(n) <= width}
    prefix = len(os.path.commonprefix(long))
    suffix = len(os.path.commonprefix([n[::-1] for n in long]))
    cuts = (lambda n: _window(n, prefix, max(prefix, len(n) - suffix), width),  # around what differs
            lambda n: ELLIPSIS + n[len(n) - width + 1:], lambda n: n[:width - 1] + ELLIPSIS)
    for cut in cuts:
        short = {n: cut(n) for n in long}
        if len(set(short.values())) == len(short) and not fitting & set(short.values()):
            return {n: short.get(n, n) for n in names}
    numbered = {n: f"{n[:width - 1 - len(str(i))]}{ELLIPSIS}{i}" for i, n in enumerate(long, 1)}
    return {n: numbered.get(n, n) for n in names}


def _window(name: str, start: int, stop: int, width: int) -> str:
    """``name`` cut to ``width`` characters around ``name[start:stop]`` (centred on it when it is shorter),
    with ``…`` where text was cut."""
    room = width - 2  # both ends cut
    lo = max(0, min(start - max(0, room - (stop - start)) // 2, len(name) - room))
    if lo == 0:
        return name[:width - 1] + ELLIPSIS
    if lo + room >= len(name):
        return ELLIPSIS + name[len(name) - width + 1:]
    return ELLIPSIS + name[lo:lo + room] + ELLIPSIS


@dataclass
class ShortNames:
    """The short forms of the names a summary shows, per column (checkpoint, group, metric, layer): one
    mapping for every table of the summary, so a name reads the same everywhere; :meth:`legend` maps back."""

    forms: dict[str, dict[str, str]] = field(default_factory=dict)

    def __call__(self, column: str, name: str) -> str:
        if column == "checkpoint" and PAIR in name and name not in self.forms.get(column, {}):
            return PAIR.join(self(column, part) for part in name.split(PAIR))
        return self.forms.get(column, {}).get(name, name)

    def legend(self) -> list[tuple[str, str, str]]:
        """``(column, short, full)`` for every name that was shortened, column by column, by full name."""
        return [(column, forms[full], full) for column, forms in self.forms.items()
                for full in sorted(forms) if forms[full] != full]


def summary_rows(correlations: pd.DataFrame, top: int, order: Sequence[str] = ()) -> pd.DataFrame:
    """The correlations the summary shows: ``top`` shared evenly among the checkpoint × group cells (each
    cell's ⌈top / cells⌉ strongest, at least one), plus the strongest row of every metric not among them, so
    that every checkpoint, subgroup and metric is represented. ``correlations`` are sorted strongest first;
    the result is in checkpoint order (``order``, else first appearance), then group (``all`` first, then by
    name), then strength."""
    if not len(correlations):
        return correlations
    table = correlations.reset_index(drop=True)
    group = table["group"].fillna("all") if "group" in table.columns else pd.Series("all", index=table.index)
    cells = pd.DataFrame({"checkpoint": table["checkpoint"], "group": group})
    each = max(1, math.ceil(top / len(cells.drop_duplicates())))
    rank = cells.groupby(["checkpoint", "group"], sort=False).cumcount()
    keep = table.index[rank < each].union(table.drop_duplicates("metric").index)
    checkpoints = [*[c for c in order if c in set(table["checkpoint"])],
                   *[c for c in dict.fromkeys(table["checkpoint"]) if c not in set(order)]]
    groups = ["all", *sorted(set(group) - {"all"})]  # as the analyses ran them
    position = pd.DataFrame({"c": table["checkpoint"].map(checkpoints.index), "g": group.map(groups.index),
                             "i": table.index})
    return table.loc[position.loc[keep].sort_values(["c", "g", "i"]).index].reset_index(drop=True)


@dataclass
class _Layout:
    """A relations table before rendering: headers, cell texts (names in full), bold rows and caption."""

    title: str
    columns: list[str]
    cells: list[list[str]]
    bold: list[bool]
    caption: str
    breaks: list[int]  # row indices that start a new checkpoint (a section line above them)

    def name_columns(self) -> list[int]:
        return [i for i, c in enumerate(self.columns) if c in NAME_COLUMNS]

    def widths(self, names: ShortNames | None = None) -> list[int]:
        """Each column's natural width (with ``names`` applied to the names and tests)."""
        return [max([cell_len(self.columns[i])] + [cell_len(self.cell(row, i, names)) for row in self.cells])
                for i in range(len(self.columns))]

    def cell(self, row: Sequence[str], i: int, names: ShortNames | None) -> str:
        """The text shown in column ``i`` of ``row``: names and tests in their short form."""
        short = names is not None and (i == 0 or self.columns[i] in NAME_COLUMNS)
        return names(self.columns[i], row[i]) if short else row[i]  # type: ignore[misc]


def _layout(rows: pd.DataFrame, directions: Mapping[str, Any], effects: Mapping[tuple[str, str], Any],
            title: str, alpha: float) -> _Layout:
    """The columns and cells of a relations table (see :func:`relations_table`)."""
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
    caption = ("p_fdr: Benjamini–Hochberg across all tests of the run; "
               f"* < {alpha}." + (" fluent?: the direction processing-fluency theory predicts." if directional
                                  else "") + (adjusted_caption(rows) if adjusted else "")
               + (f" n = {rows['n'].iloc[0]}." if one_n else "")
               + (" in-sample: OLS R² on all images, as published in-sample figures are." if in_sample else "")
               + (f" %: {CEILING_NOTE}." if ceiling else ""))
    columns = ["test", *(["checkpoint"] if several else []), *(["group"] if grouped else []), "metric", "layer",
               *([] if one_n else ["n"]), *(["raw", "p_fdr", "adj.", "p_fdr "] if adjusted else
                                             ["estimate", "p", "p_fdr"]),
               *(["in-sample"] if in_sample else []), *(["fluent?"] if directional else [])]
    cells, bold, breaks = [], [], []
    for i, row in enumerate(rows.itertuples(index=False)):
        effect = effects.get((row.analysis, row.statistic))
        direction = directions.get(row.metric, {}).get("higher_is_more_fluent")
        row_cells = [effect.title if effect is not None and effect.label else f"{row.analysis} {row.statistic}",
                     *([str(row.checkpoint)] if several else []), *([str(row.group)] if grouped else []),
                     str(row.metric), "(whole)" if pd.isna(row.layer) else str(row.layer),
                     *([] if one_n else [str(row.n)]),
                     _fmt_estimate(row.estimate) + (f" {_fmt_fraction(row.of_ceiling)}" if ceiling and
                                                     math.isfinite(row.of_ceiling) else ""),
                     *([] if adjusted else [_fmt_p(row.p)]), _fmt_fdr(row.p_fdr, alpha)]
        if adjusted:
            row_cells += [_fmt_estimate(row.estimate_adj), _fmt_fdr(getattr(row, "p_adj_fdr", math.nan), alpha)]
        if in_sample:
            row_cells.append(_fmt_estimate(getattr(row, "r2_in_sample", math.nan)))
        if directional:
            row_cells.append(supports_fluency(row.estimate, direction, getattr(effect, "directional", False)))
        if several and i and cells[-1][1] != row_cells[1] and PAIR not in row_cells[1]:
            breaks.append(i)
        cells.append(row_cells)
        bold.append(isinstance(row.p_fdr, float) and row.p_fdr < alpha)
    return _Layout(title, columns, cells, bold, caption, breaks)


#: columns of a compact table (no borders) are this many spaces apart (one when two do not fit)
_GAP = 2


def _boxed_width(widths: Sequence[int]) -> int:
    return sum(widths) + 3 * len(widths) + 1


def _compact_width(widths: Sequence[int], gap: int = _GAP) -> int:
    return sum(widths) + gap * (len(widths) - 1)


def _render(layout: _Layout, names: ShortNames | None, width: int | None) -> Table:
    """The rich table: boxed when it fits ``width`` (or no width is given), else compact (no borders)."""
    widths = layout.widths(names)
    boxed = width is None or _boxed_width(widths) <= width
    gap = _GAP if width is None or _compact_width(widths) <= width else 1
    style: dict[str, Any] = {} if boxed else {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False,
                                              "padding": (0, 1) if gap == 2 else 0, "collapse_padding": True}
    table = Table(title=layout.title, caption=layout.caption, **style)
    for col in layout.columns:
        table.add_column(col, justify="left" if col in ("test", *NAME_COLUMNS, "fluent?") else "right",
                         overflow="fold")
    for i, (row, bold) in enumerate(zip(layout.cells, layout.bold)):
        if i in layout.breaks:
            table.add_section()
        table.add_row(*[layout.cell(row, j, names) for j in range(len(row))], style="bold" if bold else None)
    return table


def fit_names(layouts: Sequence[_Layout], width: int, checkpoints: Sequence[str] = ()) -> ShortNames:
    """Short forms for the names of ``layouts`` such that every table fits ``width`` columns in the compact
    style: tests by their symbol (``Pearson r`` → ``r``) when the symbols are distinct, subgroups by their
    values (``face_sex=male, face_eth=white`` → ``male/white``), then the widest name column is narrowed
    first, never below :data:`MIN_NAME_WIDTH` (one width per column kind, the same in every table; a pair
    ``A−B`` narrows as its checkpoints do). ``checkpoints``: more checkpoint names to shorten alike."""
    full: dict[str, set[str]] = {kind: set() for kind in [*NAME_COLUMNS, "test"]}
    full["checkpoint"].update(checkpoints)  # also named in titles
    for layout in layouts:
        for j, kind in enumerate(layout.columns):
            if kind in full:
                full[kind].update(part for row in layout.cells
                                  for part in (row[j].split(PAIR) if kind == "checkpoint" else [row[j]]))
    symbols, tests = _symbols(full.pop("test")), {}
    base = {"group": _group_values(full["group"])}
    limit = {kind: max((cell_len(base.get(kind, {}).get(n, n)) for n in found), default=0)
             for kind, found in full.items()}

    def names() -> ShortNames:
        forms = {"test": tests}
        for kind, found in full.items():
            pre = base.get(kind) or {n: n for n in found}
            cut = short_names(sorted(set(pre.values())), limit[kind])
            forms[kind] = {n: cut[pre[n]] for n in sorted(found)}
        return ShortNames(forms)

    current = names()
    for layout in layouts:
        while _compact_width(layout.widths(current), 1) > width:
            if symbols and not tests:  # first the tests by their symbols: r, ρ
                tests = symbols
                current = names()
                continue
            content = {layout.columns[j]: max(cell_len(current(layout.columns[j], row[j])) for row in layout.cells)
                       for j in layout.name_columns()}
            candidates = [k for k, w in content.items() if w > cell_len(k) and limit[k] > MIN_NAME_WIDTH]
            if not candidates:
                break
            kind = max(candidates, key=lambda k: content[k])
            limit[kind] = min(limit[kind], max(map(cell_len, current.forms[kind].values()))) - 1
            current = names()
    return current


def _symbols(labels: Iterable[str]) -> dict[str, str]:
    """The test labels that end in a symbol, each → that symbol (``Pearson r`` → ``r``, ``Spearman ρ`` → ``ρ``);
    empty unless the symbols are distinct from each other and from the other labels."""
    labels = list(labels)
    symbols = {label: label.split()[-1] for label in labels if len(label.split()) > 1 and len(label.split()[-1]) <= 2}
    distinct = len(set(symbols.values())) == len(symbols) and not set(symbols.values()) & set(labels)
    return symbols if distinct else {}


def _group_values(labels: Iterable[str]) -> dict[str, str]:
    """Each subgroup label ``col=value, col=value`` → ``value/value`` when every group has the same columns
    (``all`` stays), else itself."""
    labels = list(labels)
    parts = {label: [p.split("=", 1) for p in label.split(", ")] for label in labels if label != "all"}
    keys = {tuple(p[0] for p in ps) for ps in parts.values()}
    if len(keys) != 1 or any(len(p) != 2 for ps in parts.values() for p in ps):
        return {label: label for label in labels}
    values = {label: "/".join(p[1] for p in ps) for label, ps in parts.items()}
    if len(set(values.values())) != len(values) or "all" in values.values():
        return {label: label for label in labels}
    return {"all": "all", **values} if "all" in labels else values


def relations_table(rows: pd.DataFrame, directions: Mapping[str, Any], effects: Mapping[tuple[str, str], Any],
                    title: str = "Strongest relations with the rating", alpha: float = 0.05,
                    names: ShortNames | None = None, width: int | None = None) -> Table:
    """A compact rich table of analysis rows (already sorted), with FDR significance and the fluency direction.

    ``effects`` (``{(analysis, statistic): EffectSize}``) says which statistics are directional and how they
    are labelled; the test column names the statistic. The checkpoint and group columns appear only when
    the rows come from several (the checkpoint column always for differences: it names the pair A−B).
    ``names`` shortens long names (see :func:`fit_names`); with ``width`` the table drops its borders when
    boxed it would be wider.
    """
    return _render(_layout(rows, directions, effects, title, alpha), names, width)


def print_summary(console: Console, strongest: pd.DataFrame, sections: Mapping[str, pd.DataFrame],
                  directions: Mapping[str, Any], effects: Mapping[tuple[str, str], Any],
                  alpha: float = 0.05) -> None:
    """The summary's tables (the correlations, then one per other kind of effect) fitted to the console's
    width: long names shortened the same way in every table, with a legend below the last. Correlations
    of several checkpoints share one table, a section per checkpoint; one table per checkpoint when that
    table cannot fit."""
    title = "Strongest relations with the rating"
    first = [_layout(strongest, directions, effects, title, alpha)] if len(strongest) else []
    if first and {"checkpoint", "group"} <= set(first[0].columns):  # checkpoints × subgroups: a table each
        first = [_layout(rows, directions, effects, f"{title}: {label}", alpha)
                 for label, rows in strongest.groupby("checkpoint", sort=False)]
        for layout in first[:-1]:
            layout.caption = ""
    others = [_layout(rows, directions, effects, SECTION_TITLES[kind], alpha) for kind, rows in sections.items()]
    if not first + others:
        return
    width = console.width
    names = None
    if not all(_boxed_width(layout.widths()) <= width for layout in first + others):
        names = fit_names(first + others, width, [t.removeprefix(f"{title}: ") for t in (f.title for f in first)
                                                  if t != title])
        for layout in first:  # the title names the checkpoint as the other tables do
            if layout.title != title:
                layout.title = f"{title}: {names('checkpoint', layout.title.removeprefix(f'{title}: '))}"
    for layout in first + others:
        console.print(_render(layout, names, width))
    legend = names.legend() if names is not None else []
    if legend:
        console.print("Short names:", highlight=False)
        for column, short, full in legend:
            console.print(f"  {escape(short)} = {escape(full)} ({column})", highlight=False)


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


def print_warnings(console: Console, manifest: Mapping[str, Any]) -> None:
    """Print the run's warnings about its checkpoints (collapsed latent, stimuli out of the training
    distribution, sparsity not reached), one yellow ``warning:`` line each (the report shows them too)."""
    found = manifest.get("warnings")
    for item in found if isinstance(found, list) else []:
        if isinstance(item, Mapping) and isinstance(item.get("message"), str):
            console.print(f"[yellow]warning:[/yellow] {escape(item['message'])}", highlight=False)


def print_matching(console: Console, report: MatchReport | None) -> None:
    """Print the id-matching report of a run with ratings: one line when every id matched, the problems with
    examples otherwise (the user guide's "Ids and mismatches": printed at every run)."""
    if report is None:
        return
    lines = report.summary_lines()
    if report.ok:
        console.print(f"Ratings ↔ images: {escape(lines[0])}", highlight=False)
        return
    console.print(f"[yellow]Ratings ↔ images ({report.mode} ids):[/yellow]")
    for line in lines:
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


#: what the replicate section's numbers are
REPLICATES_NOTE = ("mean ± SD (ddof = 1) and min…max of a test's estimate over the configuration's models; "
                   "p_fdr<.05: models whose test is significant (Benjamini–Hochberg across the run) of those "
                   "tested; mean r²: of r for correlations, of R² for cross-validated R². Every test: "
                   "analyses-replicates.parquet.")


def seed_ranges(seeds: str) -> str:
    """Comma-separated seeds with their runs joined: ``1,2,3,5`` → ``1-3,5`` (``?``: a seed not recorded)."""
    items = [s for s in seeds.split(",") if s]
    numbers = sorted(int(s) for s in items if s.isdigit())
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][-1] + 1:
            spans[-1].append(n)
        else:
            spans.append([n])
    parts = [f"{s[0]}-{s[-1]}" if len(s) > 2 else ",".join(map(str, s)) for s in spans]
    return ",".join(parts + ["?"] * (len(items) - len(numbers)))


def print_replicates(console: Console, rows: pd.DataFrame, effects: Mapping[tuple[str, str], Any]) -> None:
    """The replicate models' section: per configuration a heading (models, seeds) and a compact table of its
    strongest tests (:func:`fluency.core.run.replicates.strongest`), mean ± SD over the models."""
    if not len(rows):
        return
    titles = {key: getattr(effect, "title", key[1]) for key, effect in effects.items()}
    symbols = _symbols(set(titles.values()))
    console.print("[bold]Replicate models[/bold]: each test over the models of one configuration")
    for configuration, group in rows.groupby("configuration", sort=False):
        models = int(group["n_models"].max())
        console.print(f"configuration {escape(str(configuration))}: {models} models, seeds "
                      f"{escape(seed_ranges(str(group['seeds'].iloc[0])))}", highlight=False)
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
        for column in ("test", "metric", "layer", "mean ± SD", "min…max", "p_fdr<.05", "mean r²"):
            table.add_column(column, justify="left" if column in ("test", "metric", "layer") else "right",
                             overflow="fold")
        for row in group.itertuples(index=False):
            title = titles.get((row.analysis, row.statistic), f"{row.analysis} {row.statistic}")
            table.add_row(symbols.get(title, title), str(row.metric),
                          "(whole)" if row.layer is None or pd.isna(row.layer) else str(row.layer),
                          f"{row.mean:+.3f} ± {row.sd:.3f}" if math.isfinite(row.sd) else f"{row.mean:+.3f}",
                          f"{row.min:+.2f}…{row.max:+.2f}", f"{row.n_significant}/{row.n_tested}",
                          f"{row.mean_r2:.3f}" if math.isfinite(row.mean_r2) else "–")
        console.print(table)
    console.print(REPLICATES_NOTE, highlight=False)
