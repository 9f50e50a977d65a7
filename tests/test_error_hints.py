"""Errors that name the real cause, with a hint that works (issue 14, point 4).

A checkpoint trained with an LPIPS loss is measured offline by activation metrics (its loss is built only
when a metric needs it, and then the error names the checkpoint and the metric); a file that is not a
checkpoint is one line saying so; a misspelt plugin name gets a suggestion; a missing rating column says
which option names it; the hint of ``attention-l1`` is a pair of commands that run; Ctrl-C while the report
is written leaves the run not ``complete`` and says how to write the report.
"""

from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from rich.console import Console

import fluency
from cli_env import fluency_cli
from fluency.core.errors import FluencyError
from fluency.core.model.checkpoint import read_checkpoint

DEFAULT_CHECKPOINT = Path(fluency.__file__).parent / "data" / "default.pt"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight small random images."""
    folder = tmp_path_factory.mktemp("hint-images") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"img-{i}.png")
    return folder


def lpips_trained(path: Path) -> Path:
    """The shipped model's weights in a checkpoint that says it was trained with L2 + LPIPS, whose weights
    file is missing here (as on an offline machine without the hub cache)."""
    payload = read_checkpoint(DEFAULT_CHECKPOINT)
    payload["loss"] = {"beta": 1.0, "terms": [
        {"name": "l2", "weight": 1.0, "options": {}},
        {"name": "lpips", "weight": 1000.0, "options": {"weights": str(path.parent / "missing-alexnet.pth")}}]}
    torch.save(payload, path)
    return path


def test_an_lpips_trained_checkpoint_is_measured_offline_by_activation_metrics(images: Path, tmp_path: Path) -> None:
    checkpoint = lpips_trained(tmp_path / "lp.pt")
    result = fluency.run(metrics=["gini"], images=images, checkpoints=[checkpoint], out=tmp_path / "gini",
                         progress=False, figures=False, report=False, store=False, covariates=False)
    assert set(result.metrics["metric"]) == {"gini"} and result.manifest["status"] == "complete"


def test_a_loss_that_cannot_be_built_names_the_checkpoint_and_the_metric(images: Path, tmp_path: Path) -> None:
    checkpoint = lpips_trained(tmp_path / "lp.pt")
    with pytest.raises(FluencyError) as caught:
        fluency.run(metrics=["gini", "sam"], images=images, checkpoints=[checkpoint], out=tmp_path / "sam",
                    progress=False, figures=False, report=False, store=False, covariates=False)
    message = str(caught.value)
    assert message.startswith("metric 'sam' needs the training loss of checkpoint lp (l2 + lpips)"), message
    assert "missing-alexnet.pth: no such file" in message, message
    assert "this command's -o options do not reach it" in message


@pytest.mark.parametrize("name, content", [("notes.json", b'{"a": 1}'), ("README.md", b"# a readme\n")])
def test_a_file_that_is_not_a_checkpoint_is_one_line_saying_so(tmp_path: Path, name: str, content: bytes,
                                                               monkeypatch, capsys) -> None:
    (tmp_path / name).write_bytes(content)
    code, _, err = fluency_cli(monkeypatch, capsys, "run", "--checkpoint", str(tmp_path / name), "--metric", "gini",
                               "--out", str(tmp_path / "r"))
    assert code == 2
    assert err.strip().splitlines() == [f"error: checkpoint {tmp_path / name}: not a fluency checkpoint: not "
                                               "the zip archive that torch.save writes (BadZipFile: File is not a "
                                               "zip file)"]


def test_a_pickled_module_is_not_a_checkpoint_and_torchs_advice_is_not_repeated(tmp_path: Path, monkeypatch,
                                                                                 capsys) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    code, _, err = fluency_cli(monkeypatch, capsys, "run", "--checkpoint", str(tmp_path / "module.pt"), "--metric",
                               "gini", "--out", str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "not a fluency checkpoint: it holds Python objects" in err and "weights_only" not in err


@pytest.mark.parametrize("args, suggestion", [
    (["--metric", "gnii"], "unknown metric 'gnii'; did you mean 'gini'?"),
    (["--metric", "gini", "--analysis", "pearsn"], "unknown analysis 'pearsn'; did you mean 'pearson'?"),
])
def test_a_misspelt_plugin_name_gets_a_suggestion(tmp_path: Path, args: list[str], suggestion: str, monkeypatch,
                                                  capsys) -> None:
    code, _, err = fluency_cli(monkeypatch, capsys, "run", *args, "--out", str(tmp_path / "r"))
    assert code == 2 and suggestion in err, err
    assert not (tmp_path / "r").exists()


def test_a_missing_rating_column_says_to_pass_it(images: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    table = tmp_path / "ratings.csv"
    table.write_text("image_id,beauty,beauty_sd\n" + "".join(f"img-{i},{i},1\n" for i in range(8)))
    args = ("run", "--images", str(images), "--ratings", str(table), "--metric", "gini", "--out", str(tmp_path / "r"))
    code, _, err = fluency_cli(monkeypatch, capsys, *args)
    assert code == 2 and "has no rating column 'rating'" in err and "pass --rating-column NAME" in err, err
    code, _, err = fluency_cli(monkeypatch, capsys, *args, "--rating-column", "beuty")
    assert code == 2 and "did you mean 'beauty'" in err and "(pass --rating-column beauty)" in err, err


def test_the_attention_hint_is_a_pair_of_commands_that_work(images: Path, tmp_path: Path, monkeypatch,
                                                            capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = fluency_cli(monkeypatch, capsys, "run", "--images", str(images), "--metric", "attention-l1",
                               "--out", "refused")
    hint = re.search(r"e\.g\. (fluency train .*), then (fluency run .*)$", err.strip())
    assert code == 2 and hint is not None, err
    train, measure = (shlex.split(command)[1:] for command in hint.groups())
    train = [str(images) if word == "DIR" else word for word in train] + ["--epochs", "1", "--no-figures"]
    code, _, err = fluency_cli(monkeypatch, capsys, *train)
    assert code == 0, err
    code, _, err = fluency_cli(monkeypatch, capsys, *measure, "--images", str(images), "--out", "measured",
                               "--no-report", "--no-store")
    assert code == 0, err
    assert "attention-l1" in set(pd.read_parquet(tmp_path / "measured" / "metrics.parquet")["metric"])


def test_ctrl_c_while_the_report_is_written_leaves_the_run_incomplete_and_says_how_to_finish(
        images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import fluency.core.outputs.report as report

    written = report._build

    def interrupted(*args: object) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "_build", interrupted)
    buffer = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        fluency.run(metrics=["gini"], images=images, out=tmp_path / "run", figures=False, store=False,
                    covariates=False, console=Console(file=buffer, width=200))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["report_pending"] is True
    assert f"write it with: fluency report {tmp_path / 'run'}" in buffer.getvalue()
    assert not (tmp_path / "run" / "report.html").exists()
    monkeypatch.setattr(report, "_build", written)
    code, _, err = fluency_cli(monkeypatch, capsys, "report", str(tmp_path / "run"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "report_pending" not in manifest and "error" not in manifest
    assert "report.html" in manifest["outputs"]


def test_an_lpips_trained_checkpoint_is_measured_by_sam_in_vmap(images: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss (LPIPS, with its randomly initialised layers before the weights load) is built before SAM's
    vmap, which refuses random operations inside it, and its frozen network is not moved inside vmap (which
    crashed the process); vmap and the one-image loop agree."""
    weights = Path(__file__).resolve().parents[2] / "shared" / "weights" / "alexnet_imagenet_features.pth"
    if not weights.is_file():
        pytest.skip(f"needs the offline AlexNet weights at {weights}")
    payload = read_checkpoint(lpips_trained(tmp_path / "lp.pt"))
    payload["loss"]["terms"][1]["options"] = {"weights": str(weights)}
    torch.save(payload, tmp_path / "lp.pt")
    values = {method: fluency.run(metrics=["sam"], images=images, checkpoints=[tmp_path / "lp.pt"],
                                  out=tmp_path / method, options=[f"sam.method={method}"], progress=False,
                                  figures=False, report=False, store=False, covariates=False).metrics["value"].to_numpy()
              for method in ("vmap", "loop")}
    assert len(values["vmap"]) == 8 and np.isfinite(values["vmap"]).all() and (values["vmap"] > 0).all()
    assert np.allclose(values["vmap"], values["loop"], rtol=1e-4)  # the same per-image sharpness either way
