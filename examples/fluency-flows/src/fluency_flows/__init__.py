"""fluency plugin for normalising flows: the architecture ``glow-small``, a small multi-scale Glow.

The registration lives in :mod:`fluency_flows.plugin` (entry point ``flows`` in the group ``fluency``)
and imports neither torch modules of its own nor normflows; the model, built on normflows, is in
:mod:`fluency_flows.model` and is imported only when a ``glow-small`` model is built.
"""

__version__ = "0.1.0"
