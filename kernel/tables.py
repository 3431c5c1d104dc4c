"""Tables for the command line that stay readable in an 80-column terminal.

Rich's default table wraps every cell once the columns do not fit, so a run-history row became
five lines at 80 columns. Here each cell is one line: instants lose their fraction of a second
(``--json`` keeps full precision), a few free-text columns (detail, description, ...) shrink
with an ellipsis, and when even that does not fit, the least useful columns are left out and
the caption names them. Column roles are chosen by header name, so a caller passes plain
headers and strings: ``print_table("Runs", ["finished", "task", ...], rows)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

FLEX = {"detail", "description", "message", "meaning", "task", "action", "id", "schedule",
        "trace", "last", "plugin"}
"""Columns that may shrink (with an ellipsis) to make room."""
COMFY = 16
"""A flexible column is not squeezed below this (or its content) while another can be left out."""
PRIORITY = {"trace": 10, "attempt": 20, "priority": 25, "kind": 30, "action": 30, "plugin": 35,
            "running": 35, "detail": 40, "last": 45}
"""Columns left out first when a table does not fit (lowest first); the others rank 50."""
GAP = 2  # right padding plus the (blank) divider between two columns
_INSTANT = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)\.\d+(Z|[+-]\d\d:\d\d)?$")


def short_instant(cell: str) -> str:
    """``2026-11-30 10:55:34.123456Z`` -> ``2026-11-30 10:55:34Z``; other text unchanged."""
    m = _INSTANT.match(cell)
    return m.group(1) + (m.group(2) or "") if m else cell


def layout(columns: Sequence[str], rows: Sequence[Sequence[str]], width: int
           ) -> tuple[list[int], list[int]]:
    """Which columns to show (indices, in order) and each shown column's width."""
    natural = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    comfy = [min(n, max(COMFY, len(c))) if c in FLEX else n
             for c, n in zip(columns, natural, strict=True)]
    shown = list(range(len(columns)))

    def need(widths: list[int]) -> int:
        return sum(widths) + GAP * (len(widths) - 1)

    while len(shown) > 1 and need([comfy[i] for i in shown]) > width:
        shown.remove(min(shown, key=lambda i: (PRIORITY.get(columns[i], 50), -i)))
    widths = [comfy[i] for i in shown]
    spare = width - need(widths)
    while spare > 0:  # grow the flexible column that lacks the most, one character at a time
        k = max(range(len(shown)), key=lambda k: natural[shown[k]] - widths[k])
        if natural[shown[k]] <= widths[k]:
            break
        widths[k] += 1
        spare -= 1
    return shown, widths


def build_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                width: int) -> Table:
    rows = [[short_instant(c) for c in r] for r in rows]
    shown, widths = layout(columns, rows, width)
    hidden = [c for i, c in enumerate(columns) if i not in shown]
    caption = (f"not shown at {width} columns: {', '.join(hidden)} (--json has every field)"
               if hidden else None)
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, padding=(0, 1, 0, 0), title_justify="left", caption_justify="left")
    for i, w in zip(shown, widths, strict=True):
        table.add_column(columns[i], no_wrap=True, overflow="ellipsis", min_width=w,
                         max_width=w)
    for r in rows:
        table.add_row(*(r[i] for i in shown))
    return table


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                console: Console | None = None) -> None:
    """Print a table sized to the terminal (``console.width``); every row stays one line."""
    con = console or Console()
    con.print(build_table(title, columns, rows, con.width))
