"""Which process of a multi-device training owns its MLflow run: global rank 0. The others train (their part of
each batch, their share of DDP's all-reduce), take part in the statistics' reduction across ranks, and track
nothing: no run, no file, no verdict.

The rank is the Trainer's, asked before fit: Lightning resolves the launcher (its own spawned processes,
torchrun, SLURM) when the Trainer is built, and a distributed strategy's ranks can be set from the environment
then (Lightning sets them again, the same, when fit starts)."""
from __future__ import annotations

import contextlib
import os
import sys

import lightning as L
import torch


def global_rank(trainer: L.Trainer) -> int:
    strategy = trainer.strategy
    if hasattr(strategy, "set_world_ranks"):  # the DDP family (FSDP included): node_rank * processes + local_rank
        strategy.set_world_ranks()
    return int(trainer.global_rank)


def world_size(trainer: L.Trainer) -> int:
    return int(trainer.world_size)


def records_statistics(callback) -> bool:
    """A statistics callback: it declares the files it writes with `artifacts()` (src.callbacks)."""
    return hasattr(callback, "artifacts")


def for_other_ranks(callbacks: list) -> list:
    """The callbacks a rank other than 0 keeps: those that write nothing of the run, and those that must run on
    every rank because they reduce across ranks (`across_ranks`; they write on rank 0 only)."""
    return [c for c in callbacks if getattr(c, "across_ranks", False) or not records_statistics(c)]


def scope_tags(trainer: L.Trainer) -> dict[str, str]:
    """What the run's statistics describe when several processes train it (the run's tags)."""
    n = world_size(trainer)
    return {"devices": str(n), "strategy": type(trainer.strategy).__name__,
            "stats_scope": f"the global batch of the {n} processes: grad_* and update_ratio from the all-reduced "
                           f"gradient, act_* and backprop_* reduced across the processes; histograms and the "
                           f"signal through time, train/*: global rank 0's shard, 1/{n} of each batch; val/*: "
                           f"averaged over the processes"}


SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def refused(trainer: L.Trainer, callbacks: list) -> str | None:
    """Why this training cannot be recorded (None when it can). Under a sharded strategy each process holds a
    shard of every weight, and the weight statistics would describe the shard, not the tensor. A strategy that
    starts its processes from inside fit (ddp_spawn, ddp_fork, ddp_notebook) trains in processes that the MLflow
    run, its writer and the callbacks of this one never see."""
    name = type(trainer.strategy).__name__
    if name in SHARDED and any(records_statistics(c) for c in callbacks):
        return (f"trainer.strategy: the statistics do not support sharded weights ({name}) yet; use "
                "trainer.strategy=ddp, or stats=off to train without them")
    start = getattr(trainer.strategy, "_start_method", "popen")  # Lightning's DDPStrategy: how ranks are started
    if start != "popen":
        return (f"trainer.strategy: processes started by {start} from inside fit cannot be tracked as one run; use "
                "trainer.strategy=ddp (the same training, each process started as a command)")
    return None


# what Lightning's launcher sets in this process's environment for the other ranks (and reads back later)
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def this_job_alone(trainer: L.Trainer):
    """Around one training (fit and its last validation) on several processes. Lightning starts the other ranks
    on this machine by running this command again (sys.argv, and for a Hydra job `hydra.run.dir`): in a
    multirun, a sweep's trial included, that command is the whole multirun, so here it is this job's overrides
    alone, run in this job's folder. Afterwards the process group is destroyed and the launcher's environment
    undone, so that the next job of a multirun starts its own ranks (with LOCAL_RANK left set, Lightning would
    take it for a rank started by someone else and wait for peers that never come)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict, read_write

    if world_size(trainer) == 1:
        yield
        return
    env, argv = {k: os.environ.get(k) for k in LAUNCH_ENV}, list(sys.argv)
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    run_dir = None
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        with read_write(hc), open_dict(hc):
            run_dir = OmegaConf.to_container(hc.run)["dir"]  # as configured, ${now:...} unresolved
            hc.run.dir = hc.runtime.output_dir
        sys.argv[1:] = list(hc.overrides.task)
    try:
        yield
    finally:
        sys.argv[:] = argv
        if run_dir is not None:
            with read_write(hc), open_dict(hc):
                hc.run.dir = run_dir
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
