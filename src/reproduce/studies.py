"""The presets' studies: for each, what the seed or paper reported, the columns of our table, the shorter
run of --quick, and the checks that say whether our runs show the same thing."""
from __future__ import annotations

from typing import Callable

from src.reproduce.columns import (Row, best, by, first, first_step_above, last, layer_range, ratio_of_medians,
                                   swept, tag, tail_mean, top_hidden, val_err)
from src.reproduce.study import VERDICT, Study


def slowest_to_learn(rows: list[Row]) -> bool:
    """mnist_40_20: sigmoid with small Gaussian weights reaches test acc 0.5 last (or never), every other
    cell does."""
    reach = first_step_above("val/acc", 0.5)
    target = by(rows, activation="sigmoid", init="small_normal")
    others = [reach(r) for r in rows if r is not target]
    return all(s is not None for s in others) and (reach(target) is None or reach(target) > max(others))


def stalled_then_escaped(row: Row) -> bool:
    """mnist_deep_sigmoid: train/acc stays below 0.5 for at least the first tenth of the run, and the run
    ends above 0.5 (val/acc)."""
    escape, end = first_step_above("train/acc", 0.5)(row), row["history"]("train/loss")
    return escape is not None and bool(end) and escape >= 0.1 * end[-1][0] and last("val/acc")(row) >= 0.5


def depth_profile(key: str, modules: list[str]) -> Callable[[Row], float | None]:
    """`key` of the last of `modules` over the first's, at step 0 (a per-module metric, e.g. grad_norm)."""
    def get(r: Row):
        a, b = first(f"{key}/{modules[0]}")(r), first(f"{key}/{modules[-1]}")(r)
        return b / a if a and b is not None else None
    return get


FFN_OUT = [f"encoder.layers.{i}.linear2" for i in range(6)]  # post_vs_pre_ln's feed-forward output layers
SEQ_LENS = ("10", "30", "50")


def lengths(rs: list[Row], model: str) -> list[Row]:
    return [by(rs, model=model, **{"data.seq_len": n}) for n in SEQ_LENS]


STUDIES: dict[str, Study] = {
    "circles_4x5": Study(
        "seed 003: circles, 4 hidden layers of 5, N(0, 1) init, RMSprop; sigmoid vs tanh vs relu",
        "Seed 003 (Keras, 100 epochs): train accuracy sigmoid 0.652, tanh 0.994, relu 0.995; weight-gradient "
        "std per layer ≈1e-2…1e-3 for sigmoid, ≈1e-1…1e-2 for tanh.",
        [("val/acc (last 3 epochs)", tail_mean("val/acc", 3)), ("train/acc (last 10 logs)", tail_mean("train/acc")),
         ("grad_std per hidden layer (median over training)", layer_range("grad_std")), VERDICT,
         ("verdict_reason", tag("verdict_reason"))],
        ["trainer.max_epochs=30"],
        seed_column=lambda r: {"sigmoid": "acc 0.652; grad std 1e-2…1e-3", "tanh": "acc 0.994; grad std 1e-1…1e-2",
                               "relu": "acc 0.995"}.get(r["params"].get("activation"), ""),
        checks=[("sigmoid ends below tanh and relu (val/acc)", lambda rs: tail_mean("val/acc", 3)(by(rs, activation="sigmoid"))
                 < min(tail_mean("val/acc", 3)(by(rs, activation=a)) for a in ("tanh", "relu")))],
    ),
    "moons_sigmoid_vs_relu": Study(
        "seed 004: moons, 3 sigmoid vs 2 ReLU layers of 10, Adam; the first layer's change",
        "Seed 004 (Keras, Adam 1e-3, 100 epochs): sigmoid ×3 stuck at 0.51 for 10 epochs, 0.81 at the end; "
        "relu ×2 reaches 1.0. First layer: |old−new|/lr ≈280…1100 and 98…8700 % change (sigmoid), ≈4…240 and "
        "1…170 % (relu).",
        [("val/acc", last("val/acc")), ("train/acc (last 10 logs)", tail_mean("train/acc")),
         ("layer 0 mean |old−new|/lr", last("weight_change/total_over_lr/layer_00")),
         ("layer 0 median % change", last("weight_change/pct_median/layer_00")), VERDICT],
        ["trainer.max_epochs=30"],
        seed_column=lambda r: {("sigmoid", "3"): "acc 0.81; |Δ|/lr 280…1100; 98…8700 %",
                               ("relu", "2"): "acc 1.0; |Δ|/lr 4…240; 1…170 %"}.get(
            (r["params"].get("activation"), r["params"].get("model.depth")), "(not in the seed)"),
        checks=[("the seed's ReLU net ends above its sigmoid net (val/acc)",
                 lambda rs: last("val/acc")(by(rs, activation="relu", **{"model.depth": 2}))
                 > last("val/acc")(by(rs, activation="sigmoid", **{"model.depth": 3}))),
                ("the sigmoid net's first layer moves more than the ReLU net's (|old−new|/lr)",
                 lambda rs: last("weight_change/total_over_lr/layer_00")(by(rs, activation="sigmoid", **{"model.depth": 3}))
                 > last("weight_change/total_over_lr/layer_00")(by(rs, activation="relu", **{"model.depth": 2})))],
    ),
    "mnist_40_20": Study(
        "seed 001: 784-40-20-10, SGD 0.1; sigmoid/ReLU × N(0, 0.01²)/LeCun/He",
        "Seed 001 plots train-batch and test accuracy every 10 iterations for four cells (sigmoid+N(0,0.01²), "
        "ReLU+N(0,0.01²), sigmoid+\"Xavier\" (std 1/√fan_in), ReLU+He); its text gives no final numbers. Small "
        "Gaussian weights make the sigmoid net slowest to leave chance; the scaled inits learn from the start.",
        [("test acc (final)", last("val/acc")), ("test acc (best)", best("val/acc")),
         ("first step test acc ≥ 0.5", first_step_above("val/acc", 0.5)), VERDICT],
        ["trainer.max_steps=300"],
        seed_column=lambda r: "seed cell" if (r["params"].get("activation"), r["params"].get("init")) in
        {("sigmoid", "small_normal"), ("relu", "small_normal"), ("sigmoid", "lecun"), ("relu", "he")} else "",
        checks=[("sigmoid with N(0, 0.01²) is the slowest to reach test acc 0.5", slowest_to_learn)],
    ),
    "mnist_deep_sigmoid": Study(
        "seed 000: [1000, 750, 500] sigmoid, momentum 0.99; a stall, then an escape",
        "Seed 000 (MNIST, 410 steps per epoch): error ≈0.9 for ~15 epochs (~6000 steps), then falls to ≈0.03 "
        "by epoch 29: a stall, then an escape; per-layer mean |ΔW| per step shows it.",
        [("first step train/acc ≥ 0.5 (escape)", first_step_above("train/acc", 0.5)),
         ("val/acc (final)", last("val/acc")),
         ("mean |ΔW| layer 0 / last (median)", ratio_of_medians), VERDICT,
         ("verdict_reason", tag("verdict_reason"))],
        ["trainer.max_epochs=8"],
        seed_column=lambda r: "error ≈0.9 for ~6000 steps, escape, ≈0.03 at the end",
        checks=[("a stall (train/acc below 0.5 for the first tenth of the run or longer), then an escape (final "
                 "val/acc ≥ 0.5)", lambda rs: stalled_then_escaped(rs[0]))],
    ),
    "line_fit": Study(
        "seed 002: a 1→1 tanh fit of y = 2x; small gradients at convergence are not vanishing",
        "Seed 002: a 1→1 tanh unit fitting y = 2x; the gradient shrinks as the fit converges. The answer: "
        "convergence, not a vanishing gradient.",
        [("train/loss first", first("train/loss")), ("train/loss last", last("train/loss")),
         ("grad_norm first", first("grad_norm/layer_00")), ("grad_norm last", last("grad_norm/layer_00")),
         VERDICT, ("verdict_reason", tag("verdict_reason"))],
        ["trainer.max_steps=400"],
        seed_column=lambda r: "converging, not vanishing",
        checks=[("the verdict is converged, not vanishing", lambda rs: rs[0]["tags"].get("verdict") == "converged")],
    ),
    "glorot_bengio": Study(
        "Glorot & Bengio 2010, Table 1, scaled down: sigmoid/tanh/softsign × standard/normalized init",
        "Glorot & Bengio 2010, Table 1 (MNIST, 5 × 1000 units, test error %): Softsign 1.64, Softsign N 1.72, "
        "Tanh 1.76, Tanh N 1.64, Sigmoid 2.21 (Shapeset: Sigmoid 82.61, Tanh 27.15, Tanh N 15.60). With the "
        "standard init the back-propagated gradient shrinks towards the input; normalized (N) init keeps it level.",
        [("val error % (last 3 epochs)", lambda r: val_err(r)), ("backprop_ratio at step 0", first("backprop_ratio")),
         ("top hidden layer act_mean (median over training)", lambda r: top_hidden(r, "act_mean")), VERDICT],
        ["trainer.max_epochs=2", "model.width=64"],
        seed_column=lambda r: {("softsign", "torch_default"): "1.64", ("softsign", "xavier"): "1.72",
                               ("tanh", "torch_default"): "1.76", ("tanh", "xavier"): "1.64",
                               ("sigmoid", "torch_default"): "2.21"}.get(
            (r["params"].get("activation"), r["params"].get("init")), "—"),
        checks=[
            ("sigmoid has the highest error of the three activations (standard init)",
             lambda rs: val_err(by(rs, activation="sigmoid", init="torch_default"))
             > max(val_err(by(rs, activation=a, init="torch_default")) for a in ("tanh", "softsign"))),
            ("normalized init keeps the back-propagated signal more level than standard (tanh)",
             lambda rs: first("backprop_ratio")(by(rs, activation="tanh", init="xavier"))
             > first("backprop_ratio")(by(rs, activation="tanh", init="torch_default"))),
            ("normalized init keeps the back-propagated signal more level than standard (softsign)",
             lambda rs: first("backprop_ratio")(by(rs, activation="softsign", init="xavier"))
             > first("backprop_ratio")(by(rs, activation="softsign", init="torch_default"))),
            ("tanh: normalized init error ≤ standard init error",
             lambda rs: val_err(by(rs, activation="tanh", init="xavier"))
             <= val_err(by(rs, activation="tanh", init="torch_default"))),
        ],
    ),
    "he_depth": Study(
        "He et al. 2015: 30 ReLU layers of 256, LeCun (1/n) vs He (2/n) init",
        "He et al. 2015: a 30-layer ReLU net with Var(w) = 1/n \"completely stalls\"; He init (2/n) converges. "
        "Theory at init (depth 30, width 256): first/last back-propagated ratio ≈4e-5 for 1/n, ≈1 for He.",
        [("backprop_ratio at step 0", first("backprop_ratio")), ("val/acc (final)", last("val/acc")), VERDICT],
        ["trainer.max_epochs=2"],
        seed_column=lambda r: {"lecun": "≈4e-5; stalls", "he": "≈1; converges"}.get(r["params"].get("init"), ""),
        checks=[("lecun's ratio < 1e-3 and He's within [0.1, 10]",
                 lambda rs: first("backprop_ratio")(by(rs, init="lecun")) < 1e-3
                 and 0.1 <= first("backprop_ratio")(by(rs, init="he")) <= 10)],
    ),
    "plain_vs_resnet": Study(
        "He et al. 2016: 20 conv layers, plain vs with skips (ReLU, PyTorch's default init, digits)",
        "He et al. 2016: at equal depth a plain deep net trains worse than the same net with identity "
        "shortcuts, whose signal reaches the first layers unattenuated. Here 20 3×3 convolutions of 16 channels "
        "on digits' 8×8 images, ReLU, PyTorch's default init (variance 1/(3 fan_in)), Adam without warm-up.",
        [("backprop_ratio at step 0", first("backprop_ratio")), ("val/acc (final)", last("val/acc")), VERDICT],
        ["trainer.max_epochs=2"],
        seed_column=lambda r: {"cnn": "plain: worse", "resnet": "residual: better"}.get(swept(r).get("model"), ""),
        checks=[("the plain net's signal at its first layer is below 1e-3 of its last hidden layer's at step 0, "
                 "the residual net's above 1e-2",
                 lambda rs: first("backprop_ratio")(by(rs, model="cnn")) < 1e-3
                 < 1e-2 < first("backprop_ratio")(by(rs, model="resnet"))),
                ("the residual net ends above the plain one by 0.3 (val/acc)",
                 lambda rs: last("val/acc")(by(rs, model="resnet")) > last("val/acc")(by(rs, model="cnn")) + 0.3)],
    ),
    "rnn_vs_lstm": Study(
        "Bengio et al. 1994, Hochreiter & Schmidhuber 1997: tanh RNN vs LSTM on the adding problem, 10-50 steps",
        "Bengio et al. 1994: the gradient of a recurrent net decays exponentially with the time lag; Hochreiter & "
        "Schmidhuber 1997: an LSTM bridges it and solves the adding problem where a tanh RNN fails; Pascanu et al. "
        "2013: clipping handles the exploding half, not the vanishing one. Predicting the mean scores an MSE of "
        "1/6: val/loss well below 0.17 means solved.",
        [("backprop_time_ratio at step 0", first("backprop_time_ratio")), ("val/loss (final)", last("val/loss")),
         VERDICT],
        ["trainer.max_epochs=3"],
        seed_column=lambda r: {"rnn": "fails as the lag grows", "lstm": "solves"}.get(swept(r).get("model"), ""),
        checks=[("the RNN's signal through time at step 0 falls below 1e-7 by 50 steps and is always below the "
                 "LSTM's, which stays above 1e-7",
                 lambda rs: first("backprop_time_ratio")(lengths(rs, "rnn")[-1]) < 1e-7
                 and all(first("backprop_time_ratio")(a) < first("backprop_time_ratio")(b)
                         for a, b in zip(lengths(rs, "rnn"), lengths(rs, "lstm")))
                 and min(first("backprop_time_ratio")(b) for b in lengths(rs, "lstm")) > 1e-7),
                ("at 50 steps the RNN fails (val/loss above 0.1) and the LSTM solves it (below 0.05)",
                 lambda rs: last("val/loss")(lengths(rs, "rnn")[-1]) > 0.1 > 0.05 > last("val/loss")(lengths(rs, "lstm")[-1])),
                ("at 10 steps both solve it (below 0.05): the RNN's failure is the lag",
                 lambda rs: max(last("val/loss")(lengths(rs, m)[0]) for m in ("rnn", "lstm")) < 0.05)],
    ),
    "post_vs_pre_ln": Study(
        "Xiong et al. 2020: a 6-block transformer, LayerNorm after (Post-LN) vs before (Pre-LN) each sublayer",
        "Xiong et al. 2020: at initialisation the gradient of a Post-LN transformer's parameters grows toward the "
        "output layers, while a Pre-LN one's is the same at every layer; so Post-LN needs a learning-rate warm-up "
        "and without one trains worse. Here the recall task (16 tokens, 16 symbols), 6 blocks of width 64, Adam at "
        "a constant 5e-3.",
        [("linear2 grad_norm, last / first block, step 0", depth_profile("grad_norm", FFN_OUT)),
         ("val/acc (final)", last("val/acc")), VERDICT],
        ["trainer.max_epochs=1"],
        seed_column=lambda r: {"post": "grows toward the output; fails without warm-up",
                               "pre": "level; trains"}.get(swept(r).get("model.norm_position"), ""),
        checks=[("Post-LN's gradient grows toward the output (last block / first > 1)",
                 lambda rs: depth_profile("grad_norm", FFN_OUT)(by(rs, **{"model.norm_position": "post"})) > 1),
                ("Pre-LN's gradient is level across blocks (last / first within 0.8-1.25)",
                 lambda rs: 0.8 <= depth_profile("grad_norm", FFN_OUT)(by(rs, **{"model.norm_position": "pre"})) <= 1.25),
                ("without warm-up Post-LN ends below Pre-LN by 0.3 (val/acc)",
                 lambda rs: last("val/acc")(by(rs, **{"model.norm_position": "post"}))
                 < last("val/acc")(by(rs, **{"model.norm_position": "pre"})) - 0.3)],
    ),
    "cures": Study(
        "each known cure on a 20-layer sigmoid net that stays at chance without one",
        "No seed: the literature's cures, each on a deep sigmoid net (20 layers of 64, Xavier, SGD 0.1, digits) "
        "that stays at chance without one. Expected: batch norm (Ioffe & Szegedy 2015) and skip connections "
        "(He et al. 2016) keep the back-propagated signal's size; clipping only bounds large gradients, so it "
        "cannot enlarge a vanishing one; ReLU with He init removes the cause.",
        [("backprop_ratio at step 0", first("backprop_ratio")), ("val/acc (final)", last("val/acc")), VERDICT],
        ["trainer.max_epochs=4"],
        checks=[("at least one cure lifts val/acc above the baseline's by 0.3",
                 lambda rs: max(last("val/acc")(r) for r in rs if swept(r).get("cure") != "none")
                 > last("val/acc")(by(rs, cure="none")) + 0.3)],
    ),
}

# The seed's or paper's claim in a line, for the README's table.
CLAIMS = {
    "circles_4x5": "sigmoid stalls (train acc 0.65) where tanh and ReLU reach 0.99",
    "moons_sigmoid_vs_relu": "the sigmoid net is stuck for long and its first layer moves more; ReLU reaches 1.0",
    "mnist_40_20": "sigmoid with N(0, 0.01²) weights is the slowest to leave chance",
    "mnist_deep_sigmoid": "error ≈0.9 for ~6000 steps, then an escape to ≈0.03",
    "line_fit": "a shrinking gradient at convergence is not vanishing",
    "glorot_bengio": "sigmoid trains worst; the normalized init keeps the back-propagated signal level",
    "he_depth": "30 ReLU layers stall with 1/n init and train with He's 2/n",
    "plain_vs_resnet": "a deep plain net trains worse than the same net with identity shortcuts",
    "rnn_vs_lstm": "a tanh RNN's gradient decays with the time lag; an LSTM bridges it",
    "post_vs_pre_ln": "Post-LN's gradient grows toward the output and it needs warm-up; Pre-LN's is level",
    "cures": "batch norm, skips or ReLU/He rescue a deep sigmoid net; clipping cannot",
}
for _name, _claim in CLAIMS.items():
    STUDIES[_name].claim = _claim

from src.reproduce.papers import PAPERS  # noqa: E402 - the signal-propagation papers, in a file of their own

STUDIES.update(PAPERS)
