"""The README and docs/ match the code: every make target, module command, file path, config key, metric
name and artifact they name exists. A renamed key or module fails here, not in a newcomer's terminal."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.stats.names import LAYER_STATS
from tests.conftest import CONF, ROOT, runs_of

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {p.name: p.read_text() for p in DOCS}
ALL = "\n".join(TEXT.values())
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"`make ([a-z][a-z-]*)", ALL)) | set(re.findall(r"^make ([a-z][a-z-]*)", ALL, re.M))
    assert named and named <= targets, named - targets


def test_every_module_command_named_exists():
    named = set(re.findall(r"python -m (src(?:\.[a-z_]+)*)", ALL))
    assert {"src.train", "src.gradcheck", "src.sweeps", "src.reproduce", "src.tracking"} <= named
    missing = [m for m in named if importlib.util.find_spec(m) is None]
    assert not missing, missing


@pytest.mark.parametrize("module,sub", [("src.sweeps", ("status", "report", "requeue", "dashboard", "submit", "proxy")),
                                        ("src.tracking", ("replay",))])
def test_every_subcommand_named_is_in_its_help(module, sub):
    documented = set(re.findall(rf"python -m {re.escape(module)} ([a-z]+)", ALL))
    assert documented <= set(sub), documented
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    helptext = done.stdout + done.stderr
    assert all(s in helptext for s in sub), helptext


def test_every_repository_path_named_exists():
    paths = set(re.findall(r"`((?:src|conf|docs|benchmarks|deploy|hydra_plugins|tests)/[^`\s<]*)`", ALL))
    assert len(paths) > 20
    missing = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists())
    assert not missing, missing


def _keys(node, prefix="") -> set[str]:
    out = set()
    for k, v in node.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_every_config_key_named_exists_in_an_option_of_its_group():
    """`stats.log_every_n_steps`, `init.std`, ...: each is a key of at least one option of its group (init.std
    exists for the normal inits only); `hydra.sweeper.*` are keys of the sweeper's config."""
    known = set()
    for group in GROUPS:
        for f in (CONF / group).glob("*.yaml"):
            body = OmegaConf.to_container(OmegaConf.load(f)) or {}
            body.pop("defaults", None)
            package = "" if f.read_text().startswith("# @package _global_") else f"{group}."
            known |= {f"{package}{k}" for k in _keys(body)}
    sweeper = OmegaConf.to_container(OmegaConf.load(CONF / "hydra/sweeper/gradflow.yaml"))
    known |= {f"hydra.sweeper.{k}" for k in _keys(sweeper)}
    pattern = rf"(?<![\w./])((?:{'|'.join(GROUPS)}|hydra\.sweeper)\.[a-z_]+(?:\.[a-z_]+)*)(?![\w/(])"
    named = {k for k in re.findall(pattern, ALL)  # not modules (src.stats.trace.read_trace) nor files (tracking.md)
             if not k.startswith(("stats.trace.", "stats.histograms.")) and not re.search(r"\.(md|py|yaml)$", k)}
    assert len(named) > 30
    missing = sorted(k for k in named if k not in known)
    assert not missing, missing


@pytest.mark.slow
def test_every_metric_and_artifact_named_is_what_a_run_logs(tracking_uri, compose_cfg):
    """Two real runs with the optional recorders on, an MLP and a recurrent net: each documented metric key (a
    `<stat>/<module>`, `…` or `layer_LL` key as the MLP's layer_00, or the RNN's rnn_00) and each documented
    artifact is in the store."""
    from src.train import train

    common = ["trainer.max_epochs=1", "stats.log_every_n_steps=5", "trainer.enable_progress_bar=false",
              "tracking.plots=true"]
    train(compose_cfg(["model.depth=3", "callbacks=weight_change", "tracking.epoch_stats=true", "stats.jacobian=true",
                       *common, "tracking.run_name=mlp"]))
    train(compose_cfg(["model=rnn", "data=adding", "data.seq_len=8", "data.n_samples=320", *common,
                       "tracking.run_name=rnn"]))
    client, runs = runs_of(tracking_uri)
    logged = {k.replace("/rnn_00", "/layer_00") for r in runs for k in r.data.metrics}
    documented = set()
    for key in re.findall(r"`([a-z_0-9]+(?:/[a-z_0-9]+)*/(?:layer_LL|…|<module>|<layer>))`", ALL) + \
            re.findall(r"`((?:train|val|time|theory|jacobian)/[a-z_0-9]+)`", ALL):
        documented.add(re.sub(r"(layer_LL|…|<module>|<layer>)$", "layer_00", key))
    assert {f"{s}/layer_00" for s in LAYER_STATS} <= documented  # the table names every statistic
    assert "backprop_time_ratio/layer_00" in documented
    assert not documented - logged, sorted(documented - logged)

    files = {f.path for r in runs for d in client.list_artifacts(r.info.run_id)
             for f in ([d] if not d.is_dir else client.list_artifacts(r.info.run_id, d.path))}
    named = set(re.findall(r"`((?:trace|plots|hydra|jacobian)/[a-z_]+\.(?:parquet|png|csv|yaml)|report\.html)`", ALL))
    shorts = "layer_norms|saturation|curves|theory|hist_grad|hist_backprop|hist_act|jacobian_spectrum"
    for short in re.findall(rf"`({shorts})\.png`", ALL):
        named.add(f"plots/{short}.png")
    assert len(named) > 10 and {"trace/time_trace.parquet", "report.html"} <= named
    assert not named - files, sorted(named - files)
