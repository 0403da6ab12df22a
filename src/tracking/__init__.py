"""The MLflow side: where runs go (store, urls), a writer that never makes training wait (writer, sink), the
run's lifecycle (run), its Lightning logger (logger), the multirun's parent run (multirun), replay after an
outage (spool) and `make ui` (ui). Importing this package imports nothing else."""
