"""Each benchmark's current table in docs/performance.md (`--docs`): the block named after the benchmark is
replaced by the table just measured, headed by the command and the machine, so the page holds one current
table per benchmark, never a history."""
from __future__ import annotations

import os
import platform
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.reproduce.blocks import replace_block  # noqa: E402

PAGE = ROOT / "docs" / "performance.md"


def write(name: str, lines: list[str]) -> None:
    """Replace the `bench-<name>` block of docs/performance.md with `lines`, under a line naming the command
    that produced them, the day and the machine."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    head = (f"`{command}`, {date.today().isoformat()}: {cores} CPU cores ({platform.machine()}), "
            f"torch {torch.__version__} with {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}.")
    replace_block(PAGE, f"bench-{name}", "\n".join([head, "", *lines]))
    print(f"written: the {name} table of {PAGE.relative_to(ROOT)}", file=sys.stderr)
