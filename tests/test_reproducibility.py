"""``--deterministic`` and the torch settings every run records: results that do not depend on the thread count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fluency


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"im{k}.png")
    return folder


def measured(images: Path, out: Path, **settings) -> tuple[np.ndarray, dict]:
    run = fluency.run(metrics=["sam", "grad-norm"], images=str(images), out=str(out), progress=False, figures=False,
                      **settings)
    values = run.metrics.sort_values(["metric", "image_id"])["value"].to_numpy()
    return values, json.loads((out / "manifest.json").read_text())


def test_deterministic_uses_one_thread_records_it_and_restores_the_settings(images: Path, tmp_path: Path) -> None:
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(2)
    try:
        plain, manifest = measured(images, tmp_path / "plain")
        assert manifest["torch_settings"]["threads"] == 2
        assert manifest["torch_settings"]["deterministic_algorithms"] is False
        assert manifest["config"]["deterministic"] is False
        fixed, manifest = measured(images, tmp_path / "fixed", deterministic=True)
        assert manifest["torch_settings"]["threads"] == 1 and manifest["torch_settings"]["deterministic_algorithms"]
        assert manifest["config"]["deterministic"] is True
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()  # restored
        torch.set_num_threads(1)
        one_thread, _ = measured(images, tmp_path / "one")
        assert np.array_equal(fixed, one_thread)  # bit for bit: what --deterministic promises on any core count
        np.testing.assert_allclose(plain, fixed, rtol=1e-4)  # thread counts change only the last digits
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def test_the_thread_effect_benchmark_runs(images: Path) -> None:
    """The documented measurement (docs/user-guide.md, "Reproducibility"), on six images and two thread counts."""
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "thread_effect.py"
    proc = subprocess.run([sys.executable, str(script), "--images", str(images), "--metric", "gini", "--threads", "1",
                           "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["metric"] == "gini" and row["threads"] == "1 vs 2" and row["max_relative_difference"] < 1e-4
