"""The sweep engine (our Optuna sweeper): the search space (space), the storage (storage), the study and its
queue (study), leases and retries (leases), a worker's loop (loop); the Hydra side (worker, trial), the
report (report) and the commands (cli, submit). hydra_plugins/gradflow_sweeper is the shell Hydra loads."""
