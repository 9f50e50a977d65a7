"""Metric ``typicality``: how typical an image's layer response is of a reference set.

Fluency as prototypicality (the previous study's approach): fit a Gaussian to the
responses of a reference set after PCA, and score each image by the log-likelihood of its
response. Per layer:

1. the response is average-pooled to at most ``max_features`` values (C × g × g) so that a
   whole set fits in memory (N × ``max_features`` floats);
2. PCA on the reference responses keeps ``dims`` components (at most n − 1);
3. the Gaussian is the PCA one (mean, component variances λ_j + ``eps``·mean(λ)), and
   typicality(x) = −½ Σ_j (p_j²/λ_j + log 2πλ_j), p = Vᵀ(x − mean).

The reference is the stimulus set itself (default) or another folder (``reference``);
with ``groups`` (a table with ``id_column`` and ``group_columns``, e.g. the ratings table
with face_sex, face_eth) one Gaussian is fitted per group and each image is scored under
its own group's. The fitted state is saved with the run (``state/<checkpoint>/typicality.pt``)
and ``fit = PATH`` reuses it instead of fitting. Higher = more typical = more fluent.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fluency import FluencyMetric, MetricBatch, MetricSpec, MetricValues, Option, hookimpl
from fluency.api import FluencyError


def pooled(a: torch.Tensor, max_features: int) -> torch.Tensor:
    """B×F features: spatial maps average-pooled so that C·g·g ≤ ``max_features``."""
    if a.dim() == 4:
        c, h = a.shape[1], a.shape[2]
        g = max(1, min(h, int(math.sqrt(max_features / c))))
        a = F.adaptive_avg_pool2d(a, g)
    return a.flatten(1).double()


def fit_gaussian(x: np.ndarray, dims: int, eps: float) -> dict[str, np.ndarray]:
    """PCA Gaussian of the rows of ``x``: mean, components (F×k), variances (k)."""
    n = x.shape[0]
    if n < 3:
        raise FluencyError(f"typicality: {n} reference images are too few to fit a Gaussian (need ≥ 3)")
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = max(1, min(dims, n - 1, vt.shape[0]))
    var = s[:k] ** 2 / (n - 1)
    var = var + eps * max(var.mean(), 1e-12)
    return {"mean": mean, "components": vt[:k].T, "variances": var}


def log_likelihood(x: np.ndarray, g: dict[str, np.ndarray]) -> np.ndarray:
    p = (x - g["mean"]) @ g["components"]
    return -0.5 * ((p ** 2 / g["variances"]).sum(1) + np.log(2 * np.pi * g["variances"]).sum())


def load_fit(path: str | Path) -> dict[str, Any]:
    """A fit saved by an earlier run, read without unpickling code (``weights_only``) and checked: ``{"layers":
    {layer: {group: {"mean": F, "components": F×k, "variances": k positive}}}}`` float tensors. Anything else
    is one line naming the file."""
    path = Path(path)
    where = f"typicality: fit {path}"
    if not path.is_file():
        raise FluencyError(f"{where}: no such file (give the state/<checkpoint>/typicality.pt of an earlier run)")
    try:
        with warnings.catch_warnings():  # torch's notes on unusual pickles: the error below says enough
            warnings.simplefilter("ignore", UserWarning)
            fitted = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types; its message suggests unsafe loading, so it is not repeated
        raise FluencyError(f"{where}: not a fit saved by fluency, or not safely loadable ({type(exc).__name__})") \
            from None
    layers = fitted.get("layers") if isinstance(fitted, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise FluencyError(f"{where}: not a typicality fit (no 'layers' table)")
    for layer, groups in layers.items():
        for group, g in (groups.items() if isinstance(groups, dict) and groups else [(None, groups)]):
            if not _valid_gaussian(g):
                raise FluencyError(f"{where}: layer {layer!r} group {group!r} is not a Gaussian fit (needs float "
                                   "tensors mean F, components F×k and positive finite variances k)")
    return fitted


def _valid_gaussian(g: Any) -> bool:
    if not isinstance(g, dict) or not all(isinstance(g.get(k), torch.Tensor) and g[k].is_floating_point()
                                          for k in ("mean", "components", "variances")):
        return False
    mean, components, variances = g["mean"], g["components"], g["variances"]
    return (mean.dim() == 1 and components.dim() == 2 and variances.dim() == 1
            and components.shape == (mean.shape[0], variances.shape[0]) and variances.shape[0] > 0
            and bool(torch.isfinite(mean).all() and torch.isfinite(components).all())
            and bool(torch.isfinite(variances).all() and (variances > 0).all()))


class Typicality(FluencyMetric):

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._ids: list[str] = []
        self._feats: dict[str, list[np.ndarray]] = {}
        self._model: Any = None
        self._fitted: dict[str, Any] | None = None

    def layers(self, model: Any) -> list[str]:
        chosen = self.options.get("layers")
        return list(chosen) if chosen else [list(model.default_metric_layers)[-1]]

    def compute(self, batch: MetricBatch) -> list[MetricValues]:
        if self.options.get("reference") and batch.model is None:  # say so now, not after the whole store
            raise FluencyError("typicality: the 'reference' option needs the model to measure the reference "
                               "images; measuring a store has none: use `fluency run` with the checkpoint, or pass "
                               "a saved 'fit'")
        self._model = batch.model
        self._ids.extend(map(str, batch.image_ids))
        for name in self.batch_layers(batch):
            feats = pooled(batch.activations[name], int(self.options.get("max_features", 2048)))
            self._feats.setdefault(name, []).append(feats.cpu().numpy())
        return []

    def _groups(self, ids: list[str]) -> list[str]:
        table_path = self.options.get("groups")
        if not table_path:
            return ["all"] * len(ids)
        from fluency.api import read_table

        columns = list(self.options.get("group_columns") or [])
        id_col = self.options.get("id_column", "image_id")
        table = read_table(table_path)
        missing = [c for c in [id_col, *columns] if c not in table.columns]
        if missing or not columns:
            raise FluencyError(f"typicality: groups table {table_path} needs columns {[id_col, *columns]} "
                               f"(missing {missing or 'group_columns'})")
        label = table[columns].astype(str).agg("×".join, axis=1)
        lookup = dict(zip(table[id_col].astype(str).str.strip(), label))
        unknown = [i for i in ids if i not in lookup]
        if unknown:
            raise FluencyError(f"typicality: images without a group in {table_path}: {unknown[:10]}")
        return [lookup[i] for i in ids]

    def _reference(self, layer_names: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
        folder = self.options.get("reference")
        if not folder:
            return self._ids, {k: np.concatenate(v) for k, v in self._feats.items()}
        from fluency.api import capture_activations
        from fluency.api import FolderSource, Preprocessing, find_images, iter_batches

        model, root = self._model, Path(folder)  # compute() refused a batch without a model already
        channels, size, _ = model.input_shape
        files = find_images(root)
        source = FolderSource(root, {p.relative_to(root).with_suffix("").as_posix(): p for p in files},
                              Preprocessing(size, channels))
        if size is None:  # a model at native size: the reference images, too, must be of one size
            source.check_one_size()
        device = next(model.parameters()).device
        ids, feats = [], {k: [] for k in layer_names}
        for batch_ids, x in iter_batches(source, 32):
            with torch.no_grad(), capture_activations(model, layer_names) as acts:
                model(x.to(device), sample=False)
            ids += batch_ids
            for k in layer_names:
                feats[k].append(pooled(acts[k], int(self.options.get("max_features", 2048))).cpu().numpy())
        return ids, {k: np.concatenate(v) for k, v in feats.items()}

    def finish(self) -> list[tuple[list[str], MetricValues]]:
        if not self._ids:
            return []
        layer_names = list(self._feats)
        if self.options.get("fit"):
            self._fitted = load_fit(self.options["fit"])
        else:
            ref_ids, ref = self._reference(layer_names)
            ref_groups = self._groups(ref_ids)
            self._fitted = {"layers": {}}
            for layer in layer_names:
                per_group = {}
                for group in sorted(set(ref_groups)):
                    rows = [i for i, g in enumerate(ref_groups) if g == group]
                    fit = fit_gaussian(ref[layer][rows], int(self.options.get("dims", 10)),
                                       float(self.options.get("eps", 1e-3)))
                    per_group[group] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in fit.items()}
                self._fitted["layers"][layer] = per_group
        groups = self._groups(self._ids)
        out = []
        for layer in layer_names:
            x = np.concatenate(self._feats[layer])
            fits = self._fitted["layers"].get(layer)
            if fits is None:
                raise FluencyError(f"typicality: the saved fit has no layer {layer!r}")
            wrong = sorted({int(g["mean"].shape[0]) for g in fits.values()} - {x.shape[1]})
            if wrong:
                raise FluencyError(f"typicality: the fit of layer {layer!r} has {wrong[0]} features, the responses "
                                   f"{x.shape[1]} (fitted with another model or max_features?)")
            values = np.empty(len(x))
            for group in set(groups):
                if group not in fits:
                    raise FluencyError(f"typicality: no fitted Gaussian for group {group!r}")
                rows = [i for i, g in enumerate(groups) if g == group]
                g = {k: v.numpy() for k, v in fits[group].items()}
                values[rows] = log_likelihood(x[rows], g)
            out.append((list(self._ids), MetricValues("typicality", values, layer)))
        return out

    def state(self) -> dict[str, Any] | None:
        """The fitted Gaussians (tensors), saved with the run for reuse via ``fit``."""
        return self._fitted


@hookimpl
def fluency_register_metrics() -> list[MetricSpec]:
    return [MetricSpec(
        name="typicality", factory=Typicality, needs="activations", higher_is_more_fluent=True,
        description="Log-likelihood of an image's layer response under a PCA Gaussian of a reference set.",
        options={"layers": Option("list[str]", None, "layers (default: the last encoder block)"),
                 "dims": Option("int", 10, "PCA components kept (at most n − 1)", minimum=1),
                 "max_features": Option("int", 2048, "pool each response to at most this many values", minimum=1),
                 "eps": Option("float", 1e-3, "variance floor, as a fraction of the mean variance", minimum=0.0),
                 "reference": Option("str", None, "folder of reference images (default: the stimulus set)"),
                 "groups": Option("str", None, "table (CSV/Parquet) assigning each image to a group"),
                 "group_columns": Option("list[str]", None, "columns of `groups` that define a group"),
                 "id_column": Option("str", "image_id", "id column of `groups`"),
                 "fit": Option("str", None, "reuse a fit saved by an earlier run (state/<checkpoint>/typicality.pt)")})]
