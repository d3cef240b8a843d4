"""The one text-table renderer of the CLI and the reports.

Columns are padded to their widest cell and separated by three spaces;
trailing blanks are cut. Nothing here knows what the cells mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO


def render(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Print ``rows`` (the first is the header) as aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)
