"""Generated blocks of the project's Markdown: the text between `<!-- NAME:start ... -->` and
`<!-- NAME:end -->`, rewritten by the command that produces it (the README's reproduced results, each
benchmark's table in docs/performance.md), so a table is regenerated, never typed or appended to."""
from __future__ import annotations

import re
from pathlib import Path


def replace_block(path: str | Path, name: str, body: str) -> None:
    """Put `body` between the file's markers for `name`; the markers and the rest of the file stay."""
    path = Path(path)
    text = path.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(name)}:start[^>]*-->\n).*?(<!-- {re.escape(name)}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{path}: no <!-- {name}:start --> ... <!-- {name}:end --> block")
    path.write_text(pattern.sub(lambda m: m[1] + body.rstrip("\n") + "\n" + m[2], text, count=1))
