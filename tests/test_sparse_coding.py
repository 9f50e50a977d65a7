"""The ``sparse-coding`` baseline (issue 13 point 10): a patch dictionary fitted by ``fluency train`` in one pass,
whose codes are a layer that ``gini``, ``hoyer`` and ``lepsilon`` measure.

Every oracle here is independent of the plugin: patches are cut with numpy slicing (the plugin uses
``torch.nn.functional.unfold``), the lasso solution is checked through its optimality (KKT) conditions, codes are
recomputed with scikit-learn's ``SparseCoder`` from the checkpoint's tensors, and the sparsity measures are the
pairwise Hurley–Rickard Gini and Hoyer's formula written out in numpy. Tiny settings (16×16 grey images, 4×4
patches, 16 atoms) keep the file fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fluency.cli import cli as fluency_cli
from fluency.core.model.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from fluency.core.plugin.manager import get_plugin_manager
from fluency.plugins.default_sparse_coding import SparseCoding

SIZE, PATCH, ATOMS = 16, 4, 16
TRAIN_OPTIONS = ["-o", f"sparse-coding.patch_size={PATCH}", "-o", f"sparse-coding.atoms={ATOMS}",
                 "-o", "sparse-coding.iterations=3", "-o", "sparse-coding.patches_per_image=40"]


def _image(rng: np.random.Generator) -> np.ndarray:
    """A 16×16 grey image: two random gratings plus noise, 8-bit."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    out = np.zeros((SIZE, SIZE))
    for _ in range(2):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.2, 1.2), rng.uniform(0, 2 * np.pi)
        out += np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    out += 0.3 * rng.normal(size=out.shape)
    return np.clip(128 + 25 * out, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine grey 16×16 PNGs and one flat one (its patches have no contrast: zero codes)."""
    folder = tmp_path_factory.mktemp("sc-images")
    rng = np.random.default_rng(3)
    for i in range(9):
        Image.fromarray(_image(rng), mode="L").save(folder / f"img{i}.png")
    Image.fromarray(np.full((SIZE, SIZE), 90, np.uint8), mode="L").save(folder / "flat.png")
    return folder


def pixels(folder: Path) -> dict[str, np.ndarray]:
    """Each image of ``folder`` as floats in [0, 1], read with PIL (no fluency)."""
    return {p.stem: np.asarray(Image.open(p), np.float64) / 255 for p in sorted(folder.glob("*.png"))}


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(fluency_cli, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trained(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fluency train --arch sparse-coding`` through the command line; its final.pt."""
    out = tmp_path_factory.mktemp("sc-model") / "m"
    code, output = cli("train", "--arch", "sparse-coding", "--images", str(images), "--out", str(out),
                       "--image-size", str(SIZE), "--val-fraction", "0.2", "--seed", "7", *TRAIN_OPTIONS)
    assert code == 0, output
    return out / "final.pt"


def grid_patches(image: np.ndarray) -> np.ndarray:
    """The non-overlapping PATCH×PATCH patches of ``image``, row-major over the grid, each flattened."""
    n = SIZE // PATCH
    return np.stack([image[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].ravel()
                     for r in range(n) for c in range(n)])


def independent_codes(image: np.ndarray, dictionary: np.ndarray, scale: float, alpha: float) -> np.ndarray:
    """ATOMS × rows × cols lasso codes of ``image`` with scikit-learn's SparseCoder on patches cut by numpy."""
    from sklearn.decomposition import SparseCoder

    patches = grid_patches(image)
    centred = (patches - patches.mean(axis=1, keepdims=True)) / scale
    codes = np.zeros((len(centred), len(dictionary)))
    live = np.abs(centred).sum(axis=1) > 0
    if live.any():
        codes[live] = SparseCoder(dictionary, transform_algorithm="lasso_lars",
                                  transform_alpha=alpha).transform(centred[live])
    n = SIZE // PATCH
    return codes.reshape(n, n, -1).transpose(2, 0, 1)


def hurley_rickard_gini(x: np.ndarray) -> float:
    """Σ_i Σ_j |c_i − c_j| / (2 N² mean c), c = |x| (REFERENCE.md's second form); 0 for the zero vector."""
    c = np.abs(np.asarray(x, np.float64).ravel())
    if c.sum() == 0:
        return 0.0
    return float(np.abs(c[:, None] - c[None, :]).sum() / (2 * len(c) ** 2 * c.mean()))


def hoyer(x: np.ndarray) -> float:
    """(√N − ‖x‖₁/‖x‖₂) / (√N − 1); 0 for the zero vector."""
    c = np.abs(np.asarray(x, np.float64).ravel())
    if c.sum() == 0:
        return 0.0
    return float((np.sqrt(len(c)) - c.sum() / np.sqrt((c ** 2).sum())) / (np.sqrt(len(c)) - 1))


def test_the_oracles_give_reference_md_known_answers() -> None:
    assert hurley_rickard_gini([1, 2, 3, 4]) == pytest.approx(0.25)
    assert hurley_rickard_gini([0, 0, 0, 1]) == pytest.approx(0.75)
    assert hurley_rickard_gini([-1, 0, 1]) == pytest.approx(1 / 3)
    assert hoyer([1, 2, 3, 4]) == pytest.approx(0.1742581416)


def loaded(path: Path) -> SparseCoding:
    model = load_checkpoint(path, get_plugin_manager()).model
    assert isinstance(model, SparseCoding)
    return model.eval()


def as_batch(images: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.tensor(np.stack(list(images.values())), dtype=torch.float32)[:, None]


# the centred patches span 15 of the 16 dimensions, so OMP's 16th atom is linearly dependent: it says so
@pytest.mark.filterwarnings("ignore:Orthogonal matching pursuit ended prematurely")
def test_codes_reconstruct_the_patches_within_the_stated_error(trained: Path, images: Path) -> None:
    """With ``omp`` and ``nonzero`` = all 16 values of a patch, s·Dᵀc + the patch's mean gives back every patch of
    every image (cut by numpy) to a relative error below 1e-6 (the module docstring's bound)."""
    model = loaded(trained)
    exact = SparseCoding(**{**model.options, "transform": "omp", "nonzero": PATCH * PATCH})
    exact.load_state_dict(model.state_dict())
    arrays = pixels(images)
    codes = exact(as_batch(arrays)).features.double().numpy()  # B × atoms × rows × cols
    dictionary, scale = model.dictionary.double().numpy(), float(model.scale)
    n = SIZE // PATCH
    for b, image in enumerate(arrays.values()):
        patches = grid_patches(image)
        recon = scale * codes[b].transpose(1, 2, 0).reshape(n * n, -1) @ dictionary \
            + patches.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(patches - patches.mean(axis=1, keepdims=True))
        assert np.linalg.norm(recon - patches) <= 1e-6 * max(norm, 1.0), b


def test_lasso_codes_satisfy_the_lasso_optimality_conditions(trained: Path, images: Path) -> None:
    """The default codes minimise ½‖x̃ − Dᵀc‖² + α‖c‖₁: D(x̃ − Dᵀc) = α·sign(c) where c ≠ 0 and |D(x̃ − Dᵀc)| ≤ α
    elsewhere (KKT), on numpy-cut patches; α is the option itself, not rescaled by the patch size."""
    model = loaded(trained)
    alpha = float(model.options["alpha"])
    arrays = pixels(images)
    codes = model(as_batch(arrays)).features.double().numpy()
    dictionary, scale = model.dictionary.double().numpy(), float(model.scale)
    n, checked = SIZE // PATCH, 0
    for b, image in enumerate(arrays.values()):
        patches = grid_patches(image)
        centred = (patches - patches.mean(axis=1, keepdims=True)) / scale
        c = codes[b].transpose(1, 2, 0).reshape(n * n, -1)
        correlation = (centred - c @ dictionary) @ dictionary.T
        active = np.abs(c) > 1e-9  # LARS can leave a code at ~1e-19: zero in effect, tested as inactive
        tolerance = 1e-4 * alpha + 1e-6 * np.abs(correlation).max()  # float32 codes
        assert np.all(np.abs(correlation[active] - alpha * np.sign(c[active])) <= tolerance), b
        assert np.all(np.abs(correlation[~active]) <= alpha + tolerance), b
        checked += int(active.sum())
    assert checked > 0  # some codes are active: the conditions were tested on both sides


def test_train_then_run_via_the_cli_measures_the_codes_as_independent_formulas_do(
        trained: Path, images: Path, tmp_path: Path) -> None:
    """``fluency run`` with gini, hoyer and lepsilon on the trained checkpoint: on layer ``codes`` of every image,
    the values equal the pairwise Hurley–Rickard Gini, Hoyer and the count |c| > 0.01 of codes that scikit-learn's
    SparseCoder computes from the checkpoint's dictionary on numpy-cut patches."""
    code, output = cli("run", "--checkpoint", str(trained), "--images", str(images), "--metric", "gini",
                       "--metric", "hoyer", "--metric", "lepsilon", "--out", str(tmp_path / "run"))
    assert code == 0, output
    table = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert set(table["layer"]) == {"codes"} and {"gini", "hoyer", "lepsilon"} <= set(table["metric"])
    state = read_checkpoint(trained)
    dictionary, scale = state["state_dict"]["dictionary"].double().numpy(), float(state["state_dict"]["scale"])
    alpha = float(state["architecture"]["options"]["alpha"])
    values = table.set_index(["image_id", "metric"])["value"]
    for image_id, image in pixels(images).items():
        codes = independent_codes(image, dictionary, scale, alpha)
        assert codes.shape == (ATOMS, SIZE // PATCH, SIZE // PATCH)
        assert values[(image_id, "gini")] == pytest.approx(hurley_rickard_gini(codes), abs=1e-6)
        assert values[(image_id, "hoyer")] == pytest.approx(hoyer(codes), abs=1e-6)
        assert values[(image_id, "lepsilon")] == int((np.abs(codes) > 0.01).sum())
    assert values[("flat", "gini")] == 0 and values[("flat", "lepsilon")] == 0  # no contrast, no code
    assert 0 < values[("img0", "gini")] < 1


def test_the_checkpoint_holds_the_dictionary_and_round_trips(trained: Path, images: Path, tmp_path: Path) -> None:
    state = read_checkpoint(trained)
    assert state["architecture"]["name"] == "sparse-coding"
    assert state["state_dict"]["dictionary"].shape == (ATOMS, PATCH * PATCH)
    assert state["architecture"]["options"]["patch_size"] == PATCH and state["provenance"]["seed"] == 7
    assert "optimizer" not in state and "loss" not in state  # fitted in one pass: no gradient training
    row = state["history"][0]
    assert row["epoch"] == 1 and row["images"] == 8 and row["patches"] == 8 * 40 and 0 < row["recon_rel_error"] < 1
    assert "val_recon_rel_error" in row and (trained.parent / "history.parquet").exists()
    # the atoms are unit vectors (MiniBatchDictionaryLearning's constraint), not the random initial ones
    assert np.allclose(state["state_dict"]["dictionary"].norm(dim=1).numpy(), 1, atol=1e-5)
    model = loaded(trained)
    save_checkpoint(tmp_path / "again.pt", model, "sparse-coding")
    again = loaded(tmp_path / "again.pt")
    batch = as_batch(pixels(images))
    assert torch.equal(model(batch).features, again(batch).features)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in again.state_dict().items())


def natural_oracle() -> list[np.ndarray]:
    """scikit-learn's two sample photographs made 16×16 grey independently of fluency: its own decoded arrays,
    ITU-R 601 luminance, the central square, PIL's Lanczos resize."""
    from sklearn.datasets import load_sample_images

    out = []
    for image in load_sample_images().images:
        grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255
        left = (grey.shape[1] - grey.shape[0]) // 2
        crop = grey[:, left:left + grey.shape[0]].astype(np.float32)
        out.append(np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.Resampling.LANCZOS), np.float64))
    return out


def test_fitting_is_seeded_and_the_natural_source_is_scikit_learns_photographs(images: Path, tmp_path: Path) -> None:
    """Same --seed, same dictionary. patches_from=natural fits on sklearn's sample photographs: they are read as an
    independent reading gives them, and the fitted scale (the std of the centred fitting patches) is within 10% of
    the std of every centred 4×4 patch of those photographs, not that of the training images."""
    from fluency.plugins.default_sparse_coding import natural_images

    oracle = natural_oracle()
    for ours, theirs in zip(natural_images(SIZE, 1), oracle, strict=True):
        assert ours.shape == (1, SIZE, SIZE) and np.abs(ours[0].numpy() - theirs).max() < 0.05
        assert np.corrcoef(ours[0].numpy().ravel(), theirs.ravel())[0, 1] > 0.999
    runs = {}
    for name, extra in (("a", []), ("b", []), ("natural", ["-o", "sparse-coding.patches_from=natural"])):
        code, output = cli("train", "--arch", "sparse-coding", "--images", str(images), "--out",
                           str(tmp_path / name), "--image-size", str(SIZE), "--val-fraction", "0", "--seed", "1",
                           *TRAIN_OPTIONS, *extra, "--json")
        assert code == 0, output
        runs[name] = read_checkpoint(tmp_path / name / "final.pt")["state_dict"]
        history = json.loads(output[output.index("{"):])["history"]
        assert history[0]["patches"] == 10 * 40  # as many patches from the photographs as from the images
    assert torch.equal(runs["a"]["dictionary"], runs["b"]["dictionary"])
    assert not torch.allclose(runs["a"]["dictionary"], runs["natural"]["dictionary"], atol=1e-3)
    patches = np.concatenate([grid_patches_at(photo) for photo in oracle])
    expected = (patches - patches.mean(axis=1, keepdims=True)).std()
    assert float(runs["natural"]["scale"]) == pytest.approx(expected, rel=0.1)
    assert float(runs["a"]["scale"]) < 0.6 * expected  # the training images have less contrast


def grid_patches_at(image: np.ndarray) -> np.ndarray:
    """Every PATCH×PATCH patch of ``image`` (all positions, overlapping), flattened."""
    n = image.shape[0] - PATCH + 1
    return np.stack([image[r:r + PATCH, c:c + PATCH].ravel() for r in range(n) for c in range(n)])


@pytest.mark.parametrize("args, message", [
    (["-o", "sparse-coding.patch_size=5"], "sparse-coding: image_size 16 is not a multiple of patch_size 5"),
    (["-o", "sparse-coding.transform=fista"], "'fista' is not one of ['lasso_lars', 'lasso_cd', 'lars', 'omp'"),
    (["-o", "sparse-coding.alpha=0"], "sparse-coding: alpha must be positive, got 0.0"),
    (["-o", "sparse-coding.nonzero=40", "-o", "sparse-coding.transform=omp"],
     "sparse-coding: nonzero 40 is more than the atoms (16) or the values of a patch (16)"),
    (["--constraint", "l1-activation"], "is fitted in one pass, not by gradient steps: --constraint does not apply"),
    (["--lr", "0.1"], "is fitted in one pass, not by gradient steps: --lr does not apply"),
])
def test_bad_options_give_one_line(images: Path, tmp_path: Path, args: list[str], message: str,
                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the command line's entry point (as a user runs it): exit status 2 and one line on stderr."""
    from fluency.cli import main

    monkeypatch.setattr("sys.argv", ["fluency", "train", "--arch", "sparse-coding", "--images", str(images),
                                     "--out", str(tmp_path / "m"), "--image-size", str(SIZE), *TRAIN_OPTIONS, *args])
    with pytest.raises(SystemExit) as exit_status:
        main()
    error = capsys.readouterr().err
    assert exit_status.value.code == 2 and message in " ".join(error.split()), error
    assert len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "m" / "final.pt").exists()


def test_the_models_guide_section_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command of docs/models.md's sparse-coding section, in order, in an empty folder."""
    text = (Path(__file__).parents[1] / "docs" / "models.md").read_text(encoding="utf-8")
    section = text[text.index("## A sparse-coding baseline"):]
    section = section[:section.index("\n## ", 4)] if "\n## " in section[4:] else section
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()
                if line.strip() and not line.startswith("#")]
    assert len(commands) >= 3
    monkeypatch.chdir(tmp_path)
    for command in commands:
        args = command.split("#", 1)[0].replace("\\", " ").split()
        assert args[0] == "fluency", command
        code, output = cli(*args[1:])
        assert code == 0, (command, output)
    metrics = pd.read_parquet(next(tmp_path.glob("runs/*/metrics.parquet"))).query("plugin != 'image-stats'")
    assert set(metrics["layer"]) == {"codes"} and {"gini", "hoyer", "lepsilon"} <= set(metrics["metric"])
