"""A decoder for a pretrained encoder: the user guide's commands train only the latent and decoder of
``vae-vgg16`` on torchvision's ImageNet VGG16 features, offline, and ``fluency run`` measures the result.

Oracles: the weights file itself (the encoder must equal it tensor by tensor), Adam's step bound (one step moves
a weight by at most ``lr``, so the decoder must differ from its seeded initialisation by more than 0 and at most
``lr`` per step), and the count of trainable parameters (what the optimizer state may hold)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from fluency.core.model.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
VGG16_FILE = SHARED / "weights" / "vgg16_imagenet_features.pth"
FACES = SHARED / "datasets" / "london-faces"
SECTION = "## A decoder for a pretrained encoder"
N_IMAGES = 6


def guide_commands() -> list[str]:
    """The ``fluency ...`` lines of the guide's section, backslash continuations joined."""
    text = (ROOT / "docs" / "user-guide.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    blocks = [b.split("```", 1)[0] for b in section.split("```bash\n")[1:]]
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


#: the tiny setting: 1 epoch at 32 px with a narrow decoder and latent (the ImageNet encoder stays as it is)
TINY_TRAIN = {"--epochs": "1", "--image-size": "32"}
TINY_OPTIONS = ["-o", "vae-vgg16.decoder_channels=8,8,8,8,8", "-o", "vae-vgg16.latent_dim=8"]


def tiny(command: str, images: Path) -> list[str]:
    """The documented command on ``N_IMAGES`` London faces in the tiny setting (everything else as written)."""
    command = command.replace("../shared/datasets/london-faces/images", str(images))
    command = command.replace("../shared/", f"{SHARED}/")
    args = command.split()
    assert args[0] == "fluency", command
    if args[1] != "train":
        return args[1:]
    for flag, value in TINY_TRAIN.items():
        args[args.index(flag) + 1] = value
    return args[1:] + TINY_OPTIONS


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guide's train and run commands, executed in a scratch folder; the folder."""
    if not (VGG16_FILE.is_file() and (FACES / "ratings.csv").is_file()):
        pytest.skip(f"needs {VGG16_FILE} and the London faces under {FACES}")
    from click.testing import CliRunner

    from fluency.cli import cli as fluency_cli

    folder = tmp_path_factory.mktemp("pretrained")
    images = folder / "faces"
    images.mkdir()
    for path in sorted((FACES / "images").glob("*.jpg"))[:N_IMAGES]:
        shutil.copy(path, images / path.name)
    commands = guide_commands()
    assert [c.split()[1] for c in commands] == ["train", "run"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        for command in commands:
            result = CliRunner().invoke(fluency_cli, tiny(command, images), catch_exceptions=False)
            assert result.exit_code == 0, (command, result.output)
    return folder


def test_the_guide_names_the_shared_weights_and_both_options() -> None:
    train = guide_commands()[0]
    assert "vae-vgg16.imagenet_weights=../shared/weights/vgg16_imagenet_features.pth" in train
    assert "vae-vgg16.freeze_encoder=true" in train and "--arch vae-vgg16" in train


def test_the_encoder_keeps_the_imagenet_weights_tensor_by_tensor(trained: Path) -> None:
    state = read_checkpoint(trained / "runs/vgg16-decoder/final.pt")["state_dict"]
    imagenet = torch.load(VGG16_FILE, map_location="cpu", weights_only=True)
    assert len(imagenet) == 26  # 13 convolutions, weight and bias
    # with the plain options the encoder's module indices are torchvision's (features.K -> encoder.K)
    for key, value in imagenet.items():
        assert torch.equal(state[key.replace("features.", "encoder.")], value), key


def test_only_the_latent_and_decoder_train(trained: Path) -> None:
    from fluency.core.plugin.manager import PluginManager

    payload = read_checkpoint(trained / "runs/vgg16-decoder/last.pt")
    options = payload["architecture"]["options"]
    assert options["freeze_encoder"] is True and options["input_norm"] == "imagenet"
    torch.manual_seed(payload["provenance"]["seed"])  # training seeds torch, then builds the model first
    initial = PluginManager(autoload=False).get("architecture", "vae-vgg16").load()(**options)
    trainable = {n for n, p in initial.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("encoder.") for n in trainable)
    assert {n.split(".")[0] for n in trainable} == {"mu", "logvar", "dec_fc", "decoder"}
    # the optimizer was handed the trainable parameters only: its state lists exactly that many
    groups = payload["training"]["optimizer_state"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    lr = groups[0]["lr"]
    steps = math.ceil(payload["data"]["n_train"] / payload["training"]["config"]["batch_size"])
    after = payload["state_dict"]
    for name, p in initial.named_parameters():
        delta = (after[name] - p.detach()).abs().max().item()
        if name in trainable:  # moved, by at most Adam's step bound (so `initial` is truly the start)
            assert 0 < delta <= lr * steps * (1 + 1e-5), (name, delta)
        else:
            assert delta == 0, name


def test_fluency_run_measures_reconstruction_and_sam_on_the_result(trained: Path) -> None:
    table = pd.read_parquet(trained / "runs/vgg16-decoder-run/metrics.parquet")
    assert set(table["plugin"]) == {"recon-error", "sam", "image-stats"}  # image-stats: the covariates
    assert {"recon-l1", "recon-l2", "sam"} <= set(table["metric"])
    assert (table.groupby("metric")["image_id"].nunique() == N_IMAGES).all()
    assert table["value"].notna().all() and (table["value"].abs() < math.inf).all()
    sam = table[table["metric"] == "sam"]["value"]
    assert (sam != 0).all()  # the decoder's loss surface has a slope: SAM moved the loss


def test_the_trained_encoder_responds_as_torchvisions_vgg16(trained: Path) -> None:
    """``enc5`` of the trained checkpoint equals torchvision's ``vgg16().features[:30]`` with the same weights on
    ImageNet-normalised input (when torchvision is installed; fluency itself does not need it)."""
    torchvision = pytest.importorskip("torchvision")
    from fluency.core.model.checkpoint import load_checkpoint
    from fluency.core.plugin.manager import PluginManager

    model = load_checkpoint(trained / "runs/vgg16-decoder/final.pt", PluginManager(autoload=False)).model.eval()
    reference = torchvision.models.vgg16().features.eval()
    state = torch.load(VGG16_FILE, map_location="cpu", weights_only=True)
    reference.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
    seen: dict[str, torch.Tensor] = {}
    last_relu = model.encoder[29]  # torchvision's index of relu5_3, kept by vae-vgg16's plain options
    assert isinstance(last_relu, torch.nn.ReLU)
    hook = last_relu.register_forward_hook(lambda module, inputs, output: seen.setdefault("enc5", output))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        model(x, sample=False)
        expected = reference[:30]((x - mean) / std)
    hook.remove()
    torch.testing.assert_close(seen["enc5"], expected, rtol=0, atol=1e-6)
