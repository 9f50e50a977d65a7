"""``fluency runs`` and ``fluency query`` over every run below a folder (issue 15, points 6 to 8).

Two real runs (the embedded default; an untrained vae-small without covariates, in a sub-folder) are
built once; beside them a killed run (manifest says running, no lock), a failed one (no metric table),
a broken manifest and another tool's manifest.json. The query results are checked against pandas
reading the same Parquet files, and docs/querying.md's commands run as written.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from cli_env import fluency_cli
from test_startup import probe

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: newest first: the killed run's start is set in the future, the failed one's in the past
ORDER = ["killed", "sweep/b", "a"]
STATUS = {"a": "complete", "sweep/b": "complete", "killed": "incomplete", "failed": "failed"}


def edit_manifest(run_dir: Path, **values: object) -> None:
    path = run_dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}), encoding="utf-8")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose ``runs/`` holds a, sweep/b, killed, failed, broken (bad JSON) and other (not fluency's)."""
    import fluency

    base = tmp_path_factory.mktemp("query")
    runs = base / "runs"
    quiet = {"figures": False, "report": False, "progress": False, "store": False}
    fluency.run(metrics=["gini"], out=runs / "a", **quiet)
    fluency.run(metrics=["gini", "hoyer"], models=["vae-small"], covariates=False, out=runs / "sweep" / "b",
                **quiet)
    # the two real runs can start within the same second (manifests record seconds): date b a minute after a
    a_started = datetime.fromisoformat(json.loads((runs / "a" / "manifest.json").read_text())["started"])
    edit_manifest(runs / "sweep" / "b", started=(a_started + timedelta(minutes=1)).isoformat(timespec="seconds"))
    for name, status, started in (("killed", "running", "2099-01-01T00:00:00+00:00"),
                                  ("failed", "failed", "2001-01-01T00:00:00+00:00")):
        (runs / name).mkdir()
        shutil.copy(runs / "a" / "manifest.json", runs / name / "manifest.json")
        edit_manifest(runs / name, status=status, started=started, run_id=name)
    (runs / "broken").mkdir()
    (runs / "broken" / "manifest.json").write_text("{not json", encoding="utf-8")
    (runs / "other").mkdir()
    (runs / "other" / "manifest.json").write_text('{"name": "a web app"}', encoding="utf-8")
    return base


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], root: Path):
    """``fluency ARGS`` in the fixture folder: (exit status, stdout, stderr)."""
    monkeypatch.chdir(root)
    return lambda *args, columns=200: fluency_cli(monkeypatch, capsys, *args, columns=columns)


def metric_oracle(root: Path) -> pd.DataFrame:
    """The two runs' metric tables read by pandas, with run_dir."""
    return pd.concat([pd.read_parquet(root / "runs" / d / "metrics.parquet").assign(run_dir=d)
                      for d in ("a", "sweep/b")], ignore_index=True)


def by_key(table: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    return table.sort_values(key).reset_index(drop=True)


# -- fluency runs ------------------------------------------------------------------------------------------


def test_runs_lists_every_run_newest_first_with_its_status(cli) -> None:
    code, out, err = cli("runs", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [r["run_dir"] for r in listed] == [*ORDER, "failed"]
    assert {r["run_dir"]: r["status"] for r in listed} == STATUS
    b = listed[1]
    assert b["checkpoints"] == ["vae-small"] and b["metrics"] == ["gini", "hoyer"] and b["images"] == 240
    assert b["stimuli"] == "embedded" and len(b["checkpoint_sha256"][0]) == 64
    assert "gone" in listed[0]["status_note"]
    notes = [line for line in err.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "broken" in notes[0], err  # not "other"


def test_runs_table_fits_80_columns(cli) -> None:
    code, out, _ = cli("runs", columns=80)
    lines = out.splitlines()
    assert code == 0 and max(map(len, lines)) <= 80
    rows = {line.split()[2]: line for line in lines if re.match(r"\d{4}-\d\d-\d\d ", line)}
    assert list(rows) == [*ORDER, "failed"]
    assert rows["killed"].rstrip().endswith("incomplete") and "embedded (240)" in rows["a"]
    assert "gini, image-stats" in rows["a"] and "vae-small" in rows["sweep/b"]


def test_long_run_folders_are_shortened_and_stay_distinct() -> None:
    from rich.console import Console

    from fluency.core.outputs.listing import runs_table
    from fluency.core.run.history import RunInfo

    def info(name: str) -> RunInfo:
        return RunInfo(name, name, "2026-01-02T03:04:05+00:00", None, "complete", "", "london-faces/images", 102,
                       ["a-very-long-checkpoint-label", "another-one"], [None, None], ["gini", "sam", "lpips"],
                       ["pearson"], "0.1.0", Path(name))

    names = [f"sweeps/sparsity-and-optimizer/rho-0.{i}-sam-seed-{i}" for i in range(3)]
    console = Console(width=80, record=True)
    console.print(runs_table([info(n) for n in names], 80))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    shown = [line.split()[2] for line in lines if line.startswith("2026")]
    assert len(set(shown)) == 3 and all("…" in s and f"{i}-sam" in s for i, s in enumerate(shown)), shown


def test_runs_without_runs_and_without_the_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    code, out, err = fluency_cli(monkeypatch, capsys, "runs", str(tmp_path))
    assert (code, out.strip(), err) == (0, f"No fluency runs below {tmp_path}.", "")
    code, out, err = fluency_cli(monkeypatch, capsys, "runs", str(tmp_path / "nope"))
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nope'}: no such folder" and out == ""


def test_an_unreadable_folder_is_a_note_and_the_rest_is_listed(root: Path, monkeypatch, capsys) -> None:
    real = os.scandir
    locked = str(root / "runs" / "sweep")

    def scandir(path: object = ".") -> object:
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    code, out, err = fluency_cli(monkeypatch, capsys, "runs", str(root / "runs"), "--json")
    assert code == 0 and [r["run_dir"] for r in json.loads(out)] == ["killed", "a", "failed"]
    assert f"note: {locked}: not readable (Permission denied)" in " ".join(err.split())


# -- fluency query -----------------------------------------------------------------------------------------


def test_query_metrics_matches_pandas_in_csv_and_json(cli, root: Path) -> None:
    code, out, err = cli("query", "select * from metrics", "--format", "csv")
    assert code == 0, err
    got = pd.read_csv(io.StringIO(out), keep_default_na=False, na_values=[""])
    oracle = metric_oracle(root)
    assert list(got.columns) == [*oracle.columns]
    key = ["run_dir", "checkpoint", "metric", "layer", "image_id"]
    got, oracle = by_key(got, key), by_key(oracle, key)
    assert len(got) == len(oracle) > 0 and (got["value"].to_numpy() == oracle["value"].to_numpy()).all()
    assert got["layer"].isna().sum() == oracle["layer"].isna().sum() > 0  # image-stats: whole-image values
    assert (got[key].fillna("").astype(str).to_numpy() == oracle[key].fillna("").astype(str).to_numpy()).all()
    code, out, _ = cli("query", "select run_dir, metric, value from metrics", "--format", "json")
    rows = json.loads(out)
    assert len(rows) == len(oracle) and sorted(r["value"] for r in rows) == sorted(oracle["value"])


def test_query_aggregates_like_pandas(cli, root: Path) -> None:
    sql = "select run_dir, checkpoint, layer, avg(value) as mean, count(*) as n from metrics " \
          "where metric = 'gini' group by all order by run_dir, layer"
    code, out, _ = cli("query", sql, "--format", "json")
    oracle = metric_oracle(root).query("metric == 'gini'").groupby(["run_dir", "checkpoint", "layer"])["value"]
    expected = {(r, c, lay): (m, n) for (r, c, lay), m, n in zip(oracle.mean().index, oracle.mean(), oracle.size())}
    got = {(r["run_dir"], r["checkpoint"], r["layer"]): (r["mean"], r["n"]) for r in json.loads(out)}
    assert code == 0 and got.keys() == expected.keys()
    for k, (mean, n) in expected.items():
        assert got[k][0] == pytest.approx(mean, rel=1e-12) and got[k][1] == n


def test_query_analyses_is_the_union_by_column_name(cli, root: Path) -> None:
    code, out, err = cli("query", "select * from analyses", "--format", "json")
    assert code == 0, err
    rows = pd.DataFrame(json.loads(out))
    files = {(d, p.stem): pd.read_parquet(p) for d in ("a", "sweep/b")
             for p in sorted((root / "runs" / d / "analyses").glob("*.parquet"))}
    assert rows.groupby(["run_dir", "analysis"]).size().to_dict() == {k: len(v) for k, v in files.items()}
    assert {"estimate_adj", "p_fdr", "run_dir", "analysis"} <= set(rows.columns)
    assert "estimate_adj" not in files[("sweep/b", "pearson")].columns  # so these are nulls from the union
    assert rows.loc[rows["run_dir"] == "sweep/b", "estimate_adj"].isna().all()
    mine = rows[(rows["run_dir"] == "a") & (rows["analysis"] == "pearson")].sort_values(["metric", "layer"])
    oracle = files[("a", "pearson")].sort_values(["metric", "layer"])
    assert mine["estimate"].tolist() == oracle["estimate"].tolist()


def test_query_runs_view(cli) -> None:
    sql = "select run_dir, status, images, checkpoints, metrics from runs order by run_dir"
    code, out, _ = cli("query", sql, "--format", "json")
    rows = {r["run_dir"]: r for r in json.loads(out)}
    assert code == 0 and {d: r["status"] for d, r in rows.items()} == STATUS
    assert rows["sweep/b"]["checkpoints"] == ["vae-small"] and rows["a"]["metrics"] == ["gini", "image-stats"]
    assert rows["a"]["images"] == 240


def test_query_table_fits_and_says_how_many_rows(cli, root: Path) -> None:
    sql = "select image_id, checkpoint, metric, layer, value * 1e-9 as tiny, plugin_version, options_hash, run_dir " \
          "from metrics where metric = 'gini' order by value desc, image_id"
    code, out, _ = cli("query", sql, "--max-rows", "3", columns=72)
    lines = out.splitlines()
    assert code == 0 and max(map(len, lines)) <= 72 and lines[0].split()[0] == "image_id"
    gini = metric_oracle(root).query("metric == 'gini'")
    top = gini.sort_values(["value", "image_id"], ascending=[False, True]).head(3)
    rows = [line.split() for line in lines if line.startswith("stim-")]
    assert [r[0] for r in rows] == top["image_id"].tolist()
    assert [r[4] for r in rows] == [f"{v * 1e-9:.6g}" for v in top["value"]]  # numbers are not cut
    assert all(r[6].endswith("…") for r in rows)  # "fluency 0.1.0" is cut
    assert f"{len(gini)} rows, the first 3 shown" in out


def test_values_of_every_kind_in_json_csv_and_the_table(cli, tmp_path: Path) -> None:
    sql = "select 1.25::decimal(5, 2) as d, date '2026-01-02' as day, 'nan'::double as x, [1, 2] as l, " \
          "{'a': 'b'} as s, null as missing, 1/3 as third"
    code, out, _ = cli("query", sql, str(tmp_path), "--format", "json")
    assert code == 0 and json.loads(out) == [{"d": 1.25, "day": "2026-01-02", "x": None, "l": [1, 2],
                                              "s": {"a": "b"}, "missing": None, "third": 1 / 3}]
    code, out, _ = cli("query", sql, str(tmp_path), "--format", "csv")
    assert out.splitlines() == ["d,day,x,l,s,missing,third", f'1.25,2026-01-02,nan,"[1, 2]","{{""a"": ""b""}}",,{1 / 3!r}']
    code, out, _ = cli("query", sql, str(tmp_path))
    assert out.splitlines()[2].split() == ["1.25", "2026-01-02", "nan", "[1,", "2]", '{"a":', '"b"}', "NULL", "0.333333"]


def test_a_sql_error_is_one_line_with_status_2(cli) -> None:
    code, out, err = cli("query", "selec * from metrics")
    assert code == 2 and out == ""
    assert err.strip().startswith("error: query: Parser Error: syntax error") and len(err.strip().splitlines()) == 1
    code, _, err = cli("query", "select * from nosuch")
    assert code == 2 and err.startswith("error: query: Catalog Error") and len(err.strip().splitlines()) == 1


def test_a_missing_folder_and_an_empty_one(cli, tmp_path: Path) -> None:
    code, out, err = cli("query", "select 1", str(tmp_path / "nope"))
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nope'}: no such folder"
    code, out, err = cli("query", "select (select count(*) from metrics) + (select count(*) from analyses) "
                                  "+ (select count(*) from runs) as n", str(tmp_path), "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 0}]


def test_without_duckdb_one_line_names_the_extra(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "duckdb", None)  # import duckdb raises ImportError
    code, _, err = cli("query", "select 1")
    assert code == 2 and err.strip() == 'error: fluency query needs DuckDB: pip install "fluency[query]"'


def test_an_unreadable_table_is_left_out_with_a_note(root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    shutil.copytree(root / "runs" / "a", tmp_path / "a")
    shutil.copytree(root / "runs" / "a", tmp_path / "bad")
    (tmp_path / "bad" / "analyses" / "pearson.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    code, out, err = fluency_cli(monkeypatch, capsys, "query", "select run_dir, analysis, count(*) as n from analyses "
                                 "group by all order by all", str(tmp_path), "--format", "json")
    assert code == 0, err
    assert [(r["run_dir"], r["analysis"]) for r in json.loads(out)] == [("a", "pearson"), ("a", "spearman"),
                                                                         ("bad", "spearman")]
    assert err.startswith("note: ") and "bad/analyses/pearson.parquet: left out" in " ".join(err.split())


def test_the_commands_answer_without_importing_torch(root: Path) -> None:
    runs = str(root / "runs")
    assert probe(["runs", runs]) == {"code": 0, "torch": False}
    assert probe(["query", "select count(*) from metrics join runs using (run_dir)", runs]) == \
        {"code": 0, "torch": False}


# -- docs/querying.md --------------------------------------------------------------------------------------


def page_commands() -> list[str]:
    """The commands of querying.md's shell blocks, continuations joined, as the docs test reads them."""
    text = (DOCS / "querying.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_querying_pages_commands_run_as_written(cli, root: Path) -> None:
    commands = page_commands()
    assert len(commands) == 5 and all(c.startswith("fluency ") for c in commands)
    outputs = []
    for command in commands:
        code, out, err = cli(*shlex.split(command)[1:])
        assert code == 0, (command, err)
        outputs.append(out)
    assert all(d in outputs[0] for d in STATUS) and len(json.loads(outputs[1])) == len(STATUS)
    # the Gini–rating correlations: one row per run (its one checkpoint), strongest first, as in pandas
    corr = json.loads(cli(*shlex.split(commands[2])[1:], "--format", "json")[1])
    oracle = {(d, float(t.query("metric == 'gini' and layer == 'all' and group == 'all'")["estimate"].iloc[0]))
              for d in ("a", "sweep/b") for t in [pd.read_parquet(root / "runs" / d / "analyses" / "pearson.parquet")]}
    assert {(r["run_dir"], r["r"]) for r in corr} == oracle
    assert [abs(r["r"]) for r in corr] == sorted((abs(r["r"]) for r in corr), reverse=True)
    assert "vae-small" in outputs[2] and "default" in outputs[2]
    # the mean of gini per checkpoint and layer
    means = pd.read_csv(io.StringIO(outputs[3]))
    oracle = metric_oracle(root).query("metric == 'gini'").groupby(["checkpoint", "layer"])["value"].mean()
    assert len(means) == len(oracle)
    assert means.set_index(["checkpoint", "layer"])["mean_gini"].to_dict() == pytest.approx(oracle.to_dict())
    # the runs that did not complete
    assert {r["run_dir"]: r["status"] for r in json.loads(outputs[4])} == {"killed": "incomplete",
                                                                           "failed": "failed"}
