"""The terminal summary at 80 columns (short names with a legend, every checkpoint and subgroup represented,
each kind of effect in its own table) and the progress bars' labels."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from fluency.api import EffectSize
from fluency.core.outputs.summary import print_summary, short_names, summary_rows

LONG = "a-very-long-checkpoint-name-epoch-00{}0"
EFFECTS = {("pearson", "r"): EffectSize("r", "Pearson r"), ("spearman", "rho"): EffectSize("rho", "Spearman ρ"),
           ("paired", "mean_diff"): EffectSize("mean_diff", "Δ mean", kind="difference", range=None,
                                               directional=False, heatmap=False)}
DIRECTIONS = {"gini": {"higher_is_more_fluent": True}, "sam": {"higher_is_more_fluent": False}}


def test_short_names_fit_the_width_stay_distinct_and_keep_what_differs() -> None:
    names = [LONG.format(i) for i in range(1, 5)] + ["short"]
    forms = short_names(names, 12)
    assert forms["short"] == "short"  # a name that fits is kept
    assert all(len(v) <= 12 for v in forms.values()) and len(set(forms.values())) == len(names)
    assert forms[LONG.format(1)] == "…-epoch-0010"  # the part that differs (the epoch) survives, with context
    assert short_names(names, 12) == forms  # deterministic: one mapping serves a whole summary
    assert short_names(["abc", "abd"], 10) == {"abc": "abc", "abd": "abd"}
    middle = short_names(["model-constraint-kl-seed-1", "model-constraint-l1-seed-1"], 10)
    assert set(middle.values()) == {"…nt-kl-se…", "…nt-l1-se…"}  # the differing middle, cut on both sides
    ends = ["1-same-same-same-1", "1-same-same-same-2", "2-same-same-same-1"]  # no single cut tells all apart
    clash = short_names(ends, 6)
    assert len(set(clash.values())) == 3 and all(len(v) <= 6 for v in clash.values())  # numbered
    assert list(clash.values()) == ["1-sa…1", "1-sa…2", "2-sa…3"]


def correlations(checkpoints: list[str], groups: list[str]) -> pd.DataFrame:
    """Correlation rows, strongest first, for every checkpoint × group × test × metric × layer."""
    rng = np.random.default_rng(1)
    rows = [{"analysis": a, "statistic": s, "checkpoint": c, "group": g, "metric": m, "layer": layer,
             "n": 40 if g == "all" else 12, "estimate": rng.uniform(-0.9, 0.9), "p": 0.01, "estimate_adj": 0.1,
             "p_adj_fdr": 0.5, "kind": "correlation"}
            for c in checkpoints for g in groups for a, s in (("pearson", "r"), ("spearman", "rho"))
            for m in ("gini", "sam") for layer in (("enc1", "enc2", "enc3") if m == "gini" else (None,))]
    table = pd.DataFrame(rows)
    table["p_fdr"] = 1e-6 / (table["estimate"].abs() + 0.01)
    table.loc[table.checkpoint == checkpoints[0], "p_fdr"] /= 1e6  # the first checkpoint dominates a ranking
    return table.sort_values("p_fdr", kind="stable").reset_index(drop=True)


def test_summary_rows_represent_every_checkpoint_group_and_metric() -> None:
    labels = [LONG.format(i) for i in (4, 1, 3, 2)]  # the run's order, not sorted
    table = correlations(labels, ["all", "face_sex=female", "face_sex=male"])
    assert set(table.head(10)["checkpoint"]) == {labels[0]}  # a plain top 10 shows one checkpoint only
    rows = summary_rows(table, 10, labels)
    cells = rows.groupby(["checkpoint", "group"], sort=False).size()
    assert len(cells) == 12 and (cells >= 1).all()  # ⌈10 / 12⌉ = 1 row per checkpoint × group, at least
    assert list(dict.fromkeys(rows["checkpoint"])) == labels  # in the run's order
    assert set(rows["metric"]) == {"gini", "sam"}
    first = rows[rows.checkpoint == labels[1]]
    assert list(first["group"]) == ["all", "face_sex=female", "face_sex=male"]  # all first, then by name
    for _, cell in rows.groupby(["checkpoint", "group"]):  # within a cell, strongest first
        assert cell["p_fdr"].is_monotonic_increasing
    assert len(summary_rows(correlations(labels[:1], ["all"]), 5)) == 5


def _printed(strongest: pd.DataFrame, sections: dict[str, pd.DataFrame], width: int = 80) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    print_summary(console, strongest, sections, DIRECTIONS, EFFECTS)
    return console.export_text()


def _legend(text: str) -> dict[str, str]:
    return dict(re.findall(r"^  (\S.*?) = (.+) \(\w+\)$", text.split("Short names:")[1], re.M))


def test_summary_fits_80_columns_with_one_short_form_per_name_and_a_legend() -> None:
    labels = [LONG.format(i) for i in range(1, 5)]
    strongest = summary_rows(correlations(labels, ["all"]), 10, labels)
    pairs = [f"{a}−{b}" for i, a in enumerate(labels) for b in labels[i + 1:]]
    differences = pd.DataFrame({"analysis": "paired", "statistic": "mean_diff", "checkpoint": pairs, "group": "all",
                                "metric": "gini", "layer": "enc1", "n": 40, "estimate": 0.1, "p": 1e-3,
                                "p_fdr": 2e-3, "kind": "difference"})
    text = _printed(strongest, {"difference": differences})
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    legend = _legend(text)
    assert set(legend.values()) >= set(labels) | {"Pearson r", "Spearman ρ"}
    short = {full: s for s, full in legend.items()}
    tables = text.split("Short names:")[0]
    assert not any(label in tables for label in labels)  # never the full label, never a cut other than the legend's
    for label in labels:  # the same short form in the correlations and in the pairs
        assert tables.count(short[label]) >= 1 + sum(label in p for p in pairs)
    assert all(len(s) <= 80 for s in legend)
    cells = [c for line in lines for c in line.split() if c.endswith("…") or c.startswith("…")]
    assert all(any(part in legend for part in c.split("−")) for c in cells), cells  # no rich cut: "check…"
    wide = _printed(strongest, {"difference": differences}, width=200)
    assert "Short names" not in wide and all(label in wide for label in labels)


def test_summary_with_subgroups_and_checkpoints_one_table_per_checkpoint() -> None:
    labels = [LONG.format(i) for i in range(1, 3)]
    groups = ["all", "face_sex=female, face_eth=west_asian", "face_sex=male, face_eth=white"]
    text = _printed(summary_rows(correlations(labels, groups), 10, labels), {})
    assert max(map(len, text.splitlines())) <= 80
    legend = _legend(text)
    assert legend["female/west_asian"] == groups[1] and legend["male/white"] == groups[2]
    titles = [line.strip() for line in text.splitlines() if "Strongest relations" in line]
    assert len(titles) == 2 and all(t.endswith(c) for t, c in zip(titles, labels))  # no checkpoint column


def _checkpoints(folder: Path) -> list[Path]:
    """Two different checkpoints (other bytes) whose labels are long and hold rich markup brackets."""
    from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
    from fluency.core.plugin.manager import PluginManager

    loaded = load_checkpoint(DEFAULT_CHECKPOINT, PluginManager(autoload=False))
    info = {k: v for k, v in loaded.info.items() if k not in ("format", "format_version", "architecture")}
    paths = [folder / f"a-very-long-checkpoint-name-[run]-epoch-00{i}0.pt" for i in (1, 2)]
    for i, path in enumerate(paths):
        save_checkpoint(path, loaded.model, "vae-small", **info, note=f"copy {i}")
    return paths


@pytest.fixture(scope="module")
def rated_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Twelve 16-pixel images (one unrated), their ratings with a subgroup column, two checkpoints."""
    root = tmp_path_factory.mktemp("set")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(13):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    pd.DataFrame({"id": [str(i) for i in range(12)], "beauty": rng.normal(size=12),
                  "sex": ["f", "m"] * 6}).to_csv(root / "r.csv", index=False)
    return root, _checkpoints(root)


def test_cli_summary_at_80_columns_and_json_keeps_stdout_pure(rated_set, tmp_path: Path, monkeypatch) -> None:
    from fluency.cli import cli

    root, checkpoints = rated_set
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("FLUENCY_DISABLE_PLUGIN_AUTOLOAD", "1")
    args = ["run", "--metric", "gini", "--images", str(root / "images"), "--ratings", str(root / "r.csv"),
            "--id-column", "id", "--rating-column", "beauty", "--by", "sex", "--min-group-size", "3",
            "--no-store", "--no-figures", "--no-report", "--no-covariates"]
    for path in checkpoints:
        args += ["--checkpoint", str(path)]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert max(map(len, text.splitlines())) <= 80 and "Short names:" in text
    for label in ("a-very-long-checkpoint-name-[run]-epoch-0010", "a-very-long-checkpoint-name-[run]-epoch-0020"):
        assert f"= {label} (checkpoint)" in text
    assert "Ratings ↔ images" in result.stderr and "1 image" in result.stderr  # the unrated image, on stderr
    as_json = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b"), "--json"])
    assert as_json.exit_code == 0, as_json.output
    summary = json.loads(as_json.stdout)  # nothing but JSON on stdout
    assert {r["checkpoint"] for r in summary["strongest"]} == {p.stem for p in checkpoints}
    assert "Ratings ↔ images" in as_json.stderr  # the matching report, on stderr


def test_progress_bars_name_every_checkpoint_and_keep_brackets(rated_set, tmp_path: Path) -> None:
    import fluency

    root, checkpoints = rated_set
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200, color_system=None)
    fluency.run(metrics=["gini"], images=root / "images", ratings=root / "r.csv", id_column="id",
                rating_column="beauty", by=["sex"], min_group_size=3, checkpoints=checkpoints, out=tmp_path / "o",
                store=False, figures=False, covariates=False, console=console)
    shown = buffer.getvalue()
    for path in checkpoints:
        assert f"metrics · {path.stem}" in shown  # the label, brackets and all, one bar per checkpoint
    assert "loading the model" in shown  # the bar is there before the model is loaded
    assert "analyses" in shown


def test_a_failed_step_leaves_its_finished_bars_and_drops_the_unfinished_one() -> None:
    """Piped stderr: a refusal raised while a model loads stays one line (no ``0/? loading the model`` bar)."""
    from fluency.core.progress import progress_bar

    buffer = io.StringIO()
    with pytest.raises(ValueError), progress_bar(Console(file=buffer, width=80)) as bars:
        done = bars.add_task("metrics · first", total=1, status="")
        bars.advance(done)
        bars.add_task("metrics · second", total=None, status="loading the model")
        raise ValueError("refused")
    shown = buffer.getvalue()
    assert "metrics · first" in shown and "second" not in shown and "loading the model" not in shown


def test_bars_fit_80_columns_with_counts_times_and_distinct_long_labels() -> None:
    from fluency.core.progress import progress_bar, step

    buffer = io.StringIO()
    labels = [LONG.format(i) for i in (1, 2)]
    with progress_bar(Console(file=buffer, width=80)) as bars:
        for label in labels:
            task = bars.add_task(step("metrics", label), total=1020, status="drawing the figures")
            bars.advance(task, 500)
    lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines)
    for line, label in zip(lines, labels, strict=True):
        assert line.startswith("metrics · a-very") and label[-4:] in line  # both ends of the name
        assert re.search(r" 500/1020 \d:\d\d:\d\d ", line), line  # counts and times whole
