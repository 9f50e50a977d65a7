"""fluency plugins for information measures: activation entropy, pointwise MI between images and layers, layer MI.

The plugins live in :mod:`fluency_mutual_info.plugin` (entry point ``mutual-info`` in the group
``fluency``); the estimators, free of torch and fluency, in :mod:`fluency_mutual_info.estimators`.
"""

__version__ = "0.1.0"
