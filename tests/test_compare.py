"""`fluency compare` at the images' own size, with the lpips plugin's options (issue 13, point 5).

The oracle for LPIPS is the `lpips` package itself: its own linear heads on torchvision's own AlexNet/VGG16
with the shared offline weights loaded by torchvision (not by fluency's backbone loader), on images read
with PIL alone and scaled to [-1, 1] by hand.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFilter

from cli_env import fluency_cli as cli
from fluency.core.errors import InputError, OptionError
from fluency.core.run.compare import compare

SHARED = Path(__file__).resolve().parents[2] / "shared"
ALEX = SHARED / "weights" / "alexnet_imagenet_features.pth"
VGG = SHARED / "weights" / "vgg16_imagenet_features.pth"
FACES = SHARED / "datasets" / "london-faces" / "images"
EXAMPLES = SHARED / "datasets" / "lpips-examples"

needs_alex = pytest.mark.skipif(not ALEX.exists() or not FACES.exists(),
                                reason="shared offline AlexNet weights or London faces not present")


def pixels(path: Path) -> torch.Tensor:
    """1×3×H×W in [0, 1], read with PIL and numpy only."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float()


@functools.cache
def lpips_package(net: str, weights: Path) -> torch.nn.Module:
    """The lpips package's LPIPS v0.1, its backbone torchvision's own ``features`` with ``weights`` loaded by
    torchvision (strict), handed to lpips in place of its ImageNet download."""
    lpips = pytest.importorskip("lpips")
    import torchvision

    if net == "alex":
        features = torchvision.models.alexnet().features
    else:  # VGG16's features alone: building the whole network spends seconds on its classifier
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = torch.load(weights, weights_only=True)
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()}, strict=True)
    backbone = SimpleNamespace(features=features)
    with pytest.MonkeyPatch.context() as mp:  # undone before fluency builds its own network
        mp.setattr(lpips.pretrained_networks.tv, {"alex": "alexnet", "vgg": "vgg16"}[net],
                   lambda *args, **kwargs: backbone)
        return lpips.LPIPS(net=net, version="0.1", verbose=False).eval()


def lpips_oracle(net: str, weights: Path, a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`lpips_package`'s value for images in [0, 1], scaled to [-1, 1] as it expects."""
    with torch.no_grad():
        return float(lpips_package(net, weights)(a * 2 - 1, b * 2 - 1))


def resized(path: Path, n: int) -> torch.Tensor:
    """The documented recipe by hand: each channel (float) scaled, shorter side to n (Lanczos), centre n×n crop."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    h, w = rgb.shape[:2]
    new_w, new_h = max(n, round(w * n / min(h, w))), max(n, round(h * n / min(h, w)))
    left, top = (new_w - n) // 2, (new_h - n) // 2
    planes = [np.asarray(Image.fromarray(rgb[:, :, c]).resize((new_w, new_h), Image.Resampling.LANCZOS))
              [top:top + n, left:left + n] for c in range(3)]
    return torch.from_numpy(np.clip(np.stack(planes), 0, 1))[None]


def face_pairs(root: Path, scale: int = 1) -> tuple[Path, Path]:
    """a/: a 256×256 face and a 160×256 (non-square) crop of another, both shrunk ``scale`` times; b/: a
    blurred copy and a JPEG at quality 20."""
    if not FACES.exists():
        pytest.skip(f"London faces not present at {FACES}")
    a, b = root / "a", root / "b"
    a.mkdir(), b.mkdir()
    face = Image.open(FACES / "X001.jpg").convert("RGB").reduce(scale)
    face.save(a / "square.png")
    face.filter(ImageFilter.GaussianBlur(2)).save(b / "square.png")
    tall = Image.open(FACES / "X002.jpg").convert("RGB").crop((48, 0, 208, 256)).reduce(scale)
    tall.save(a / "tall.png")
    tall.save(b / "tall.jpg", quality=20)
    return a, b


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """:func:`face_pairs` at full size (256×256 and 160×256)."""
    return face_pairs(tmp_path)


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, Path]:
    """:func:`face_pairs` at a quarter of the size (64×64 and 40×64), for VGG on a CPU."""
    return face_pairs(tmp_path, 4)


def values(result, metric: str) -> dict[str, float]:
    rows = result.table[result.table["metric"] == metric]
    return dict(zip(rows["image"], rows["value"]))


@needs_alex
def test_lpips_alex_at_native_size_equals_the_lpips_package(folders: tuple[Path, Path]) -> None:
    a, b = folders
    result = compare(a, b, ["lpips", "l1", "l2"], options=[f"lpips.weights={ALEX}"])
    assert result.settings == {"image_size": "native", "lpips": {"net": "alex", "weights": str(ALEX)}}
    got = values(result, "lpips")
    for name, other in (("square", "square.png"), ("tall", "tall.jpg")):
        xa, xb = pixels(a / f"{name}.png"), pixels(b / other)
        assert got[name] == pytest.approx(lpips_oracle("alex", ALEX, xa, xb), abs=1e-5)
        diff = (xa - xb).double()
        assert values(result, "l1")[name] == pytest.approx(float(diff.abs().mean()), rel=1e-5)
        assert values(result, "l2")[name] == pytest.approx(float((diff ** 2).mean()), rel=1e-5)
    assert 0.05 < got["square"] < 1 and 0.05 < got["tall"] < 1


@pytest.mark.skipif(not ALEX.exists() or not EXAMPLES.exists(), reason="shared LPIPS weights or examples not present")
def test_the_lpips_example_images_give_the_published_values(tmp_path: Path) -> None:
    """The LPIPS repository's 64×64 example pair at its own size: 0.722 and 0.138 (alex, v0.1), as published."""
    for folder, names in (("ref", ("ex_ref.png", "ex_ref.png")), ("other", ("ex_p0.png", "ex_p1.png"))):
        (tmp_path / folder).mkdir()
        for index, name in enumerate(names):
            Image.open(EXAMPLES / name).save(tmp_path / folder / f"pair{index}.png")
    got = values(compare(tmp_path / "ref", tmp_path / "other", options=[f"lpips.weights={ALEX}"]), "lpips")
    assert [got["pair0"], got["pair1"]] == pytest.approx([0.722, 0.138], abs=5e-4)
    oracle = lpips_oracle("alex", ALEX, pixels(EXAMPLES / "ex_ref.png"), pixels(EXAMPLES / "ex_p0.png"))
    assert got["pair0"] == pytest.approx(oracle, abs=1e-5)


@needs_alex
def test_image_size_resizes_by_the_documented_recipe(folders: tuple[Path, Path]) -> None:
    a, b = folders
    native = values(compare(a, b, options=[f"lpips.weights={ALEX}"]), "lpips")
    result = compare(a, b, size=128, options=[f"lpips.weights={ALEX}"])
    assert result.settings["image_size"] == 128
    got = values(result, "lpips")
    for name, other in (("square", "square.png"), ("tall", "tall.jpg")):
        expected = lpips_oracle("alex", ALEX, resized(a / f"{name}.png", 128), resized(b / other, 128))
        assert got[name] == pytest.approx(expected, abs=2e-4)
        assert abs(got[name] - native[name]) > 0.01  # resizing changes the value


def test_pairs_of_different_sizes_are_an_error_naming_both(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(a / "x.png")       # 32 wide, 24 high
    Image.fromarray(np.full((32, 24, 3), 255, np.uint8)).save(b / "x.jpg")   # 24 wide, 32 high
    with pytest.raises(InputError) as caught:
        compare(a, b, ["l1"])
    message = str(caught.value)
    assert str(a / "x.png") in message and "32×24" in message and str(b / "x.jpg") in message and "24×32" in message
    assert "--image-size" in message and "\n" not in message
    # asked to resize, both become 16×16: black against white
    assert values(compare(a, b, ["l1"], size=16), "l1")["x"] == pytest.approx(1.0, abs=1e-6)


@needs_alex
def test_images_too_small_for_alexnet_are_one_line(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    rng = np.random.default_rng(0)
    for name, side in (("s31", 31), ("t30", 30)):  # in this order: the 30-pixel pair is measured second
        for folder in (a, b):
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    with pytest.raises(InputError, match=r"lpips cannot measure t30 at 30×30 pixels: too small .*--image-size"):
        compare(a, b, options=[f"lpips.weights={ALEX}"], batch_size=1)
    (a / "t30.png").unlink(), (b / "t30.png").unlink()
    assert values(compare(a, b, options=[f"lpips.weights={ALEX}"]), "lpips")["s31"] > 0


@pytest.mark.skipif(not VGG.exists() or not ALEX.exists(), reason="shared offline VGG16/AlexNet weights not present")
def test_lpips_net_vgg_is_honoured_and_config_is_read(small: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = small
    vgg = values(compare(a, b, options=["lpips.net=vgg", f"metric.lpips.weights={VGG}"]), "lpips")
    alex = values(compare(a, b, options=[f"lpips.weights={ALEX}"]), "lpips")
    for name, other in (("square", "square.png"), ("tall", "tall.jpg")):
        xa, xb = pixels(a / f"{name}.png"), pixels(b / other)
        assert vgg[name] == pytest.approx(lpips_oracle("vgg", VGG, xa, xb), abs=1e-5)
        assert abs(vgg[name] - alex[name]) > 0.01
    # a [lpips] table of --config is read (its samples is refused), and -o wins over it, as for `run`
    config = tmp_path / "fluency.toml"
    config.write_text("[lpips]\nsamples = 2\n")
    with pytest.raises(OptionError, match="lpips.samples=2"):
        compare(a, b, config=config)
    config.write_text(f'[lpips]\nnet = "vgg"\nweights = "{VGG}"\n')
    back = compare(a, b, config=config, options=["lpips.net=alex", f"lpips.weights={ALEX}"])
    assert values(back, "lpips") == pytest.approx(alex, abs=1e-7)


def test_lpips_options_are_the_plugins_and_checked_as_for_run(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / folder / "x.png")
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(OptionError, match=r"unknown option 'nett'; did you mean 'net'"):
        compare(a, b, options=["lpips.nett=vgg"])
    with pytest.raises(OptionError, match=r"'resnet'"):
        compare(a, b, options=["lpips.net=resnet"])
    with pytest.raises(OptionError, match=r"lpips.samples=2: compare .* no reconstruction"):
        compare(a, b, options=["lpips.samples=2"])
    with pytest.raises(OptionError, match=r"'gini' is not used by this command"):
        compare(a, b, ["l1"], options=["gini.layers=[enc1]"])


def test_cli_errors_are_one_line_and_old_flags_are_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(a / "x.png")
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(b / "x.png")
    code, _, err = cli(monkeypatch, capsys, "compare", str(a), str(b), "--metric", "l1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "30×20" in err and "20×30" in err
    code, out, _ = cli(monkeypatch, capsys, "compare", str(a), str(b), "--metric", "l1", "--image-size", "16", "--json")
    assert code == 0 and json.loads(out)["settings"] == {"image_size": 16}
    code, _, err = cli(monkeypatch, capsys, "compare", str(a), str(b), "-o", "lpips.nett=vgg")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'nett'" in err
    for old in (["--net", "vgg"], ["--lpips-weights", str(ALEX)]):
        code, _, err = cli(monkeypatch, capsys, "compare", str(a), str(b), *old)
        assert code == 2 and f"No such option '{old[0]}'" in err


def guide_commands() -> list[str]:
    text = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text(encoding="utf-8")
    section = text[text.index("## `fluency compare`"):text.index("## Options and config files")]
    blocks = [block.split("```", 1)[0] for block in section.split("```bash\n")[1:]]
    return [line for block in blocks for line in block.splitlines() if line.strip()]


@pytest.mark.skipif(not VGG.exists() or not ALEX.exists(), reason="shared offline VGG16/AlexNet weights not present")
def test_the_user_guides_compare_commands_run_as_written(small: tuple[Path, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    a, b = small
    a.rename(tmp_path / "originals"), b.rename(tmp_path / "morphs")
    (tmp_path / "vgg16_imagenet_features.pth").symlink_to(VGG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLUENCY_LPIPS_WEIGHTS", str(ALEX))  # offline AlexNet where the command names none
    commands = guide_commands()
    assert len(commands) == 3
    for command in commands:
        args = command.split()
        assert args[0] == "fluency"
        code, out, err = cli(monkeypatch, capsys, *args[1:])
        assert code == 0, (command, err)
    table = pd.read_csv(tmp_path / "distances.csv")
    assert set(table["metric"]) == {"lpips", "l1", "1-ssim"} and set(table["image"]) == {"square", "tall"}
