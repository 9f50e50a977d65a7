"""Measuring: the run pipeline, the Parquet activation store and metric tables, folder comparisons."""
