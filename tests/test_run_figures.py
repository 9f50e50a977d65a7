"""The model figures of a run: latent means, reconstruction grid, interpolation strips, training curves,
and the latent projection the report draws from them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import fluency
from fluency.core.inputs import demo
from fluency.core.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from fluency.core.errors import FluencyError
from fluency.core.inputs.images import Preprocessing
from fluency.core.plugin.manager import get_plugin_manager
from fluency.core.outputs.report import build_report, pca_2d
from fluency.core.outputs.run_figures import interpolate, interpolation_pairs, write_checkpoint_figures
from fluency.core.inputs.stimuli import from_folder

N = 24


@pytest.fixture(scope="module")
def stimuli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.export(tmp_path_factory.mktemp("stimuli"), n=N)


@pytest.fixture(scope="module")
def small_run(stimuli_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> fluency.RunResult:
    """24 rated images through the default checkpoint, with two explicit interpolation pairs."""
    return fluency.run(metrics=["gini"], analyses=["pearson"], images=stimuli_dir / "images",
                       ratings=stimuli_dir / "ratings.csv", interpolate=["stim-000,stim-005", ("stim-003", "stim-010")],
                       out=tmp_path_factory.mktemp("run") / "run", progress=False)


@pytest.fixture(scope="module")
def loaded():  # type: ignore[no-untyped-def]
    return load_checkpoint(DEFAULT_CHECKPOINT, get_plugin_manager(), "default")


def test_latents_table_has_one_finite_row_per_image(small_run: fluency.RunResult, loaded) -> None:  # type: ignore[no-untyped-def]
    table = pd.read_parquet(small_run.path / "latents" / "default.parquet")
    latent_dim = int(loaded.model.options["latent_dim"])
    assert list(table.columns) == ["image_id"] + [f"mu_{j}" for j in range(latent_dim)]
    assert len(table) == N and set(table["image_id"]) == set(small_run.metrics["image_id"])
    mu = table.drop(columns="image_id").to_numpy()
    assert np.isfinite(mu).all() and mu.std(axis=0).max() > 0
    # the means are the encoder's mu of the preprocessed image
    stimuli = from_folder(Path(small_run.manifest["inputs"]["stimuli"]["images"]), None, "image_id", "rating")
    src = stimuli.make_source(Preprocessing(64, 3))
    k = src.ids.index("stim-007")
    with torch.no_grad():
        expected = loaded.model.eval().encode(src.load(k)[None])[0][0].numpy()
    row = table.set_index("image_id").loc["stim-007"].to_numpy(float)
    np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)


def test_pca_projection_equals_sklearn_up_to_sign(small_run: fluency.RunResult) -> None:
    from sklearn.decomposition import PCA

    table = pd.read_parquet(small_run.path / "latents" / "default.parquet")
    rng = np.random.default_rng(3)
    for x in (table.drop(columns="image_id").to_numpy(np.float64), rng.normal(size=(50, 7)) @ rng.normal(size=(7, 7))):
        scores, ratio = pca_2d(x)
        pca = PCA(n_components=2).fit(x)
        reference = pca.transform(x)
        for j in range(2):
            sign = np.sign(scores[:, j] @ reference[:, j])
            np.testing.assert_allclose(scores[:, j], sign * reference[:, j], atol=1e-8)
        np.testing.assert_allclose(ratio, pca.explained_variance_ratio_, rtol=1e-10)
    assert pca_2d(x)[0].tolist() == pca_2d(x.copy())[0].tolist()  # deterministic sign


def test_interpolation_endpoints_are_the_decoded_means(small_run: fluency.RunResult, loaded) -> None:  # type: ignore[no-untyped-def]
    table = pd.read_parquet(small_run.path / "latents" / "default.parquet").set_index("image_id")
    model = loaded.model.eval()
    mu_a = torch.tensor(table.loc["stim-000"].to_numpy(np.float32))
    mu_b = torch.tensor(table.loc["stim-005"].to_numpy(np.float32))
    decoded, ts = interpolate(model, mu_a, mu_b)
    assert decoded.shape[0] == 8 and ts == pytest.approx(np.linspace(0, 1, 8).tolist())
    with torch.no_grad():
        ends = model.decode(torch.stack([mu_a, mu_b])).clamp(0, 1)
    torch.testing.assert_close(decoded[0], ends[0])
    torch.testing.assert_close(decoded[-1], ends[1])
    assert not torch.allclose(decoded[0], decoded[-1])
    with torch.no_grad():  # the middle point decodes the midpoint of the segment
        middle = interpolate(model, mu_a, mu_b, steps=3)[0][1]
        torch.testing.assert_close(middle, model.decode(((mu_a + mu_b) / 2)[None]).clamp(0, 1)[0])
    assert small_run.manifest["figures"]["interpolate"] == [["stim-000", "stim-005"], ["stim-003", "stim-010"]]
    for k in (0, 1):
        assert (small_run.path / "figures" / f"interp-default-{k}.png").read_bytes()[:4] == b"\x89PNG"


def test_default_pair_is_lowest_and_highest_rated(stimuli_dir: Path) -> None:
    rated = from_folder(stimuli_dir / "images", stimuli_dir / "ratings.csv", "image_id", "rating")
    table = rated.ratings.sort_values(["rating", "image_id"], kind="mergesort")
    assert interpolation_pairs([], rated) == [(table["image_id"].iloc[0], table["image_id"].iloc[-1])]
    unrated = from_folder(stimuli_dir / "images", None, "image_id", "rating")
    assert interpolation_pairs([], unrated) == [("stim-000", f"stim-{N - 1:03d}")]


def test_unknown_interpolate_id_is_an_error_naming_it(stimuli_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FluencyError, match="'no-such-face'"):
        fluency.run(metrics=["gini"], images=stimuli_dir / "images", interpolate=["stim-001,no-such-face"],
                    out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before any work
    with pytest.raises(FluencyError, match="two image ids"):
        interpolation_pairs(["stim-001"], from_folder(stimuli_dir / "images", None, "image_id", "rating"))
    from fluency.cli import cli

    result = CliRunner().invoke(cli, ["run", "--metric", "gini", "--images", str(stimuli_dir / "images"),
                                      "--interpolate", "stim-001,ghost", "--out", str(tmp_path / "cli")])
    assert result.exit_code != 0 and "ghost" in str(result.exception)


def test_figures_are_deterministic_and_curves_need_a_history(small_run: fluency.RunResult, loaded,  # type: ignore[no-untyped-def]
                                                             stimuli_dir: Path, tmp_path: Path) -> None:
    stimuli = from_folder(stimuli_dir / "images", stimuli_dir / "ratings.csv", "image_id", "rating")
    no_history = dataclasses.replace(loaded, info={k: v for k, v in loaded.info.items() if k != "history"})
    written = write_checkpoint_figures(no_history, stimuli, tmp_path, torch.device("cpu"),
                                       [("stim-000", "stim-005")])
    assert set(written) == {"figures/recon-default.png", "figures/interp-default-0.png"}
    for name in written:
        assert (tmp_path / name).read_bytes() == (small_run.path / name).read_bytes()
    assert (small_run.path / "figures" / "curves-default.png").exists()  # the default checkpoint has a history
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "latents" / "default.parquet"),
                                  pd.read_parquet(small_run.path / "latents" / "default.parquet"))


def test_report_embeds_the_model_figures(small_run: fluency.RunResult) -> None:
    page = build_report(small_run.path).read_text()
    alts = set(re.findall(r'<img alt="([^"]+)"', page))
    assert {"recon-default", "curves-default", "latents-pca-default", "interp-default-0",
            "interp-default-1"} <= alts
    assert "Model views (default)" in page and "PC1 (" not in page  # axis labels live in the PNG
    assert "PCA projection of the latent means" in page and "stim-003" in page
    assert (small_run.path / "figures" / "latents-pca-default.svg").exists()


def test_no_figures_skips_them(stimuli_dir: Path, tmp_path: Path) -> None:
    result = fluency.run(metrics=["gini"], images=stimuli_dir / "images", figures=False,
                         interpolate=["stim-000,ghost"], out=tmp_path / "run", progress=False)
    assert not (result.path / "latents").exists() and "figures" not in result.manifest


def test_projection_colours_by_group_and_uses_umap_when_installed(small_run: fluency.RunResult,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from fluency.core.outputs.report import _model_views

    class FakeUMAP:  # stands in for umap-learn, which is an optional extra
        def __init__(self, **kwargs: object) -> None:
            assert kwargs["random_state"] == 0

        def fit_transform(self, x: np.ndarray) -> np.ndarray:
            return x[:, :2]

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    ratings = pd.read_parquet(small_run.path / "ratings.parquet").assign(sex=["f", "m"] * (N // 2))
    manifest = {**small_run.manifest, "subgroups": {"by": ["sex"]}}
    html = "".join(_model_views(small_run.path, "default", manifest, ratings, "rating"))
    assert 'alt="latents-umap-default"' in html and 'alt="latents-pca-default"' in html
    assert "coloured by sex" in html and "install the optional extra" not in html
    monkeypatch.setitem(sys.modules, "umap", None)  # import fails: PCA only, with a note
    html = "".join(_model_views(small_run.path, "default", small_run.manifest, ratings, "rating"))
    assert "latents-umap" not in html and "coloured by rating" in html and "fluency[umap]" in html
