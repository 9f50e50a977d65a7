"""Contract tests for fluency plugins: ready checks a plugin's own pytest suite calls in a few lines.

::

    # tests/test_contract.py of a plugin package
    import fluency_mi.plugin
    from fluency.testing import check_plugin, check_registration

    def test_every_spec_meets_fluencys_contract():
        for spec in check_registration(fluency_mi.plugin):   # registers, checks names and options
            check_plugin(spec)                              # the contract of its kind

Each check runs the plugin the way fluency does, on small deterministic inputs (synthetic
32×32 images, a tiny ``vae-small``, a 30-image metric table), and raises :class:`AssertionError` with
one message naming the plugin and what broke; it returns what it computed, for further assertions.
Options are given as a mapping (``check_metric(spec, {"steps": 5})``), so that a plugin option may
have any name. What each kind must do:

- every spec: a valid name and a loadable factory; option defaults pass their own declaration; a
  wrong-typed or unknown option is refused with :class:`fluency.api.OptionError`;
- metric: one finite-or-NaN value per image for every ``(metric, layer)`` it returns; the same values
  for batch sizes 7 and 1 (values from ``finish()`` included), twice for one seed, and from a live
  capture and from an activation store (``needs="model"`` metrics: live only); no hook, weight,
  buffer or mode of the model changed, and neither the activations nor the images;
- analysis: a DataFrame with :data:`fluency.api.RESULT_COLUMNS`, its rows named after the analysis,
  ``p`` in [0, 1] or NaN, the same table twice, the input left as it was;
- constraint: declared layers that the model has; a finite scalar penalty, computed from those layers
  alone, the same twice, whose gradient reaches the model's weights; no hook left;
- optimizer: a ``torch.optim.Optimizer`` that steps with a closure, lowers a quadratic and reloads
  its ``state_dict``;
- architecture: a :class:`fluency.api.FluencyModel` of a known ``kind`` providing known capabilities;
  it runs forward with ``sample=False`` deterministically, every hookable layer gives a tensor with
  the batch first, ``default_metric_layers`` are hookable, no hook is left; and what it ``provides``
  works: ``latent`` (one code per image, ``latent_code`` agreeing), ``decoder`` (reconstructions of the
  image's shape in [0, 1]), ``inverse`` (gives the images back), ``objective`` (finite per-image terms
  with ``loss``, which backpropagates to the weights).

Metric, constraint and architecture checks run on the CPU whatever the machine has, and restore the
caller's torch and numpy random state.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from fluency.api import (CAPABILITIES, RESULT_COLUMNS, ActivationStore, AnalysisData, AnalysisSpec, ArchitectureSpec,
                         ConstraintSpec, FluencyError, FluencyModel, MetricBatch, MetricSpec, MetricValues,
                         ModelDescription, ObjectiveSettings, OptimizerSpec, OptionError, capture_activations,
                         get_plugin_manager)

T = TypeVar("T")
#: ``(metric, layer)``: one entry of a metric's results
Key = tuple[str, str | None]
#: a spec of any kind
Spec = ArchitectureSpec | ConstraintSpec | OptimizerSpec | MetricSpec | AnalysisSpec

#: the tolerance of "the same values" (batch sizes, seeds, live and store)
RTOL, ATOL = 1e-5, 1e-6
#: the kinds of model an architecture may build
MODEL_KINDS = ("vae", "flow", "encoder")
#: side of the synthetic images
IMAGE_SIZE = 32
#: options of the tiny ``vae-small`` the checks run (CBAM attention after enc3, so attention plugins work too)
TINY_VAE_SMALL: dict[str, Any] = {"image_size": IMAGE_SIZE, "latent_dim": 8, "channels": [8, 8, 16, 16, 16],
                                  "decoder_channels": [16, 8, 8, 8, 8], "attention": ["enc3"]}

__all__ = [
    "ATOL", "IMAGE_SIZE", "MODEL_KINDS", "RTOL", "TINY_VAE_SMALL",
    "check_analysis", "check_architecture", "check_constraint", "check_metric", "check_optimizer",
    "check_options", "check_plugin", "check_registration",
    "synthetic_analysis_data", "synthetic_images", "tiny_model",
]


# -- inputs -------------------------------------------------------------------------------------


def synthetic_images(n: int = 14, size: int = IMAGE_SIZE, channels: int = 3,
                     seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """``(ids, images)``: ``n`` smooth seeded images ``n×channels×size×size`` in [0, 1], ids ``img000``….

    Smooth (upsampled 8×8 noise plus a gradient) rather than white noise, so that image statistics and
    reconstructions behave as on real pictures; the same seed always gives the same images.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 8, 8, generator=generator)
    images = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size) * torch.rand(n, 1, 1, 1, generator=generator)
    images = (0.8 * images + 0.2 * ramp).clamp(0, 1)
    return [f"img{i:03d}" for i in range(n)], images.contiguous()


def tiny_model(architecture: str = "vae-small", options: Mapping[str, Any] | None = None,
               seed: int = 0) -> FluencyModel:
    """A small, seeded, untrained model of a registered ``architecture`` in eval mode on the CPU.

    For ``vae-small`` the options default to :data:`TINY_VAE_SMALL` (32×32 images, a few channels, one
    attention layer): a forward pass takes milliseconds, so metric checks can run it many times.
    """
    spec = get_plugin_manager().get("architecture", architecture)
    chosen = dict(TINY_VAE_SMALL if options is None and architecture == "vae-small" else options or {})
    with _seeded(seed):
        model = spec.load()(**spec.resolve(chosen))
    return model.eval()


def synthetic_analysis_data(n_images: int = 30, metrics: Sequence[str] = ("metric-a", "metric-b"),
                            layers: Sequence[str | None] = ("enc1", "enc2"), checkpoints: Sequence[str] = ("default",),
                            seed: int = 0) -> AnalysisData:
    """A seeded metric table (every image × checkpoint × metric × layer) with ratings, as analyses get it.

    The ratings table has ``image_id``, ``rating`` (the rating column), a numeric ``covariate`` and a
    two-level ``group``, for analyses whose options name covariates or groups; values correlate
    moderately with the rating, so tests have something to find.
    """
    rng = np.random.default_rng(seed)
    ids = [f"img{i:03d}" for i in range(n_images)]
    rating = rng.normal(size=n_images)
    frames = [pd.DataFrame({"image_id": ids, "checkpoint": checkpoint, "metric": metric, "layer": layer,
                            "value": 0.5 * rating + rng.normal(size=n_images)})
              for checkpoint in checkpoints for metric in metrics for layer in layers]
    ratings = pd.DataFrame({"image_id": ids, "rating": rating, "covariate": rng.normal(size=n_images),
                            "group": ["a" if i % 2 else "b" for i in range(n_images)]})
    return AnalysisData(pd.concat(frames, ignore_index=True), ratings, "rating")


# -- every spec -------------------------------------------------------------------------------


def check_registration(plugin: object, name: str | None = None) -> list[Spec]:
    """Register ``plugin`` (a module or an object with ``fluency_register_*`` hooks) in a fresh plugin manager
    with the built-ins, assert that it registers at least one spec and none is broken (hook errors, malformed
    specs, invalid names or option defaults, a name clash with a built-in), check each spec's options
    (:func:`check_options`) and return its specs.

    A built-in plugin module is checked as the manager loaded it.
    """
    from fluency.core.plugin.manager import PluginManager  # internal: a fresh manager, not the process-wide one

    label = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    manager = PluginManager(autoload=False, strict=False, blocked=())
    own = [r for r in manager.records if r.plugin == label]
    if not own:
        before = len(manager.records)
        manager.register(plugin, label, package=f"<{label}>", version="test")
        own = manager.records[before:]
    broken = [r for r in own if r.status != "ok"]
    if broken:
        raise AssertionError(f"plugin {label!r} did not register: "
                             + "; ".join(f"{r.kind or 'plugin'} {r.name!r}: {r.error}" for r in broken))
    specs = [r.spec for r in own]
    if not specs:
        raise AssertionError(f"plugin {label!r} registered no spec: does it have @hookimpl functions named "
                             "fluency_register_metrics (…_architectures, _constraints, _optimizers, _analyses)?")
    for spec in specs:
        check_options(spec)
    return specs


#: the side of the synthetic images given to a model that takes images at their own size
NATIVE_PROBE = 64

#: a value of the wrong type for each option type (a string for a list would be parsed as a list)
_WRONG = {"int": "not-an-int", "float": "not-a-float", "bool": "not-a-bool", "str": 12345,
          "int|str": {"not": "a number or a word"},
          "list[str]": {"not": "a list"}, "list[int]": {"not": "a list"}, "list[float]": {"not": "a list"}}


def check_options(spec: Spec) -> dict[str, Any]:
    """Assert that the spec is well formed (:meth:`PluginSpec.check`), its factory loads, its defaults
    resolve, and every option refuses a wrong-typed value, as an unknown option is refused, with
    :class:`OptionError`. Returns the resolved defaults."""
    try:
        spec.check()
    except ValueError as exc:
        raise _fail(spec, f"malformed spec: {exc}") from None
    factory = _call(spec, "loading its factory", spec.load)
    if not callable(factory):
        raise _fail(spec, f"its factory {spec.factory!r} is not callable")
    defaults = _call(spec, "resolving its default options", spec.resolve)
    for key, opt in spec.options.items():
        _refused(spec, {key: _WRONG[opt.type]}, f"option {key!r} ({opt.type}) given {_WRONG[opt.type]!r}")
    _refused(spec, {"no_such_option_for_fluency_testing": 1}, "an unknown option")
    return defaults


def _refused(spec: Spec, options: Mapping[str, Any], label: str) -> None:
    """Assert that resolving ``options`` raises :class:`OptionError`."""
    try:
        spec.resolve(options)
    except OptionError:
        return
    except Exception as exc:
        raise _fail(spec, f"{label} raised {type(exc).__name__} instead of OptionError: {exc}") from exc
    raise _fail(spec, f"{label} was accepted; a bad option value must raise OptionError")


def check_plugin(spec: Spec, options: Mapping[str, Any] | None = None, **settings: Any) -> Any:
    """The check of the spec's kind (:func:`check_metric`, :func:`check_analysis`, …) with ``options`` and the
    check's own keyword ``settings``; returns what that check returns."""
    checks: dict[str, Callable[..., Any]] = {"metric": check_metric, "analysis": check_analysis,
                                             "constraint": check_constraint, "optimizer": check_optimizer,
                                             "architecture": check_architecture}
    kind = getattr(spec, "kind", None)
    if kind not in checks:
        raise AssertionError(f"{spec!r} is not a fluency spec (kind {kind!r}; expected one of {sorted(checks)})")
    return checks[kind](spec, options, **settings)


# -- metrics --------------------------------------------------------------------------------------


def check_metric(spec: MetricSpec, options: Mapping[str, Any] | None = None, *, n_images: int = 14,
                 batch_sizes: tuple[int, int] = (7, 1), seed: int = 0, model: FluencyModel | None = None,
                 architecture: str | None = None, rtol: float = RTOL, atol: float = ATOL
                 ) -> dict[Key, np.ndarray]:
    """Run a metric as ``fluency run`` and ``fluency measure`` do and assert its contract (module docstring).

    ``model`` (default: :func:`tiny_model`) produces the activations; its images are
    :func:`synthetic_images`. Passes, each with a fresh metric: the live capture at ``batch_sizes[0]``
    twice (determinism), at ``batch_sizes[1]`` (stream independence), then the same activations written
    to a float32 activation store and read back (not for ``needs="model"``). The activations are captured
    once and re-batched, so that a difference comes from the metric, not from float noise in the model.
    Returns ``{(metric, layer): values}`` in image order.
    """
    _is(spec, MetricSpec)
    check_options(spec)
    resolved = _call(spec, "resolving the options", lambda: spec.resolve(dict(options or {})))
    if model is None:
        model, architecture = tiny_model(), architecture or "vae-small"
    model = model.eval()
    description = ModelDescription.of(model, architecture or type(model).__name__)
    _has_capabilities(spec, model)
    ids, images = synthetic_images(n_images, int(model.input_shape[1] or NATIVE_PROBE), int(model.input_shape[0]),
                                   seed)
    layers = _metric_layers(spec, resolved, description) if spec.reads_activations else []
    acts = _capture(spec, model, layers, images, batch_sizes[0])
    live = _LiveSource(spec, model, description, ids, images, acts, seed)
    guard = _Unchanged(model, images, acts)
    reference_size, other_size = batch_sizes
    live_at = {size: f"the live source, batch size {size}" for size in batch_sizes}
    first = _metric_pass(spec, resolved, live.batches(reference_size), ids, live_at[reference_size], seed)
    guard.check(spec, live_at[reference_size])
    again = _metric_pass(spec, resolved, live.batches(reference_size), ids, live_at[reference_size], seed)
    guard.check(spec, live_at[reference_size])
    _same(spec, first, again, ids, "a first run", "a second run with the same seed", rtol, atol,
          "a metric must be deterministic for a given seed (MetricBatch.seed)")
    other = _metric_pass(spec, resolved, live.batches(other_size), ids, live_at[other_size], seed)
    guard.check(spec, live_at[other_size])
    _same(spec, first, other, ids, f"batch size {reference_size}", f"batch size {other_size}", rtol, atol,
          "a metric must give each image the same value whatever the batch size (draw random numbers with "
          "fluency.api.per_image_noise, not from a batch-wide generator)")
    if spec.needs != "model":
        with tempfile.TemporaryDirectory(prefix="fluency-testing-") as tmp:
            store = _write_store(Path(tmp) / "store", ids, acts, description, reference_size)
            given = images if spec.needs == "images" else None  # fluency measure --images
            stored = _metric_pass(spec, resolved, _store_batches(store, ids, layers, given, seed, reference_size), ids,
                                  f"the activation store, batch size {reference_size}", seed)
        _same(spec, first, stored, ids, "the live capture", "the activation store", rtol, atol,
              "a metric must read only MetricBatch.activations/description (and images for needs='images'): a "
              "store batch has no model, no images and no loss")
    return {key: np.array([first[key][i] for i in ids]) for key in first}


def _metric_layers(spec: MetricSpec, options: Mapping[str, Any], description: ModelDescription) -> list[str]:
    metric = _call(spec, "building it", lambda: spec.load()(**options))
    layers = _call(spec, "layers(description)", lambda: metric.layers(description))
    if not isinstance(layers, (list, tuple)) or not all(isinstance(n, str) for n in layers):
        raise _fail(spec, f"layers() returned {layers!r}, expected a list of layer names")
    return list(layers)


def _has_capabilities(spec: MetricSpec, model: FluencyModel) -> None:
    missing = [c for c in spec.requires if c not in model.provides]
    if missing:
        raise _fail(spec, f"requires {missing}, which the test model {type(model).__name__} does not provide; pass "
                          "check_metric(..., model=) a model that does")


def _capture(spec: MetricSpec, model: FluencyModel, layers: Sequence[str], images: torch.Tensor,
             batch_size: int) -> dict[str, torch.Tensor]:
    """The named layers' float32 activations of every image, captured batch by batch as a run does."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    if not layers:
        return {}
    try:
        for start in range(0, len(images), batch_size):
            with torch.no_grad(), capture_activations(model, layers) as captured:
                model(images[start:start + batch_size], sample=False)
            for name in layers:
                parts[name].append(captured[name].float())
    except FluencyError as exc:
        raise _fail(spec, f"its layers {list(layers)} cannot be captured from the test model: {exc}") from None
    missing = [name for name in layers if len(parts[name]) != -(-len(images) // batch_size)]
    if missing:
        raise _fail(spec, f"layers {missing} gave no tensor in a forward pass of the test model")
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


@dataclasses.dataclass
class _LiveSource:
    """Batches as ``fluency run`` gives them: images, the captured layers, the model (eval), the seed, the
    description, and the checkpoint loss for ``needs="model"`` metrics only."""

    spec: MetricSpec
    model: FluencyModel
    description: ModelDescription
    ids: list[str]
    images: torch.Tensor
    acts: dict[str, torch.Tensor]
    seed: int

    def batches(self, size: int) -> Iterator[MetricBatch]:
        loss = _checkpoint_loss(self.model) if self.spec.needs == "model" else None
        for start in range(0, len(self.ids), size):
            part = slice(start, start + size)
            yield MetricBatch(self.ids[part], self.images[part], {k: v[part] for k, v in self.acts.items()},
                              self.model, loss, self.seed, self.description)


def _checkpoint_loss(model: FluencyModel) -> Any:
    """``MetricBatch.loss`` of a checkpoint trained with the default settings (a VAE: L2 + KL, β = 1)."""
    from fluency.core.model.losses import loss_from_config  # internal: how a run builds MetricBatch.loss

    return loss_from_config(model, {})


def _write_store(path: Path, ids: list[str], acts: Mapping[str, torch.Tensor], description: ModelDescription,
                 batch_size: int) -> ActivationStore:
    """The activations in a float32 activation store (bit-identical), written batch by batch, opened."""
    from fluency.core.run.store import ActivationStoreWriter  # internal: the store writer

    with ActivationStoreWriter(path, dtype="float32", provenance={"source": "fluency.testing"},
                               model=description) as writer:
        for start in range(0, len(ids), batch_size):
            for name, values in acts.items():
                writer.write(name, ids[start:start + batch_size], values[start:start + batch_size])
    return ActivationStore(path)


def _store_batches(store: ActivationStore, ids: list[str], layers: Sequence[str], images: torch.Tensor | None,
                   seed: int, size: int) -> Iterator[MetricBatch]:
    """Batches as ``fluency measure`` gives them: the store's layers and description (the run's ``ids`` when the
    metric reads no layer), images for image metrics (``--images``), no model and no loss."""
    description = store.description
    if layers:
        batches: Iterable[MetricBatch] = store.metric_batches(list(layers), size)
    else:
        batches = (MetricBatch(ids[s:s + size], description=description) for s in range(0, len(ids), size))
    start = 0
    for batch in batches:
        n = len(batch.image_ids)
        yield MetricBatch(batch.image_ids, None if images is None else images[start:start + n], batch.activations,
                          seed=seed, description=description)
        start += n


def _metric_pass(spec: MetricSpec, options: Mapping[str, Any], batches: Iterable[MetricBatch], ids: Sequence[str],
                 where: str, seed: int) -> dict[Key, dict[str, float]]:
    """A fresh metric over ``batches`` then ``finish()``: ``{(metric, layer): {image id: value}}``, checked."""
    values: dict[Key, dict[str, float]] = {}
    with _seeded(seed):
        metric = _call(spec, "building it", lambda: spec.load()(**options))
        for batch in batches:
            returned = _call(spec, f"compute() ({where})", lambda b=batch: metric.compute(b))
            _collect(spec, values, returned, list(batch.image_ids), f"compute() ({where})")
        finished = _call(spec, f"finish() ({where})", metric.finish)
        _collect_pairs(spec, values, finished, f"finish() ({where})")
    for (name, layer), got in values.items():
        missing = [i for i in ids if i not in got]
        if missing:
            raise _fail(spec, f"{where}: no value of {name!r} (layer {layer!r}) for images {missing[:5]}; give one "
                              "value per image for every (metric, layer) returned")
    if not values:
        raise _fail(spec, f"{where}: returned no values at all from compute() or finish()")
    return values


def _collect(spec: MetricSpec, values: dict[Key, dict[str, float]], returned: Any, ids: list[str],
             call: str) -> None:
    if not isinstance(returned, (list, tuple)):
        raise _fail(spec, f"{call} returned {type(returned).__name__}, expected a list of MetricValues")
    for item in returned:
        _add(spec, values, item, ids, call)


def _collect_pairs(spec: MetricSpec, values: dict[Key, dict[str, float]], returned: Any, call: str) -> None:
    if not isinstance(returned, (list, tuple)):
        raise _fail(spec, f"{call} returned {type(returned).__name__}, expected a list of (image_ids, MetricValues)")
    for pair in returned:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _fail(spec, f"{call} returned {pair!r:.80} in its list, expected (image_ids, MetricValues) pairs")
        _add(spec, values, pair[1], [str(i) for i in pair[0]], call)


def _add(spec: MetricSpec, values: dict[Key, dict[str, float]], item: Any, ids: list[str], call: str) -> None:
    if not isinstance(item, MetricValues):
        raise _fail(spec, f"{call} returned a {type(item).__name__} in its list, expected MetricValues")
    try:
        numbers = item.as_numpy()
    except (TypeError, ValueError) as exc:
        raise _fail(spec, f"{call}: the values of {item.metric!r} are not numbers ({exc})") from None
    where = f"{item.metric!r} (layer {item.layer!r})"
    if len(numbers) != len(ids):
        raise _fail(spec, f"{call} gave {len(numbers)} values of {where} for {len(ids)} images; give one value per "
                          "image")
    if np.isinf(numbers).any():
        bad = [i for i, v in zip(ids, numbers) if np.isinf(v)]
        raise _fail(spec, f"{call} gave infinite values of {where} for images {bad[:5]}; values must be finite "
                          "(or NaN where undefined)")
    slot = values.setdefault((item.metric, item.layer), {})
    twice = [i for i in ids if i in slot]
    if twice:
        raise _fail(spec, f"{call} gave images {twice[:5]} a second value of {where}")
    slot.update(zip(ids, numbers.tolist()))


def _same(spec: MetricSpec, a: Mapping[Key, Mapping[str, float]], b: Mapping[Key, Mapping[str, float]],
          ids: Sequence[str], first: str, second: str, rtol: float, atol: float, why: str) -> None:
    """Assert two passes gave the same entries and values (NaN where the other has NaN)."""
    if set(a) != set(b):
        raise _fail(spec, f"returned {sorted(a, key=str)} with {first} but {sorted(b, key=str)} with {second}; {why}")
    for key in a:
        x = np.array([a[key][i] for i in ids])
        y = np.array([b[key][i] for i in ids])
        close = np.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
        if not close.all():
            k = int(np.argmin(close))
            raise _fail(spec, f"values of {key[0]!r} (layer {key[1]!r}) differ between {first} and {second}: image "
                              f"{ids[k]} {float(x[k])!r} vs {float(y[k])!r} ({int((~close).sum())} of {len(ids)} "
                              f"images differ beyond rtol={rtol}, atol={atol}); {why}")


class _Unchanged:
    """What a metric must leave as it found it: the model's hooks, weights, buffers, requires_grad and mode, and
    the images and activations it was given."""

    def __init__(self, model: FluencyModel, images: torch.Tensor, acts: Mapping[str, torch.Tensor]) -> None:
        self.model = model
        self.hooks = _hooks(model)
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.grads = {n: p.requires_grad for n, p in model.named_parameters()}
        self.training = model.training
        self.inputs = {"the images": (images, images.clone()),
                       **{f"the activations of {k!r}": (v, v.clone()) for k, v in acts.items()}}

    def check(self, spec: Any, where: str) -> None:
        left = _hook_changes(self.hooks, _hooks(self.model))
        if left:
            raise _fail(spec, f"{where}: hooks changed on the model ({'; '.join(left[:3])}); remove every hook you "
                              "add (use fluency.api.capture_activations or a try/finally)")
        now = self.model.state_dict(keep_vars=True)
        changed = [k for k, v in self.state.items() if k not in now or not torch.equal(v, now[k].detach())]
        if changed:
            raise _fail(spec, f"{where}: changed the model's weights or buffers {changed[:3]}; restore them exactly")
        flags = [n for n, p in self.model.named_parameters() if self.grads.get(n) != p.requires_grad]
        if flags:
            raise _fail(spec, f"{where}: changed requires_grad of {flags[:3]}; restore it")
        if self.model.training != self.training:
            raise _fail(spec, f"{where}: left the model in {'train' if self.model.training else 'eval'} mode")
        for what, (tensor, saved) in self.inputs.items():
            if not torch.equal(tensor, saved):
                raise _fail(spec, f"{where}: modified {what} in place; treat MetricBatch as read-only")


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooks(model: nn.Module) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The ids of every hook on every module of ``model`` (and torch's global module hooks)."""
    from torch.nn.modules import module as torch_module

    found = {name or "<model>": tuple(tuple(getattr(m, attr, {}).keys()) for attr in _HOOK_DICTS)
             for name, m in model.named_modules()}
    found["<global module hooks>"] = tuple(tuple(getattr(torch_module, f"_global{attr}", {}).keys())
                                           for attr in _HOOK_DICTS)
    return found


def _hook_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    out = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old != new:
            kinds = [attr.strip("_").replace("_", " ") for attr, o, n in zip(_HOOK_DICTS, old or ((),) * 4,
                                                                              new or ((),) * 4) if o != n]
            out.append(f"{', '.join(kinds) or 'hooks'} on {name!r}")
    return out


# -- analyses -------------------------------------------------------------------------------------


def check_analysis(spec: AnalysisSpec, options: Mapping[str, Any] | None = None, *,
                   data: AnalysisData | None = None) -> pd.DataFrame:
    """Run an analysis twice on ``data`` (default: :func:`synthetic_analysis_data`) and assert its contract;
    returns the result table."""
    _is(spec, AnalysisSpec)
    check_options(spec)
    resolved = _call(spec, "resolving the options", lambda: spec.resolve(dict(options or {})))
    data = data if data is not None else synthetic_analysis_data()
    pristine = copy.deepcopy(data)
    first = _run_analysis(spec, resolved, data)
    for attr in ("metrics", "ratings"):
        if not getattr(data, attr).equals(getattr(pristine, attr)):
            raise _fail(spec, f"run() modified the input's {attr} table; copy it before changing it")
    if not isinstance(first, pd.DataFrame):
        raise _fail(spec, f"run() returned {type(first).__name__}, expected a pandas DataFrame")
    missing = [c for c in RESULT_COLUMNS if c not in first.columns]
    if missing:
        raise _fail(spec, f"the result lacks the columns {missing}; every analysis has {list(RESULT_COLUMNS)}")
    if first.empty:
        raise _fail(spec, "the result has no rows on a 30-image table of 2 metrics × 2 layers")
    names = sorted(set(map(str, first["analysis"])) - {spec.name})
    if names:
        raise _fail(spec, f"rows have analysis {names}; name every row after the analysis ({spec.name!r})")
    n = pd.to_numeric(first["n"], errors="coerce")
    if ((first["n"].notna() & n.isna()) | (n < 0)).any():
        raise _fail(spec, f"n {list(first['n'][(first['n'].notna() & n.isna()) | (n < 0)][:3])} are not counts of "
                          "images")
    p = pd.to_numeric(first["p"], errors="coerce")
    bad = first["p"][(first["p"].notna() & p.isna()) | (p < 0) | (p > 1)]
    if len(bad):
        raise _fail(spec, f"p values {list(bad[:3])} are not probabilities in [0, 1] (or NaN)")
    second = _run_analysis(spec, resolved, copy.deepcopy(pristine))
    try:
        pd.testing.assert_frame_equal(first, second)
    except AssertionError as exc:
        raise _fail(spec, f"two runs on the same data differ (seed every random draw): {' '.join(str(exc).split())}")
    return first


def _run_analysis(spec: AnalysisSpec, options: Mapping[str, Any], data: AnalysisData) -> Any:
    analysis = _call(spec, "building it", lambda: spec.load()(**options))
    with _seeded(0):
        return _call(spec, "run()", lambda: analysis.run(data))


# -- constraints ----------------------------------------------------------------------------------


def check_constraint(spec: ConstraintSpec, options: Mapping[str, Any] | None = None, *,
                     model: FluencyModel | None = None, n_images: int = 4) -> float:
    """Compute a constraint's penalty on ``model`` (default: :func:`tiny_model`) in train mode from the layers it
    declares, as training does, and assert its contract; returns the penalty's value."""
    _is(spec, ConstraintSpec)
    check_options(spec)
    resolved = _call(spec, "resolving the options", lambda: spec.resolve(dict(options or {})))
    model = model if model is not None else tiny_model()
    was_training = model.training
    try:
        return _check_penalty(spec, resolved, model.train(), n_images)
    finally:
        model.train(was_training)


def _check_penalty(spec: ConstraintSpec, options: Mapping[str, Any], model: FluencyModel, n_images: int) -> float:
    constraint = _call(spec, "building it", lambda: spec.load()(**options))
    layers = _call(spec, "layers(model)", lambda: constraint.layers(model))
    available = list(model.hookable_layers())
    if not isinstance(layers, (list, tuple)) or not layers or not all(n in available for n in layers):
        raise _fail(spec, f"layers(model) returned {layers!r}: name one or more of the model's layers {available}")
    _, images = synthetic_images(n_images, int(model.input_shape[1] or NATIVE_PROBE), int(model.input_shape[0]))
    hooks = _hooks(model)
    first = _penalty(spec, constraint, model, list(layers), images).detach()
    second = _penalty(spec, constraint, model, list(layers), images)
    left = _hook_changes(hooks, _hooks(model))
    if left:
        raise _fail(spec, f"hooks changed on the model ({'; '.join(left[:3])})")
    if not torch.allclose(first, second.detach(), rtol=RTOL, atol=ATOL):
        raise _fail(spec, f"two penalties of the same batch differ: {float(first)} vs {float(second.detach())}")
    model.zero_grad(set_to_none=True)
    _call(spec, "backward() through the penalty", second.backward)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    weight = options.get("weight", 1.0)
    if not grads or ((weight is None or float(weight) != 0) and not any(bool(g.any()) for g in grads)):
        raise _fail(spec, "the penalty's gradient does not reach the model's weights (all zero or none)")
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        raise _fail(spec, "the penalty's gradient has NaN or infinite values")
    model.zero_grad(set_to_none=True)
    return float(first)


def _penalty(spec: ConstraintSpec, constraint: Any, model: FluencyModel, layers: list[str],
             images: torch.Tensor) -> torch.Tensor:
    """θ × penalty from the declared layers only (captured without detaching, as in training)."""
    with capture_activations(model, layers, detach=False) as acts:
        model(images, sample=False)
    given = {name: acts[name] for name in layers}
    penalty = _call(spec, f"computing the penalty from its layers {layers}", lambda: constraint(given, model))
    if not isinstance(penalty, torch.Tensor):
        raise _fail(spec, f"the penalty is a {type(penalty).__name__}, expected a scalar torch.Tensor")
    if penalty.dim() != 0:
        raise _fail(spec, f"the penalty has shape {tuple(penalty.shape)}, expected a scalar (shape ())")
    if not bool(torch.isfinite(penalty)):
        raise _fail(spec, f"the penalty is {float(penalty.detach())}, expected a finite number")
    if not penalty.requires_grad:
        raise _fail(spec, "the penalty does not require grad: compute it from the activations with torch "
                          "operations (no .detach(), .item() or numpy) so that it can be trained")
    return penalty


# -- optimizers -------------------------------------------------------------------------------------


class _Quadratic(nn.Module):
    """L(w) = ½ Σ a_i w_i², minimum 0 at w = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -1.0, 0.5, 2.0]))
        self.register_buffer("a", torch.tensor([1.0, 4.0, 9.0, 0.5]))

    def forward(self) -> torch.Tensor:
        return 0.5 * (self.a * self.w * self.w).sum()


def check_optimizer(spec: OptimizerSpec, options: Mapping[str, Any] | None = None, *,
                    steps: int = 25) -> list[float]:
    """Step an optimizer with a closure on a quadratic, as training does (``factory(params, **options)``, plus
    ``model=`` when the factory takes it), and assert it lowers the loss and reloads its ``state_dict``;
    returns the loss before each step."""
    _is(spec, OptimizerSpec)
    check_options(spec)
    resolved = _call(spec, "resolving the options", lambda: spec.resolve(dict(options or {})))
    module, optimizer = _build_optimizer(spec, resolved)
    calls = 0
    losses: list[float] = []

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = module()
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(float(module().detach()))
        _call(spec, "step(closure)", lambda: optimizer.step(closure))
    final = float(module().detach())
    if calls < steps:
        raise _fail(spec, f"step(closure) evaluated the closure {calls} times in {steps} steps; fluency always "
                          "passes a closure and the gradient comes from calling it")
    if not np.isfinite(final) or not final < losses[0]:
        raise _fail(spec, f"{steps} steps did not lower the quadratic loss ({losses[0]:.6g} → {final:.6g})")
    state = _call(spec, "state_dict()", optimizer.state_dict)
    _, fresh = _build_optimizer(spec, resolved)
    _call(spec, "load_state_dict() of its own state_dict() (resuming training)", lambda: fresh.load_state_dict(state))
    return losses


def _build_optimizer(spec: OptimizerSpec, options: Mapping[str, Any]) -> tuple[_Quadratic, Any]:
    module = _Quadratic()
    factory = _call(spec, "loading its factory", spec.load)
    extra = {"model": module} if "model" in inspect.signature(factory).parameters else {}
    optimizer = _call(spec, "factory(params, **options)", lambda: factory(module.parameters(), **options, **extra))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise _fail(spec, f"the factory returned {type(optimizer).__name__}, expected a torch.optim.Optimizer")
    return module, optimizer


# -- architectures ----------------------------------------------------------------------------------


def check_architecture(spec: ArchitectureSpec, options: Mapping[str, Any] | None = None, *,
                       batch_size: int = 2, seed: int = 0) -> FluencyModel:
    """Build an architecture with ``options`` (over its defaults), run it forward and assert its contract;
    returns the model (eval mode)."""
    _is(spec, ArchitectureSpec)
    check_options(spec)
    resolved = _call(spec, "resolving the options", lambda: spec.resolve(dict(options or {})))
    with _seeded(seed):
        model = _call(spec, "building the model", lambda: spec.load()(**resolved))
    if not isinstance(model, FluencyModel):
        raise _fail(spec, f"the factory returned {type(model).__name__}, expected a FluencyModel (subclass FluencyVAE, "
                          "FluencyFlow or FluencyEncoder from fluency.api)")
    if model.kind not in MODEL_KINDS or not set(model.provides) <= set(CAPABILITIES):
        raise _fail(spec, f"kind {model.kind!r} / provides {sorted(model.provides)}: the kind is one of "
                          f"{list(MODEL_KINDS)} and it provides capabilities among {list(CAPABILITIES)}")
    model.eval()
    shape = _call(spec, "input_shape", lambda: tuple(model.input_shape))
    if (len(shape) != 3 or not (isinstance(shape[0], int) and shape[0] > 0) or not (
            shape[1:] == (None, None) or all(isinstance(s, int) and s > 0 for s in shape[1:]))):
        raise _fail(spec, f"input_shape is {shape!r}, expected (channels, height, width), height and width both "
                          "None for a model that takes images at their own size")
    shape = (shape[0], shape[1] or NATIVE_PROBE, shape[2] or NATIVE_PROBE)
    layers = _hookable(spec, model)
    defaults = list(getattr(model, "default_metric_layers", ()))
    if not set(defaults) <= set(layers):
        raise _fail(spec, f"default_metric_layers {sorted(set(defaults) - set(layers))} are not hookable layers "
                          f"{list(layers)}")
    images = synthetic_images(batch_size, shape[1], shape[0], seed)[1]
    hooks = _hooks(model)
    with _seeded(seed):  # seeded once, as a run is: a model drawing random numbers gives two different passes
        first, acts = _forward(spec, model, list(layers), images)
        second, _ = _forward(spec, model, list(layers), images)
    left = _hook_changes(hooks, _hooks(model))
    if left:
        raise _fail(spec, f"hooks changed on the model after capturing its layers ({'; '.join(left[:3])})")
    silent = [name for name in layers if not isinstance(acts.get(name), torch.Tensor)]
    if silent:
        raise _fail(spec, f"hookable layers {silent} gave no tensor in a forward pass")
    wrong = [f"{n} {tuple(t.shape)}" for n, t in acts.items() if t.dim() == 0 or t.shape[0] != batch_size]
    if wrong:
        raise _fail(spec, f"hookable layers {wrong} do not have the batch (size {batch_size}) as first dimension")
    for name, (a, b) in _output_tensors(first, second).items():
        if not torch.equal(a, b):
            raise _fail(spec, f"two forward passes with sample=False differ in {name}: the model must be "
                              "deterministic in eval mode with sample=False")
    _check_capabilities(spec, model, images, first)
    return model


def _hookable(spec: ArchitectureSpec, model: FluencyModel) -> dict[str, nn.Module]:
    layers = _call(spec, "hookable_layers()", model.hookable_layers)
    if not isinstance(layers, Mapping) or not layers:
        raise _fail(spec, f"hookable_layers() returned {layers!r:.80}, expected a non-empty dict name → module")
    own = {id(m) for m in model.modules()}
    foreign = [name for name, m in layers.items() if not isinstance(m, nn.Module) or id(m) not in own]
    if foreign:
        raise _fail(spec, f"hookable layers {foreign} are not modules of the model")
    return dict(layers)


def _forward(spec: ArchitectureSpec, model: FluencyModel, layers: list[str],
             images: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
    with torch.no_grad(), capture_activations(model, layers) as acts:
        output = _call(spec, "forward(images, sample=False)", lambda: model(images, sample=False))
    return output, dict(acts)


def _output_tensors(a: Any, b: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The tensors of two forward outputs (a tensor, or a dataclass such as VAEOutput), by field."""
    if isinstance(a, torch.Tensor):
        return {"the output": (a, b)}
    if dataclasses.is_dataclass(a):
        return {f"output.{f.name}": (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
                if isinstance(getattr(a, f.name), torch.Tensor)}
    return {}


def _check_capabilities(spec: ArchitectureSpec, model: Any, images: torch.Tensor, output: Any) -> None:
    """What the model ``provides`` works: a latent code per image (also from ``latent_code``), a decoder
    back to the image's shape and range, an exact inverse, an objective that trains."""
    b = images.shape[0]
    code = None
    if "latent" in model.provides:
        code = _call(spec, "latent(output)", lambda: model.latent(output))
        if not isinstance(code, torch.Tensor) or code.dim() == 0 or code.shape[0] != b:
            raise _fail(spec, f"provides 'latent' but latent(output) gave {_shape(code)}, expected B×… (B = {b})")
        with torch.no_grad():
            direct = _call(spec, "latent_code(images)", lambda: model.latent_code(images))
        if not isinstance(direct, torch.Tensor) or direct.shape != code.shape or not torch.allclose(direct, code,
                                                                                                  rtol=RTOL, atol=ATOL):
            raise _fail(spec, "latent_code(images) differs from latent(model(images, sample=False))")
    if "decoder" in model.provides:
        recon = getattr(output, "recon", None)
        if recon is None and code is not None:
            with torch.no_grad():
                recon = _call(spec, "decode(latent)", lambda: model.decode(code))
        if not isinstance(recon, torch.Tensor) or tuple(recon.shape) != tuple(images.shape):
            raise _fail(spec, f"provides 'decoder' but the reconstruction has {_shape(recon)} for images "
                              f"{tuple(images.shape)}")
        if not bool(((recon >= 0) & (recon <= 1)).all()):
            raise _fail(spec, "the reconstruction leaves [0, 1]; images and reconstructions are in [0, 1]")
    if "inverse" in model.provides:
        with torch.no_grad():
            back = _call(spec, "inverse(latent)", lambda: model.inverse(model.latent(output)))
        if not isinstance(back, torch.Tensor) or back.shape != images.shape or not torch.allclose(back, images,
                                                                                                atol=1e-4):
            raise _fail(spec, "provides 'inverse' but inverse(latent(model(images))) does not give the images back")
    if "objective" in model.provides:
        _check_objective(spec, model, images)


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _check_objective(spec: ArchitectureSpec, model: FluencyModel, images: torch.Tensor) -> None:
    """``objective(output, images, settings)`` gives finite per-image terms with ``loss``, which backpropagates."""
    settings = _objective_settings()
    with _seeded(0):
        output = _call(spec, "forward(images, sample=False)", lambda: model(images, sample=False))
        terms = _call(spec, "objective(output, images, settings)", lambda: model.objective(output, images, settings))
    if not isinstance(terms, Mapping) or "loss" not in terms:
        raise _fail(spec, f"objective() returned {terms!r:.80}, expected a dict of per-image terms with 'loss'")
    b = images.shape[0]
    wrong = [f"{k} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}" for k, v in terms.items()
             if not isinstance(v, torch.Tensor) or tuple(v.shape) != (b,)]
    if wrong:
        raise _fail(spec, f"objective() terms {wrong} are not one value per image (shape ({b},))")
    if not bool(torch.isfinite(terms["loss"]).all()):
        raise _fail(spec, f"objective()['loss'] is not finite: {terms['loss'].tolist()}")
    model.zero_grad(set_to_none=True)
    _call(spec, "backward() through objective()['loss']", lambda: terms["loss"].sum().backward())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or not any(bool(g.any()) for g in grads) or not all(bool(torch.isfinite(g).all()) for g in grads):
        raise _fail(spec, "the gradient of objective()['loss'] does not reach the model's weights (or is not finite)")
    model.zero_grad(set_to_none=True)


def _objective_settings() -> ObjectiveSettings:
    """Settings of the default training objective: an L2 reconstruction term (sum over pixels), β = 1."""

    def l2(recon: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"l2": (recon - images).pow(2).flatten(1).sum(1)}

    return ObjectiveSettings(reconstruction=l2, weights={"l2": 1.0}, beta=1.0)


# -- helpers ----------------------------------------------------------------------------------------


def _fail(spec: Any, what: str) -> AssertionError:
    """The one-line failure of a check, naming the plugin."""
    return AssertionError(f"{getattr(spec, 'kind', 'plugin')} {getattr(spec, 'name', spec)!r}: {what}")


def _call(spec: Any, what: str, fn: Callable[[], T]) -> T:
    """Run plugin code; an exception becomes an AssertionError naming the plugin and the step."""
    try:
        return fn()
    except AssertionError:
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())
        raise _fail(spec, f"{what} raised {type(exc).__name__}: {text[:400]}") from exc


def _is(spec: Any, kind: type) -> None:
    if not isinstance(spec, kind):
        raise AssertionError(f"{spec!r:.80} is not a {kind.__name__}")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch and numpy's global generators inside the block and restore the caller's state after it."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)
