"""``python -m benchmarks`` runs every suite and writes its results table (issue 16, point 4).

At ``--size smoke`` the sizes are tiny: this checks that the command and every suite still run and
that each figure comes with its same-run baseline and ratio, not the figures themselves.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_command_writes_every_suite_with_its_baselines(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--size", "smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((out / "results.json").read_text())["figures"]
    suites = {f["suite"] for f in figures}
    assert suites == {"run", "metrics", "store", "analysis", "memory", "training"}
    for f in figures:
        assert math.isfinite(f["value"]) and f["value"] > 0, f
        if f["baseline"]:
            assert math.isclose(f["ratio"], f["value"] / f["baseline_value"], rel_tol=1e-9) or \
                math.isclose(f["ratio"], f["baseline_value"] / f["value"], rel_tol=1e-9), f
    table = (out / "results.md").read_text()
    # the header, its rule, one row per figure
    assert table.count("\n| ") == len(figures) + 2 and "python -m benchmarks --size smoke" in table


def test_training_benchmark_refuses_a_folder_holding_other_files_and_replaces_nothing(tmp_path: Path) -> None:
    mine = tmp_path / "ratings.csv"
    mine.write_text("a user's table\n")
    done = subprocess.run([sys.executable, "benchmarks/bench_training.py", "--against-bare", "--images", "8",
                           "--folder", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"--folder {tmp_path} holds files other than the 8 images this "
                                                "benchmark generates there; choose an empty or new folder (nothing "
                                                "in it is replaced)"]
    assert mine.read_text() == "a user's table\n" and not (tmp_path / "images").exists()


def test_memory_benchmark_measures_another_model_with_a_limited_store(tmp_path: Path) -> None:
    """The 224² ``vae-vgg16`` memory test of issue 16 runs with ``--model`` and ``--store-layers``: checked here
    on a tiny untrained ``vae-small``, storing one layer."""
    done = subprocess.run([sys.executable, "benchmarks/bench_memory.py", "--sizes", "6", "12", "--image-size", "32",
                           "--model", "vae-small", "--store-layers", "enc5", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout)
    assert [r["images"] for r in m["runs"]] == [6, 12]
    assert all(r["stored_layers"] == {"vae-small": ["enc5"]} and r["peak_rss_mib"] > 100 for r in m["runs"])
    assert m["growth"] == m["runs"][1]["peak_rss_mib"] / m["runs"][0]["peak_rss_mib"]
