"""Verdict rules on synthetic statistics (tier b), and on real tiny runs (tier d)."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from src.analysis import verdict
from src.stats.names import LAYER_STATS
from src.train import train
from tests.conftest import CONF, runs_of

TH = verdict.from_config(OmegaConf.to_container(OmegaConf.load(CONF / "verdict" / "default.yaml")))


def make_trace(n_steps=200, n_layers=4, **overrides):
    """A healthy trace: every hidden layer gets the output layer's signal, moderate gradients and updates,
    a third of units saturated. overrides: stat -> [steps x layers] array or callable(steps) -> array."""
    steps = np.arange(n_steps)
    t = {"steps": steps, "layers": np.arange(n_layers)}
    for s in LAYER_STATS:
        t[s] = np.full((n_steps, n_layers), 0.01, dtype=np.float32)
    t["backprop_norm"][:] = 1.0
    t["grad_nonfinite"][:] = 0
    t["act_saturation"][:] = 0.3
    t["act_saturation"][:, -1] = np.nan  # no activation after the output layer
    t["update_ratio"][:] = 1e-3
    for k, v in overrides.items():
        t[k] = np.asarray(v(steps) if callable(v) else v, dtype=np.float32)
    return t


def loss_history(values, every=10):
    return {"train/loss": [(i * every, float(v)) for i, v in enumerate(values)]}


FLAT = loss_history([2.3] * 20)            # stuck at chance
FALLING = loss_history(np.linspace(2.3, 1.5, 20))  # learning, not done
DONE = loss_history(2.3 * np.exp(-np.arange(20) / 3))  # falls far below a tenth of its start


def test_healthy():
    v = verdict.diagnose(make_trace(), FALLING, "tanh", TH)
    assert v.verdict == "healthy" and v.escape_step is None
    assert "no rule fired" in v.reason


def test_vanishing_names_layer_ratio_and_step():
    bp = np.ones((200, 4))
    bp[50:, 0] = 1e-5  # from step 50 the first layer gets 1e-5 of the output layer's signal
    v = verdict.diagnose(make_trace(backprop_norm=bp), FLAT, "sigmoid", TH)
    assert (v.verdict, v.step, v.escape_step) == ("vanishing", 50, None)
    assert "layer 00" in v.reason and "1.0e-05" in v.reason and "step 50" in v.reason
    assert v.tags() == {"verdict": "vanishing", "verdict_reason": v.reason, "verdict_step": "50"}


def test_a_short_blip_is_not_vanishing():
    """5 steps < patience_steps (20): no gradient rule fires; the loss never moved, so the run has stalled."""
    bp = np.ones((200, 4))
    bp[50:55, 0] = 1e-5
    v = verdict.diagnose(make_trace(backprop_norm=bp), FLAT, "sigmoid", TH)
    assert v.verdict == "stalled" and "no gradient rule explains it" in v.reason
    assert verdict.diagnose(make_trace(backprop_norm=bp), FALLING, "sigmoid", TH).verdict == "healthy"


def test_a_loss_that_barely_moved_is_stalled_never_healthy():
    """circles 4x5 sigmoid at seed 1: the loss ends at 0.90 of its start with no rule firing: stalled. At 0.7
    of its start the run is still learning: healthy."""
    for end, expected in ((0.9, "stalled"), (0.81, "stalled"), (0.7, "healthy")):
        v = verdict.diagnose(make_trace(), loss_history(np.linspace(1.0, end, 20)), "sigmoid", TH)
        assert v.verdict == expected, end
    # the smoothed loss: the median of the last 5 logged values, 0.91
    assert "still 0.91 of its start at step 199 (threshold 0.8)" in verdict.diagnose(
        make_trace(), loss_history(np.linspace(1.0, 0.9, 20)), "sigmoid", TH).reason


def test_a_net_that_learned_only_the_constant_has_not_learned():
    """A regression net whose first outputs are far off: its loss falls from 0.40 to 0.17, the loss of predicting
    the targets' mean. Against its start that is a plateau at 0.43 (read as converged); against the constant
    prediction it is 1.0: stalled. Below the constant's loss, the start is the reference again."""
    to_mean = loss_history(np.r_[np.linspace(0.4, 0.17, 5), np.full(15, 0.17)])
    assert verdict.diagnose(make_trace(), to_mean, "tanh", TH).verdict == "converged"
    v = verdict.diagnose(make_trace(), to_mean, "tanh", TH, constant_loss=0.167)
    assert v.verdict == "stalled" and "1.02 of a constant prediction's (0.17)" in v.reason, v.reason
    assert verdict.diagnose(make_trace(), DONE, "tanh", TH, constant_loss=2.31).verdict == "converged"


def test_vanishing_through_time_names_the_recurrent_module():
    """||dL/dh_1|| / ||dL/dh_T|| below vanishing_time_ratio while the loss is high: vanishing, through time."""
    norms = np.array([[1e-9, 1e-3, 1.0]] * 5)  # measured at steps 0, 50, ..., 200
    through = {"rnn_00": {"steps": np.arange(0, 250, 50), "norms": norms}}
    v = verdict.diagnose(make_trace(), FLAT, "tanh", TH, through)
    assert (v.verdict, v.step) == ("vanishing", 0)
    assert v.reason.startswith("rnn_00's signal through time at its first step is 1.0e-09 of its last step's")
    through["rnn_00"]["norms"] = np.array([[0.5, 0.7, 1.0]] * 5)  # an LSTM that keeps its signal
    assert verdict.diagnose(make_trace(), FALLING, "tanh", TH, through).verdict == "healthy"


def test_vanishing_by_the_absolute_gradient_floor_in_a_net_without_hidden_layers():
    g = np.full((200, 1), 1e-9)
    t = make_trace(n_layers=1, grad_mean=g, grad_std=g)
    v = verdict.diagnose(t, FLAT, "tanh", TH)
    assert v.verdict == "vanishing" and "gradient RMS" in v.reason and v.step == 0


def test_converged_not_vanishing_small_gradients_at_low_loss():
    """Seed 002: the gradient shrinks by orders of magnitude (to 2e-10, below the 1e-7 floor from step 139 on)
    because the fit is done: the loss fell below half its start by step 30."""
    g = 0.1 * np.exp(-np.arange(200) / 10)[:, None]
    assert g[-1, 0] < 1e-9
    t = make_trace(n_layers=1, grad_mean=g, grad_std=g)
    v = verdict.diagnose(t, DONE, "tanh", TH)
    assert v.verdict == "converged" and "of its start" in v.reason
    first_low = next(s for s, x in DONE["train/loss"] if x <= 0.1 * 2.3)
    assert v.step >= first_low  # the running median lags the raw loss by a couple of points


def test_converged_by_plateau():
    v = verdict.diagnose(make_trace(), loss_history([2.3, 1.8, 1.2] + [0.6] * 17), "relu", TH)
    assert v.verdict == "converged" and "flat" in v.reason


def test_stall_then_escape_reports_both_steps():
    """Seed 000: the signal is tiny and the loss flat for a long time, then the net escapes."""
    bp = np.ones((400, 4))
    bp[:250, 0] = 1e-4
    loss = loss_history([2.3] * 25 + list(np.linspace(2.3, 0.2, 15)))  # steps 0..390, falls after 250
    v = verdict.diagnose(make_trace(400, backprop_norm=bp), loss, "sigmoid", TH)
    assert v.verdict == "vanishing" and v.step == 0
    assert 250 < v.escape_step < 400 and f"escaped at step {v.escape_step}" in v.reason
    assert v.tags()["verdict_escape_step"] == str(v.escape_step)


def test_saturated_for_bounded_activations():
    sat = np.full((200, 4), 0.1)
    sat[30:, 2] = 0.8
    v = verdict.diagnose(make_trace(act_saturation=sat), FLAT, "sigmoid", TH)
    assert (v.verdict, v.step) == ("saturated", 30) and "80% of layer 02's sigmoid units" in v.reason


def test_dead_for_rectifiers_with_an_activation_aware_threshold():
    sat = np.full((200, 4), 0.6)  # 60% of a ReLU layer off: normal (half is off at init), not dead
    assert verdict.diagnose(make_trace(act_saturation=sat), FALLING, "relu", TH).verdict == "healthy"
    sat[10:, 1] = 0.97
    v = verdict.diagnose(make_trace(act_saturation=sat), FLAT, "relu", TH)
    assert (v.verdict, v.step) == ("dead", 10) and "97% of layer 01's relu units are dead" in v.reason


def test_dead_layer_wins_over_the_vanishing_it_causes():
    sat = np.full((200, 4), 0.5)
    sat[10:, 1] = 1.0
    bp = np.ones((200, 4))
    bp[10:, :2] = 0.0  # nothing gets through a dead layer
    assert verdict.diagnose(make_trace(act_saturation=sat, backprop_norm=bp), FLAT, "relu", TH).verdict == "dead"


def test_identity_is_never_saturated():
    sat = np.full((200, 4), 1.0)
    assert verdict.diagnose(make_trace(act_saturation=sat), FALLING, "identity", TH).verdict == "healthy"


@pytest.mark.parametrize("trace_kw,loss,expect", [
    ({}, loss_history([2.3, 2.2, float("nan")]), "training loss is nan at step 20"),
    ({}, loss_history([2.3, 2.2, float("inf")]), "training loss is inf at step 20"),
    ({"grad_nonfinite": lambda s: np.where(s[:, None] >= 7, [0, 3, 0, 0], 0)}, FALLING,
     "layer 01's gradient has 3 NaN/Inf entries at step 7"),
    ({"backprop_norm": lambda s: np.where(s[:, None] >= 5, [1e5, 1, 1, 1], 1.0)}, FALLING,
     "layer 00's back-propagated signal is 1.0e+05x the output layer's at step 5"),
    ({"update_ratio": lambda s: np.where(s[:, None] == 3, [0, 0, 50, 0], 1e-3)}, FALLING,
     "layer 02's update is 50x its weights' norm at step 3"),
    ({}, loss_history([2.3] * 5 + [50.0] * 10), "the loss grew to 22x its start"),
])
def test_exploding(trace_kw, loss, expect):
    v = verdict.diagnose(make_trace(**trace_kw), loss, "relu", TH)
    assert v.verdict == "exploding" and expect in v.reason, v.reason


def test_a_run_stopped_on_its_first_nan_loss_is_exploding():
    """A guard that ends the run on a non-finite loss leaves a truncated trace whose last step has a NaN
    gradient norm (no NaN count yet) and a history ending in NaN."""
    t = make_trace(8)
    t["grad_norm"][-1, :] = np.nan
    v = verdict.diagnose(t, loss_history([2.3, float("nan")], every=7), "tanh", TH)
    assert (v.verdict, v.step) == ("exploding", 7)
    t["grad_norm"][-1, 2] = np.nan
    v = verdict.diagnose(t, loss_history([2.3]), "tanh", TH)
    assert v.verdict == "exploding" and "layer 00's gradient has a non-finite norm at step 7" in v.reason


def test_a_layer_the_loss_does_not_reach_is_not_an_explosion():
    bp = np.ones((200, 4))
    bp[:, 1] = np.nan  # the callback's mark for a frozen/unused layer; its gradient norm stays finite (0)
    assert verdict.diagnose(make_trace(backprop_norm=bp), FALLING, "tanh", TH).verdict == "healthy"


def test_stats_off_is_unknown_with_a_reason():
    v = verdict.diagnose(None, FALLING, "relu", TH)
    assert v.verdict == "unknown" and "(stats=off)" in v.reason


def test_every_registry_activation_says_what_its_saturation_means():
    from src.models.registry import ACTIVATIONS
    assert {a.family for a in ACTIVATIONS.values()} == {"saturated", "dead", None}
    assert {n for n, a in ACTIVATIONS.items() if a.family == "saturated"} == {"sigmoid", "tanh", "softsign"}
    assert ACTIVATIONS["identity"].family is None  # no flat region: never judged
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        verdict.diagnose(make_trace(), FLAT, "swish", TH)


def test_bad_thresholds_are_named():
    values = {**OmegaConf.to_container(OmegaConf.load(CONF / "verdict" / "default.yaml")),
              "vanishing_ratio": 2.0, "patience_steps": 0, "typo": 1}
    found = verdict.problems(values)
    assert any(p.startswith("verdict.typo: unknown key") for p in found)
    assert "verdict.vanishing_ratio=2.0: must be a number in (0, 1]" in found
    assert "verdict.patience_steps=0: must be an integer >= 1" in found
    with pytest.raises(ValueError, match="vanishing_ratio"):
        verdict.from_config(values)


# ---- tier (d): real runs ---------------------------------------------------------------------------------
REAL = ["trainer.max_epochs=2", "trainer.max_steps=80", "trainer.log_every_n_steps=5",
        "trainer.enable_progress_bar=false", "model.depth=10", "model.width=32", "tracking.plots=false"]


def test_real_runs_deep_sigmoid_vanishes_relu_he_does_not(tracking_uri, compose_cfg, capsys):
    sig = train(compose_cfg([*REAL, "activation=sigmoid", "init=xavier", "tracking.run_name=sig"]))
    relu = train(compose_cfg([*REAL, "activation=relu", "init=he", "tracking.run_name=relu"]))
    assert sig["verdict"] == "vanishing"
    assert relu["verdict"] == "healthy"  # 80 steps: still learning, the loss at about half its start (seeds 0-2)
    assert isinstance(sig["train/loss"], float)
    assert "verdict: vanishing: layer_00's back-propagated signal" in capsys.readouterr().out
    _, runs = runs_of(tracking_uri)
    tags = {r.info.run_name: r.data.tags for r in runs}
    assert tags["sig"]["verdict"] == "vanishing" and tags["sig"]["verdict_step"] == "0"
    assert "of the output layer's at step 0" in tags["sig"]["verdict_reason"]
    assert tags["relu"]["verdict"] == relu["verdict"]


def test_real_run_with_stats_off_is_unknown(tracking_uri, compose_cfg):
    out = train(compose_cfg([*REAL, "model.depth=2", "stats=off", "trainer.max_steps=5"]))
    assert out["verdict"] == "unknown"
    _, [run] = runs_of(tracking_uri)
    assert run.data.tags["verdict"] == "unknown" and "(stats=off)" in run.data.tags["verdict_reason"]


def test_a_run_that_never_trained_with_a_moderately_decaying_signal_is_vanishing():
    """Seed 003's sigmoid net: the signal is 0.02-0.1 of the output layer's (above vanishing_ratio) and the
    loss is still high at the end. The same decay in a run whose loss fell is not called vanishing."""
    bp = np.ones((200, 4))
    bp[30:, 0] = 0.03
    v = verdict.diagnose(make_trace(backprop_norm=bp), FLAT, "sigmoid", TH)
    assert (v.verdict, v.step) == ("vanishing", 30)
    assert "still 1.00 of its start" in v.reason and "layer 00" in v.reason and "0.1" in v.reason
    assert verdict.diagnose(make_trace(backprop_norm=bp), DONE, "sigmoid", TH).verdict == "converged"
    bp[150:, 0] = 1.0  # the signal recovered before the end: no gradient explains the stall
    assert verdict.diagnose(make_trace(backprop_norm=bp), FLAT, "sigmoid", TH).verdict == "stalled"
