"""The worker image without a Docker engine: the Dockerfile's worker stage replayed (its COPY steps into a fresh
folder, its `pip install` of the project, non-editable, into a fresh venv), then the compose worker's own command
with the compose file's environment against a native PostgreSQL and a real `mlflow server`."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT, runs_of
from tests.pg import fresh_database
from tests.test_compose import FILES, rendered

pytestmark = pytest.mark.slow


def worker_stage() -> tuple[list[tuple[str, str]], list[str]]:
    """The (source, destination) of each COPY and the project's `pip install` line of the worker image: the
    base stage's steps, then the worker stage's."""
    text = (ROOT / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S))
    steps = stages["base"] + stages["worker"]
    copies = [(src, dst) for srcs, dst in re.findall(r"^COPY\s+(.+?)\s+(\S+)$", steps, re.M) for src in srcs.split()]
    pip = [part.strip() for line in re.findall(r"^RUN (.*)$", steps, re.M) for part in line.split("&&")
           if re.fullmatch(r"pip install .* (\.|\"\.\[\w+\]\")", part.strip())]
    return copies, pip


def replay(tmp: Path) -> tuple[Path, Path]:
    """The image's /app and its python, built as the worker stage builds them. Dependencies come from this
    venv (a path in a .pth file: its packages, not its editable install of the checkout)."""
    app, root = tmp / "app", tmp / "root"
    copies, [pip] = worker_stage()
    for src, dst in copies:
        target = root / dst.lstrip("/") if dst.startswith("/") else app / dst
        if dst.endswith("/") or dst == "./":
            target = target / Path(src).name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / src).is_dir() else shutil.copy)(ROOT / src, target)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    *args, target = pip.split()[2:]  # what the Dockerfile passes to `pip install`, then the project (with extras)
    args = [str(root / a.lstrip("/")) if a.startswith("/") else a for a in args]
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    *args, target.strip('"')], cwd=app, check=True)
    return app, venv / "bin/python"


def test_the_worker_stage_copies_what_a_sweep_needs():
    copies, pip = worker_stage()
    assert {"src", "conf", "hydra_plugins"} <= {src for src, _ in copies} and len(pip) == 1
    assert "-c /tmp/constraints.txt" in pip[0]  # the versions the dashboard image has too


def test_the_worker_image_runs_the_compose_workers_command(tmp_path, mlflow_server):
    app, python = replay(tmp_path)
    installed = subprocess.run([str(python), "-c", "import src, conf, hydra_plugins.gradflow_sweeper as p; "
                                "print(src.__file__, conf.__file__, p.__file__)"], cwd=tmp_path,
                               capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in installed and "site-packages" in installed  # not the checkout, nor /app
    worker = rendered(FILES["base"])["services"]["worker"]
    with fresh_database("gradflow_image") as storage:
        env = {**{k: str(v) for k, v in worker["environment"].items()}, "PATH": "/usr/bin:/bin",
               "MLFLOW_TRACKING_URI": mlflow_server, "GRADFLOW_SWEEP_STORAGE": storage, "HOME": str(tmp_path)}
        # the compose command as it is, on one small point of its grid
        small = ["activation=relu", "init=he", "model.depth=2", "trainer.max_steps=5", "hydra.sweeper.study_name=img"]
        done = subprocess.run([str(python) if a == "python" else a for a in worker["command"]] + small, cwd=app,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        from src.sweeps.storage import open_storage

        trials = optuna.load_study(study_name="img", storage=open_storage(storage)).get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE], [(t.state, t.user_attrs) for t in trials]
    client, runs = runs_of(mlflow_server)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # the study's parent and its trial
    # the image's default command, from a folder without the sources: the installed package finds its configs
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    done = subprocess.run([str(python), "-m", "src.train", "debug=fast", f"tracking.uri=sqlite:///{empty}/m.db"],
                          cwd=empty, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "verdict:" in done.stdout, done.stderr[-3000:]
