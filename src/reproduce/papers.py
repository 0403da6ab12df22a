"""The signal-propagation papers as studies: the trainability phase diagram (Schoenholz et al. 2017), dynamical
isometry (Pennington et al. 2017), deep linear nets (Saxe et al. 2014) and the saturation of Glorot & Bengio
2010's figures 2-3. Each check compares our runs with the mean-field theory (src/analysis/phase.py) or with the
paper's figure, stated as an ordering or a threshold a reader can verify in the table."""
from __future__ import annotations

import math
from functools import lru_cache

from src.analysis import phase
from src.reproduce.columns import Row, by, first, fmt, last, swept
from src.reproduce.study import VERDICT, Study
from src.stats.names import jacobian_spread

def _figure(name: str):
    """The study's figure, drawn by src.reproduce.figures (matplotlib, imported only when a figure is drawn)."""
    def draw(rows: list[Row], path) -> None:
        from src.reproduce import figures

        getattr(figures, name)(rows, path)
    return draw


# ---- trainability ----------------------------------------------------------------------------------------
TRAINS = 0.5  # val/acc: five times chance on digits' 10 classes
SB2 = 0.05    # the paper's sigma_b^2


@lru_cache(maxsize=None)
def _six_xi(activation: str, sw2: float, sb2: float) -> float:
    return 6 * phase.correlation_depth(activation, sw2, sb2)


def _p(r: Row, key: str) -> float:
    return float(r["params"][key])


def six_xi(r: Row) -> float:
    """The theory's deepest trainable net for this run's activation, sigma_w^2 and sigma_b^2."""
    return _six_xi(r["params"]["activation.name"], _p(r, "init.weight_var"), _p(r, "init.bias_std") ** 2)


def inside(r: Row) -> bool:
    return _p(r, "model.depth") <= six_xi(r)


def trains(r: Row) -> bool:
    return (last("val/acc")(r) or 0.0) >= TRAINS


def on_the_predicted_side(rows: list[Row]) -> tuple[int, int]:
    return sum(inside(r) == trains(r) for r in rows), len(rows)


def deepest_best_is_critical(rows: list[Row]) -> bool:
    """At the largest depth, the sigma_w^2 nearest the critical one reaches the highest val/acc."""
    deep = [r for r in rows if _p(r, "model.depth") == max(_p(x, "model.depth") for x in rows)]
    crit = phase.critical_weight_variance(deep[0]["params"]["activation.name"], _p(deep[0], "init.bias_std") ** 2)
    nearest = min(deep, key=lambda r: abs(_p(r, "init.weight_var") - crit))
    return last("val/acc")(nearest) == max(last("val/acc")(r) for r in deep)


def _fraction(rows: list[Row], side: bool, outcome: bool) -> float:
    group = [r for r in rows if inside(r) == side]
    return sum(trains(r) == outcome for r in group) / len(group) if group else math.nan


def _trainability_ours(rows: list[Row]) -> str:
    k, n = on_the_predicted_side(rows)
    return (f"{k} of {n} points ({k / n:.0%}) on the side of depth = 6 ξ_c that the theory predicts; critical "
            f"σ_w² = {phase.critical_weight_variance('tanh', SB2):.3f}")


# ---- isometry --------------------------------------------------------------------------------------------
def spread(r: Row) -> float | None:
    """max σ² / mean σ² of the Jacobian's singular values: 1 for an isometry, large for a spread spectrum."""
    top, msq = first("jacobian/max_sv")(r), first("jacobian/mean_sq_sv")(r)
    return jacobian_spread(top, msq) if top is not None and msq else None


def chi1_power(r: Row) -> float | None:
    """The mean-field prediction of the mean squared singular value: the product of the per-layer chi1 over
    the blocks the Jacobian spans (2..L; theory/chi1/layer_LL is layer LL's factor)."""
    chis = [first(f"theory/chi1/layer_{i:02d}")(r) for i in range(1, int(_p(r, "model.depth")))]
    return math.prod(chis) if chis and None not in chis else None


def steps_to(r: Row, key: str = "val/acc", level: float = 0.8) -> float:
    """The first step at which `key` reached `level` (inf: never in the run)."""
    return next((float(s) for s, v in r["history"](key) if v >= level), math.inf)


def _cells(rows: list[Row], activation: str, init: str) -> list[Row]:
    return sorted((r for r in rows if swept(r).get("activation") == activation and swept(r).get("init") == init),
                  key=lambda r: _p(r, "model.depth"))


def _spread_grows(rows: list[Row], activation: str, init: str) -> bool:
    cells = _cells(rows, activation, init)
    return spread(cells[-1]) > 2 * spread(cells[0])


def _isometry_ours(rows: list[Row]) -> str:
    parts = []
    for act, init in (("tanh", "critical_orthogonal"), ("tanh", "critical"), ("relu", "critical_orthogonal")):
        cells = _cells(rows, act, init)
        if cells:
            parts.append(f"{act}/{init}: {fmt(spread(cells[0]))} → {fmt(spread(cells[-1]))}")
    return "max σ²/mean σ² from the shallowest to the deepest net: " + "; ".join(parts)


# ---- deep linear -----------------------------------------------------------------------------------------
LOSS_LEVEL = 0.3  # val/loss: a linear classifier of digits ends near 0.15


def epochs_to_level(r: Row) -> float:
    """Validation runs once per epoch: the epoch whose val/loss first fell below LOSS_LEVEL (inf: never)."""
    return next((float(i + 1) for i, (_, v) in enumerate(r["history"]("val/loss")) if v < LOSS_LEVEL), math.inf)


def epochs_text(r: Row) -> str:
    e = epochs_to_level(r)
    return fmt(e) if math.isfinite(e) else f"never ({len(r['history']('val/loss'))})"


def _by_depth(rows: list[Row], init: str) -> list[Row]:
    return sorted((r for r in rows if swept(r).get("init") == init), key=lambda r: _p(r, "model.depth"))


def _deep_linear_ours(rows: list[Row]) -> str:
    return "; ".join(f"{init}: " + " → ".join(epochs_text(r) for r in _by_depth(rows, init))
                     for init in ("orthogonal", "gaussian")) + " epochs, depth 1 → 32"


# ---- Glorot & Bengio's saturation ------------------------------------------------------------------------
AFTER = 100  # steps: well inside the first epoch (batch 10: 144 steps)


def at_step(key: str, step: int = AFTER):
    def get(r: Row):
        return next((v for s, v in r["history"](key) if s >= step), None)
    return get


def hidden(r: Row) -> list[str]:
    return [f"layer_{i:02d}" for i in range(int(_p(r, "model.depth")))]


def saturation_onsets(r: Row, level: float = 0.5) -> list[float]:
    """Per hidden layer (input side first): the first step at which more than `level` of its units are
    saturated (inf: never)."""
    return [next((float(s) for s, v in r["history"](f"act_saturation/{m}") if v > level), math.inf) for m in hidden(r)]


def _sigmoid_top_collapses(rows: list[Row]) -> bool:
    r = by(rows, activation="sigmoid")
    layers = hidden(r)
    lower = [at_step(f"act_mean/{m}")(r) for m in layers[:-1]]
    return at_step(f"act_mean/{layers[-1]}")(r) < 0.1 and all(0.4 <= v <= 0.8 for v in lower)


def _one_after_another(onsets: list[float]) -> bool:
    """Every layer saturates, not all at once: the onsets are distinct and ordered along the depth."""
    finite = all(math.isfinite(o) for o in onsets)
    return finite and len(set(onsets)) == len(onsets) and (onsets == sorted(onsets) or onsets == sorted(onsets)[::-1])


def _glorot_ours(rows: list[Row]) -> str:
    s, t = by(rows, activation="sigmoid"), by(rows, activation="tanh")
    out = []
    if s:
        out.append(f"sigmoid at step {AFTER}: top hidden act_mean {fmt(at_step(f'act_mean/{hidden(s)[-1]}')(s))}, "
                   f"first {fmt(at_step(f'act_mean/{hidden(s)[0]}')(s))}")
    if t:
        out.append("tanh: first step with >50 % saturated units, layer 0 → top: "
                   + ", ".join(fmt(o) for o in saturation_onsets(t)))
    return "; ".join(out)


PAPERS: dict[str, Study] = {
    "trainability": Study(
        "Schoenholz et al. 2017: which (σ_w², depth) a tanh net trains at, against the theory's 6 ξ_c",
        "Schoenholz, Gilmer, Ganguli & Sohl-Dickstein 2017, \"Deep information propagation\" (MNIST, width 300, "
        "σ_b² = 0.05, SGD): a net trains up to a depth of about 6 ξ_c, the correlation depth scale; ξ_c diverges at "
        "the critical σ_w² ≈ 1.76, where the trainable depth peaks; beyond the 6 ξ_c line training fails.",
        [("σ_w²", lambda r: _p(r, "init.weight_var")), ("depth", lambda r: _p(r, "model.depth")),
         ("6 ξ_c (theory)", six_xi), ("predicted", lambda r: "trains" if inside(r) else "fails"),
         ("val/acc (final)", last("val/acc")), ("as predicted", lambda r: "yes" if inside(r) == trains(r) else "no"),
         VERDICT],
        ["model.depth=4,16,64", "init.weight_var=1.0,1.76,4.0", "trainer.max_steps=300"],
        seed_column=lambda r: f"{'trains' if inside(r) else 'fails'} (depth {'≤' if inside(r) else '>'} 6 ξ_c)",
        checks=[
            ("the critical σ_w² for σ_b² = 0.05 is 1.76 (our quadrature)",
             lambda rs: abs(phase.critical_weight_variance("tanh", SB2) - 1.76) < 0.01),
            ("at the largest depth the σ_w² nearest the critical one reaches the highest val/acc",
             deepest_best_is_critical),
            (f"most points beyond the 6 ξ_c line fail (val/acc < {TRAINS})", lambda rs: _fraction(rs, False, False) > 0.5),
            (f"most points inside the line train (val/acc ≥ {TRAINS})", lambda rs: _fraction(rs, True, True) > 0.5),
        ],
        claim="a net trains up to depth ≈ 6 ξ_c; the trainable depth peaks at the critical σ_w² ≈ 1.76",
        ours=_trainability_ours, figure=_figure("trainability"),
    ),
    "isometry": Study(
        "Pennington et al. 2017: the Jacobian's spectrum at init, tanh/ReLU × Gaussian/orthogonal at criticality",
        "Pennington, Schoenholz & Ganguli 2017, \"Resurrecting the sigmoid\": at criticality the mean squared "
        "singular value of the input-output Jacobian is χ₁^L = 1 at any depth, but only orthogonal weights on a "
        "tanh-like net keep every singular value near 1 (dynamical isometry); Gaussian weights and any ReLU net "
        "spread the spectrum as depth grows, and learn more slowly.",
        [("depth", lambda r: _p(r, "model.depth")), ("mean σ² (step 0)", first("jacobian/mean_sq_sv")),
         ("∏ χ₁ over blocks 2..L (theory)", chi1_power), ("max σ (step 0)", first("jacobian/max_sv")),
         ("max σ² / mean σ²", spread), ("first step val/acc ≥ 0.8", lambda r: steps_to(r)),
         ("val/acc (final)", last("val/acc")), VERDICT],
        ["model.depth=2,16", "trainer.max_epochs=3"],
        seed_column=lambda r: {("tanh", "critical_orthogonal"): "isometry: spectrum stays near 1"}.get(
            (swept(r).get("activation"), swept(r).get("init")), "spreads with depth"),
        checks=[
            ("the mean squared singular value tracks the theory's ∏ χ₁ within a factor of 2 where depth ≤ width / 8 "
             "(mean field is a wide-net limit)",
             lambda rs: all(0.5 <= first("jacobian/mean_sq_sv")(r) / chi1_power(r) <= 2 for r in rs
                            if _p(r, "model.depth") <= _p(r, "model.width") / 8)),
            ("orthogonal tanh keeps the spectrum concentrated (max σ² / mean σ² below 2 at every depth)",
             lambda rs: all(spread(r) < 2 for r in _cells(rs, "tanh", "critical_orthogonal"))),
            ("at the largest depth orthogonal tanh's spread is at least 10× smaller than Gaussian tanh's and ReLU's",
             lambda rs: 10 * spread(_cells(rs, "tanh", "critical_orthogonal")[-1])
             < min(spread(_cells(rs, a, i)[-1]) for a, i in (("tanh", "critical"), ("relu", "critical"),
                                                            ("relu", "critical_orthogonal")))),
            ("Gaussian tanh's spectrum spreads with depth (the ratio doubles from the shallowest to the deepest)",
             lambda rs: _spread_grows(rs, "tanh", "critical")),
            ("ReLU's spectrum spreads with depth under both inits",
             lambda rs: _spread_grows(rs, "relu", "critical") and _spread_grows(rs, "relu", "critical_orthogonal")),
            ("at the largest depth orthogonal tanh reaches val/acc 0.8 in fewer steps than Gaussian tanh",
             lambda rs: steps_to(_cells(rs, "tanh", "critical_orthogonal")[-1])
             < steps_to(_cells(rs, "tanh", "critical")[-1])),
        ],
        claim="only orthogonal tanh at criticality keeps the Jacobian's spectrum near 1 with depth, and learns faster",
        ours=_isometry_ours, figure=_figure("isometry"),
    ),
    "deep_linear": Study(
        "Saxe et al. 2014: epochs to learn vs depth for deep linear nets, orthogonal vs scaled Gaussian init",
        "Saxe, McClelland & Ganguli 2014: with the learning rate scaled as 1/depth, a deep linear net learns in "
        "a number of epochs nearly independent of its depth from random orthogonal weights, and in ever more "
        "epochs from scaled Gaussian weights (N(0, 1/fan_in)).",
        [("depth", lambda r: _p(r, "model.depth")), ("lr", lambda r: _p(r, "optimizer.lr")),
         (f"epochs to val/loss < {LOSS_LEVEL}", epochs_text), ("val/loss (final)", last("val/loss")),
         ("val/acc (final)", last("val/acc"))],
        ["model.depth=1,8,32", "trainer.max_epochs=12"],
        seed_column=lambda r: {"orthogonal": "flat in depth", "gaussian": "grows with depth"}.get(
            swept(r).get("init"), ""),
        checks=[
            ("orthogonal: the deepest net needs at most 1.5× the epochs of the shallowest",
             lambda rs: epochs_to_level(_by_depth(rs, "orthogonal")[-1]) <= 1.5 * epochs_to_level(_by_depth(rs, "orthogonal")[0])),
            ("Gaussian: the deepest net needs at least 2× the epochs of the shallowest (or never gets there)",
             lambda rs: epochs_to_level(_by_depth(rs, "gaussian")[-1]) >= 2 * epochs_to_level(_by_depth(rs, "gaussian")[0])),
            ("at every depth orthogonal needs no more epochs than Gaussian",
             lambda rs: all(epochs_to_level(o) <= epochs_to_level(g)
                            for o, g in zip(_by_depth(rs, "orthogonal"), _by_depth(rs, "gaussian")))),
        ],
        claim="learning time is nearly depth-independent from orthogonal init, grows with depth from Gaussian",
        ours=_deep_linear_ours, figure=_figure("deep_linear"),
    ),
    "glorot_saturation": Study(
        "Glorot & Bengio 2010, figures 2-3: sigmoid's top hidden layer driven to 0; tanh's layers saturating",
        "Glorot & Bengio 2010 (4-5 layers of 1000, standard init U(±1/√fan_in)): \"very quickly at the "
        "beginning, all the sigmoid activation values of the last hidden layer are pushed to their lower "
        "saturation value of 0\" while the lower layers stay near 0.5 (figure 2); with tanh the layers saturate "
        "one after another, from the first layer up (figure 3).",
        [("top hidden act_mean at step 100", lambda r: at_step(f"act_mean/{hidden(r)[-1]}")(r)),
         ("lower layers' act_mean at step 100", lambda r: ", ".join(fmt(at_step(f"act_mean/{m}")(r)) for m in hidden(r)[:-1])),
         ("first step > 50 % saturated, layer 0 → top", lambda r: ", ".join(fmt(o) for o in saturation_onsets(r))),
         VERDICT, ("verdict_reason", lambda r: r["tags"].get("verdict_reason", "—"))],
        ["trainer.max_epochs=1"],
        seed_column=lambda r: {"sigmoid": "top layer → 0 at once; lower ≈ 0.5",
                               "tanh": "saturates layer 1, then 2, …"}.get(swept(r).get("activation"), ""),
        checks=[
            (f"sigmoid: by step {AFTER} the top hidden layer's mean activation is below 0.1 while the lower "
             "layers' stay within 0.4-0.8", _sigmoid_top_collapses),
            ("sigmoid: our verdict is `saturated`, naming the top hidden layer",
             lambda rs: (r := by(rs, activation="sigmoid"))["tags"].get("verdict") == "saturated"
             and hidden(r)[-1] in r["tags"].get("verdict_reason", "")),
            ("tanh: the layers saturate one after another", lambda rs: _one_after_another(saturation_onsets(by(rs, activation="tanh")))),
            ("tanh: in the paper's order, the first layer first",
             lambda rs: (o := saturation_onsets(by(rs, activation="tanh"))) == sorted(o) and _one_after_another(o)),
        ],
        claim="sigmoid's top hidden layer saturates at 0 early; tanh's layers saturate one after another, bottom up",
        ours=_glorot_ours, figure=_figure("glorot_saturation"),
    ),
}
