"""The environment variables through which a multirun or a sweep tells the job it runs where the job's MLflow
run belongs. Only the parent (the multirun's Hydra callback, the sweep worker) sets them."""

PARENT_RUN_ENV = "GRADFLOW_PARENT_RUN_ID"  # the parent run the job's run is nested under
RUN_ID_ENV = "GRADFLOW_RUN_ID"             # a sweep trial: the run its worker created for it, to adopt
SWEEP_KEYS_ENV = "GRADFLOW_SWEEP_KEYS"     # the swept keys, which name the child run (activation=relu,init=he)
