"""Shared fixtures: a throwaway MLflow store per test, Hydra composition, tiny MNIST files."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from mlflow.tracking import MlflowClient

from tests.pg import fresh_database

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where a CUDA device is, and are skipped, saying why, everywhere else."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A real SQLite MLflow store in tmp, chosen the way users choose one: $MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(overrides) -> the composed root config, as `python -m src.train overrides` sees it,
    with Hydra's runtime config (chosen options, output dir in tmp) set as a real run has it."""
    def _compose(overrides: list[str] = ()):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
        out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        out.mkdir()
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(out)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg
    yield _compose
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


def runs_of(uri: str, experiment: str = "gradflow"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file, the format MNIST ships in."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path) -> Path:
    """A 200/50-image MNIST-shaped IDX set (random pixels, labels 0-9)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for split, n in (("train", 200), ("t10k", 50)):
        write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` in its own process group, on a fixed port and store, so a test can kill it
    (an outage) and start it again where it was. Extra args/env e.g. turn on the basic-auth app."""

    def __init__(self, folder: Path, backend: str | None = None, args: list[str] = (), env: dict | None = None):
        self.folder, self.port = folder, free_port()
        self.backend = backend or f"sqlite:///{folder / 'server.db'}"
        self.args, self.env = list(args), {**os.environ, **(env or {})}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = folder / "mlflow-server.log"

    def start(self, timeout: float = 240) -> "MlflowServer":  # a loaded 2-core CI box takes > 60 s
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
             "--artifacts-destination", str(self.folder / "server-artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", *self.args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=5)
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not start: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.3)

    def kill(self) -> None:
        """A crash: SIGKILL to the whole process group (the server and its workers)."""
        self.stop(signal.SIGKILL)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def server_factory(tmp_path):
    """server_factory(backend=None, args=(), env=None) -> a started MlflowServer; all stopped at teardown."""
    started: list[MlflowServer] = []

    def _start(**kwargs) -> MlflowServer:
        folder = tmp_path / f"server{len(started)}"
        folder.mkdir()
        started.append(MlflowServer(folder, **kwargs).start())
        return started[-1]
    yield _start
    for server in started:
        server.stop()


@pytest.fixture
def mlflow_server(server_factory) -> str:
    """A real `mlflow server` (SQLite backend, served artifacts) in its own process group; yields its URL.
    Teardown stops the whole group (the server starts helper processes) by its id."""
    return server_factory().url


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database for this test session, dropped after it (see tests/pg.py)."""
    with fresh_database() as url:
        yield url


class SlowProxy:
    """A TCP proxy on 127.0.0.1 that holds every chunk a client sends for `delay` seconds before passing it
    on: a tracking server that answers slowly."""

    def __init__(self, target_port: int, delay: float):
        self.delay, self.target_port = delay, target_port
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, self.delay), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, 0.0), daemon=True).start()

    def _pipe(self, src, dst, delay):
        try:
            while data := src.recv(65536):
                if delay:
                    self.requests += 1
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.server.close()
