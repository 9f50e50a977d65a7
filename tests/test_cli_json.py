"""``--json`` output keeps numbers at full precision."""

from __future__ import annotations

import math

import pandas as pd

from fluency.cli import _jsonable


def test_jsonable_keeps_small_p_values_and_nan() -> None:
    rows = _jsonable(pd.DataFrame({"p": [7.741234567891e-10, 0.0123456789012345, float("nan")], "name": list("abc")}))
    assert math.isclose(rows[0]["p"], 7.741234567891e-10, rel_tol=1e-12)
    assert math.isclose(rows[1]["p"], 0.0123456789012345, rel_tol=1e-12)
    assert rows[2]["p"] is None and rows[2]["name"] == "c"
