"""Decoder-free reconstruction and `fluency compare`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluency.core.run.compare import compare
from fluency.core.plugin.metric import MetricBatch
from fluency.plugins.default_decoderless import Decoderless, total_variation
from fluency.plugins.default_vae_small import VAESmall


def test_inversion_lowers_the_latent_distance_and_is_seeded() -> None:
    torch.manual_seed(0)
    model = VAESmall(image_size=32, latent_dim=8).eval()
    x = torch.rand(3, 3, 32, 32)
    batch = MetricBatch(["a", "b", "c"], x, model=model, seed=1)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    start = {v.metric: v.as_numpy() for v in Decoderless(steps=1, lr=0.0).compute(batch)}
    end = {v.metric: v.as_numpy() for v in Decoderless(steps=60, lr=0.05).compute(batch)}
    assert (end["decoderless-latent"] < 0.2 * start["decoderless-latent"]).all()
    # the model is left as it was: every weight and buffer bit for bit, its trainable flags, no gradient, eval mode
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags and all(flags.values())
    assert all(p.grad is None for p in model.parameters()) and not model.training
    again = {v.metric: v.as_numpy() for v in Decoderless(steps=60, lr=0.05).compute(batch)}
    assert np.array_equal(end["decoderless-latent"], again["decoderless-latent"])


def test_total_variation_prior_smooths() -> None:
    flat, noisy = torch.full((1, 3, 8, 8), 0.5), torch.rand(1, 3, 8, 8)
    assert float(total_variation(flat)) == 0.0 and float(total_variation(noisy)) > 0.1
    torch.manual_seed(0)
    model = VAESmall(image_size=32, latent_dim=8).eval()
    x = torch.rand(2, 3, 32, 32)
    from fluency.plugins.default_decoderless import invert_encoder

    plain = invert_encoder(model, x, 40, 0.05, 0.0, 0)
    smooth = invert_encoder(model, x, 40, 0.05, 5.0, 0)
    assert (total_variation(smooth) < total_variation(plain)).all()


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a / "sub", b / "sub"):
        folder.mkdir(parents=True)
    for name in ("x", "sub/y", "only_a"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(a / f"{name}.png")
    Image.open(a / "x.png").save(b / "x.png")                       # identical
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(b / "sub" / "y.jpg")  # different, other format
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(b / "only_b.png")
    return a, b


def test_compare_pairs_by_relative_path_and_reports_the_rest(tmp_path: Path) -> None:
    a, b = _folders(tmp_path)
    result = compare(a, b, ["l1", "l2", "ssim"], size=32)
    assert result.only_in_a == ["only_a"] and result.only_in_b == ["only_b"]
    table = result.table.pivot(index="image", columns="metric", values="value")
    assert list(table.index) == ["sub/y", "x"]
    assert table.loc["x"].abs().max() < 1e-6 and (table.loc["sub/y"] > 0.01).all()
    assert table.loc["sub/y", "l2"] < table.loc["sub/y", "l1"]


def test_compare_cli_writes_a_table(tmp_path: Path) -> None:
    a, b = _folders(tmp_path)
    env = {**os.environ, "FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "fluency.cli", "compare", str(a), str(b), "--metric", "l1,ssim",
                           "--image-size", "32", "--out", str(tmp_path / "d.csv"), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["only_in_b"] == ["only_b"]
    assert (tmp_path / "d.csv").read_text().startswith("image,metric,value")
    bad = subprocess.run([sys.executable, "-m", "fluency.cli", "compare", str(a), str(b), "--metric", "psnr"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "unknown metric" in bad.stderr


def test_random_draws_depend_on_the_image_not_the_batch() -> None:
    """Each image's noise comes from the run seed and its id alone: the same whatever batch it is in."""
    from fluency.api import per_image_noise
    from fluency.plugins.default_decoderless import invert_encoder
    from fluency.plugins.default_vae_small import VAESmall

    ids = ["a", "b", "c", "d", "e"]
    whole = per_image_noise(7, ids, (3, 4))
    assert torch.equal(torch.cat([per_image_noise(7, [i], (3, 4)) for i in reversed(ids)]), whole.flip(0))
    assert not torch.equal(per_image_noise(8, ids, (3, 4)), whole)
    torch.manual_seed(0)
    model = VAESmall(image_size=32, latent_dim=4, channels=[4, 4, 4, 4, 4], decoder_channels=[4, 4, 4, 4, 4]).eval()
    x = torch.rand(5, 3, 32, 32)
    for steps, tolerance in ((0, 0.0), (5, 1e-2)):
        together = invert_encoder(model, x, steps, 0.05, 0.0, 3, ids)
        alone = torch.cat([invert_encoder(model, x[i:i + 1], steps, 0.05, 0.0, 3, [ids[i]]) for i in range(5)])
        # the start is the same noise exactly; after optimising, only float rounding differs between batched
        # and single-image convolutions, which Adam's normalised steps amplify (2.8e-3 measured here)
        torch.testing.assert_close(alone, together, atol=tolerance, rtol=0)


def _one_minus_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """1 − SSIM by Wang et al. (2004), written out here as the oracle: 11×11 Gaussian window (σ = 1.5), valid
    positions only, K1 = 0.01, K2 = 0.03, data range 1, averaged over positions and channels (H×W×C input)."""
    from scipy.signal import convolve2d

    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    window = np.outer(g, g) / g.sum() ** 2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    maps = []
    for ch in range(x.shape[2]):
        a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
        f = lambda z: convolve2d(z, window, mode="valid")  # noqa: E731
        mu_a, mu_b = f(a), f(b)
        var_a, var_b, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
        maps.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return 1.0 - float(np.mean(maps))


def test_compare_1_minus_ssim_matches_the_formula_and_is_named_as_a_distance(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    x = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-60, 61, x.shape), 0, 255).astype(np.uint8)
    Image.fromarray(x).save(tmp_path / "a" / "p.png"), Image.fromarray(y).save(tmp_path / "b" / "p.png")
    Image.fromarray(x).save(tmp_path / "a" / "same.png"), Image.fromarray(x).save(tmp_path / "b" / "same.png")
    for asked in ("ssim", "1-ssim"):
        table = compare(tmp_path / "a", tmp_path / "b", [asked]).table.set_index("image")
        assert set(table["metric"]) == {"1-ssim"}
        assert table.loc["same", "value"] == pytest.approx(0.0, abs=1e-6)
        assert table.loc["p", "value"] == pytest.approx(_one_minus_ssim(x / 255.0, y / 255.0), abs=1e-5)
        assert 0.05 < table.loc["p", "value"] < 1
