"""URL helpers shared by the tracking stack and the sweep engine, kept free of heavy imports (MLflow,
Lightning) so that sweep workers and status commands can use them cheaply."""
from __future__ import annotations

import os
import re
from pathlib import Path


def redact(text: str) -> str:
    """The text with the password of any URL in it replaced, safe to print or log."""
    return re.sub(r"(://[^:/@\s]+):[^@/\s]*@", r"\1:***@", str(text))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///<file>` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") and len(uri) > len("sqlite:///") else None


# the MLflow UI opens on its GenAI layout unless the URL selects the model-training one
ML_VIEW = "workflowType=machine_learning"
# the curated runs view's share key (src.tracking.view writes it)
VIEW_KEY = "gradflow"


def page_route(experiment_id: str, run_id: str | None = None) -> str:
    """The UI's route to a run's page, or without one to the experiment's runs in the curated view."""
    return (f"/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}" if run_id
            else f"/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&{ML_VIEW}")


def ui_base(uri: str) -> str:
    """Where the UI of the store at `uri` is served: the tracking server itself, else where `make ui` serves."""
    if uri.startswith(("http://", "https://")):
        return redact(uri.rstrip("/"))
    return f"http://127.0.0.1:{os.environ.get('MLFLOW_UI_PORT', '5000')}"


def run_page(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where a person looks at a run (or, without one, at the experiment's runs in the curated view): its page
    on the tracking server, or for a store without a server `make ui` (told the store where it is not the one
    `make ui` finds) and the page it serves."""
    url = ui_base(uri) + page_route(experiment_id, run_id)
    if uri.startswith(("http://", "https://")):
        return url
    found = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"  # as make ui
    ui = "make ui" if uri == found else f"MLFLOW_TRACKING_URI='{redact(uri)}' make ui"
    return f"{ui}, then {url}"
