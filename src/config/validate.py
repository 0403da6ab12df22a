"""Check a composed config before anything is built or any MLflow run is created.

`problems(cfg)` returns one short sentence per problem, naming the key and what is allowed; `main` prints
them and exits 2 instead of letting a bad value surface as a traceback minutes into a run.
Hydra itself rejects unknown config-group options (listing the available ones) and unknown keys set without
`+`; src.config.keys rejects keys added with `+` that nothing reads.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from src.analysis import verdict
from src.config import keys
from src.data.datasets import DATASETS, SOURCES
from src.models import registry
from src.models.mlp import NORMS
from src.stats.modules import selection_problems
from src.tracking.store import resolve_uri
from src.tracking.urls import redact

TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _task_overrides() -> list[str]:
    """The command line's overrides, where Hydra's runtime is set (a run started by `python -m src.train`)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


class ConfigError(ValueError):
    """One or more config values are unusable; str() lists them, one per line."""


def check(cfg) -> None:
    found = problems(cfg)
    if found:
        raise ConfigError("\n".join(found))


def problems(cfg) -> list[str]:
    out: list[str] = keys.problems(cfg, _task_overrides())  # first: a typo'd key explains what follows
    try:
        c = OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as e:  # a resolver's own error (init=critical on sigmoid): one line
        cause = re.sub(r"^\w+ raised while resolving interpolation: ", "", str(e).splitlines()[0])
        return out + [f"{e.full_key}: {cause}"]

    def need(ok: bool, key: str, what: str, value) -> None:
        if not ok:
            out.append(f"{key}={value!r}: {what}")

    for key, table in (("activation.name", registry.ACTIVATIONS), ("init.name", registry.INITS),
                       ("optimizer.name", registry.OPTIMIZERS), ("data.name", DATASETS)):
        group, field = key.split(".")
        value = c[group][field]
        need(value in table, key, f"must be one of {', '.join(sorted(table))}", value)

    bias_std, weight_var = c["init"].get("bias_std", 0.0), c["init"].get("weight_var", 1.0)
    need(isinstance(bias_std, (int, float)) and bias_std >= 0, "init.bias_std", "must be a number >= 0", bias_std)
    need(isinstance(weight_var, (int, float)) and weight_var > 0, "init.weight_var", "must be a number > 0",
         weight_var)

    m = c["model"]
    for k in ("depth", "width", "channels", "heads", "max_len"):
        if k in m and not (k in ("depth", "width") and m.get("widths") is not None):
            need(_int(m[k]) and m[k] >= 1, f"model.{k}", "must be an integer >= 1", m[k])
    if m.get("widths") is not None:
        ws = m["widths"]
        need(isinstance(ws, list) and all(_int(w) and w >= 1 for w in ws), "model.widths",
             "must be a list of integers >= 1, e.g. [1000,750,500] ([] for no hidden layer)", ws)
    norm = m.get("norm", "none")
    need(norm in NORMS, "model.norm", f"must be one of {', '.join(NORMS)}", norm)
    need(isinstance(m.get("residual", False), bool), "model.residual", "must be true or false",
         m.get("residual"))
    head = m.get("head_activation")
    need(head is None or head in registry.ACTIVATIONS, "model.head_activation",
         f"must be null or one of {', '.join(sorted(registry.ACTIVATIONS))}", head)
    if "norm_position" in m:
        need(m["norm_position"] in ("pre", "post"), "model.norm_position", "must be pre or post", m["norm_position"])
    if "forget_bias" in m:
        need(_number(m["forget_bias"]), "model.forget_bias", "must be a number", m["forget_bias"])
    if norm == "batch":  # BatchNorm cannot normalise a batch of one in training mode
        need(not _int(c["data"]["batch_size"]) or c["data"]["batch_size"] >= 2, "data.batch_size",
             "must be >= 2 with model.norm=batch", c["data"]["batch_size"])
    for k in ("seq_len", "vocab", "n_samples"):
        if k in c["data"]:
            need(_int(c["data"][k]) and c["data"][k] >= 1, f"data.{k}", "must be an integer >= 1", c["data"][k])

    o = c["optimizer"]
    need(_number(o["lr"]) and o["lr"] > 0, "optimizer.lr", "must be a number > 0", o["lr"])
    for k in ("momentum", "weight_decay"):
        if k in o:
            need(_number(o[k]) and o[k] >= 0, f"optimizer.{k}", "must be a number >= 0", o[k])

    d = c["data"]
    need(_int(d["batch_size"]) and d["batch_size"] >= 1, "data.batch_size", "must be an integer >= 1",
         d["batch_size"])
    need(_number(d.get("val_fraction", 0)) and 0 <= d.get("val_fraction", 0) < 1, "data.val_fraction",
         "must be a number in [0, 1)", d.get("val_fraction"))
    need(isinstance(d.get("shuffle", True), bool), "data.shuffle", "must be true or false", d.get("shuffle"))
    if d["name"] in ("mnist", "fashion_mnist") and not Path(str(d["path"])).exists():
        out.append(f"data.path={d['path']!r}: no such file or folder (download the four {d['name']} IDX files "
                   f"from {SOURCES[d['name']]} into it, or set data.path or $GRADFLOW_DATA_DIR; data=digits "
                   "runs offline)")

    t = c["trainer"]
    need(_int(t["max_steps"]) and (t["max_steps"] == -1 or t["max_steps"] >= 1), "trainer.max_steps",
         "must be an integer >= 1, or -1 for no limit", t["max_steps"])
    need(_int(t["max_epochs"]) and (t["max_epochs"] == -1 or t["max_epochs"] >= 1), "trainer.max_epochs",
         "must be an integer >= 1, or -1 for no limit", t["max_epochs"])
    need(_int(t["log_every_n_steps"]) and t["log_every_n_steps"] >= 1, "trainer.log_every_n_steps",
         "must be an integer >= 1", t["log_every_n_steps"])
    clip = t.get("gradient_clip_val")
    need(clip is None or (_number(clip) and clip >= 0), "trainer.gradient_clip_val",
         "must be null (no clipping) or a number >= 0", clip)
    algo = t.get("gradient_clip_algorithm")
    need(algo is None or algo in ("norm", "value"), "trainer.gradient_clip_algorithm",
         "must be null, norm or value", algo)

    s = c["stats"]
    for k in ("every_n_steps", "log_every_n_steps", "trace_chunk_steps"):
        need(_int(s[k]) and s[k] >= 1, f"stats.{k}", "must be an integer >= 1", s[k])
    if _int(s["every_n_steps"]) and _int(s["log_every_n_steps"]) and s["every_n_steps"] >= 1:
        need(s["log_every_n_steps"] % s["every_n_steps"] == 0, "stats.log_every_n_steps",
             f"must be a multiple of stats.every_n_steps ({s['every_n_steps']})", s["log_every_n_steps"])
    need(_int(s["histogram_every_n_steps"]) and s["histogram_every_n_steps"] >= 1, "stats.histogram_every_n_steps",
         "must be an integer >= 1 (callbacks.histograms=null turns the histograms off)", s["histogram_every_n_steps"])
    need(_number(s["saturation_threshold"]) and 0 < s["saturation_threshold"] < 1,
         "stats.saturation_threshold", "must be a number in (0, 1)", s["saturation_threshold"])
    need(_int(s.get("time_every_n_steps", 1)) and s.get("time_every_n_steps", 1) >= 1, "stats.time_every_n_steps",
         "must be an integer >= 1", s.get("time_every_n_steps"))
    te = s.get("time_every_n_steps", s["every_n_steps"])
    if _int(te) and _int(s["every_n_steps"]) and te >= 1 and s["every_n_steps"] >= 1 \
            and te != s["log_every_n_steps"]:  # that one has its own message above
        need(te % s["every_n_steps"] == 0, "stats.time_every_n_steps",
             f"must be a multiple of stats.every_n_steps ({s['every_n_steps']})", te)
    need(isinstance(s.get("jacobian", False), bool), "stats.jacobian", "must be true or false", s.get("jacobian"))
    out += selection_problems(s.get("include"), s.get("exclude"), s.get("types"))

    for name, node in (c.get("callbacks") or {}).items():
        need(node is None or (isinstance(node, dict) and "_target_" in node), f"callbacks.{name}",
             "must be null (off) or a node with a _target_ (a Lightning callback class)", node)

    need(_int(c["seed"]), "seed", "must be an integer", c["seed"])
    out += verdict.problems(c.get("verdict", {}))

    need(_number(c["tracking"]["server_timeout"]) and c["tracking"]["server_timeout"] >= 0,
         "tracking.server_timeout", "must be a number of seconds >= 0", c["tracking"]["server_timeout"])
    if urlparse(str(c["tracking"]["uri"] or "")).password:  # the config is saved with the run
        out.append(f"tracking.uri={redact(c['tracking']['uri'])!r}: no password in the config, it is saved "
                   "with every run; set $MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD instead")
    uri = resolve_uri(c["tracking"]["uri"])
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in TRACKING_SCHEMES or (scheme in ("http", "https") and not urlparse(uri).hostname):
        source = "tracking.uri" if c["tracking"]["uri"] else "$MLFLOW_TRACKING_URI"
        out.append(f"{source}={redact(uri)!r}: not a tracking URI; use e.g. sqlite:///mlflow.db, "
                   "http://host:5000 or postgresql://user@host/db")
    return out
