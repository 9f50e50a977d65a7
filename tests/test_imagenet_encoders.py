"""``alexnet-imagenet``, ``vgg16-imagenet``, ``vgg19-imagenet``: torchvision's ImageNet CNNs as fixed encoders.

The oracle is torchvision itself (its ``features`` loaded with ``load_state_dict`` from the same file, its
own ``Normalize``) and an independent numpy Hurley–Rickard Gini; fluency's loader, layer naming,
normalisation and ``gini`` metric are what is tested.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import fluency

from fluency.api import FluencyError, MetricBatch, capture_activations
from fluency.core.plugin.manager import PluginManager
from fluency.testing import check_architecture, synthetic_images

torchvision = pytest.importorskip("torchvision")

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights"
VGG16_FILE = WEIGHTS / "vgg16_imagenet_features.pth"
ALEXNET_FILE = WEIGHTS / "alexnet_imagenet_features.pth"
#: indices in torchvision's ``features`` of each named layer (torchvision's own layout, written out by hand)
VGG16_INDICES = {"conv1": 3, "pool1": 4, "conv2": 8, "pool2": 9, "conv3": 15, "pool3": 16, "conv4": 22, "pool4": 23,
                 "conv5": 29, "pool5": 30}
ALEXNET_INDICES = {"conv1": 1, "pool1": 2, "conv2": 4, "pool2": 5, "conv3": 7, "conv4": 9, "conv5": 11, "pool5": 12}


@pytest.fixture(scope="module")
def manager() -> PluginManager:
    return PluginManager()


def needs(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is absent (the offline ImageNet weights described in shared/weights/README.md)")
    return path


def hurley_rickard_gini(x: np.ndarray) -> float:
    """G = 1 − 2 Σ_k (c_k/‖c‖₁)((N − k + ½)/N), c = |x| sorted ascending, k = 1..N."""
    c = np.sort(np.abs(x.astype(np.float64).ravel()))
    n = c.size
    k = np.arange(1, n + 1)
    return float(1.0 - 2.0 * np.sum(c / c.sum() * (n - k + 0.5) / n))


def torchvision_layers(builder: str, path: Path, images: torch.Tensor, indices: dict[str, int]) -> dict[str, np.ndarray]:
    """Outputs of torchvision's own ``features`` at ``indices``, with the file's weights and torchvision's
    Normalize."""
    features = getattr(torchvision.models, builder)(weights=None).features.eval()
    state = torch.load(path, map_location="cpu", weights_only=True)
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
    normalize = torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x, out = normalize(images), {}
    wanted = {i: name for name, i in indices.items()}
    with torch.no_grad():
        for i, module in enumerate(features):
            x = module(x)
            if i in wanted:
                out[wanted[i]] = x.clone().numpy()
    return out


def images_64() -> tuple[list[str], torch.Tensor]:
    ids, images = synthetic_images(2, 72, seed=3)
    return ids, images[..., :64]  # 72×64: native keeps the aspect ratio


@pytest.mark.parametrize(("arch", "builder", "path", "indices"), [
    ("vgg16-imagenet", "vgg16", VGG16_FILE, VGG16_INDICES),
    ("alexnet-imagenet", "alexnet", ALEXNET_FILE, ALEXNET_INDICES),
])
def test_layers_equal_torchvision_and_gini_equals_hurley_rickard(manager: PluginManager, arch: str, builder: str,
                                                                 path: Path, indices: dict[str, int]) -> None:
    path = needs(path)
    spec = manager.get("architecture", arch)
    model = spec.load()(**spec.resolve({"size": "native", "weights": str(path)}))
    assert model.kind == "encoder" and not model.provides
    assert list(model.hookable_layers()) == list(indices)  # names, in forward order
    ids, images = images_64()
    layers = list(indices)
    with torch.no_grad(), capture_activations(model, layers) as acts:
        model(images, sample=False)
    expected = torchvision_layers(builder, path, images, indices)
    for name in layers:
        np.testing.assert_allclose(acts[name].numpy(), expected[name], rtol=1e-5, atol=1e-5, err_msg=name)

    gini = manager.get("metric", "gini")
    metric = gini.load()(**gini.resolve({"layers": layers, "all_layers": False}))
    values = {v.layer: v.as_numpy() for v in metric.compute(MetricBatch(ids, images, dict(acts)))}
    pools = [name for name in layers if name.startswith("pool")]
    assert len(pools) == (3 if builder == "alexnet" else 5)
    for name in layers:
        independent = [hurley_rickard_gini(expected[name][i]) for i in range(len(ids))]
        np.testing.assert_allclose(values[name], independent, rtol=1e-6, atol=1e-9, err_msg=name)
    assert model.weights_sha256 and model.options["size"] == "native"


def test_missing_weights_give_one_line_naming_the_file_and_the_option(manager: PluginManager, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty torchvision cache
    for arch, file in (("vgg16-imagenet", "vgg16-397923af.pth"), ("alexnet-imagenet", "alexnet-owt-7be5be79.pth"),
                       ("vgg19-imagenet", "vgg19-dcbb9e9d.pth")):
        spec = manager.get("architecture", arch)
        with pytest.raises(FluencyError) as info:
            spec.load()(**spec.resolve({}))
        text = str(info.value)
        assert "\n" not in text and file in text and str(tmp_path / "hub" / "checkpoints") in text
        assert f"-o {arch}.weights=PATH" in text
    spec = manager.get("architecture", "vgg16-imagenet")
    with pytest.raises(FluencyError, match="no such file"):
        spec.load()(**spec.resolve({"weights": str(tmp_path / "absent.pth")}))


def test_the_torchvision_cache_is_used_and_a_full_state_dict_loads(manager: PluginManager, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # a full VGG19 state dict (random weights, made here) in an otherwise empty torchvision cache
    reference = torchvision.models.vgg19(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "vgg19-dcbb9e9d.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    spec = manager.get("architecture", "vgg19-imagenet")
    model = check_architecture(spec, {"size": 32})
    assert list(model.hookable_layers()) == [f"{s}{i}" for i in range(1, 6) for s in ("conv", "pool")]
    assert model.weights_file == str(cache / "vgg19-dcbb9e9d.pth")
    for (name, mine), theirs in zip(model.features.state_dict().items(), reference.features.state_dict().values()):
        assert torch.equal(mine, theirs), name


@pytest.mark.parametrize(("arch", "path"), [("vgg16-imagenet", VGG16_FILE), ("alexnet-imagenet", ALEXNET_FILE)])
def test_contract_and_size(manager: PluginManager, arch: str, path: Path) -> None:
    path = needs(path)
    spec = manager.get("architecture", arch)
    model = check_architecture(spec, {"size": 64, "weights": str(path)})
    assert model.input_shape == (3, 64, 64) and model.options["size"] == 64
    assert set(model.default_metric_layers) == {f"conv{i}" for i in range(1, 6)}
    assert not any(p.requires_grad for p in model.parameters())
    assert spec.resolve({"size": "native"})["size"] == "native"
    with pytest.raises(FluencyError, match="64×64"):
        model(torch.rand(1, 3, 64, 56))
    with pytest.raises(FluencyError, match="size"):
        spec.load()(**spec.resolve({"size": "huge", "weights": str(path)}))
    native = spec.load()(**spec.resolve({"size": "native", "weights": str(path)}))
    with pytest.raises(FluencyError, match="smallest"):
        native(torch.rand(1, 3, 24, 80))
    with pytest.raises(FluencyError, match="minimum"):
        spec.resolve({"size": 16})
    with pytest.raises(FluencyError, match="outside"):  # a number given as text is checked by the model
        spec.load()(**spec.resolve({"size": "16", "weights": str(path)}))


# --- `fluency run --model NAME`: pretrained networks without a checkpoint, end to end ---------------------------

FACES = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "london-faces"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "fluency.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Four London faces, cut to 112×96 (not square: native keeps the aspect) as lossless PNGs, and their
    ratings."""
    if not (FACES / "images" / "X001.jpg").is_file():
        pytest.skip(f"{FACES} is absent")
    folder = tmp_path_factory.mktemp("faces")
    (folder / "images").mkdir()
    ids = ["X001", "X002", "X003", "X004"]
    for i in ids:
        Image.open(FACES / "images" / f"{i}.jpg").convert("RGB").resize((96, 112)).save(folder / "images" / f"{i}.png")
    pd.read_csv(FACES / "ratings.csv").query("image_id in @ids").to_csv(folder / "ratings.csv", index=False)
    return folder / "images", folder / "ratings.csv"


def test_run_model_native_gini_at_every_pool_equals_torchvision(faces: tuple[Path, Path], tmp_path: Path) -> None:
    """The issue's test: `fluency run --model vgg16-imagenet` at native size; Gini at pool1…pool5 equals an
    independent Hurley–Rickard Gini of torchvision's own vgg16().features outputs with the same weights."""
    path, (images, _) = needs(VGG16_FILE), faces
    pools = [f"pool{i}" for i in range(1, 6)]
    out = tmp_path / "run"
    proc = cli("run", "--model", "vgg16-imagenet", "--images", str(images), "--metric", "gini", "--out", str(out),
               "-o", f"vgg16-imagenet.weights={path}", "-o", "vgg16-imagenet.size=native",
               "-o", f"gini.layers={json.dumps(pools)}", "-o", "gini.all_layers=false", "--no-report", "--no-figures")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_parquet(out / "metrics.parquet").query("metric == 'gini'")
    assert set(table["checkpoint"]) == {"vgg16-imagenet"} and set(table["layer"]) == set(pools)
    ids = sorted(p.stem for p in images.glob("*.png"))
    pixels = np.stack([np.asarray(Image.open(images / f"{i}.png"), np.float32) / 255.0 for i in ids])
    expected = torchvision_layers("vgg16", path, torch.from_numpy(pixels).permute(0, 3, 1, 2),
                                  {k: v for k, v in VGG16_INDICES.items() if k in pools})
    assert expected["pool5"].shape[1:] == (512, 3, 3)  # 112×96 → 3×3 after five pools: the native size was kept
    for layer in pools:
        got = table[table["layer"] == layer].set_index("image_id")["value"].reindex(ids).to_numpy()
        independent = [hurley_rickard_gini(expected[layer][k]) for k in range(len(ids))]
        np.testing.assert_allclose(got, independent, rtol=1e-6, atol=1e-9, err_msg=layer)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["inputs"]["checkpoints"][0]
    assert entry["model"] == "vgg16-imagenet" and entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["weights"] == {"kind": "pretrained", "file": str(path), "sha256": entry["sha256"]}
    assert manifest["options"]["architecture.vgg16-imagenet"]["size"] == "native"
    store = json.loads((out / "activations" / "vgg16-imagenet" / "_COMPLETE.json").read_text())
    assert store["provenance"]["checkpoint_sha256"] == entry["sha256"]
    assert store["provenance"]["preprocessing"]["size"] == "native"


def test_run_model_with_ratings_mixed_with_a_checkpoint(faces: tuple[Path, Path], tmp_path: Path) -> None:
    """Two pretrained models beside a checkpoint, each under its own label with its own size; a model named
    twice is measured once. (The issue's command at the default size 224 is the user guide's, run below.)"""
    images, ratings = faces
    vgg, alex = needs(VGG16_FILE), needs(ALEXNET_FILE)
    out = tmp_path / "mixed"
    proc = cli("run", "--model", "vgg16-imagenet", "--model", "alexnet-imagenet", "--model", "vgg16-imagenet",
               "--checkpoint", str(Path(fluency.__file__).parent / "data" / "default.pt"), "--images", str(images),
               "--ratings", str(ratings), "--rating-column", "attractiveness", "--metric", "gini",
               "--metric", "typicality", "-o", f"vgg16-imagenet.weights={vgg}", "-o", f"alexnet-imagenet.weights={alex}",
               "-o", "alexnet-imagenet.size=64", "-o", "vgg16-imagenet.size=64", "--analysis", "spearman", "--out", str(out), "--no-report", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "--model vgg16-imagenet is given more than once: measured once" in proc.stderr
    table = pd.read_parquet(out / "metrics.parquet")
    assert set(table["checkpoint"]) == {"default", "vgg16-imagenet", "alexnet-imagenet"}
    assert set(table.loc[table.checkpoint == "vgg16-imagenet", "layer"].dropna()) >= {f"conv{i}" for i in range(1, 6)}
    assert set(table["metric"]) >= {"gini", "typicality"}
    manifest = json.loads((out / "manifest.json").read_text())
    options = {c["label"]: c["architecture"]["options"] for c in manifest["inputs"]["checkpoints"]}
    assert options["vgg16-imagenet"]["size"] == 64 and options["alexnet-imagenet"]["size"] == 64
    analysed = pd.read_parquet(out / "analyses" / "spearman.parquet")
    assert {"default", "vgg16-imagenet", "alexnet-imagenet"} <= set(analysed["checkpoint"])


def test_run_model_refusals_are_one_line_and_write_nothing(faces: tuple[Path, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    images, _ = faces
    vgg = needs(VGG16_FILE)
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(images / "X001.png", odd / "a.png")
    Image.open(images / "X002.png").resize((80, 112)).save(odd / "b.png")
    cases = [
        (["--model", "vgg16-imagenet", "--metric", "recon-error", "--images", str(images),
          "-o", f"vgg16-imagenet.weights={vgg}"], "'vgg16-imagenet' is an encoder-only model without"),
        (["--model", "vgg16-imagenet", "--metric", "gini", "--images", str(odd), "-o", f"vgg16-imagenet.weights={vgg}",
          "-o", "vgg16-imagenet.size=native"], "is 96×112 but"),
        (["--model", "nope", "--metric", "gini", "--images", str(images)], "unknown architecture 'nope'"),
        (["--model", "vgg16-imagenet", "--metric", "gini", "--images", str(images),
          "-o", "vgg16-imagenet.size=huge", "-o", f"vgg16-imagenet.weights={vgg}"], "neither 'native'"),
    ]
    for k, (args, expected) in enumerate(cases):
        out = tmp_path / f"out{k}"
        code, stderr = main_in_process(monkeypatch, capsys, "run", *args, "--out", str(out))
        assert code == 2 and expected in stderr, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
        assert not out.exists()  # refused before the run folder is made
    # no weights anywhere: the line names torchvision's cache file and the option
    env_home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(env_home))
    code, stderr = main_in_process(monkeypatch, capsys, "run", "--model", "vgg16-imagenet", "--metric", "gini",
                                   "--images", str(images), "--out", str(tmp_path / "none"))
    assert code == 2 and "vgg16-397923af.pth" in stderr and str(env_home) in stderr
    assert "-o vgg16-imagenet.weights=PATH" in stderr


def main_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``fluency ARGS`` through the real entry point (its one-line errors and exit status), in this process."""
    from fluency.cli import main

    monkeypatch.setattr(sys, "argv", ["fluency", *args])
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    return int(exited.value.code or 0), capsys.readouterr().err


def test_inspect_lists_the_layers_of_a_model(tmp_path: Path) -> None:
    vgg = needs(VGG16_FILE)
    proc = cli("inspect", "--model", "vgg16-imagenet", "-o", f"vgg16-imagenet.weights={vgg}",
               "-o", "vgg16-imagenet.size=native", "--size", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    layers = {row["name"]: row for row in info["layers"]}
    assert list(layers) == list(VGG16_INDICES)
    assert layers["pool5"]["shape"] == [512, 2, 2] and layers["conv1"]["shape"] == [64, 64, 64]
    assert {k for k, row in layers.items() if row["default"]} == {f"conv{i}" for i in range(1, 6)}
    assert info["kind"] == "encoder" and info["sha256"] == hashlib.sha256(vgg.read_bytes()).hexdigest()
    text = cli("inspect", "--checkpoint", str(Path(fluency.__file__).parent / "data" / "default.pt"))
    assert text.returncode == 0 and "enc1" in text.stdout and "16×64×64" in text.stdout
    assert cli("inspect").returncode == 2


def test_the_user_guides_model_commands_run_as_written(faces: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command of the guide's "Pretrained brain models" section, in a folder holding what they name."""
    from click.testing import CliRunner

    from fluency.cli import cli as fluency_cli

    images, ratings = faces
    (tmp_path / "weights").mkdir()
    for path in (needs(VGG16_FILE), needs(ALEXNET_FILE)):
        (tmp_path / "weights" / path.name).symlink_to(path)
    shutil.copytree(images, tmp_path / "faces")
    shutil.copy(ratings, tmp_path / "ratings.csv")
    text = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text(encoding="utf-8")
    section = text[text.index("## Pretrained brain models"):text.index("## `fluency measure`")]
    commands = [line for block in section.split("```bash\n")[1:] for line in block.split("```")[0].splitlines()]
    assert len(commands) == 3
    monkeypatch.chdir(tmp_path)
    for command in commands:
        args = command.split()
        assert args[0] == "fluency"
        result = CliRunner().invoke(fluency_cli, [*args[1:], *(["--no-report"] if args[1] == "run" else [])],
                                    catch_exceptions=False)
        assert result.exit_code == 0, (command, result.output)
    assert set(pd.read_parquet(tmp_path / "runs/vgg16/analyses/pearson.parquet")["checkpoint"]) == {"vgg16-imagenet"}
    assert set(pd.read_parquet(tmp_path / "runs/native/metrics.parquet")["checkpoint"]) == {"alexnet-imagenet",
                                                                                          "vgg16-imagenet"}


def test_model_without_pretrained_weights_is_untrained_and_seeded(faces: tuple[Path, Path], tmp_path: Path) -> None:
    """`--model vae-small`: an untrained network drawn from --seed, identified by its weights' sha256."""
    images, _ = faces
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run = fluency.run(metrics=["gini", "sam"], models=["vae-small"], images=str(images), seed=seed,
                          out=str(tmp_path / name), progress=False, figures=False)
        (entry,) = run.manifest["inputs"]["checkpoints"]
        runs[name] = (entry, run.metrics.sort_values(["metric", "layer", "image_id"])["value"].to_numpy())
    (a, values_a), (b, values_b), (c, _) = runs["a"], runs["b"], runs["c"]
    assert a["weights"]["kind"] == "untrained" and a["weights"]["seed"] == 1 and a["path"] is None
    assert a["sha256"] == b["sha256"] != c["sha256"] and np.array_equal(values_a, values_b)
    from fluency.core.model.checkpoint import state_sha256

    spec = PluginManager().get("architecture", "vae-small")
    torch.manual_seed(1)
    assert state_sha256(spec.load()(**spec.resolve({}))) == a["sha256"]  # the same weights as building it here from the same seed


def test_typicality_reference_of_two_sizes_is_one_line_at_native_size(faces: tuple[Path, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    images, _ = faces
    vgg = needs(VGG16_FILE)
    reference = tmp_path / "reference"
    reference.mkdir()
    shutil.copy(images / "X001.png", reference / "a.png")
    Image.open(images / "X002.png").resize((80, 112)).save(reference / "b.png")
    code, stderr = main_in_process(monkeypatch, capsys, "run", "--model", "vgg16-imagenet", "--images", str(images),
                                   "--metric", "typicality", "-o", f"vgg16-imagenet.weights={vgg}",
                                   "-o", "vgg16-imagenet.size=native", "-o", f"typicality.reference={reference}",
                                   "--out", str(tmp_path / "run"), "--no-report")
    assert code == 2 and "images of different sizes" in stderr and "b.png is 80×112" in stderr, stderr
    assert "Traceback" not in stderr


def test_one_checkpoint_named_twice_is_one_model_for_the_default_analyses(faces: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    """Two spellings of one file are measured once, so they do not add `paired` (which needs two models)."""
    images, ratings = faces
    default = Path(fluency.__file__).parent / "data" / "default.pt"
    (tmp_path / "again.pt").symlink_to(default)
    run = fluency.run(metrics=["gini"], checkpoints=[str(default), str(tmp_path / "again.pt")], images=str(images),
                      ratings=str(ratings), rating_column="attractiveness", out=str(tmp_path / "run"),
                      progress=False, figures=False, covariates=False)
    assert run.manifest["analyses"] == ["pearson", "spearman"]
    assert [c["label"] for c in run.manifest["inputs"]["checkpoints"]] == ["default"]
