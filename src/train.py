"""Entry point: `python -m src.train [overrides]`, or `-m` for a multirun. `train(cfg)` is importable."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from src import histograms, plots, theory, tracking, validate, verdict
from src.callback import GradientStatsCallback
from src.data import ArrayDataModule, DataFilesMissing
from src.guards import StopOnNonFiniteLoss
from src.model import Classifier, Regressor, build_mlp
from src.trace import read_trace
from src.weight_change import WeightChangeCallback

TRIAL_ENV = "GRADFLOW_TRIAL"

GROUPS = ("data", "model", "activation", "init", "optimizer", "trainer", "stats", "tracking")


def train(cfg: DictConfig) -> dict[str, float | str]:
    """Seed, build, fit with statistics, track in MLflow; return the final run-level metrics (floats)
    and the run's diagnosis under the key "verdict" (a str, one of src.verdict.VERDICTS)."""
    validate.check(cfg)  # before anything is built or any MLflow run exists
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = ArrayDataModule(**_plain(cfg.data), seed=cfg.seed)
    m = cfg.model
    widths = list(m.widths) if m.widths is not None else [m.width] * m.depth
    net = build_mlp(
        data.in_dim, data.n_classes, widths,
        activation=cfg.activation.name, activation_params=_plain(cfg.activation, drop=("name",)),
        init=cfg.init.name, init_params=_plain(cfg.init, drop=("name",)),
        norm=m.get("norm", "none"), residual=bool(m.get("residual", False)),
        head_activation=m.get("head_activation"),
    )
    task = Regressor if data.task == "regression" else Classifier
    module = task(net, cfg.optimizer.name, _plain(cfg.optimizer, drop=("name",)))
    prediction = theory.predict(net, data.train_set.tensors[0], cfg.activation.name,
                                _plain(cfg.activation, drop=("name",))) if widths else None  # at init

    out_dir = _output_dir()
    choices = _choices(cfg)
    run_name = cfg.tracking.run_name or _run_name(choices, cfg)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    with tracking.TrackedRun(uri, cfg.tracking.experiment, run_name, params=_params(cfg, choices),
                             spool_dir=out_dir, server_timeout=cfg.tracking.server_timeout) as run:
        logger = tracking.MlflowAsyncLogger(run.writer, cfg.tracking.experiment)
        callbacks = []
        stats_cb = None
        if cfg.stats.enabled:
            stats_cb = GradientStatsCallback(
                every_n_steps=cfg.stats.every_n_steps, log_every_n_steps=cfg.stats.log_every_n_steps,
                saturation_threshold=cfg.stats.saturation_threshold,
                trace_path=out_dir / "trace.parquet", trace_chunk_steps=cfg.stats.trace_chunk_steps,
            )
            callbacks.append(stats_cb)
        change_cb = None
        if cfg.stats.get("weight_change"):  # seeds 000/004: per-step mean |dW| and before/after change
            change_cb = WeightChangeCallback(cfg.stats.every_n_steps, cfg.stats.log_every_n_steps,
                                             csv_path=out_dir / "weight_change.csv")
            callbacks.append(change_cb)
        hist_cb = None
        if cfg.stats.enabled and cfg.stats.get("histogram_every_n_steps", 0):
            hist_cb = histograms.HistogramCallback(cfg.stats.histogram_every_n_steps, out_dir / "histograms.parquet")
            callbacks.append(hist_cb)
        if os.environ.get(TRIAL_ENV):  # a trial of a sweep: report to the study, stop if pruned
            from src.sweeper import trial_callbacks
            callbacks += trial_callbacks()
        guard = StopOnNonFiniteLoss() if cfg.guard.stop_on_nonfinite_loss else None
        callbacks += [guard] if guard else []
        trainer = L.Trainer(**_plain(cfg.trainer), logger=logger, callbacks=callbacks,
                            default_root_dir=str(out_dir))
        fit_start = time.perf_counter()
        try:
            trainer.fit(module, datamodule=data)
        except SystemExit:
            if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after its own graceful shutdown
                raise KeyboardInterrupt from None  # so the run is marked KILLED, not FAILED
            raise
        finally:
            fit_s = time.perf_counter() - fit_start
            trace = _log_artifacts(run, cfg, out_dir, stats_cb, logger.history, run_name,
                                   prediction.chi1 if prediction else None, hist_cb)
            _log_extras(run, cfg, out_dir, trace, change_cb, trainer, run_name)
            artifacts_s = time.perf_counter() - fit_start - fit_s
        if guard and guard.stop_reason:
            run.writer.set_tags({"stop_reason": guard.stop_reason})
        results = {k: float(v) for k, v in trainer.callback_metrics.items() if "/layer_" not in k}
        # Lightning's fit alone, then the trace, figures and uploads after it; the rest of a run is set-up
        timing = {"time/fit_s": fit_s, "time/artifacts_s": artifacts_s}
        results.update(timing)
        run.writer.log_metrics(timing, step=trainer.global_step)
        print(f"run {run.run_id} ({run_name}) in {tracking.redact(uri)}: "
              + "  ".join(f"{k}={v:.4g}" for k, v in sorted(results.items())))
        if trace is not None and prediction is not None:  # stats=off: no per-layer keys; theory needs a hidden layer
            run.writer.log_metrics(theory.metrics(prediction, trace), 0)
        judged = verdict.diagnose(trace, logger.history, cfg.activation.name, verdict.from_config(_plain(cfg.verdict)))
        run.writer.set_tags(judged.tags())
        print(f"verdict: {judged.verdict}: {judged.reason}")
    return {**results, "verdict": judged.verdict}


def _log_artifacts(run, cfg, out_dir: Path, stats_cb, history, title, chi1=None, hist_cb=None) -> dict | None:
    """Upload config, trace and figures; return the trace as read back (None without statistics)."""
    hydra_dir = out_dir / ".hydra"
    if hydra_dir.is_dir():
        run.log_artifact(hydra_dir, "hydra")
    else:  # train(cfg) called without Hydra's runtime: save the composed config ourselves
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        run.log_artifact(out_dir / "config.yaml", "hydra")
    trace_path = stats_cb.trace.close() if stats_cb and stats_cb.trace else None
    trace = None
    if trace_path:
        run.log_artifact(trace_path, "trace")
        trace = read_trace(trace_path)
    hist_path = hist_cb.close() if hist_cb else None
    if hist_path:
        run.log_artifact(hist_path, "trace")
    if cfg.tracking.plots:
        try:  # called from a `finally`: a figure that cannot be drawn must not hide the run's own error
            paths = plots.draw_all(trace, history, out_dir / "plots", title, chi1,
                                   histograms.read_histograms(hist_path) if hist_path else None)
        except Exception as e:  # noqa: BLE001
            print(f"plots: could not draw the figures: {e}", file=sys.stderr)
            paths = []
        for p in paths:
            run.log_artifact(p, "plots")
    return trace


def _log_extras(run, cfg, out_dir: Path, trace, change_cb, trainer, title) -> None:
    """The presets' extra views: per-epoch layer statistics (seed 003) and weight change (000, 004)."""
    try:  # called from a `finally`, like the figures
        if change_cb is not None and change_cb.write_csv():
            run.log_artifact(change_cb.csv_path, "trace")
            if cfg.tracking.plots:
                run.log_artifact(plots.weight_change(change_cb.steps, change_cb.mean_abs,
                                                     out_dir / "plots" / "weight_change.png", title), "plots")
        if cfg.tracking.get("epoch_stats") and trace is not None and len(trace["steps"]):
            per_epoch = max(1, trainer.num_training_batches // cfg.trainer.accumulate_grad_batches)
            paths = plots.epoch_stats(trace, per_epoch, out_dir / "epoch_stats.csv",
                                      out_dir / "plots" / "epoch_stats.png" if cfg.tracking.plots else None, title)
            for path, where in zip(paths, ("trace", "plots")):
                run.log_artifact(path, where)
    except Exception as e:  # noqa: BLE001
        print(f"extras: could not write the extra views: {e}", file=sys.stderr)


def _plain(node, drop: tuple = ()) -> dict:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in drop}


def _output_dir() -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(tempfile.mkdtemp(prefix="gradflow-"))


def _choices(cfg) -> dict[str, str]:
    """The option chosen in each config group (e.g. init=he), or the option's own name without Hydra."""
    found = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    return {g: str(found.get(g) or cfg[g].get("name", "")) for g in GROUPS if g in cfg}


def _run_name(choices: dict[str, str], cfg) -> str:
    keys = [k for k in os.environ.get(tracking.SWEEP_KEYS_ENV, "").split(",") if k]
    if keys and HydraConfig.initialized():
        mine = [o for o in HydraConfig.get().overrides.task if o.split("=")[0].lstrip("+~") in keys]
        return ",".join(mine)
    return f"{choices['activation']}-{choices['init']}-d{cfg.model.depth}"


def _params(cfg, choices: dict[str, str]) -> dict[str, object]:
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    flat.update({g: choices[g] for g in ("activation", "init", "data", "optimizer") if g in choices})
    return flat


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except (validate.ConfigError, DataFilesMissing) as e:
        print("config error:\n  " + str(e).replace("\n", "\n  "), file=sys.stderr)
        sys.exit(2)
    except tracking.TrackingUnavailable as e:
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
    """Leave without the interpreter's teardown, which with torch, Lightning and MLflow loaded takes 2-3 s
    (measured here: 2.7 s, against 0.07 s for this) and is paid by every command, a sweep included. By now
    every run, trace and writer of ours is closed; logging.shutdown() flushes Hydra's log files."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    _exit_now()
