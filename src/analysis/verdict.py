"""The end-of-run diagnosis: is this net's gradient vanishing, exploding, saturated, dead, or has it converged?

Pure functions of the dense trace (`src.stats.trace.read_trace`: `steps`, `modules`, `kinds` and one
[steps x modules] matrix per statistic), of the signal through time of recurrent modules
(`src.stats.trace.read_time_trace`) and of the run-level loss history (`{"train/loss": [(step, value), ...]}`, what the
Lightning logger keeps). Thresholds come from `conf/verdict/default.yaml`; every default is justified there.
What a saturated unit means for an activation (saturated, dead, or never judged) is the registry's.

Rules, in order of precedence:
  exploding   a non-finite loss or gradient, a loss grown `loss_growth`x, a hidden layer's back-propagated
              signal above `exploding_ratio` x the output layer's, or an update above `update_ratio_max` x ||W||
  dead /      (while the loss is still high) a module with more than `dead_fraction` dead units
  saturated   (rectifiers) / `saturated_fraction` saturated units (sigmoid, tanh, softsign)
  vanishing   (while the loss is still high) a hidden layer's signal below `vanishing_ratio` x the output
              layer's, a recurrent module's signal at its first time step below `vanishing_time_ratio` x its
              last one's (through time), a gradient RMS below `grad_rms_floor`, or an update below
              `update_ratio_min` x ||W||; or, for a run whose loss is still high at its end, a signal below
              `stall_ratio` x the output layer's from some step to the end
  converged   the loss fell to `converged_loss_fraction` of its start, or is low and flat
  stalled     the loss ends above `stalled_loss_fraction` of its start, and no rule above explains it
  healthy     none of the above: still learning
"Of its start" is of the first logged loss, or of the best constant prediction's where that is lower (a
regression net whose first outputs are far off "learns" the targets' mean first; that is not learning the task).
"Layers" here are the modules of src.stats.modules.LAYER_KINDS (not the norms), the output layer the last of
them; reasons name each module by its path.
Among dead, saturated and vanishing the earliest wins (the cause before its symptom on a tie). A stall that
ends (the loss later falls below the high mark) keeps its verdict and reports the escape step too.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from src.models.registry import ACTIVATIONS, lookup
from src.stats.modules import LAYER_KINDS

VERDICTS = ("vanishing", "exploding", "saturated", "dead", "stalled", "converged", "healthy", "unknown")


@dataclass(frozen=True)
class Thresholds:
    """The `verdict` config group as plain values (no defaults here: the YAML file is the one source)."""
    vanishing_ratio: float
    vanishing_time_ratio: float
    stall_ratio: float
    exploding_ratio: float
    grad_rms_floor: float
    update_ratio_min: float
    update_ratio_max: float
    saturated_fraction: float
    dead_fraction: float
    high_loss_fraction: float
    stalled_loss_fraction: float
    converged_loss_fraction: float
    plateau_fraction: float
    plateau_change: float
    loss_growth: float
    loss_smoothing: int
    patience_steps: int


def problems(values: dict) -> list[str]:
    """One sentence per bad or missing threshold (called by src.validate before any run exists)."""
    names = {f.name for f in fields(Thresholds)}
    out = [f"verdict.{k}: unknown key; valid: {', '.join(sorted(names))}" for k in sorted(set(values) - names)]
    out += [f"verdict.{k}: missing" for k in sorted(names - set(values))]

    def num(k):
        v = values.get(k)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    for k, lo, hi in (("vanishing_ratio", 0, 1), ("vanishing_time_ratio", 0, 1), ("stall_ratio", 0, 1), ("grad_rms_floor", 0, None), ("update_ratio_min", 0, None),
                      ("saturated_fraction", 0, 1), ("dead_fraction", 0, 1), ("high_loss_fraction", 0, 1),
                      ("stalled_loss_fraction", 0, 1),
                      ("converged_loss_fraction", 0, 1), ("plateau_fraction", 0, 1), ("plateau_change", 0, None),
                      ("exploding_ratio", 1, None), ("update_ratio_max", 0, None), ("loss_growth", 1, None)):
        if k in values:
            v = num(k)
            if v is None or not v > lo or (hi is not None and not v <= hi):
                allowed = f"in ({lo}, {hi}]" if hi is not None else f"> {lo}"
                out.append(f"verdict.{k}={values[k]!r}: must be a number {allowed}")
    for k in ("loss_smoothing", "patience_steps"):
        v = values.get(k)
        if k in values and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            out.append(f"verdict.{k}={v!r}: must be an integer >= 1")
    if not out and values["converged_loss_fraction"] > values["high_loss_fraction"]:
        out.append(f"verdict.converged_loss_fraction={values['converged_loss_fraction']!r}: must not exceed "
                   f"verdict.high_loss_fraction ({values['high_loss_fraction']!r})")
    return out


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reason: str
    step: int | None = None          # first step at which the verdict's condition was reached
    escape_step: int | None = None   # a stall (vanishing/saturated/dead) that ended: where the loss fell again

    def tags(self) -> dict[str, str]:
        """The MLflow tags: verdict, verdict_reason, verdict_step (and verdict_escape_step after an escape)."""
        out = {"verdict": self.verdict, "verdict_reason": self.reason,
               "verdict_step": "" if self.step is None else str(self.step)}
        if self.escape_step is not None:
            out["verdict_escape_step"] = str(self.escape_step)
        return out


# ---- the loss -----------------------------------------------------------------------------------------
def _loss(history: dict, th: Thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, raw losses, causal running median of the last `loss_smoothing` finite values)."""
    pts = sorted(history.get("train/loss", []))
    steps = np.array([s for s, _ in pts], dtype=np.int64)
    raw = np.array([v for _, v in pts], dtype=np.float64)
    smooth = np.full(len(raw), np.nan)
    for i in range(len(raw)):
        window = raw[max(0, i - th.loss_smoothing + 1): i + 1]
        window = window[np.isfinite(window)]
        if window.size:
            smooth[i] = np.median(window)
    return steps, raw, smooth


def _loss_at(steps: np.ndarray, loss_steps: np.ndarray, smooth: np.ndarray) -> np.ndarray:
    """The smoothed loss last logged at or before each step (the first logged value before that)."""
    if not len(loss_steps):
        return np.full(len(steps), np.nan)
    return smooth[np.clip(np.searchsorted(loss_steps, steps, side="right") - 1, 0, None)]


# ---- conditions over the trace ------------------------------------------------------------------------
def _onset(cond: np.ndarray, steps: np.ndarray, patience: int) -> int | None:
    """Index of the first step from which `cond` holds on every recorded step for `patience` optimizer
    steps, or until the run ends."""
    n = len(cond)
    idx = np.arange(n)
    # first index at or after i where cond is False (n if none)
    next_false = np.minimum.accumulate(np.where(cond, n, idx)[::-1])[::-1]
    window_end = np.searchsorted(steps, steps + patience, side="left")  # first index outside [s, s+patience)
    ok = cond & (next_false >= window_end)
    hits = np.flatnonzero(ok)
    return int(hits[0]) if hits.size else None


def _worst(matrix: np.ndarray, i: int, largest: bool) -> tuple[int, float]:
    row = np.where(np.isfinite(matrix[i]), matrix[i], np.nan)
    j = int(np.nanargmax(row) if largest else np.nanargmin(row))
    return j, float(row[j])


def _fmt(x: float) -> str:
    return f"{x:.2g}" if 1e-2 <= abs(x) < 1e3 else f"{x:.1e}"


def _time_ratios(time_trace: dict | None, steps: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """[trace steps, recurrent modules] ||dL/dh_1|| / ||dL/dh_T|| as last measured at or before each step
    (NaN before the first measurement), and the modules' names."""
    names = list(time_trace or {})
    out = np.full((len(steps), len(names)), np.nan)
    for j, name in enumerate(names):
        t = time_trace[name]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = t["norms"][:, 0] / t["norms"][:, -1]
        at = np.searchsorted(t["steps"], steps, side="right") - 1
        out[at >= 0, j] = ratio[at[at >= 0]]
    return out, names


def diagnose(trace: dict | None, history: dict, activation: str | None, th: Thresholds,
             time_trace: dict | None = None, constant_loss: float | None = None) -> Verdict:
    """The verdict of one run from its trace (None when statistics were off), its signal through time (None
    without recurrent modules) and its loss history. `activation`: the registry name of the activation whose
    saturation is judged (None: none is). `constant_loss`: the training loss of the best constant prediction
    (the targets' mean, the classes' frequencies); where it is below the first logged loss, the loss is judged
    against it, so a net that has learned only the constant has not learned."""
    # which failure act_saturation means
    family = lookup(ACTIVATIONS, "activation", activation).family if activation is not None else None
    loss_steps, raw, smooth = _loss(history, th)
    bad = np.flatnonzero(~np.isfinite(raw))
    if bad.size:  # needs no statistics at all
        s = int(loss_steps[bad[0]])
        return Verdict("exploding", f"the training loss is {raw[bad[0]]} at step {s}", s)
    if trace is None or not len(trace.get("steps", ())):
        return Verdict("unknown", "no gradient statistics were recorded (stats=off), so the gradients cannot "
                                  "be judged")
    steps = np.asarray(trace["steps"], dtype=np.int64)
    n_modules = trace["grad_norm"].shape[1]
    name = [str(m) for m in trace["modules"]] if "modules" in trace else [f"layer {j:02d}" for j in range(n_modules)]
    layer = (np.flatnonzero(np.isin(np.asarray(trace["kinds"]), LAYER_KINDS)) if "kinds" in trace
             else np.arange(n_modules))  # the output layer is the last of these
    start = smooth[0] if len(smooth) else np.nan
    first_loss, ref = start, "of its start"
    if constant_loss is not None and 0 < constant_loss < start:
        first_loss, ref = constant_loss, f"of a constant prediction's ({_fmt(constant_loss)})"
    rel_loss = _loss_at(steps, loss_steps, smooth) / first_loss  # NaN when no loss was logged
    high = ~(rel_loss <= th.high_loss_fraction)  # no loss logged: treat as still high

    def loss_note(i: int) -> str:
        return "" if np.isnan(rel_loss[i]) else f" while the loss is still {rel_loss[i]:.2f} {ref}"

    # ---- exploding: no patience, one non-finite step is already fatal --------------------------------
    found: dict[str, tuple[int, str]] = {}
    # (a NaN backprop_norm alone is a layer the loss does not reach, e.g. a frozen one: not an explosion)
    nonfinite = (trace["grad_nonfinite"] > 0) | ~np.isfinite(trace["grad_norm"])
    rows = np.flatnonzero(nonfinite.any(axis=1))
    if rows.size:
        i = rows[0]
        j = int(np.flatnonzero(nonfinite[i])[0])
        n = trace["grad_nonfinite"][i, j]
        what = f"{int(n)} NaN/Inf entries" if np.isfinite(n) and n > 0 else "a non-finite norm"
        found["exploding"] = (i, f"{name[j]}'s gradient has {what} at step {steps[i]}")
    grown = np.flatnonzero(np.isfinite(smooth) & (smooth > th.loss_growth * start))
    if grown.size and "exploding" not in found:
        s = int(loss_steps[grown[0]])
        found["exploding"] = (int(np.searchsorted(steps, s).clip(0, len(steps) - 1)),
                              f"the loss grew to {_fmt(smooth[grown[0]] / start)}x its start "
                              f"({_fmt(start)} -> {_fmt(smooth[grown[0]])}) by step {s}")

    bp = trace["backprop_norm"][:, layer].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = bp[:, :-1] / bp[:, -1:]  # hidden layers against the output layer
    rel_name = [name[j] for j in layer[:-1]]
    if rel.shape[1]:
        i = _onset(np.nanmax(np.where(np.isfinite(rel), rel, -np.inf), axis=1) > th.exploding_ratio, steps, th.patience_steps)
        if i is not None and "exploding" not in found:
            j, r = _worst(rel, i, largest=True)
            found["exploding"] = (i, f"{rel_name[j]}'s back-propagated signal is {_fmt(r)}x the output layer's "
                                     f"at step {steps[i]} (threshold {_fmt(th.exploding_ratio)})")
    upd = trace["update_ratio"].astype(np.float64)
    i = _onset((upd > th.update_ratio_max).any(axis=1), steps, 1)
    if i is not None and "exploding" not in found:
        j, r = _worst(upd, i, largest=True)
        found["exploding"] = (i, f"{name[j]}'s update is {_fmt(r)}x its weights' norm at step {steps[i]} "
                                 f"(threshold {_fmt(th.update_ratio_max)})")
    if "exploding" in found:
        i, reason = found["exploding"]
        return Verdict("exploding", reason, int(steps[i]))

    # ---- stalls: only while the loss is still high ----------------------------------------------------
    if family is not None:
        sat = trace["act_saturation"].astype(np.float64)  # NaN where no activation follows a module
        sat[:, layer[-1:]] = np.nan  # a bounded head (regression onto tanh) is the target's range, not a stall
        limit = th.saturated_fraction if family == "saturated" else th.dead_fraction
        i = _onset(high & (np.nan_to_num(sat, nan=0.0) > limit).any(axis=1), steps, th.patience_steps)
        if i is not None:
            j, f = _worst(sat, i, largest=True)
            word = "saturated (f' near 0)" if family == "saturated" else "dead (f' near 0)"
            found[family] = (i, f"{f:.0%} of {name[j]}'s {activation} units are {word} at step {steps[i]}"
                                f"{loss_note(i)} (threshold {limit:.0%})")
    vanish: list[tuple[int, str]] = []
    if rel.shape[1]:
        i = _onset(high & (np.nanmin(np.where(np.isfinite(rel), rel, np.inf), axis=1) < th.vanishing_ratio),
                   steps, th.patience_steps)
        if i is not None:
            j, r = _worst(rel, i, largest=False)
            vanish.append((i, f"{rel_name[j]}'s back-propagated signal is {_fmt(r)} of the output layer's at step "
                              f"{steps[i]}{loss_note(i)} (threshold {_fmt(th.vanishing_ratio)})"))
    through, through_name = _time_ratios(time_trace, steps)
    if through.shape[1]:
        i = _onset(high & (np.nan_to_num(through, nan=np.inf) < th.vanishing_time_ratio).any(axis=1), steps,
                   th.patience_steps)
        if i is not None:
            j, r = _worst(through, i, largest=False)
            vanish.append((i, f"{through_name[j]}'s signal through time at its first step is {_fmt(r)} of its "
                              f"last step's at step {steps[i]}{loss_note(i)} (threshold {_fmt(th.vanishing_time_ratio)})"))
    rms = np.sqrt(trace["grad_mean"].astype(np.float64) ** 2 + trace["grad_std"].astype(np.float64) ** 2)
    i = _onset(high & (rms < th.grad_rms_floor).any(axis=1), steps, th.patience_steps)
    if i is not None:
        j, r = _worst(rms, i, largest=False)
        vanish.append((i, f"{name[j]}'s gradient RMS is {_fmt(r)} at step {steps[i]}{loss_note(i)} "
                          f"(threshold {_fmt(th.grad_rms_floor)})"))
    i = _onset(high & (upd < th.update_ratio_min).any(axis=1), steps, th.patience_steps)
    if i is not None:
        j, r = _worst(upd, i, largest=False)
        vanish.append((i, f"{name[j]}'s update is {_fmt(r)} of its weights' norm at step {steps[i]}"
                          f"{loss_note(i)} (threshold {_fmt(th.update_ratio_min)})"))
    if rel.shape[1] and high[-1]:  # never trained: a weaker decay explains a loss that stayed high all run
        i = _onset(high & (np.nanmin(np.where(np.isfinite(rel), rel, np.inf), axis=1) < th.stall_ratio),
                   steps, th.patience_steps)
        if i is not None and (np.nanmin(np.where(np.isfinite(rel[-1]), rel[-1], np.inf)) < th.stall_ratio):
            j, r = _worst(rel, i, largest=False)
            vanish.append((i, f"the loss is still {rel_loss[-1]:.2f} {ref} at step {steps[-1]} and "
                              f"{rel_name[j]}'s back-propagated signal has been below {_fmt(th.stall_ratio)} of the "
                              f"output layer's since step {steps[i]} ({_fmt(r)} then)"))
    if vanish:
        found["vanishing"] = min(vanish, key=lambda x: x[0])
    if found:  # earliest stall; on a tie the cause (dead, saturated) before the symptom (vanishing)
        name = min(found, key=lambda k: (found[k][0], ("dead", "saturated", "vanishing").index(k)))
        i, reason = found[name]
        later = np.flatnonzero(~high[i:])
        if later.size:
            e = i + int(later[0])
            return Verdict(name, f"{reason}; escaped at step {steps[e]} (the loss fell to "
                                 f"{rel_loss[e]:.2f} {ref})", int(steps[i]), int(steps[e]))
        return Verdict(name, reason, int(steps[i]))

    # ---- no pathology: converged or still training -----------------------------------------------------
    if len(smooth) and np.isfinite(first_loss):
        low = np.flatnonzero(smooth <= th.converged_loss_fraction * first_loss)
        if low.size:
            k = low[0]
            return Verdict("converged", f"the loss fell to {_fmt(smooth[k] / first_loss)} {ref} "
                                        f"({_fmt(first_loss)} -> {_fmt(smooth[k])}) by step {loss_steps[k]} "
                                        f"(threshold {_fmt(th.converged_loss_fraction)})", int(loss_steps[k]))
        tail = max(2, int(np.ceil(th.plateau_fraction * len(smooth))))
        if len(smooth) >= 2 * tail and smooth[-1] <= th.high_loss_fraction * first_loss:
            a, b = smooth[-tail], smooth[-1]
            if abs(a - b) <= th.plateau_change * max(abs(b), 1e-300):
                k = len(smooth) - tail
                return Verdict("converged", f"the loss is flat at {_fmt(b / first_loss)} {ref} "
                                            f"({_fmt(first_loss)} -> {_fmt(b)}) from step {loss_steps[k]} on "
                                            f"(changed {abs(a - b) / max(abs(b), 1e-300):.1%} over the last "
                                            f"{th.plateau_fraction:.0%} of the run)", int(loss_steps[k]))
    last = len(steps) - 1
    j, r = (_worst(rel, last, largest=False) if rel.shape[1] and np.isfinite(rel[last]).any()
            else (None, float("nan")))
    signal = f"; smallest signal ratio {_fmt(r)} ({rel_name[j]})" if j is not None else ""
    if np.isfinite(rel_loss[last]) and rel_loss[last] > th.stalled_loss_fraction:
        return Verdict("stalled", f"the loss is still {rel_loss[last]:.2f} {ref} at step {steps[last]} "
                                  f"(threshold {_fmt(th.stalled_loss_fraction)}) and no gradient rule explains it"
                                  f"{signal}", int(steps[last]))
    loss = (f"the loss is at {rel_loss[last]:.2f} {ref}" if np.isfinite(rel_loss[last])
            else "no training loss was logged")
    return Verdict("healthy", f"no rule fired by step {steps[last]}: {loss}{signal}", int(steps[0]))


def from_config(values: dict) -> Thresholds:
    found = problems(values)
    if found:
        raise ValueError("\n".join(found))
    return Thresholds(**values)
