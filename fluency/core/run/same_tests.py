"""One hypothesis, one test: outputs of a model that are the same variable enter the FDR family once.

Two outputs (metric, layer) of one checkpoint are *the same test* when their per-image values on the
rated images are equal up to an affine map a + b·v (b ≠ 0, either sign): every correlation with them
then has the same |r| and p (Pearson, Spearman, partial), a regression the same t and p, and ridge the
same standardised features. ``lepsilon`` and ``lepsilon-fraction`` (count = N · fraction, per layer)
are such a pair, and so are ``elbo-recon`` and ``recon-l2`` for a checkpoint trained with an L2
reconstruction loss. Whether two outputs coincide depends on the options and on the checkpoint
(``lepsilon``'s layer ``all`` with ``layer_weights`` is not an affine map of its count; ``elbo-recon``
of a checkpoint trained with LPIPS is not ``recon-l2``), so fluency finds them from the values, for
every plugin alike, instead of a list of names. Outputs of *different* checkpoints are different
hypotheses (one model against another) and are never merged.

Numerically: on the images where both are finite (the same images for both), with z-scores z_a, z_b
(population SD), the outputs are the same when rms(z_a ∓ z_b) ≤ :data:`TOLERANCE`. By Cauchy–Schwarz
their Pearson correlations with any variable then differ by at most that much, i.e. nothing a table
shows: float32 round-off (``elbo-recon`` against ``recon-l2`` differ by ~4e-8 here) passes, two
genuinely different metrics do not. Constant outputs and fewer than :data:`MIN_IMAGES` images are
never merged.

The first output in the metric table's order is kept and tested. Every analysis row of another one
keeps its estimate and p, names the kept output in ``same_as`` (``metric@layer``, or ``metric``
for a whole-model output or a whole-metric analysis such as ``ridge``) and gets ``p_fdr`` NaN: it is
not in the run-wide Benjamini–Hochberg family. A whole-metric row (``layer`` empty while the metric
has layers) is the same test when each of the metric's outputs is the same as one of the kept
metric's, one to one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fluency.core.plugin.metric_columns import MetricColumns, as_columns

#: rms difference of z-scores under which two outputs are one test (|Δr| ≤ this for any third variable)
TOLERANCE = 1e-5
#: fewer common images than this (any two series of 2 points are affine maps of each other) merge nothing
MIN_IMAGES = 3

Key = tuple[str, str | None]  # (metric, layer); layer None for a whole-model output


def _layer(value: object) -> str | None:
    return None if value is None or pd.isna(value) else str(value)  # type: ignore[arg-type]


def _name(key: Key) -> str:
    return key[0] if key[1] is None else f"{key[0]}@{key[1]}"


@dataclass
class SameTests:
    """Per checkpoint, which output is the same test as an earlier (kept) one."""

    #: ``{checkpoint: {duplicate (metric, layer): kept (metric, layer)}}``
    kept: dict[str, dict[Key, Key]] = field(default_factory=dict)
    #: ``{checkpoint: {metric: its (metric, layer) outputs}}``
    outputs: dict[str, dict[str, list[Key]]] = field(default_factory=dict)

    def same_as(self, checkpoint: str, metric: str, layer: object) -> str:
        """The kept output this row's test repeats (``"metric@layer"`` or ``"metric"``), else ``""``;
        ``checkpoint`` ``"A−B"`` (a comparison row) repeats a test only if it does so under A and B alike."""
        if checkpoint not in self.kept:
            pair = self._pair(checkpoint)
            if pair is None:
                return ""
            a, b = (self.same_as(c, metric, layer) for c in pair)
            return a if a and a == b else ""
        key = (str(metric), _layer(layer))
        if key in self.kept[checkpoint]:
            return _name(self.kept[checkpoint][key])
        if key[1] is None and key not in self._all(checkpoint):
            return self._same_metric(checkpoint, key[0])
        return ""

    def mark(self, result: pd.DataFrame) -> pd.Series:
        """Fill ``same_as`` (and say so in ``note``, where the table has one); True for the repeated tests."""
        if not len(result) or not {"checkpoint", "metric", "layer"} <= set(result.columns):
            result["same_as"] = ""
            return pd.Series(False, index=result.index)
        same = [self.same_as(str(c), str(m), lay) for c, m, lay in
                zip(result["checkpoint"], result["metric"], result["layer"])]
        result["same_as"] = same
        repeated = pd.Series([bool(s) for s in same], index=result.index)
        if "note" in result.columns and repeated.any():
            extra = [f"same test as {s} (affine-identical values): not in the FDR family" for s in same]
            result.loc[repeated, "note"] = [f"{n}; {e}" if isinstance(n, str) and n else e
                                            for n, e in zip(result.loc[repeated, "note"], np.array(extra)[repeated])]
        return repeated

    def _all(self, checkpoint: str) -> set[Key]:
        return {k for keys in self.outputs.get(checkpoint, {}).values() for k in keys}

    def _same_metric(self, checkpoint: str, metric: str) -> str:
        """The metric whose outputs are, one to one, the kept tests of all of ``metric``'s outputs."""
        keys = self.outputs.get(checkpoint, {}).get(metric, [])
        kept = [self.kept[checkpoint].get(k) for k in keys]
        if not keys or any(k is None for k in kept) or len({k[0] for k in kept}) != 1:  # type: ignore[index]
            return ""
        other = kept[0][0]  # type: ignore[index]
        return other if sorted(kept, key=str) == sorted(self.outputs[checkpoint].get(other, []), key=str) else ""

    def _pair(self, checkpoint: str) -> tuple[str, str] | None:
        for a in self.kept:
            if checkpoint.startswith(f"{a}−") and checkpoint[len(a) + 1:] in self.kept:
                return a, checkpoint[len(a) + 1:]
        return None


def same_tests(metric_table: pd.DataFrame | MetricColumns, image_ids: Iterable[str]) -> SameTests:
    """Which outputs of each checkpoint repeat an earlier output's test on the images ``image_ids``."""
    table = as_columns(metric_table).restrict(image_ids)
    found = SameTests()
    outputs = table.outputs()
    for checkpoint in dict.fromkeys(k[0] for k in outputs):
        mine = [k for k in outputs if k[0] == checkpoint]
        keys: list[Key] = [(metric, layer) for _, metric, layer in mine]
        found.outputs[checkpoint] = {}
        for key in keys:
            found.outputs[checkpoint].setdefault(key[0], []).append(key)
        found.kept[checkpoint] = _duplicates(keys, table.wide(mine).to_numpy(float))
    return found


def _duplicates(keys: list[Key], values: np.ndarray) -> dict[Key, Key]:
    """``{later key: first key}`` for columns of ``values`` that are affine maps of an earlier column."""
    finite = np.isfinite(values)
    by_mask: dict[bytes, list[int]] = {}
    for j in range(len(keys)):
        by_mask.setdefault(np.packbits(finite[:, j]).tobytes(), []).append(j)
    out: dict[Key, Key] = {}
    for columns in by_mask.values():
        rows = finite[:, columns[0]]
        if len(columns) < 2 or rows.sum() < MIN_IMAGES:
            continue
        v = values[rows][:, columns]
        sd = v.std(axis=0)
        ok = sd > 0
        z = np.zeros_like(v)
        z[:, ok] = (v[:, ok] - v[:, ok].mean(axis=0)) / sd[ok]
        # rms(z_i ∓ z_j)² = 2 − 2|r_ij|: one matrix product instead of a loop over pairs
        same = 1 - np.abs(z.T @ z) / len(z) <= TOLERANCE**2 / 2
        kept: list[int] = []
        for j in range(len(columns)):
            if not ok[j]:
                continue
            match = next((i for i in kept if same[i, j]), None)
            if match is None:
                kept.append(j)
            else:
                out[keys[columns[j]]] = keys[columns[match]]
    return out
