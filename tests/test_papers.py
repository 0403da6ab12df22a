"""The signal-propagation studies (src/reproduce/papers.py): their checks hold on run records that show the
paper's finding and do not on records that contradict it (fast, hand-made records); the slow tier runs each
study scaled down and checks its central finding on real runs."""
from __future__ import annotations

import math
import os

import pytest
import torch

from src.reproduce.papers import epochs_to_level, six_xi, spread
from src.reproduce.results import markdown, summary_row
from src.reproduce.runner import StudyRun
from src.train import train
from tests.conftest import runs_of


def _row(name, params, metrics=None, history=None, tags=None):
    history = history or {}
    return {"name": name, "params": {k: str(v) for k, v in params.items()}, "metrics": metrics or {},
            "tags": tags or {}, "history": lambda key: history.get(key, [])}


def _phase_row(sw2, depth, acc):
    return _row(f"init.weight_var={sw2},model.depth={depth}",
                {"activation.name": "tanh", "init.weight_var": sw2, "init.bias_std": 0.05 ** 0.5, "model.depth": depth},
                {"val/acc": acc})


def test_trainability_counts_the_points_on_the_predicted_side():
    # 6 xi_c: 22 at sigma_w^2 = 1, ~3e4 at 1.76, 42 at 4
    rows = [_phase_row(1.0, 10, 0.9), _phase_row(1.0, 80, 0.1), _phase_row(1.76, 80, 0.8), _phase_row(4.0, 80, 0.1),
            _phase_row(4.0, 10, 0.2)]
    assert six_xi(rows[0]) == pytest.approx(6 * 3.63, rel=0.02)
    text = markdown("trainability", StudyRun(rows, 1.0, ["x"]), False)
    assert "4 of 5 points (80%) on the side" in text and "critical σ_w² = 1.761" in text
    assert text.count("**holds**") == 4, text
    rows[2]["metrics"]["val/acc"] = 0.05  # the critical point fails at depth 80: trainability no longer peaks there
    rows[0]["metrics"]["val/acc"] = 0.1
    text = markdown("trainability", StudyRun(rows, 1.0, ["x"]), False)
    assert "reaches the highest val/acc: **does NOT hold**" in text
    assert "most points inside the line train (val/acc ≥ 0.5): **does NOT hold**" in text


def test_deep_linear_epochs_read_from_the_validation_history():
    def run(init, depth, losses):
        return _row(f"init={init},model.depth={depth}", {"init": init, "model.depth": depth, "optimizer.lr": 0.08 / depth},
                    {}, {"val/loss": [(44 * (i + 1), v) for i, v in enumerate(losses)]})
    rows = [run("orthogonal", 1, [0.5, 0.35, 0.25]), run("orthogonal", 32, [0.5, 0.35, 0.2]),
            run("gaussian", 1, [0.5, 0.35, 0.25]), run("gaussian", 32, [0.9, 0.8, 0.7])]
    assert epochs_to_level(rows[0]) == 3 and math.isinf(epochs_to_level(rows[3]))
    text = markdown("deep_linear", StudyRun(rows, 1.0, ["x"]), False)
    assert text.count("**holds**") == 3 and "gaussian: 3 → never (3) epochs" in text
    rows[1] = run("orthogonal", 32, [0.9, 0.8, 0.7, 0.6, 0.5, 0.2])  # orthogonal slows with depth too
    assert "1.5× the epochs of the shallowest: **does NOT hold**" in markdown("deep_linear", StudyRun(rows, 1.0, ["x"]), False)


def test_isometry_checks_read_the_spectrum_at_step_0():
    def run(act, init, depth, top, msq, chi=1.0, acc=((0, 0.1), (100, 0.9))):
        r = _row(f"activation={act},init={init},model.depth={depth}",
                 {"activation": act, "init": init, "model.depth": depth, "model.width": 256})
        h = {"jacobian/max_sv": [(0, top)], "jacobian/mean_sq_sv": [(0, msq)], "val/acc": list(acc)}
        r["history"] = lambda key: [(0, chi)] if key.startswith("theory/chi1/layer_") else h.get(key, [])
        return r
    rows = [run("tanh", "critical_orthogonal", 2, 1.1, 1.0), run("tanh", "critical_orthogonal", 32, 1.3, 0.95),
            run("tanh", "critical", 2, 1.5, 1.0, acc=((0, 0.1), (300, 0.9))), run("tanh", "critical", 32, 6.0, 0.9, acc=((0, 0.1), (300, 0.9))),
            run("relu", "critical", 2, 1.6, 1.0), run("relu", "critical", 32, 8.0, 1.1),
            run("relu", "critical_orthogonal", 2, 1.5, 1.0), run("relu", "critical_orthogonal", 32, 7.0, 1.0)]
    assert spread(rows[1]) == pytest.approx(1.3 ** 2 / 0.95)
    text = markdown("isometry", StudyRun(rows, 1.0, ["x"]), False)
    assert text.count("**holds**") == 6, text
    rows[1] = run("tanh", "critical_orthogonal", 32, 3.0, 1.0)  # orthogonal spreads too: no isometry
    assert "below 2 at every depth): **does NOT hold**" in markdown("isometry", StudyRun(rows, 1.0, ["x"]), False)


def test_glorot_saturation_checks_and_the_readme_row():
    sig = _row("activation=sigmoid", {"activation": "sigmoid", "model.depth": 2}, {},
               {"act_mean/layer_00": [(0, 0.5), (100, 0.52)], "act_mean/layer_01": [(0, 0.5), (100, 0.03)]},
               {"verdict": "saturated", "verdict_reason": "90% of layer_01's sigmoid units are saturated"})
    tanh = _row("activation=tanh", {"activation": "tanh", "model.depth": 2}, {},
                {"act_saturation/layer_00": [(0, 0.0), (50, 0.6)], "act_saturation/layer_01": [(0, 0.0), (90, 0.7)]})
    text = markdown("glorot_saturation", StudyRun([sig, tanh], 1.0, ["x"]), False)
    assert text.count("**holds**") == 4, text
    row = summary_row("glorot_saturation", text, "docs/results/glorot_saturation.md")
    assert "sigmoid's top hidden layer saturates at 0 early" in row and "top hidden act_mean 0.03" in row
    tanh["history"] = lambda key: {"act_saturation/layer_00": [(0, 0.0), (90, 0.6)],
                                   "act_saturation/layer_01": [(0, 0.0), (50, 0.7)]}.get(key, [])  # top layer first
    text = markdown("glorot_saturation", StudyRun([sig, tanh], 1.0, ["x"]), False)
    assert "one after another: **holds**" in text and "the first layer first: **does NOT hold**" in text


# ---- real runs, scaled down -----------------------------------------------------------------------------
QUIET = ["trainer.enable_progress_bar=false", "tracking.plots=false"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_isometry_at_init_orthogonal_tanh_stays_near_one(compose_cfg, tracking_uri, one_thread):
    """One step each (the spectrum is of the net as initialised), depth 32 width 64: orthogonal tanh's spread
    (max sigma^2 / mean sigma^2; 3.6 seen) is over 10x smaller than Gaussian tanh's and orthogonal ReLU's (106,
    144); the mean squared singular
    value is within a factor of 2 of the theory's product of chi1 over blocks 2..32."""
    got = {}
    for act, init in (("tanh", "critical_orthogonal"), ("tanh", "critical"), ("relu", "critical_orthogonal")):
        name = f"{act}-{init}"
        train(compose_cfg(["experiment=isometry", f"activation={act}", f"init={init}", "model.depth=32",
                           "trainer.max_steps=1", *QUIET, f"tracking.run_name={name}"]))
        client, runs = runs_of(tracking_uri, "isometry")
        run = next(r for r in runs if r.info.run_name == name)
        m = run.data.metrics
        got[name] = m["jacobian/max_sv"] ** 2 / m["jacobian/mean_sq_sv"]
        predicted = math.prod(m[f"theory/chi1/layer_{i:02d}"] for i in range(1, 32))
        assert 0.5 < m["jacobian/mean_sq_sv"] / predicted < 2, (name, m["jacobian/mean_sq_sv"], predicted)
    assert 10 * got["tanh-critical_orthogonal"] < min(got["tanh-critical"], got["relu-critical_orthogonal"]), got


@pytest.mark.slow
def test_deep_linear_orthogonal_learns_in_fewer_epochs_at_depth(compose_cfg, tracking_uri, one_thread):
    """Depth 32 (lr 0.08/32), 6 epochs (the preset: 30): orthogonal reaches val/loss 0.3 within 4 epochs, scaled
    Gaussian does not."""
    epochs = {}
    for init in ("orthogonal", "gaussian"):
        train(compose_cfg(["experiment=deep_linear", f"init={init}", "model.depth=32", "trainer.max_epochs=6",
                           "stats=off", *QUIET, f"tracking.run_name={init}"]))
        client, runs = runs_of(tracking_uri, "deep_linear")
        run = next(r for r in runs if r.info.run_name == init)
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss"))
        epochs[init] = epochs_to_level({"history": lambda key, h=history: h})
    assert epochs["orthogonal"] <= 4 < epochs["gaussian"], epochs


@pytest.mark.slow
def test_glorot_sigmoid_top_layer_is_driven_to_zero(compose_cfg, tracking_uri, one_thread):
    """The preset's sigmoid run cut to 110 steps: the top hidden layer's mean activation is below 0.1 by step
    100, the lower layers' within 0.4-0.8 (the paper's figure 2)."""
    train(compose_cfg(["experiment=glorot_saturation", "activation=sigmoid", "trainer.max_steps=110", *QUIET]))
    client, (run,) = runs_of(tracking_uri, "glorot_saturation")

    def at_100(layer):
        return next(m.value for m in sorted(client.get_metric_history(run.info.run_id, f"act_mean/{layer}"),
                                            key=lambda m: m.step) if m.step >= 100)
    assert at_100("layer_03") < 0.1, at_100("layer_03")
    assert all(0.4 <= at_100(f"layer_{i:02d}") <= 0.8 for i in range(3))


@pytest.mark.slow
def test_trainability_inside_and_beyond_the_line(compose_cfg, tracking_uri, one_thread):
    """Depth 40, 400 steps (the preset: 1000): at the critical sigma_w^2 = 1.76 (6 xi_c ~ 3e4) the net trains;
    at sigma_w^2 = 1 (6 xi_c = 22) it does not."""
    acc = {w: train(compose_cfg(["experiment=trainability", f"init.weight_var={w}", "model.depth=40",
                                 "trainer.max_steps=400", "stats=off", *QUIET]))["val/acc"] for w in (1.0, 1.76)}
    assert acc[1.0] < 0.5 <= acc[1.76], acc


def test_make_sweep_runs_a_presets_own_points_when_told_an_experiment():
    import subprocess

    from tests.conftest import ROOT

    def dry(args: str) -> str:
        return subprocess.run(["make", "-n", "sweep", f"ARGS={args}"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "-m hparams_search=preset experiment=trainability" in dry("experiment=trainability")
    assert "-m hparams_search=grid activation=relu" in dry("activation=relu")


@pytest.mark.slow
def test_a_preset_through_our_sweeper_gets_its_phase_diagram(tmp_path):
    """experiment=trainability on the Optuna engine, 2 workers, 4 points cut to 50 steps: every point once, and the
    study's report is the phase diagram with the theory's line."""
    import subprocess
    import sys

    import optuna

    from src.sweeps.storage import open_storage
    from tests.conftest import ROOT

    storage = f"journal:{tmp_path}/optuna.journal"
    args = [sys.executable, "-m", "src.train", "-m", "experiment=trainability", "hparams_search=preset",
            "hydra.sweeper.workers=2", "init.weight_var=1.0,1.76", "model.depth=10,40", "trainer.max_steps=50",
            "stats=off", f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path}/s"]
    done = subprocess.run(args, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(study_name="trainability", storage=open_storage(storage)).get_trials()
    assert sorted((t.params["init.weight_var"], t.params["model.depth"]) for t in trials
                  if t.state.name == "COMPLETE") == [(1.0, 10), (1.0, 40), (1.76, 10), (1.76, 40)]
    page = (tmp_path / "s" / "report" / "report.html").read_text()
    assert "<h2>Phase diagram</h2>" in page and "<th>6 ξ_c</th>" in page and page.count("class='beyond'") == 1
