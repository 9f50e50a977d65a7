"""The settings of ``fluency run`` and ``fluency measure``, validated once and written once into the manifest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fluency.core.errors import FluencyError
from fluency.core.plugin.options import check_seed

STORE_DTYPES = ("float16", "float32")


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

    @classmethod
    def create(cls, **settings: Any) -> RunConfig:
        """A config from keyword arguments as ``fluency.run`` takes them (paths, lists); unknown names are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise FluencyError(f"unknown run setting(s) {unknown}; known: {sorted(known)}")
        values = dict(settings)
        for name in ("metrics", "checkpoints", "models", "options", "by"):
            if name in values:
                values[name] = _strings(values[name])
        for name in ("analyses", "layers", "store_layers"):
            if values.get(name) is not None:
                values[name] = _strings(values[name])
        for name in ("images", "ratings", "out", "config", "rater_ratings"):
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

    @property
    def analysis(self) -> AnalysisSettings:
        return AnalysisSettings(self.analyses, self.by, self.min_group_size)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists), for the manifest."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
