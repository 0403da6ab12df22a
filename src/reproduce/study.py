"""What a reproduced study is: the paper's finding, our table's columns, the shorter --quick run, the checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from src.reproduce.columns import Row, tag


@dataclass
class Study:
    title: str                           # the study in one line (the README's table)
    reference: str                       # what the seed/paper showed, in one paragraph
    columns: list[tuple[str, Callable]]  # (header, fn(row) -> value)
    quick: list[str]                     # overrides for --quick
    seed_column: Callable[[Row], str] = lambda r: ""
    checks: list[tuple[str, Callable[[list[Row]], bool]]] = field(default_factory=list)
    claim: str = ""                      # the paper's claim in a line (the README's table)
    ours: Callable[[list[Row]], str] | None = None  # our headline number in a line, from the runs
    figure: Callable[[list[Row], Path], None] | None = None  # draws the study's figure (a PNG) at the path


VERDICT = ("verdict", tag("verdict"))
