"""The plugin API: everything a fluency plugin may import, in one module (built-in plugins use nothing else).

Names are grouped by the plugin kind that needs them; the building blocks of architectures are in
:mod:`fluency.blocks`. A plugin module may declare the API version it was written for::

    FLUENCY_PLUGIN_API = "1"        # major[.minor]

fluency loads it when the major versions agree and the plugin's minor version is not newer than
:data:`PLUGIN_API_VERSION`'s; otherwise ``fluency plugins`` lists it as ``broken`` ("built for plugin
API 2, this fluency provides 1.0") and the rest keeps working.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fluency.core.errors import FluencyError, InputError, OptionError
from fluency.core.plugin.analysis import (ADJUSTED_COLUMNS, EFFECT_KINDS, FDR_COLUMNS, RESULT_COLUMNS, Analysis,
                                         AnalysisData, EffectSize)
from fluency.core.plugin.constraint import Constraint, L1Penalty, require_layers, weight_option
from fluency.core.plugin.hookspecs import hookimpl
from fluency.core.plugin.manager import get_plugin_manager
from fluency.core.plugin.metric import (FluencyMetric, MetricBatch, MetricValues, ModelDescription, per_image_noise,
                                         units_as_rows)
from fluency.core.plugin.options import Option
from fluency.core.plugin.specs import (CAPABILITIES, AnalysisSpec, ArchitectureSpec, ConstraintSpec, MetricSpec,
                                        OptimizerSpec)
from fluency.core.version import PLUGIN_API_VERSION

if TYPE_CHECKING:
    from fluency.core.inputs.images import FolderSource, Preprocessing, find_images, iter_batches
    from fluency.core.inputs.ratings import read_table
    from fluency.core.model.capture import capture_activations
    from fluency.core.model.losses import LOSSES
    from fluency.core.plugin.architecture import (EncoderOutput, FlowOutput, FluencyEncoder, FluencyFlow,
                                                   FluencyModel, FluencyVAE, ObjectiveSettings, VAEOutput,
                                                   kl_divergence, require_attention_layers)
    from fluency.core.plugin.layer_options import (ALL_LAYERS, all_layers_options, channel_rows, layer_weights,
                                                   per_option, wants_all_layers, weighted_mean)
    from fluency.core.plugin.optimizer import OptimizerFactory
    from fluency.core.run.folder import RunResult
    from fluency.core.run.store import ActivationStore
    from fluency.core.stats import DEPENDENT_METHODS, compare_dependent_correlations, fdr_bh

#: names whose modules import torch (or pandas and scipy), served on first use by :func:`__getattr__`, so that a
#: plugin module that declares its specs with this API is listed by ``fluency plugins`` without loading torch
_LAZY = {
    **dict.fromkeys(("FolderSource", "Preprocessing", "find_images", "iter_batches"), "fluency.core.inputs.images"),
    "read_table": "fluency.core.inputs.ratings",
    "capture_activations": "fluency.core.model.capture",
    "LOSSES": "fluency.core.model.losses",
    **dict.fromkeys(("EncoderOutput", "FlowOutput", "FluencyEncoder", "FluencyFlow", "FluencyModel", "FluencyVAE",
                     "ObjectiveSettings", "VAEOutput", "kl_divergence", "require_attention_layers"),
                    "fluency.core.plugin.architecture"),
    **dict.fromkeys(("ALL_LAYERS", "all_layers_options", "channel_rows", "layer_weights", "per_option",
                     "wants_all_layers", "weighted_mean"), "fluency.core.plugin.layer_options"),
    "OptimizerFactory": "fluency.core.plugin.optimizer",
    "RunResult": "fluency.core.run.folder",
    "ActivationStore": "fluency.core.run.store",
    **dict.fromkeys(("DEPENDENT_METHODS", "compare_dependent_correlations", "fdr_bh"), "fluency.core.stats"),
}


def __getattr__(name: str) -> Any:
    """Import a heavy name of the API when it is first used (PEP 562); ``from fluency.api import X`` works alike."""
    if name not in _LAZY:
        raise AttributeError(f"module 'fluency.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    # declaring plugins
    "PLUGIN_API_VERSION", "hookimpl", "Option",
    "ArchitectureSpec", "ConstraintSpec", "OptimizerSpec", "MetricSpec", "AnalysisSpec",
    "FluencyError", "OptionError", "InputError",
    # metrics
    "FluencyMetric", "MetricBatch", "MetricValues", "ModelDescription", "units_as_rows", "per_image_noise",
    "ALL_LAYERS", "all_layers_options", "per_option", "wants_all_layers", "layer_weights", "weighted_mean",
    "channel_rows", "LOSSES", "capture_activations", "FolderSource", "Preprocessing", "find_images",
    "iter_batches", "read_table", "ActivationStore", "RunResult",
    # analyses
    "Analysis", "AnalysisData", "RESULT_COLUMNS", "ADJUSTED_COLUMNS", "FDR_COLUMNS", "EffectSize", "EFFECT_KINDS", "fdr_bh", "compare_dependent_correlations", "DEPENDENT_METHODS",
    # constraints
    "Constraint", "L1Penalty", "require_layers", "weight_option",
    # architectures (building blocks: fluency.blocks)
    "FluencyModel", "FluencyVAE", "FluencyFlow", "FluencyEncoder", "VAEOutput", "FlowOutput", "EncoderOutput",
    "ObjectiveSettings", "CAPABILITIES", "kl_divergence", "require_attention_layers",
    # optimizers (a factory; one that wraps another optimizer plugin gets it from the manager)
    "OptimizerFactory", "get_plugin_manager",
]
