"""glow-small through fluency's command line: train on a tiny folder of images, then measure it.

The commands run as ``python -m fluency.cli`` in a subprocess (``sys.executable``). When the package is
installed, fluency finds ``glow-small`` through the entry point; when it is only on ``PYTHONPATH``
(``PYTHONPATH=src``), the subprocess registers the plugin module in fluency's process-wide plugin
manager first and then runs the same CLI module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

INSTALLED = any(ep.value == "fluency_flows.plugin" for ep in entry_points(group="fluency"))
LAUNCHER = ("import runpy, fluency.api, fluency_flows.plugin as plugin; "
            "fluency.api.get_plugin_manager().register(plugin, 'flows', 'fluency-flows', '0.1.0'); "
            "runpy.run_module('fluency.cli', run_name='__main__', alter_sys=True)")


def fluency_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``fluency ARGS`` in a subprocess of this interpreter (exit status, stdout and stderr kept)."""
    start = [sys.executable, "-m", "fluency.cli"] if INSTALLED else [sys.executable, "-c", LAUNCHER]
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p))
    return subprocess.run([*start, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 PNG images 16×16: smooth colour gradients with a bright square and a little noise."""
    root = tmp_path_factory.mktemp("glow-e2e")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 16)
    (root / "images").mkdir()
    for i in range(24):
        a, b, c = rng.uniform(0.2, 0.8, 3)
        img = np.stack(np.broadcast_arrays(a * ramp[None, :], b * ramp[:, None], np.full((16, 16), c)), axis=-1)
        x, y = rng.integers(0, 12, 2)
        img[y:y + 4, x:x + 4] = 0.95
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(root / "images" / f"img-{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def trained(folder: Path) -> dict:
    """Two epochs of glow-small at 16×16 through ``fluency train``; its --json summary."""
    done = fluency_cli("train", "--arch", "glow-small", "--images", folder / "images", "--out", folder / "model",
                       "--epochs", "2", "--batch-size", "4", "--image-size", "16", "--lr", "1e-3",
                       "--val-fraction", "0.25", "--device", "cpu", "--seed", "0", "--no-figures", "--json",
                       cwd=folder)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_training_lowers_the_nll_in_bits_per_dimension(trained: dict, folder: Path) -> None:
    history = pd.read_parquet(folder / "model" / "history.parquet")
    print("\n" + history[["epoch", "nll_bpd", "val_nll_bpd"]].to_string(index=False))
    assert {"loss", "nll_bpd", "val_nll_bpd"} <= set(history.columns) and "kl" not in history.columns
    assert np.isfinite(history[["loss", "nll_bpd", "val_nll_bpd"]].to_numpy()).all()
    assert history["nll_bpd"].iloc[-1] < history["nll_bpd"].iloc[0]
    assert 0 < history["val_nll_bpd"].iloc[-1] < 8  # below 8 bits: better than uniform 8-bit pixels
    assert Path(trained["checkpoint"]) == folder / "model" / "final.pt"


def test_activation_metrics_read_the_per_scale_layers(trained: dict, folder: Path) -> None:
    done = fluency_cli("run", "--checkpoint", trained["checkpoint"], "--images", folder / "images",
                       "--metric", "gini", "--metric", "hoyer", "--out", folder / "run", "--device", "cpu",
                       "--no-report", cwd=folder)
    assert done.returncode == 0, done.stderr
    metrics = pd.read_parquet(folder / "run" / "metrics.parquet")
    assert set(metrics["metric"]) == {"gini", "hoyer"}
    assert set(metrics["layer"]) == {"scale1", "scale2", "all"}  # the default layers and their mean
    assert metrics.groupby(["metric", "layer"])["image_id"].nunique().eq(24).all()
    assert metrics["value"].between(0, 1).all()
    (latents,) = (folder / "run" / "latents").glob("*.parquet")  # the flow's z, from the same pass
    assert pd.read_parquet(latents).shape == (24, 1 + 3 * 16 * 16)


def test_a_metric_that_needs_a_decoder_is_refused_in_one_line(trained: dict, folder: Path) -> None:
    done = fluency_cli("run", "--checkpoint", trained["checkpoint"], "--images", folder / "images",
                       "--metric", "recon-error", "--out", folder / "refused", "--device", "cpu", cwd=folder)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: metric 'recon-error' needs a model with a decoder")
    assert "'glow-small', a flow model" in lines[0]


@pytest.mark.skipif(not INSTALLED, reason="fluency-flows is not installed: no entry point to find")
def test_fluency_lists_the_installed_plugin(tmp_path: Path) -> None:
    done = fluency_cli("plugins", "glow-*", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert (row["kind"], row["name"], row["package"], row["version"], row["status"]) == \
        ("architecture", "glow-small", "fluency-flows", "0.1.0", "ok")
