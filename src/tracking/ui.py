"""`make ui`: serve the MLflow UI on the project's store and point the user at the runs table, opened on the
curated view (src.tracking.view) written into the experiment now.

MLflow 3's UI opens an experiment on a GenAI traces overview unless the experiment is tagged as
custom model development; experiments created here carry that tag, and older ones get it now.
MLflow >= 3.17 ignores that tag while its sidebar's GenAI / Model training switch is shown: the switch
(kept per browser, GenAI by default) decides, so the printed URL also selects Model training.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
import webbrowser

from src.tracking.store import EXPERIMENT_KIND, client as mlflow_client, resolve_uri
from src.tracking import view
from src.tracking.urls import ML_VIEW, page_route, redact


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=int(os.environ.get("MLFLOW_UI_PORT", 5000)))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--experiment", default="gradflow")
    args = ap.parse_args()
    uri = resolve_uri()
    if uri.startswith(("http://", "https://")):
        sys.exit(f"MLFLOW_TRACKING_URI is a server ({redact(uri)}): open it in a browser instead")
    client = mlflow_client(uri)
    for exp in client.search_experiments():
        if exp.tags.get("mlflow.experimentKind") is None:
            client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    exp = client.get_experiment_by_name(args.experiment)
    base = f"http://{args.host}:{args.port}"
    # workflowType selects the sidebar's "Model training" side for this visit (older UIs ignore it)
    url = f"{base}/#/?{ML_VIEW}"
    if exp is not None:
        view.share(client, exp.experiment_id)  # with the metric keys of every run so far
        url = base + page_route(exp.experiment_id)
    # `kill` / a closed terminal end this process through the `finally` below, not around it
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    # own process group, so Ctrl-C / exit stops the server and its helper processes together
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
         "--host", args.host, "--port", str(args.port)], start_new_session=True,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    return server.returncode
                time.sleep(0.5)
        print(f"\nMLflow UI: {url}\n(Ctrl-C to stop)", flush=True)
        webbrowser.open(url)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
