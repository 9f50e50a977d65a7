"""``--seeds``: a list of seeds written as ranges and single values (``1-10``, ``1,3,5``, ``1-3,8``).

Light on purpose (no torch): the command line checks the list before anything loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from fluency.core.errors import OptionError
from fluency.core.plugin.options import SEED_LIMIT

#: the most models one ``--seeds`` may ask for (a typo such as ``1-10000000`` is refused, not started)
MAX_SEEDS = 1000
_ITEM = re.compile(r"(\d+)(?:-(\d+))?")


@dataclass(frozen=True)
class RangeSpec:
    """The seeds of a ``--seeds`` text, in the order written, each once."""

    text: str
    seeds: tuple[int, ...]

    @classmethod
    def parse(cls, text: str, where: str = "--seeds") -> RangeSpec:
        """Parse ``text``; anything malformed is one :class:`OptionError` line naming the bad item."""
        seeds: list[int] = []
        items = [item.strip() for item in str(text).split(",")]
        if not any(items):
            raise OptionError(f"{where} {text!r}: give seeds such as 1-10 or 1,3,5")
        for item in items:
            seeds += _expand(item, text, where, len(seeds))
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise OptionError(f"{where} {text!r}: seed {repeated[0]} is listed twice; each seed trains one model")
        return cls(str(text), tuple(seeds))

    def __len__(self) -> int:
        return len(self.seeds)

    def __iter__(self) -> Iterator[int]:
        return iter(self.seeds)


def _expand(item: str, text: str, where: str, before: int) -> list[int]:
    """The seeds of one item (``7`` or ``1-10``), checked: whole numbers in [0, 2**32), ranges upwards."""
    match = _ITEM.fullmatch(item)
    if not match:
        raise OptionError(f"{where} {text!r}: {item!r} is neither a seed (7) nor a range (1-10); seeds are whole "
                          f"numbers from 0 to {SEED_LIMIT - 1}, separated by commas")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if high < low:
        raise OptionError(f"{where} {text!r}: the range {item!r} runs downwards; write {high}-{low}")
    if high >= SEED_LIMIT:
        raise OptionError(f"{where} {text!r}: seed {high} is too large; seeds run from 0 to {SEED_LIMIT - 1}")
    if before + high - low + 1 > MAX_SEEDS:
        raise OptionError(f"{where} {text!r}: more than {MAX_SEEDS} seeds; train fewer models at a time")
    return list(range(low, high + 1))
