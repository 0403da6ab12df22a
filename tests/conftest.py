"""Shared fixtures: a throwaway MLflow store per test, Hydra composition, tiny MNIST files."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


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
