-- Runs once, when the postgres volume is first created: one database per store, owned by $POSTGRES_USER.
-- MLflow keeps experiments, runs, params and metrics in `mlflow`; Optuna keeps studies and trials in `optuna`.
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
