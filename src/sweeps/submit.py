"""`python -m src.sweeps submit --workers N [...]`: sweep workers as jobs, through submitit: on SLURM where
`sbatch` exists, else as local processes (submitit's local executor, which is how it is tested here)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from src.sweeps import loop


def submit(cfg, overrides: list[str], workers: int, partition: str | None, gpus: int, minutes: int) -> int:
    """One worker per job, each a fresh `python -m src.train -m ...` process, so nothing (CUDA included) is
    shared between workers; the study's storage is the only thing they share. `cfg`: the sweep's config."""
    import submitit

    slurm = shutil.which("sbatch") is not None
    folder = Path(str(cfg.hydra.sweep.dir))
    executor = submitit.AutoExecutor(folder=folder / "jobs", cluster=None if slurm else "local")
    executor.update_parameters(timeout_min=minutes, gpus_per_node=gpus,
                               cpus_per_task=4 if slurm else max(1, (os.cpu_count() or 1) // workers),
                               **({"slurm_partition": partition} if partition else {}))
    command = [sys.executable, "-m", "src.train", "-m", *overrides, "hydra.sweeper.workers=1"]
    jobs = [executor.submit(_worker_job, command, str(Path.cwd())) for _ in range(workers)]
    loop.log(f"submitted {len(jobs)} worker job(s) to {executor.cluster}: {[j.job_id for j in jobs]}; "
             f"logs in {folder / 'jobs'}")
    codes = [j.result() for j in jobs]
    loop.log(f"worker exit codes: {codes}")
    return max(codes, default=0)


def _worker_job(command: list[str], cwd: str) -> int:
    return subprocess.run(command, cwd=cwd).returncode
