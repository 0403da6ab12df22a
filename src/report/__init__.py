"""Self-contained HTML reports (no network, readable in MLflow's artifact viewer): one per run, one per sweep."""
