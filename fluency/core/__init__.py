"""The core of fluency: plugin system, data exchange and the run/train pipelines."""
