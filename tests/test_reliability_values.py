"""No silent wrong result, and one line (a FluencyError) for bad input: float16 overflow of the activation store,
infinite ratings, two rating rows naming one image, bad --config / typicality fit / LPIPS weights files, reports
of corrupted run folders, and random bytes and odd tables fed to the readers (issue 12, points 3 and 4)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from rich.console import Console

import fluency
from fluency.core.errors import FluencyError, InputError, OptionError, PluginFailure, StoreError
from fluency.core.inputs.ratings import normalise_id, read_ratings
from fluency.core.inputs.stimuli import from_folder
from fluency.core.plugin.config import read_config
from fluency.core.plugin.metric import MetricBatch, ModelDescription
from fluency.core.run.store import MARKER, ActivationStore, ActivationStoreWriter
from fluency.core.run.tables import MetricTableWriter, read_metric_table

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- float16 overflow of the activation store ---------------------------------------------------------------------

def test_float16_overflow_moves_the_layer_to_float32_and_says_so(tmp_path: Path) -> None:
    small = np.array([[0.5, -1.25], [3.0, 7.5], [1e-8, 6e-8]], np.float32)  # 1e-8: float16 underflow, not an error
    big = np.array([[1e5, -2.0], [-7e4, 0.25]], np.float32)
    with ActivationStoreWriter(tmp_path / "s", rows_per_group=2, provenance={}) as writer:
        writer.write("a", ["i0", "i1", "i2"], small)  # one row group written as float16, one row buffered
        writer.write("a", ["i3", "i4"], torch.from_numpy(big))
        writer.write("b", ["i0", "i1", "i2"], small)
        writer.write("b", ["i3", "i4"], small[:2])
    assert len(writer.notes) == 1 and "'a'" in writer.notes[0] and "float32" in writer.notes[0]
    store = ActivationStore(tmp_path / "s")
    assert store.dtype("a") == np.float32 and store.dtype("b") == np.float16
    ids, a = store.read_layer("a")
    assert ids == ["i0", "i1", "i2", "i3", "i4"] and np.isfinite(a).all()
    np.testing.assert_array_equal(a[:3], small.astype(np.float16).astype(np.float32))  # float16 precision kept
    np.testing.assert_array_equal(a[3:], big)  # exact from the switch on
    assert np.isfinite(store.read_layer("b")[1]).all()
    record = json.loads((tmp_path / "s" / MARKER).read_text())["layers"]["a"]
    assert record["dtype"] == "float32"
    assert record["widened"] == {"from": "float16", "float16_rows": 3, "peak": 1e5}
    assert not list((tmp_path / "s").glob("*.partial"))


def test_a_layer_that_starts_beyond_float16_and_non_finite_values(tmp_path: Path) -> None:
    with ActivationStoreWriter(tmp_path / "s", provenance={}) as writer:
        writer.write("a", ["i0"], np.array([[65520.0]], np.float64))
        writer.write("u", ["i0"], np.array([[65535]], np.uint16))  # itemsize 2, still beyond float16
    store = ActivationStore(tmp_path / "s")
    assert store.meta["layers"]["a"]["widened"]["float16_rows"] == 0
    assert store.read_layer("a")[1][0, 0] == 65520.0 and store.read_layer("u")[1][0, 0] == 65535.0
    writer = ActivationStoreWriter(tmp_path / "t", provenance={})
    with pytest.raises(StoreError, match=r"layer 'a'.*'i1'"):
        writer.write("a", ["i0", "i1"], np.array([[1.0], [np.inf]], np.float32))
    writer.abort()


def _checkpoint(path: Path, scale: float) -> Path:
    """A tiny vae-small whose first convolution is scaled (by 1e6: enc1 and enc2 respond beyond float16, enc5
    does not)."""
    from fluency.core.model.checkpoint import save_checkpoint
    from fluency.plugins.default_vae_small import VAESmall

    torch.manual_seed(0)
    model = VAESmall(image_size=32, latent_dim=4, channels=[4, 4, 4, 4, 4], decoder_channels=[4, 4, 4, 4, 4])
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight.mul_(scale)
        conv.bias.fill_(scale / 10)
    save_checkpoint(path, model, "vae-small")
    return path


def _run(root: Path, scale: float) -> tuple[fluency.core.run.folder.RunResult, str]:
    """A run (8 random images, gini) of :func:`_checkpoint` ``scale``; returns it and its console output."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for k in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"img{k}.png")
    buffer = io.StringIO()
    result = fluency.run(metrics=["gini"], images=root / "images", checkpoints=[_checkpoint(root / "m.pt", scale)],
                         out=root / "run", batch_size=4, figures=False, console=Console(file=buffer, width=300))
    return result, buffer.getvalue()


@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[fluency.core.run.folder.RunResult, str]:
    """A run of a model whose enc1 responds up to ~1e6."""
    return _run(tmp_path_factory.mktemp("big"), 1e6)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> fluency.core.run.folder.RunResult:
    """A run of a model whose responses fit float16."""
    return _run(tmp_path_factory.mktemp("plain"), 1.0)[0]


def test_a_run_whose_activations_overflow_float16_completes_with_those_layers_in_float32(big_run) -> None:
    result, console = big_run
    assert result.manifest["status"] == "complete"
    store = ActivationStore(result.path / "activations" / "m")
    assert store.dtype("enc1") == np.float32 and store.dtype("enc5") == np.float16
    assert all(np.isfinite(store.read_layer(layer)[1]).all() for layer in store.layers)
    entry = result.manifest["stores"]["m"]
    assert "enc1" in entry["widened"] and "enc5" not in entry["widened"]
    assert "'enc1'" in console and "float32" in console
    measured = fluency.measure(store.path, ["gini"], out=result.path.parent / "m", progress=False)  # exact: float32
    live = result.metrics.query("layer == 'enc1'")["value"].to_numpy()
    np.testing.assert_array_equal(measured.metrics.query("layer == 'enc1'")["value"].to_numpy(), live)


# --- ratings: infinite values, two rows naming one image ----------------------------------------------------------

def test_infinite_ratings_are_errors_naming_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("image_id,rating\na,1\nb,1e999\nc,inf\nd,-Infinity\ne,2\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_ratings(path)
    message = str(err.value)
    assert "r.csv" in message and "row 3: '1e999'" in message and "row 4: 'inf'" in message
    assert "row 5: '-Infinity'" in message and "infinite" in message
    pd.DataFrame({"image_id": ["a", "b", "c"], "rating": ["1", "2", "-1e400"]}).to_parquet(tmp_path / "r.parquet")
    with pytest.raises(InputError, match=r"r\.parquet.*infinite.*row 3: '-1e400'"):
        read_ratings(tmp_path / "r.parquet")


def _images(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (50, 60, 70)).save(root / name)
    return root


def test_two_rows_naming_one_image_are_an_error_naming_both_rows(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", ["img01.png", "img02.png", "img03.png"])
    table = tmp_path / "r.csv"
    table.write_text("image_id,rating\nimg01,1\nimg02,2\nimg01.png,3\nimg03,4\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        from_folder(images, table, "image_id", "rating")
    message = str(err.value)
    assert "r.csv" in message and "row 2 ('img01')" in message and "row 4 ('img01.png')" in message
    assert "img01.png" in message
    table.write_text("image_id,rating\n./img01,1\nimg02,2\nimg01,3\nimg03,4\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"r\.csv.*'\./img01' \(row 2\).*'img01' \(row 4\)"):
        read_ratings(table)  # the same image under the matching rules, without looking at the images
    table.write_text("image_id,rating\nimg01.png,1\nimg01.jpg,2\n", encoding="utf-8")
    assert len(read_ratings(table)) == 2  # two files by relative path: not the same image


# --- one line for bad files: --config, typicality fit, LPIPS weights ----------------------------------------------

def test_config_that_is_a_folder_or_not_utf8_toml_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--config .*folder"):
        read_config(tmp_path)
    (tmp_path / "c.toml").write_bytes(b"[sam]\nrho = 0.1 # caf\xe9\n")
    with pytest.raises(OptionError, match=r"--config .*c\.toml.*UTF-8"):
        read_config(tmp_path / "c.toml")


class _Boom:
    """Unpickling this would create a file: proof that a fit file cannot run code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.target),))


def _typicality(fit: Path) -> None:
    from fluency.plugins.default_typicality import Typicality

    metric = Typicality(layers=["enc1"], fit=str(fit))
    acts = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)
    metric.compute(MetricBatch([f"i{k}" for k in range(4)], None, {"enc1": acts}))
    metric.finish()


def test_typicality_fit_file_hostile_or_malformed_is_one_line(tmp_path: Path) -> None:
    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(pickle.dumps({"layers": _Boom(str(tmp_path / "pwned"))}))
    good = {"mean": torch.zeros(6), "components": torch.eye(6)[:, :2], "variances": torch.ones(2)}
    malformed = {"list.pt": [1, 2, 3], "nolayers.pt": {"x": torch.zeros(1)},
                 "shape.pt": {"layers": {"enc1": {"all": {**good, "components": torch.eye(5)[:, :2]}}}},
                 "variance.pt": {"layers": {"enc1": {"all": {**good, "variances": torch.tensor([1.0, -1.0])}}}},
                 "strings.pt": {"layers": {"enc1": {"all": {**good, "mean": "zeros"}}}}}
    for name, obj in malformed.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name in ["hostile.pt", *malformed, "text.pt", "missing.pt"]:
        with pytest.raises(FluencyError) as err:
            _typicality(tmp_path / name)
        message = str(err.value)
        assert not isinstance(err.value, PluginFailure) and name in message and "\n" not in message, message
        assert "weights_only=False" not in message
    assert not (tmp_path / "pwned").exists()
    torch.save({"layers": {"enc1": {"all": good}}}, tmp_path / "good.pt")
    _typicality(tmp_path / "good.pt")  # a valid fit still works


def test_lpips_weights_that_are_not_a_state_dict_name_the_file_and_variable(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from fluency.core.model.backbones import ENV_WEIGHTS, lpips_model

    cases = {"tensor.pth": torch.zeros(3), "list.pth": [torch.zeros(1)], "keys.pth": {1: torch.zeros(1)},
             "values.pth": {"features.0.weight": "x", "features.0.bias": [1]}}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    for name in [*cases, "missing.pth"]:
        monkeypatch.setenv(ENV_WEIGHTS, str(tmp_path / name))
        with pytest.raises(FluencyError) as err:
            lpips_model("alex")
        assert name in str(err.value) and ENV_WEIGHTS in str(err.value), str(err.value)


# --- fluency report on a corrupted run ----------------------------------------------------------------------------

def _corrupt_manifest_bytes(run: Path) -> Path:
    (run / "manifest.json").write_bytes(b'{"status": "comp\xff')
    return run / "manifest.json"


def _corrupt_manifest_type(run: Path) -> Path:
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "metrics": 7, "inputs": ["x"]}))
    return run / "manifest.json"


def _corrupt_metrics(run: Path) -> Path:
    (run / "metrics.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    return run / "metrics.parquet"


def _corrupt_layer(run: Path) -> Path:
    layer = run / "activations" / "m" / "enc2.parquet"
    layer.write_bytes(layer.read_bytes()[:100])
    return layer


def _corrupt_marker_model(run: Path) -> Path:
    marker = run / "activations" / "m" / MARKER
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "model": {"default_metric_layers": 5}}))
    return marker


@pytest.mark.parametrize("corrupt", [_corrupt_manifest_bytes, _corrupt_manifest_type, _corrupt_metrics,
                                     _corrupt_layer, _corrupt_marker_model])
def test_report_on_a_corrupted_run_names_the_file(plain_run, tmp_path: Path, corrupt) -> None:
    from fluency.core.outputs.report import build_report

    run = tmp_path / "run"
    shutil.copytree(plain_run.path, run)
    damaged = corrupt(run)
    with pytest.raises(FluencyError) as err:
        build_report(run)
    assert damaged.name in str(err.value), str(err.value)


# --- random bytes and odd tables: fluency's own errors or success -------------------------------------------------

def _fluency_error_or_success(call):  # type: ignore[no-untyped-def]
    """``call()``'s result, or None when it raised a FluencyError; any other exception fails the test."""
    try:
        return call()
    except FluencyError:
        return None


def _sane_ratings(path: Path) -> None:
    """read_ratings succeeds only with finite-or-empty ratings and one row per image (no silent wrong table)."""
    table = _fluency_error_or_success(lambda: read_ratings(path))
    if table is not None:
        ratings = table["rating"].to_numpy(float)
        assert not np.isinf(ratings).any(), list(ratings)
        keys = [normalise_id(i) for i in table["image_id"]]
        assert len(set(keys)) == len(keys), keys


odd_cells = st.one_of(st.text(max_size=8), st.sampled_from(["", "NA", "nan", "inf", "-inf", "1e999", "1e308",
                                                            "-0", "5,5", "1_000", "0x10", "٣", " 1 ", "./a", "a"]),
                      st.from_regex(r"[+-]?[0-9]{1,3}(\.[0-9])?e[+-]?[0-9]{3}", fullmatch=True),
                      st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70), st.none())
odd_tables = st.tuples(
    st.lists(st.one_of(st.text(max_size=6), st.sampled_from(["image_id", "rating"])), max_size=2, unique=True),
    st.booleans(),  # with the image_id and rating columns
    st.lists(st.lists(odd_cells, min_size=4, max_size=4), max_size=6))


def _odd_frame(extra: list[str], named: bool, rows: list[list[object]]) -> pd.DataFrame:
    columns = list(dict.fromkeys((["image_id", "rating"] if named else []) + extra))
    return pd.DataFrame([row[:len(columns)] for row in rows], columns=columns)


@FUZZ
@given(table=odd_tables, data=st.binary(max_size=300), raw=st.booleans(),
       suffix=st.sampled_from([".csv", ".tsv", ".txt", ".parquet"]))
@example(table=(["x"], True, [["a", "1", "", ""], ["b", "1e999", "", ""]]), data=b"", raw=False, suffix=".csv")
@example(table=([], True, [["./a", "1", "", ""], ["a", "2", "", ""]]), data=b"", raw=False, suffix=".parquet")
def test_ratings_reader_on_random_bytes_and_odd_tables(tmp_path: Path, table: tuple, data: bytes, raw: bool,
                                                       suffix: str) -> None:
    path = tmp_path / f"r{suffix}"
    frame = _odd_frame(*table)
    if raw:
        path.write_bytes(data)
    elif suffix == ".parquet":
        try:
            frame.astype(str).to_parquet(path) if frame.columns.size else frame.to_parquet(path)
        except (ValueError, TypeError):  # column names pyarrow cannot write: not a reader question
            return
    else:
        sep = {".tsv": "\t", ".txt": ";"}.get(suffix, ",")
        path.write_bytes(frame.to_csv(index=False, sep=sep).encode("utf-8", "surrogatepass"))
    _sane_ratings(path)


@FUZZ
@given(data=st.one_of(st.binary(max_size=200),
                      st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))))
@example(data=b"a = 1 # caf\xe9")
def test_config_loader_on_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(data)
    _fluency_error_or_success(lambda: read_config(path))


@pytest.fixture(scope="module")
def store_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of a small complete store (and a metric table), to be damaged by the tests below."""
    path = tmp_path_factory.mktemp("template")
    with ActivationStoreWriter(path / "s", provenance={}, model=ModelDescription("x", ("a",))) as writer:
        writer.write("a", ["i0", "i1"], np.ones((2, 3), np.float32))
    files = {p.name: p.read_bytes() for p in (path / "s").iterdir()}
    with MetricTableWriter(path / "metrics.parquet", "run") as table:
        table.write("c", "gini", "a", ["i0", "i1"], np.array([0.1, 0.2]))
    return {**files, "metrics.parquet": (path / "metrics.parquet").read_bytes()}


def _store(path: Path, files: dict[str, bytes], **changed: bytes) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    for name, data in {**files, **changed}.items():
        (path / name).write_bytes(data)
    return path


def _read_everything(path: Path) -> None:
    store = ActivationStore(path)
    store.description, store.label, store.image_ids  # noqa: B018
    for layer in store.layers:
        store.read_layer(layer)
    for _ in store.metric_batches():
        pass


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(),
                                     st.text(max_size=5)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=10)


@FUZZ
@given(where=st.sampled_from([MARKER, "a.parquet", "metrics.parquet"]), data=st.binary(max_size=400),
       cut=st.integers(0, 2000), truncate=st.booleans())
@example(where="a.parquet", data=b"", cut=0, truncate=False)
def test_store_and_table_readers_on_random_bytes(tmp_path: Path, store_files: dict[str, bytes], where: str,
                                                 data: bytes, cut: int, truncate: bool) -> None:
    damaged = store_files[where][:cut] + data if truncate else data
    path = _store(tmp_path / "s", store_files, **{where: damaged})
    if where == "metrics.parquet":
        _fluency_error_or_success(lambda: read_metric_table(path / where))
    else:
        _fluency_error_or_success(lambda: _read_everything(path))


@FUZZ
@given(layer=st.one_of(json_values, st.dictionaries(st.sampled_from(["shape", "dtype", "rows", "file"]), json_values,
                                                    max_size=2)),
       model=st.one_of(json_values, st.dictionaries(st.sampled_from(["architecture", "default_metric_layers",
                                                                     "attention_layers", "checkpoint",
                                                                     "input_shape"]), json_values, max_size=3)),
       layers_key=st.sampled_from(["a", "../a", "", "a.parquet"]))
@example(layer={}, model={"default_metric_layers": 5}, layers_key="a")
@example(layer={"shape": [2**40, 2**40]}, model=None, layers_key="a")
def test_store_reader_on_odd_markers(tmp_path: Path, store_files: dict[str, bytes], layer: object, model: object,
                                     layers_key: str) -> None:
    meta = json.loads(store_files[MARKER])
    odd = {**meta["layers"]["a"], **layer} if isinstance(layer, dict) else layer
    marker = json.dumps({**meta, "model": model, "layers": {layers_key: odd}}).encode()
    _fluency_error_or_success(lambda: _read_everything(_store(tmp_path / "s", store_files, **{MARKER: marker})))


def test_a_full_disk_is_one_line_naming_the_file_and_the_run_is_marked_failed(tmp_path: Path) -> None:
    """A real file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) in a subprocess, not a mocked write."""
    import resource
    import signal
    import subprocess
    import sys

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run([sys.executable, "-m", "fluency.cli", "run", "--metric", "gini", "--out", "r",
                           "--no-report", "--no-figures"], cwd=tmp_path, preexec_fn=limit, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "FLUENCY_DISABLE_PLUGIN_AUTOLOAD": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert "enc1.parquet: the disk is full" in lines[0] and "200,000 bytes" in lines[0]
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "disk is full" in manifest["error"]
    assert not (tmp_path / "r" / "activations" / "default" / "_COMPLETE.json").exists()


def test_a_store_that_cannot_fit_is_refused_after_the_first_batch(tmp_path: Path, monkeypatch) -> None:
    from fluency.core.errors import StorageFullError

    real = shutil.disk_usage
    monkeypatch.setattr("fluency.core.run.store.shutil.disk_usage",
                        lambda path: real(path)._replace(free=1_000_000))
    with pytest.raises(StorageFullError, match=r"needs about \d+ MiB more for 240 images .*--store-layers"):
        fluency.run(metrics=["gini"], out=str(tmp_path / "r"), progress=False, batch_size=16)
    assert fluency.run(metrics=["gini"], out=str(tmp_path / "ok"), progress=False, store=False).metrics.size


@pytest.mark.parametrize("args, message", [
    (["run", "--metric", "gini", "--seed", "-1"], "--seed"),
    (["run", "--metric", "gini", "--seed", str(2**32)], "--seed"),
    (["train", "--images", "imgs", "--out", "m", "--lr", "nan"], "--lr"),
    (["train", "--images", "imgs", "--out", "m", "--lr", "-0.1"], "--lr"),
    (["train", "--images", "imgs", "--out", "m", "--seed", str(2**40)], "--seed"),
])
def test_out_of_range_seeds_and_learning_rates_are_refused_before_anything_is_written(
        tmp_path: Path, args: list[str], message: str, monkeypatch, capsys) -> None:
    import sys

    from fluency.cli import main

    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fluency", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    assert exited.value.code == 2 and message in captured.err and "Traceback" not in captured.err, captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # nothing written
    with pytest.raises(OptionError, match="--seed"):
        fluency.run(metrics=["gini"], seed=2**32, out=str(tmp_path / "never"), progress=False)
    assert not (tmp_path / "never").exists()


def test_report_on_a_read_only_run_folder_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno
    import sys

    from fluency.cli import main

    run = fluency.run(metrics=["gini"], out=str(tmp_path / "run"), progress=False, store=False).path
    if os.geteuid() != 0:  # a real read-only folder
        run.chmod(0o555)
    else:  # root writes anywhere: the file system says read-only instead
        real = os.open

        def read_only(path, flags, *args):
            if flags & os.O_CREAT and str(path).startswith(str(run)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, flags, *args)

        monkeypatch.setattr("fluency.core.run.lock.os.open", read_only)
    monkeypatch.setattr(sys, "argv", ["fluency", "report", str(run)])
    try:
        with pytest.raises(SystemExit) as exited:
            main()
    finally:
        run.chmod(0o755)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err and str(run) in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_every_test_the_reliability_page_cites_exists() -> None:
    import re

    root = Path(__file__).resolve().parents[1]
    files = {"F": "test_reliability_folders.py", "I": "test_reliability_inputs.py", "V": "test_reliability_values.py"}
    page = (root / "docs" / "reliability.md").read_text(encoding="utf-8")
    cited = re.findall(r"\| ([FIV]) ((?:`test_\w+`(?:, )?)+) \|", page)
    assert len(cited) >= 25
    for key, names in cited:
        source = (root / "tests" / files[key]).read_text(encoding="utf-8")
        for name in re.findall(r"`(test_\w+)`", names):
            assert f"def {name}(" in source, f"docs/reliability.md cites {name}, which {files[key]} does not have"
