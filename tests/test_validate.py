"""Bad input fails fast, names the key and what is allowed, and creates no MLflow run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from src.config import validate
from tests.conftest import ROOT, runs_of


@pytest.mark.parametrize("override,key,hint", [
    ("model.depth=0", "model.depth", "integer >= 1"),
    ("model.depth=2.5", "model.depth", "integer >= 1"),
    ("model.width=abc", "model.width", "integer >= 1"),
    ("model.widths=[64,0]", "model.widths", "list of integers"),
    ("optimizer.lr=-0.1", "optimizer.lr", "> 0"),
    ("data.batch_size=0", "data.batch_size", "integer >= 1"),
    ("data.val_fraction=1.5", "data.val_fraction", "[0, 1)"),
    ("trainer.max_steps=many", "trainer.max_steps", "or -1"),
    ("trainer.max_epochs=0", "trainer.max_epochs", "or -1"),
    ("seed=x", "seed", "integer"),
    ("stats.every_n_steps=3", "stats.log_every_n_steps", "multiple"),
    ("stats.saturation_threshold=2", "stats.saturation_threshold", "(0, 1)"),
    ("tracking.uri=notaurl", "tracking.uri", "not a tracking URI"),
    ("tracking.uri=http://", "tracking.uri", "not a tracking URI"),
    ("data=mnist", "data.path", "no such file"),
    ("tracking.server_timeout=-1", "tracking.server_timeout", ">= 0"),
    ("tracking.uri=http://bob:s3cret@host:5000", "tracking.uri", "MLFLOW_TRACKING_PASSWORD"),
    ("stats.include=[encoder,'a(b']", "stats.include", "'a(b' is not a regular expression"),
    ("stats.exclude='norm['", "stats.exclude", "'norm[' is not a regular expression"),
    ("stats.types=[linear,conv3d]", "stats.types", "unknown type 'conv3d'; valid: linear, conv,"),
    ("stats.jacobian=maybe", "stats.jacobian", "true or false"),
    ("stats.time_every_n_steps=0", "stats.time_every_n_steps", "integer >= 1"),
    ("stats.time_every_n_steps=15", "stats.time_every_n_steps", "multiple of stats.every_n_steps (2)"),
    ("model.norm_position=middle", "model.norm_position", "pre or post"),
    ("data.seq_len=0", "data.seq_len", "integer >= 1"),
])
def test_each_bad_value_is_named(override, key, hint, compose_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    extra = {"data.path": "data.path=/nonexistent", "model.norm_position": "model=transformer",
             "data.seq_len": "data=adding",
             "stats.time_every_n_steps": "stats.every_n_steps=2"}
    found = validate.problems(compose_cfg([override] + [v for k, v in extra.items() if k == key]))
    assert len(found) == 1, found
    assert found[0].startswith(f"{key}=") and hint in found[0]
    assert "s3cret" not in found[0]


def test_default_config_is_valid(compose_cfg, tracking_uri):
    assert validate.problems(compose_cfg()) == []


def test_password_never_printed(compose_cfg, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://bob:s3cret@host/x")
    [msg] = validate.problems(compose_cfg())
    assert "s3cret" not in msg and msg.startswith("$MLFLOW_TRACKING_URI=")


@pytest.mark.slow
def test_cli_exits_2_with_a_short_message_and_no_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-m", "src.train", "model.depth=0", "optimizer.lr=-1"], cwd=ROOT,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "model.depth=0: must be an integer >= 1" in done.stderr
    assert "optimizer.lr=-1: must be a number > 0" in done.stderr
    assert runs_of(uri)[1] == []


@pytest.mark.slow
def test_a_selection_that_matches_nothing_or_is_not_a_pattern_exits_2_before_any_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for override, says in (("stats.include=[nomatch]", "no module of Classifier matches stats.include=['nomatch']; "
                                                         "its modules with trainable parameters: layer_00, layer_01"),
                           ("stats.types=[lienar]", "stats.types=['lienar']: unknown type 'lienar'; valid: linear")):
        done = subprocess.run([sys.executable, "-m", "src.train", override], cwd=ROOT, capture_output=True,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri}, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr and says in done.stderr, done.stderr
    assert runs_of(uri)[1] == []


@pytest.mark.parametrize("override, says", [
    ("+stats.every_n_step=5", "+stats.every_n_step: no part of the program reads this key; did you mean "
                              "`stats.every_n_steps`?"),
    ("+trainer.max_step=100", "+trainer.max_step: no part of the program reads this key; did you mean "
                              "`trainer.max_steps`?"),
    ("+nonexistent=1", "+nonexistent: no part of the program reads this key"),
    ("+trainer.bogus=1", "+trainer.bogus: no part of the program reads this key"),
    ("+model.dropout=0.1", "+model.dropout: no part of the program reads this key"),
])
def test_an_added_key_that_nothing_reads_is_named(compose_cfg, tracking_uri, override, says):
    found = validate.problems(compose_cfg([override]))
    assert len(found) == 1 and found[0].startswith(says.split(";")[0]) and says in found[0], found


@pytest.mark.parametrize("overrides", [
    ["+trainer.limit_val_batches=2"],  # a Trainer argument our YAML does not set
    ["+data.limit_train=100"],  # read with a default by our code
    ["model=cnn", "++model.depth=2"],  # ++ on a key the YAML sets
    ["+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor", "+callbacks.lr.logging_interval=step"],
])
def test_added_keys_that_are_read_pass(compose_cfg, tracking_uri, overrides):
    assert validate.problems(compose_cfg(overrides)) == []


def test_a_misspelt_argument_of_a_callback_of_ones_own(compose_cfg, tracking_uri):
    found = validate.problems(compose_cfg(["+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor",
                                           "+callbacks.lr.logging_intervl=step"]))
    assert found == ["+callbacks.lr.logging_intervl: no part of the program reads this key; did you mean "
                     "`callbacks.lr.logging_interval`?"]


@pytest.mark.slow
def test_a_typo_exits_2_before_any_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for override in ("+stats.every_n_step=5", "+trainer.bogus=1"):
        done = subprocess.run([sys.executable, "-m", "src.train", override], cwd=ROOT, capture_output=True,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri}, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"{override.split('=')[0]}: no part of the program reads this key" in done.stderr
    assert runs_of(uri)[1] == []


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [["activation=sigmoid,relu"], ["hparams_search=grid"]])
def test_a_typo_stops_a_multirun_or_a_sweep_before_anything_runs(tmp_path, sweep):
    done = subprocess.run([sys.executable, "-m", "src.train", "-m", *sweep, "+stats.every_n_step=5",
                           f"hydra.sweeper.storage=journal:{tmp_path}/o.journal" if "hparams_search=grid" in sweep
                           else "seed=0", f"hydra.sweep.dir={tmp_path}/s"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}, timeout=120)
    assert done.returncode == 2 and "did you mean `stats.every_n_steps`?" in done.stderr, done.stderr[-2000:]
    assert "Launching" not in done.stdout + done.stderr  # no job, no parent run, no study
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "o.journal").exists()
