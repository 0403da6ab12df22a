"""The edge between the Hydra config and the code: what a training run is built from (data, network,
LightningModule, callbacks) and how it is named and described in MLflow. Past here, everything takes plain
typed arguments."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.config.validate import ConfigError
from src.data.datamodule import ArrayDataModule
from src.models.modules import TASKS
from src.models.registry import ACTIVATION_BY_TYPE
from src.stats.modules import NothingToRecord
from src.tracking.env import SWEEP_KEYS_ENV

# config groups whose chosen option names a run's params (activation=relu) and name
GROUPS = ("data", "model", "activation", "init", "optimizer", "trainer", "stats", "tracking")


def plain(node, drop: tuple = ()) -> dict:
    """A config node as a plain dict, interpolations resolved, without the keys in `drop`."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in drop}


def option(node) -> tuple[str, dict]:
    """A named option (activation, init, optimizer) as its registry name and its parameters."""
    return node.name, plain(node, drop=("name",))


def data_module(cfg: DictConfig) -> ArrayDataModule:
    return ArrayDataModule(**plain(cfg.data), seed=cfg.seed)


def network(cfg: DictConfig, data: ArrayDataModule):
    """The model group's `_target_` builder, given the data's sizes and the activation and init options."""
    (act, act_params), (init, init_params) = option(cfg.activation), option(cfg.init)
    try:
        return instantiate(cfg.model, in_dim=data.in_dim, in_kind=data.in_kind, out_dim=data.n_classes,
                           activation=act, activation_params=act_params, init=init, init_params=init_params)
    except Exception as e:  # noqa: BLE001 - Hydra wraps the builder's error; a builder's ValueError is the config's
        cause = e.__cause__ or e
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from None
        raise


def lightning_module(cfg: DictConfig, net, data: ArrayDataModule):
    name, params = option(cfg.optimizer)
    return TASKS[data.task](net, name, params)


def callbacks(cfg: DictConfig) -> list:
    """Every callback node that is not null, built in the group's order; a constructor's objection to its
    arguments is a config error (before any MLflow run exists)."""
    built = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        try:
            built.append(instantiate(node))
        except Exception as e:  # noqa: BLE001 - Hydra wraps the constructor's error; its message is the point
            cause = e.__cause__ or e
            raise ConfigError(f"callbacks.{name}: {cause}") from None
    return built


def judged_activation(cfg: DictConfig, net) -> str | None:
    """The activation whose saturation the verdict judges: the configured one where the network applies it as
    a module (an LSTM's gates are its own)."""
    return cfg.activation.name if any(type(m) in ACTIVATION_BY_TYPE for m in net.modules()) else None


def check_selection(callbacks: list, model) -> None:
    """Each callback that records selected modules finds some in `model` (a ConfigError naming the selection
    if not): checked before any MLflow run exists."""
    for cb in callbacks:
        if hasattr(cb, "select"):
            try:
                cb.select(model)
            except NothingToRecord as e:
                raise ConfigError(str(e)) from None


def output_dir() -> Path:
    """The job's folder (Hydra's), or a fresh temporary one when train(cfg) is called without Hydra."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(tempfile.mkdtemp(prefix="gradflow-"))


def saved_config(cfg: DictConfig, out_dir: Path) -> Path:
    """The folder holding the composed config: Hydra's .hydra/ (with hydra.yaml and overrides.yaml), or
    config.yaml written here when train(cfg) runs without Hydra's runtime."""
    hydra_dir = out_dir / ".hydra"
    if hydra_dir.is_dir():
        return hydra_dir
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return out_dir / "config.yaml"


def choices(cfg: DictConfig) -> dict[str, str]:
    """The option chosen in each config group (e.g. init=he), or the option's own name without Hydra."""
    found = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    return {g: str(found.get(g) or cfg[g].get("name", "")) for g in GROUPS if g in cfg}


def run_name(cfg: DictConfig) -> str:
    """tracking.run_name; in a multirun or sweep the job's swept overrides (activation=relu,init=he); else
    <activation>-<init>-d<depth>."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    keys = [k for k in os.environ.get(SWEEP_KEYS_ENV, "").split(",") if k]
    if keys and HydraConfig.initialized():
        return ",".join(o for o in HydraConfig.get().overrides.task if o.split("=")[0].lstrip("+~") in keys)
    picked = choices(cfg)
    return f"{picked['activation']}-{picked['init']}-d{cfg.model.depth}"


def run_params(cfg: DictConfig) -> dict[str, object]:
    """MLflow params: the flattened resolved config, plus the option chosen in the main groups."""
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    picked = choices(cfg)
    flat.update({g: picked[g] for g in ("activation", "init", "data", "optimizer") if g in picked})
    return flat


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
