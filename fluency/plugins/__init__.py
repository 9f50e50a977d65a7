"""Built-in plugins. Each ``default_*.py`` module is one plugin, listed in ``registry.toml``
and written against the same public API (``fluency.hookimpl`` and the spec classes) as a
third-party plugin."""
