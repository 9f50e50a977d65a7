"""The settings of ``fluency run`` and ``fluency measure``, validated once and written once into the manifest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fluency.core.errors import FluencyError
from fluency.core.plugin.options import check_seed

STORE_DTYPES = ("float16", "float32")
EXECUTORS = ("local", "dask", "slurm")
#: the settings that make a run folder's run: another value is another run (RunConfig.differences)
IDENTITY = ("images", "ratings", "id_column", "rating_column", "checkpoints", "checkpoints_from", "models", "seed",
            "store", "store_dtype", "store_layers", "shard_size", "match_group")


def _strings(values: Sequence[Any] | str | None) -> tuple[str, ...]:
    """A list setting as a tuple of strings; one string is one item (``"all"``, not ``("a", "l", "l")``)."""
    if isinstance(values, (str, Path)):
        return (str(values),)
    return tuple(str(v) for v in values or ())


@dataclass(frozen=True)
class AnalysisSettings:
    """What the analyses run on: which analyses (None: the registry's defaults), subgroups."""

    analyses: tuple[str, ...] | None = None
    by: tuple[str, ...] = ()
    min_group_size: int = 10


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what ``fluency run`` computes (the Python API takes the same names).

    ``store_layers``: None stores the layers the activation metrics read plus the model's default
    metric layers (so a later ``fluency measure`` with default layers works), ``("all",)`` every
    hookable layer, else the named layers. ``deterministic``: one CPU thread and torch's deterministic
    algorithms, for results that do not depend on the machine's thread count. ``check_fit``: check that the
    stimuli are within the model's training distribution (see :mod:`fluency.core.run.checks`). ``models``: architectures measured without a checkpoint (pretrained
    networks such as ``vgg16-imagenet``), after the ``checkpoints``; with neither, the embedded default model.
    """

    metrics: tuple[str, ...]
    images: str | None = None
    ratings: str | None = None
    id_column: str = "image_id"
    rating_column: str = "rating"
    checkpoints: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    analyses: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    out: str | None = None
    device: str = "auto"
    batch_size: int = 32
    seed: int = 0
    options: tuple[str, ...] = ()
    config: str | None = None
    store: bool = True
    store_dtype: str = "float16"
    store_layers: tuple[str, ...] | None = None
    strict: bool = False
    overwrite: bool = False
    by: tuple[str, ...] = ()
    min_group_size: int = 10
    rater_ratings: str | None = None  # per-rater table: the noise ceiling (fluency.core.run.ceiling)
    rater_column: str = "rater"
    reliability_splits: int = 1000
    deterministic: bool = False
    covariates: bool = True  # also compute image-stats and control every relation for it (--no-covariates: off)
    #: compare the stimuli's reconstruction error with the checkpoint's validation error even when no metric
    #: decodes (--check-fit; a decoding metric always does): fluency.core.run.checks
    check_fit: bool = False
    #: a text file listing checkpoints (one path, glob or folder per line; # comments), added to ``checkpoints``
    checkpoints_from: str | None = None
    #: images per unit of work (None: each checkpoint's images in one unit)
    shard_size: int | None = None
    force: bool = False  # recompute every part, even those a previous run of this folder left under the same key
    fail_fast: bool = False  # an unloadable checkpoint or a failed task stops the run (default: reported, skipped)
    #: where the units run: "local" (this process), "dask" (a LocalCluster of ``workers`` processes, or the cluster
    #: at ``scheduler``), "slurm" (dask-jobqueue; ``slurm`` holds KEY=VALUE settings over the config's [slurm])
    executor: str = "local"
    workers: int | None = None
    scheduler: str | None = None
    threads: int | None = None  # torch threads per unit (None: torch's default in-process, 1 per Dask worker)
    retries: int = 2
    slurm: tuple[str, ...] = ()
    #: ratings columns of the subgroups models were trained on (``fluency train --by``): each image is measured
    #: with its own group's model only (fluency.core.run.groups)
    match_group: tuple[str, ...] = ()

    @classmethod
    def create(cls, **settings: Any) -> RunConfig:
        """A config from keyword arguments as ``fluency.run`` takes them (paths, lists); unknown names are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise FluencyError(f"unknown run setting(s) {unknown}; known: {sorted(known)}")
        values = dict(settings)
        for name in ("metrics", "checkpoints", "models", "options", "by", "slurm", "match_group"):
            if name in values:
                values[name] = _strings(values[name])
        for name in ("analyses", "layers", "store_layers"):
            if values.get(name) is not None:
                values[name] = _strings(values[name])
        for name in ("images", "ratings", "out", "config", "rater_ratings", "checkpoints_from"):
            if values.get(name) is not None:
                values[name] = str(Path(values[name]))
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        check_seed(self.seed)
        if self.store_dtype not in STORE_DTYPES:
            raise FluencyError(f"--store-dtype {self.store_dtype!r}: use one of {list(STORE_DTYPES)}")
        if self.batch_size < 1:
            raise FluencyError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.min_group_size < 1:
            raise FluencyError(f"--min-group-size must be at least 1, not {self.min_group_size}")
        if self.reliability_splits < 10:
            raise FluencyError(f"--reliability-splits must be at least 10, not {self.reliability_splits}")
        if self.rater_ratings is not None and self.ratings is None:
            raise FluencyError("--rater-ratings needs --ratings (the per-image table whose rating is analysed)")
        if self.images is None and self.ratings is not None:
            raise FluencyError("--ratings needs --images (the folder of the rated images)")
        if self.shard_size is not None and self.shard_size < 1:
            raise FluencyError(f"--shard-size must be at least 1, not {self.shard_size}")
        if self.executor not in EXECUTORS:
            raise FluencyError(f"--executor {self.executor!r}: use one of {list(EXECUTORS)}")
        if self.retries < 0:
            raise FluencyError(f"--retries must be at least 0, not {self.retries}")
        for name in ("workers", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise FluencyError(f"--{name} must be at least 1, not {getattr(self, name)}")

    def differences(self, recorded: Mapping[str, Any]) -> list[str]:
        """What makes this config another run than ``recorded`` (a manifest's ``config``): the stimuli, the models,
        the seed, the sharding and the store. Metrics, options, analyses and how the units run may change: the parts
        are keyed by them."""
        now = self.as_dict()
        return [f"{name}: {recorded.get(name)!r} then, {now[name]!r} now" for name in IDENTITY
                if _same_shape(recorded.get(name, _DEFAULTS[name])) != _same_shape(now[name])]

    @property
    def analysis(self) -> AnalysisSettings:
        return AnalysisSettings(self.analyses, self.by, self.min_group_size)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists), for the manifest."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


_DEFAULTS = {f.name: f.default for f in fields(RunConfig)}


def _same_shape(value: Any) -> Any:
    """A setting as compared between runs: lists and tuples alike."""
    return list(value) if isinstance(value, (list, tuple)) else value
