"""URL helpers shared by the tracking stack and the sweep engine, kept free of heavy imports (MLflow,
Lightning) so that sweep workers and status commands can use them cheaply."""
from __future__ import annotations

import re
from pathlib import Path


def redact(text: str) -> str:
    """The text with the password of any URL in it replaced, safe to print or log."""
    return re.sub(r"(://[^:/@\s]+):[^@/\s]*@", r"\1:***@", str(text))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///<file>` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") and len(uri) > len("sqlite:///") else None
