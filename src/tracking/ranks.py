"""Which process of a multi-device training owns its MLflow run: global rank 0. The others train (their part of
each batch, their share of DDP's all-reduce) and track nothing: no run, no file, no verdict.

The rank is the Trainer's, asked before fit: Lightning resolves the launcher (its own spawned processes,
torchrun, SLURM) when the Trainer is built, and a distributed strategy's ranks can be set from the environment
then (Lightning sets them again, the same, when fit starts)."""
from __future__ import annotations

import lightning as L


def global_rank(trainer: L.Trainer) -> int:
    strategy = trainer.strategy
    if hasattr(strategy, "set_world_ranks"):  # the DDP family (FSDP included): node_rank * processes + local_rank
        strategy.set_world_ranks()
    return int(trainer.global_rank)


def world_size(trainer: L.Trainer) -> int:
    return int(trainer.world_size)


def without_files(callbacks: list) -> list:
    """The callbacks a rank other than 0 keeps: those that write no file of the run (the statistics callbacks
    declare theirs with `artifacts()`)."""
    return [c for c in callbacks if not hasattr(c, "artifacts")]


def scope_tags(trainer: L.Trainer) -> dict[str, str]:
    """What the run's statistics describe when several processes train it (the run's tags)."""
    n = world_size(trainer)
    return {"devices": str(n), "strategy": type(trainer.strategy).__name__,
            "stats_scope": f"grad_* and update_ratio: the gradient all-reduced over the {n} processes (the global "
                           f"batch); act_*, backprop_*: global rank 0's shard, 1/{n} of each batch"}


SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def refuse_sharded(trainer: L.Trainer, callbacks: list) -> str | None:
    """Why this training cannot be recorded (None when it can): under a sharded strategy each process holds a
    shard of every weight, and the weight statistics would describe the shard, not the tensor."""
    name = type(trainer.strategy).__name__
    if name in SHARDED and any(hasattr(c, "artifacts") for c in callbacks):
        return (f"trainer.strategy: the statistics do not support sharded weights ({name}) yet; use "
                "trainer.strategy=ddp, or stats=off to train without them")
    return None
