"""Entry point: `python -m src.train [overrides]`, or `-m` for a multirun; `train(cfg)` is importable."""
from __future__ import annotations

import logging
import os
import sys
import time

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from src import console
from src.analysis import jacobian, outputs, theory, verdict
from src.callbacks import tags_of
from src.callbacks.guards import CtrlCAtStepEnd
from src.callbacks.progress import LastValidation, RunProgressBar
from src.callbacks.pruning import TRIAL_ENV
from src.config import build, validate
from src.data.datasets import DataFilesMissing
from src.stats.names import is_module_key
from src.tracking.env import PARENT_RUN_ENV
from src.tracking import ranks
from src.tracking.logger import MlflowAsyncLogger
from src.tracking.run import TrackedRun
from src.tracking.store import TrackingUnavailable, resolve_uri
from src.tracking.urls import redact, run_page


def train(cfg: DictConfig) -> dict[str, float | str]:
    """Seed, build, fit with statistics, track in MLflow; return the run's final metrics (floats) and its
    diagnosis under "verdict" (a str, one of src.analysis.verdict.VERDICTS)."""
    validate.check(cfg)  # before anything is built or any MLflow run exists
    console.quiet_known_noise()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = build.data_module(cfg)
    net = build.network(cfg, data)
    module = build.lightning_module(cfg, net, data)
    callbacks = build.callbacks(cfg) + _trial_callbacks()
    bar = [RunProgressBar()] if cfg.trainer.enable_progress_bar else []  # Lightning refuses a bar it was told off
    callbacks += [CtrlCAtStepEnd()]
    build.check_selection(callbacks, module)  # a selection that matches nothing: before any MLflow run exists
    no_theory = theory.not_applicable(net)
    prediction = None if no_theory else theory.predict(net, data.train_set.tensors[0], *build.option(cfg.activation))
    chi1 = prediction.chi1 if prediction else None
    spectrum, no_jacobian = jacobian.at_init(cfg.stats.jacobian, net, data.train_set.tensors[0])  # as initialised
    out_dir, name, uri = build.output_dir(), build.run_name(cfg), resolve_uri(cfg.tracking.uri)
    validated = LastValidation()
    trainer = L.Trainer(**build.plain(cfg.trainer), logger=False, callbacks=callbacks + bar + [validated],
                        default_root_dir=str(out_dir))
    refused = ranks.refused(trainer, callbacks)
    if refused:  # before any MLflow run exists
        raise validate.ConfigError(refused)
    if ranks.global_rank(trainer) != 0:  # one MLflow run per training, global rank 0's: the others only train
        trainer.callbacks = ranks.for_other_ranks(trainer.callbacks)
        final = _fit_and_validate(trainer, module, data, validated)
        return {k: float(v) for k, v in final.items() if not is_module_key(k)}
    with TrackedRun(uri, cfg.tracking.experiment, name, params=build.run_params(cfg), spool_dir=out_dir,
                    server_timeout=cfg.tracking.server_timeout) as run:
        logger = MlflowAsyncLogger(run.writer, cfg.tracking.experiment)
        trainer.loggers = [logger]
        if ranks.world_size(trainer) > 1:
            run.writer.set_tags(ranks.scope_tags(trainer))
        jacobian.record(run, spectrum, no_jacobian, out_dir, cfg.tracking.plots, name)  # kept if fit fails
        per_epoch = (lambda: trainer.num_training_batches // cfg.trainer.accumulate_grad_batches) \
            if cfg.tracking.epoch_stats else None
        started = time.perf_counter()
        try:
            final = _fit_and_validate(trainer, module, data, validated)
        finally:  # what was recorded reaches MLflow even when fit failed
            fit_s = time.perf_counter() - started
            run.log_artifact(build.saved_config(cfg, out_dir), "hydra")
            got = outputs.record(run.log_artifact, callbacks, logger.history, out_dir, name, chi1,
                                 cfg.tracking.plots, per_epoch)
        run.writer.set_tags(tags_of(callbacks))
        results = {k: float(v) for k, v in final.items() if not is_module_key(k)}
        results["time/fit_s"] = fit_s  # Lightning's fit alone; the rest of a run is set-up or what follows fit
        if got.trace is not None and prediction is not None:
            run.writer.log_metrics(theory.metrics(prediction, got.trace), 0)
        if no_theory:
            run.writer.set_tags({"theory": f"not applicable: {no_theory}"})
        judged = verdict.diagnose(got.trace, logger.history, build.judged_activation(cfg, net),
                                  verdict.from_config(build.plain(cfg.verdict)), got.through_time, data.constant_loss)
        run.writer.set_tags(judged.tags())
        headline = results | _last(logger.history, ("backprop_ratio", "backprop_time_ratio"))
        outputs.report(run.log_artifact, got, out_dir, name, judged, headline, logger.history, chi1,
                       redact(OmegaConf.to_yaml(cfg)), spectrum)
        results["time/artifacts_s"] = time.perf_counter() - started - fit_s  # everything after fit, report included
        run.writer.log_metrics({k: results[k] for k in ("time/fit_s", "time/artifacts_s")}, step=trainer.global_step)
        if os.environ.get(PARENT_RUN_ENV):  # one of many: one line, the multirun's table comes at its end
            print(f"{name}: {judged.verdict}  " + console.metrics_line(headline))
        else:
            print(console.summary(judged.verdict, judged.reason, headline,
                                  run_page(uri, run.experiment_id, run.run_id)))
    return {**results, "verdict": judged.verdict}


def _last(history: dict[str, list[tuple[int, float]]], keys: tuple[str, ...]) -> dict[str, float]:
    """The last logged value of each of `keys` that was logged."""
    return {k: history[k][-1][1] for k in keys if history.get(k)}


def _trial_callbacks() -> list:
    """A sweep's trial reports to its study and stops when pruned; Optuna is imported only there."""
    if not os.environ.get(TRIAL_ENV):
        return []
    from src.sweeps.trial import trial_callbacks

    return trial_callbacks()


def _fit_and_validate(trainer: L.Trainer, module, data, validated: LastValidation) -> dict:
    with ranks.this_job_alone(trainer):  # several processes: one job's training, its ranks gone at the end
        _fit(trainer, module, data)
        return _validate_the_last_steps(trainer, module, data, validated)


def _validate_the_last_steps(trainer: L.Trainer, module, data, validated: LastValidation) -> dict:
    """Validate once more when training went on after the last validation (max_steps ended an epoch early, or
    ended the first one), so that val/* describe the net as trained and a sweep's objective always exists.
    Every rank decides alike (validation is collective under DDP). Returns the run's final metrics: the
    training ones of fit, the latest validation."""
    metrics = dict(trainer.callback_metrics)
    if trainer.global_step and trainer.limit_val_batches and (validated.step is None
                                                              or validated.step < trainer.global_step):
        if trainer.progress_bar_callback is not None:  # the run's one bar has ended with fit
            trainer.progress_bar_callback.disable()
        trainer.validate(module, datamodule=data, verbose=False)
        metrics |= trainer.callback_metrics
    return metrics


def _fit(trainer: L.Trainer, module, data) -> None:
    try:
        trainer.fit(module, datamodule=data)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after its own graceful shutdown
            raise KeyboardInterrupt from None  # so the run is marked KILLED, not FAILED
        raise


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except (validate.ConfigError, DataFilesMissing) as e:
        print("config error:\n  " + str(e).replace("\n", "\n  "), file=sys.stderr)
        sys.exit(2)
    except TrackingUnavailable as e:
        print(f"tracking error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted: the MLflow run is marked KILLED, with what was recorded", file=sys.stderr)
        sys.exit(130)
    objective = cfg.get("optimized_metric")
    if objective and objective not in metrics:
        print(f"optimized_metric={objective} is not among this run's metrics: {', '.join(sorted(metrics))}",
              file=sys.stderr)
    return metrics.get(objective) if objective else None


def _exit_now() -> None:
    """Leave without the interpreter's teardown, which with torch, Lightning and MLflow loaded takes seconds
    and is paid by every command, a sweep included. By now every run, trace and writer of ours is closed;
    logging.shutdown() flushes Hydra's log files."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    _exit_now()
