"""`python -m src.sweeps submit --workers N [...]`: sweep workers as jobs, through submitit: on SLURM where
its commands are (submitit looks for `srun`), else as local processes (submitit's local executor, which is how it is tested here)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from src.sweeps import loop
from src.sweeps.trial import usable_cpus


def submit(cfg, overrides: list[str], workers: int, partition: str | None, gpus: int, minutes: int,
           wait: bool = False) -> int:
    """One worker per job, each a fresh `python -m src.train -m ...` process, so nothing (CUDA included) is
    shared between workers; the study's storage is the only thing they share. On SLURM the jobs are one job
    array, and the command returns once they are queued (with `wait`, when they have ended, with the worst
    exit code). Local jobs end with the command that started them, so it always waits for them."""
    import submitit

    folder = Path(str(cfg.hydra.sweep.dir))
    executor = submitit.AutoExecutor(folder=folder / "jobs")  # SLURM where its commands are, else local
    slurm = executor.cluster == "slurm"
    executor.update_parameters(timeout_min=minutes, gpus_per_node=gpus,
                               cpus_per_task=4 if slurm else max(1, usable_cpus() // workers),
                               **({"slurm_partition": partition} if partition else {}))
    command = [sys.executable, "-m", "src.train", "-m", *overrides, "hydra.sweeper.workers=1"]
    with executor.batch():  # on SLURM: one sbatch, an array of `workers` tasks
        jobs = [executor.submit(_worker_job, command, str(Path.cwd())) for _ in range(workers)]
    loop.log(f"submitted {len(jobs)} worker job(s) to {executor.cluster}: {[j.job_id for j in jobs]}; "
             f"logs in {folder / 'jobs'}")
    if slurm and not wait:
        loop.log("they run on their own: follow them with `squeue --me` and `make sweep-status`")
        return 0
    codes = [j.result() for j in jobs]
    loop.log(f"worker exit codes: {codes}")
    return max(codes, default=0)


def _worker_job(command: list[str], cwd: str) -> int:
    return subprocess.run(command, cwd=cwd).returncode
