"""The tables a reproduced study leaves: docs/results/<preset>.md (one row per run, our numbers next to the
seed's or paper's, each check and whether it holds) and the README's summary of all of them."""
from __future__ import annotations

import math
import re
from pathlib import Path

from src.reproduce.blocks import replace_block
from src.reproduce.columns import fmt
from src.reproduce.runner import StudyRun
from src.reproduce.studies import STUDIES

START, END = "<!-- presets:start (python -m src.reproduce readme) -->", "<!-- presets:end -->"  # the README's block
_OURS = re.compile(r"— (\d+) runs?, (\d+) s wall time")
_CHECK = re.compile(r"^- (.*): \*\*(.*)\*\*$", re.M)
_NUMBER = re.compile(r"^\*\*Our number\.\*\* (.*)$", re.M)


def markdown(preset: str, run: StudyRun, quick: bool, figure: str | None = None) -> str:
    """The study's table, our number, its figure (a path relative to the table) and its checks."""
    study = STUDIES[preset]
    heads = ["run", *[h.replace("|", "\\|") for h, _ in study.columns], "seed / paper"]
    n = len(run.rows)
    load = (f" (mean load average {run.load:.1f} while it ran; above 2, the wall time is inflated by the other "
            "work)") if not math.isnan(run.load) else ""
    lines = [f"### `{preset}`{' (quick)' if quick else ''}", "", f"**Seed / paper.** {study.reference}", "",
             f"**Ours.** `{' '.join(run.command)}` — {n} run{'s' if n != 1 else ''}, {run.wall:.0f} s wall time "
             f"on 2 CPU cores shared with other work{load}.", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in run.rows:
        cells = [r["name"]]
        for _, fn in study.columns:
            v = fn(r)
            cells.append(fmt(v) if isinstance(v, (int, float)) or v is None else str(v).replace("|", "\\|"))
        cells.append(study.seed_column(r).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    if study.ours:
        try:
            lines.append(f"\n**Our number.** {study.ours(run.rows)}")
        except Exception as e:  # noqa: BLE001 - a missing cell: say so, the table still stands
            lines.append(f"\n**Our number.** cannot be computed ({type(e).__name__})")
    if figure:
        lines.append(f"\n![{preset}]({figure})")
    for text, check in study.checks:
        try:
            ok = "holds" if check(run.rows) else "does NOT hold"
        except Exception as e:  # noqa: BLE001 - a missing cell makes the check unanswerable, say so
            ok = f"cannot be checked ({type(e).__name__})"
        lines.append(f"\n- {text}: **{ok}**")
    return "\n".join(lines) + "\n"


def summary_row(preset: str, table: str, link: str) -> str:
    """One README row from a preset's results table (as markdown() wrote it)."""
    ours = _OURS.search(table)
    runs = f"{ours[1]} run{'' if ours[1] == '1' else 's'}, {ours[2]} s" if ours else "—"
    checks = "; ".join(f"{text}: **{ok}**" for text, ok in _CHECK.findall(table)) or "—"
    quick = " (quick)" if "(quick)" in table.splitlines()[0] else ""
    number = _NUMBER.search(table)
    claim = STUDIES[preset].claim or "—"
    return (f"| [`{preset}`]({link}){quick} | {STUDIES[preset].title} | {claim} | {number[1] if number else '—'} | "
            f"{runs} | {checks} |")


def update_readme(results: Path, readme: Path = Path("README.md")) -> None:
    """Replace the README's generated block with one row per preset (a full run's table before a quick
    one's), each linking to its table in `results`."""
    tables = sorted(results.glob("*.md"), key=lambda f: (f.stem.split(".")[0], ".quick" in f.name))
    rows, seen = [], set()
    for f in tables:
        preset = f.stem.split(".")[0]
        if preset in STUDIES and preset not in seen:
            seen.add(preset)
            link = Path("docs/results") / f.name if results.resolve() == (readme.parent / "docs/results").resolve() \
                else f
            rows.append(summary_row(preset, f.read_text(), str(link)))
    block = ["| preset | study | the paper's claim | our number | runs, wall time (2 cores) | checks |",
             "|---|---|---|---|---|---|", *rows]
    replace_block(readme, "presets", "\n".join(block))
