"""Hydra plugin shell of the sweep engine (Hydra only loads sweepers from the `hydra_plugins` namespace).
It accepts the configuration keys of hydra-optuna-sweeper; the work is done in src.sweeps.worker, imported
only when a sweep runs so that every other Hydra start-up stays fast."""
from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper


class GradflowSweeper(Sweeper):
    def __init__(self, sampler: Any = None, direction: str = "minimize", study_name: str = "gradflow",
                 storage: str | None = None, n_trials: int | None = 20, workers: int = 1,
                 params: Any = None, pruner: Any = None, max_retries: int = 2,
                 heartbeat_interval: float = 10.0, grace_period: float = 60.0, torch_threads: int | None = None,
                 gpus: Any = None, gpus_per_trial: int = 1, search_space: Any = None, custom_search_space: Any = None,
                 n_jobs: int | None = None) -> None:
        if search_space or custom_search_space:
            raise ValueError("hydra.sweeper.search_space / custom_search_space are not supported: "
                             "use hydra.sweeper.params")
        if n_jobs is not None:  # a key of hydra-optuna-sweeper that means something else there
            raise ValueError(f"hydra.sweeper.n_jobs={n_jobs}: hydra-optuna-sweeper's batch size; this engine has "
                             "no batches. For N worker processes on this machine: hydra.sweeper.workers=N")
        self.sampler, self.direction, self.study_name, self.storage = sampler, direction, study_name, storage
        self.n_trials, self.workers, self.params, self.pruner = n_trials, workers, params, pruner
        self.max_retries, self.heartbeat_interval, self.grace_period = max_retries, heartbeat_interval, \
            grace_period
        self.torch_threads, self.gpus, self.gpus_per_trial = torch_threads, gpus, gpus_per_trial

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from omegaconf import OmegaConf

        from src.sweeps import worker

        for key in ("sampler", "pruner", "params", "gpus"):  # plain containers from here on
            value = getattr(self, key)
            if OmegaConf.is_config(value):
                setattr(self, key, OmegaConf.to_container(value, resolve=True))
        return worker.run(self, arguments)
