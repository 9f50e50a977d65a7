"""Group-matched evaluation (``--match-group COLUMN[,COLUMN]``): each image measured only with the model trained on
its own subgroup.

``fluency train --by COLUMNS`` trains one model per subgroup into ``OUT/<group label>/`` and lists them in
``OUT/checkpoints.json`` (each group's values and checkpoint). A run given those checkpoints with
``--match-group`` measures every group model on the rated images of its group only; their rows are then
filed under one checkpoint, ``matched-<columns>``, so that the analyses compare the group-matched models with
the general ones (checkpoints without a group) as they compare any two checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from fluency.core.errors import FluencyError

LISTING = "checkpoints.json"


def checkpoint_group(path: Path) -> dict[str, str] | None:
    """The subgroup a checkpoint was trained on, from the ``checkpoints.json`` of ``fluency train --by`` in a folder
    above it; None for a model of all images."""
    target = path.resolve()
    for folder in list(target.parents)[:3]:
        try:
            listing = json.loads((folder / LISTING).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        for entry in listing.get("groups", []) if isinstance(listing, dict) else []:
            if isinstance(entry, dict) and entry.get("checkpoint") and isinstance(entry.get("group"), dict) \
                    and Path(str(entry["checkpoint"])).resolve() == target:
                return {str(k): str(v) for k, v in entry["group"].items()}
    return None


def matched_label(columns: Sequence[str]) -> str:
    return "matched-" + "-".join(columns)


def group_image_ids(ratings: pd.DataFrame, group: Mapping[str, str], columns: Sequence[str], label: str) -> list[str]:
    """The rated images of one subgroup, in the ratings' order."""
    missing = [c for c in columns if c not in group]
    if missing:
        raise FluencyError(f"--match-group {','.join(columns)}: checkpoint {label} was trained on the subgroup "
                           f"{dict(group)}, which does not say its {', '.join(missing)}")
    rows = pd.Series(True, index=ratings.index)
    for column in columns:
        rows &= ratings[column].astype(str) == str(group[column])
    ids = [str(i) for i in ratings.loc[rows, "image_id"]]
    if not ids:
        raise FluencyError(f"--match-group: no rated image belongs to the subgroup of checkpoint {label} "
                           f"({dict(group)})")
    return ids


def check_columns(ratings: pd.DataFrame | None, columns: Sequence[str]) -> None:
    if ratings is None:
        raise FluencyError("--match-group needs --ratings (the table with the group columns)")
    missing = [c for c in columns if c not in ratings.columns]
    if missing:
        raise FluencyError(f"--match-group: no column(s) {missing} in the ratings; columns are "
                           f"{[c for c in ratings.columns if c != 'image_id']}")
