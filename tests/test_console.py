"""What a run prints: known noise filtered by message only, one progress bar, three closing lines."""
from __future__ import annotations

import logging
import warnings

import lightning as L
from lightning.pytorch.loggers import CSVLogger
import torch
from torch.utils.data import DataLoader, TensorDataset

from src import console
from src.callbacks.progress import RunProgressBar
from src.models.modules import Classifier
from src.models.mlp import build_mlp
from src.tracking.urls import run_page
from src.train import train
from tests.test_train import FAST


def test_only_the_known_noise_is_filtered(caplog):
    console.quiet_known_noise()
    console.quiet_known_noise()  # twice: one filter
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert sum(isinstance(f, console._DropAdvert) for f in log.filters) == 1
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](x)")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.quiet_known_noise()  # filters added after simplefilter take precedence
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


def test_one_bar_over_the_run_with_the_live_ratio(capsys, tmp_path):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=8)
    module = Classifier(build_mlp(8, 3, activation="tanh", init="xavier_uniform", depth=4, width=8), "sgd",
                        {"lr": 0.1})

    class History(CSVLogger):  # what our logger offers the bar: the run-level history
        history = {"backprop_ratio": [(0, 0.5), (10, 0.25)]}

    trainer = L.Trainer(max_epochs=3, logger=History(tmp_path), callbacks=[RunProgressBar()],
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data, data)
    out = capsys.readouterr().out
    assert "Validation" not in out and "Sanity" not in out
    last = out.replace("\r", "\n").strip().splitlines()[-1]
    assert "epoch 2" in last and "24/24" in last and "backprop_ratio=0.25" in last and "v_num" not in last


def test_a_run_ends_with_verdict_metrics_and_where_to_look(tracking_uri, compose_cfg, capsys):
    train(compose_cfg([*FAST, "activation=tanh", "init=he"]))
    verdict, metrics, look = capsys.readouterr().out.strip().splitlines()[-3:]
    assert verdict.startswith("verdict: ") and ": " in verdict[len("verdict: "):]
    assert "train/loss=" in metrics and "backprop_ratio=" in metrics and metrics.endswith(" s)")
    assert look.startswith("look: ") and look.endswith("?workflowType=machine_learning") and "/runs/" in look


def test_where_to_look(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_UI_PORT", raising=False)
    assert run_page("http://bob:pw@host:5000/", "3", "abc") == \
        "http://bob:***@host:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert run_page(f"sqlite:///{tmp_path / 'mlflow.db'}", "1", "abc") == \
        "make ui, then http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    monkeypatch.setenv("MLFLOW_UI_PORT", "5100")
    assert run_page("sqlite:////elsewhere/m.db", "1") == \
        "MLFLOW_TRACKING_URI='sqlite:////elsewhere/m.db' make ui, then " \
        "http://127.0.0.1:5100/#/experiments/1/runs?viewStateShareKey=gradflow&workflowType=machine_learning"


def test_ctrl_c_stops_at_the_end_of_the_batch_and_the_handler_is_restored(tmp_path):
    import os
    import signal

    import pytest

    from src.callbacks.guards import CtrlCAtStepEnd

    class PressAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # delivered to this (the main) thread at once

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=8)

    def trainer(callbacks):
        return L.Trainer(max_epochs=2, logger=False, callbacks=callbacks, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)

    def module():
        return Classifier(build_mlp(8, 3, activation="tanh", init="xavier_uniform", depth=2, width=8), "sgd",
                          {"lr": 0.1})

    before = signal.getsignal(signal.SIGINT)
    calm = trainer([CtrlCAtStepEnd()])
    calm.fit(module(), data)  # no Ctrl-C: the handler is put back as it was
    assert calm.global_step == 16 and signal.getsignal(signal.SIGINT) == before
    try:
        pressed = trainer([PressAt(), CtrlCAtStepEnd()])
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown, which train() turns into exit 130
            pressed.fit(module(), data)
        # the batch that was running finished its step (Python's own handler would have stopped it at 3)
        assert pressed.interrupted and pressed.global_step == 4
    finally:
        signal.signal(signal.SIGINT, before)  # Lightning left SIGINT ignored after its shutdown
