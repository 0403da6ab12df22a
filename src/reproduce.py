"""Re-run a preset's study and write OUR numbers next to what the seed or paper reported.

    python -m src.reproduce <preset> [--quick] [overrides ...]
    python -m src.reproduce readme      # put docs/results/*.md into README's Presets section

runs `python -m src.train -m experiment=<preset> ...` (the preset's own sweep, one MLflow parent run with a
child per cell), reads the children back from MLflow and writes docs/results/<preset>.md: a table with one
row per run, the reference column quoted from the seed/paper, and the wall time. `--quick` runs a shorter
study (the step counts the tests use); its table says so. Extra overrides go to every run (`data=digits`).
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlflow.tracking import MlflowClient

from src.tracking import resolve_uri

LOAD = float("nan")  # set by run_study
Row = dict  # {"name", "params", "tags", "metrics", "history": callable(key) -> [(step, value)]}


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.2e}"


def first(key: str) -> Callable[[Row], float | None]:
    def get(r: Row):
        h = r["history"](key)
        return h[0][1] if h else None
    return get


def last(key: str) -> Callable[[Row], float | None]:
    return lambda r: r["metrics"].get(key)


def best(key: str) -> Callable[[Row], float | None]:
    def get(r: Row):
        h = r["history"](key)
        return max(v for _, v in h) if h else None
    return get


def tail_mean(key: str, n: int = 10) -> Callable[[Row], float | None]:
    def get(r: Row):
        h = r["history"](key)
        return sum(v for _, v in h[-n:]) / len(h[-n:]) if h else None
    return get


def first_step_above(key: str, threshold: float) -> Callable[[Row], float | None]:
    def get(r: Row):
        return next((float(s) for s, v in r["history"](key) if v >= threshold), None)
    return get


def layer_range(stat: str, how: str = "median") -> Callable[[Row], str]:
    """min ... max over hidden layers of each layer's median (over the logged steps) of `stat`."""
    def get(r: Row):
        per_layer = []
        for i in range(64):
            h = [v for _, v in r["history"](f"{stat}/layer_{i:02d}") if math.isfinite(v)]
            if not h and i > 0:
                break
            if h:
                per_layer.append(sorted(h)[len(h) // 2])
        hidden = per_layer[:-1] or per_layer
        return f"{min(hidden):.1e} … {max(hidden):.1e}" if hidden else "—"
    return get


def tag(key: str) -> Callable[[Row], str]:
    return lambda r: r["tags"].get(key, "—")


@dataclass
class Study:
    reference: str                       # what the seed/paper showed, in one paragraph
    columns: list[tuple[str, Callable]]  # (header, fn(row) -> value)
    quick: list[str]                     # overrides for --quick
    seed_column: Callable[[Row], str] = lambda r: ""
    checks: list[tuple[str, Callable[[list[Row]], bool]]] = field(default_factory=list)


def _swept(r: Row) -> dict[str, str]:
    """The run's parameters plus the key=value pairs its name carries (a `cure=...` is not a param)."""
    return {**r["params"], **dict(kv.split("=", 1) for kv in r["name"].split(",") if "=" in kv)}


def _by(rows: list[Row], **params) -> Row | None:
    return next((r for r in rows if all(str(_swept(r).get(k)) == str(v) for k, v in params.items())), None)


def _val_err(r: Row | None) -> float:
    return 100 * (1 - tail_mean("val/acc", 3)(r)) if r else float("nan")


VERDICT = ("verdict", tag("verdict"))
STUDIES: dict[str, Study] = {
    "circles_4x5": Study(
        "Seed 003 (Keras, 100 epochs): train accuracy sigmoid 0.652, tanh 0.994, relu 0.995; weight-gradient "
        "std per layer ≈1e-2…1e-3 for sigmoid, ≈1e-1…1e-2 for tanh.",
        [("val/acc (last 3 epochs)", tail_mean("val/acc", 3)), ("train/acc (last 10 logs)", tail_mean("train/acc")),
         ("grad_std per hidden layer (median over training)", layer_range("grad_std")), VERDICT,
         ("verdict_reason", tag("verdict_reason"))],
        ["trainer.max_epochs=30"],
        seed_column=lambda r: {"sigmoid": "acc 0.652; grad std 1e-2…1e-3", "tanh": "acc 0.994; grad std 1e-1…1e-2",
                               "relu": "acc 0.995"}.get(r["params"].get("activation"), ""),
        checks=[("sigmoid ends below tanh and relu (val/acc)", lambda rs: tail_mean("val/acc", 3)(_by(rs, activation="sigmoid"))
                 < min(tail_mean("val/acc", 3)(_by(rs, activation=a)) for a in ("tanh", "relu")))],
    ),
    "moons_sigmoid_vs_relu": Study(
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
    ),
    "mnist_40_20": Study(
        "Seed 001 plots train-batch and test accuracy every 10 iterations for four cells (sigmoid+N(0,0.01²), "
        "ReLU+N(0,0.01²), sigmoid+\"Xavier\" (std 1/√fan_in), ReLU+He); its text gives no final numbers. Small "
        "Gaussian weights make the sigmoid net slowest to leave chance; the scaled inits learn from the start.",
        [("test acc (final)", last("val/acc")), ("test acc (best)", best("val/acc")),
         ("first step test acc ≥ 0.5", first_step_above("val/acc", 0.5)), VERDICT],
        ["trainer.max_steps=300"],
        seed_column=lambda r: "seed cell" if (r["params"].get("activation"), r["params"].get("init")) in
        {("sigmoid", "small_normal"), ("relu", "small_normal"), ("sigmoid", "lecun"), ("relu", "he")} else "",
    ),
    "mnist_deep_sigmoid": Study(
        "Seed 000 (MNIST, 410 steps per epoch): error ≈0.9 for ~15 epochs (~6000 steps), then falls to ≈0.03 "
        "by epoch 29: a stall, then an escape; per-layer mean |ΔW| per step shows it.",
        [("first step train/acc ≥ 0.5 (escape)", first_step_above("train/acc", 0.5)),
         ("val/acc (final)", last("val/acc")),
         ("mean |ΔW| layer 0 / last (median)", lambda r: _ratio_of_medians(r)), VERDICT,
         ("verdict_reason", tag("verdict_reason"))],
        ["trainer.max_epochs=8"],
        seed_column=lambda r: "error ≈0.9 for ~6000 steps, escape, ≈0.03 at the end",
    ),
    "line_fit": Study(
        "Seed 002: a 1→1 tanh unit fitting y = 2x; the gradient shrinks as the fit converges. The answer: "
        "convergence, not a vanishing gradient.",
        [("train/loss first", first("train/loss")), ("train/loss last", last("train/loss")),
         ("grad_norm first", first("grad_norm/layer_00")), ("grad_norm last", last("grad_norm/layer_00")),
         VERDICT, ("verdict_reason", tag("verdict_reason"))],
        ["trainer.max_steps=400"],
        seed_column=lambda r: "converging, not vanishing",
    ),
    "glorot_bengio": Study(
        "Glorot & Bengio 2010, Table 1 (MNIST, 5 × 1000 units, test error %): Softsign 1.64, Softsign N 1.72, "
        "Tanh 1.76, Tanh N 1.64, Sigmoid 2.21 (Shapeset: Sigmoid 82.61, Tanh 27.15, Tanh N 15.60). With the "
        "standard init the back-propagated gradient shrinks towards the input; normalized (N) init keeps it level.",
        [("val error % (last 3 epochs)", lambda r: _val_err(r)), ("backprop_ratio at step 0", first("backprop_ratio")),
         ("top hidden layer act_mean (median over training)", lambda r: _top_hidden(r, "act_mean")), VERDICT],
        ["trainer.max_epochs=2", "model.width=64"],
        seed_column=lambda r: {("softsign", "torch_default"): "1.64", ("softsign", "xavier"): "1.72",
                               ("tanh", "torch_default"): "1.76", ("tanh", "xavier"): "1.64",
                               ("sigmoid", "torch_default"): "2.21"}.get(
            (r["params"].get("activation"), r["params"].get("init")), "—"),
        checks=[
            ("sigmoid has the highest error of the three activations (standard init)",
             lambda rs: _val_err(_by(rs, activation="sigmoid", init="torch_default"))
             > max(_val_err(_by(rs, activation=a, init="torch_default")) for a in ("tanh", "softsign"))),
            ("normalized init keeps the back-propagated signal more level than standard (tanh)",
             lambda rs: first("backprop_ratio")(_by(rs, activation="tanh", init="xavier"))
             > first("backprop_ratio")(_by(rs, activation="tanh", init="torch_default"))),
            ("normalized init keeps the back-propagated signal more level than standard (softsign)",
             lambda rs: first("backprop_ratio")(_by(rs, activation="softsign", init="xavier"))
             > first("backprop_ratio")(_by(rs, activation="softsign", init="torch_default"))),
            ("tanh: normalized init error ≤ standard init error",
             lambda rs: _val_err(_by(rs, activation="tanh", init="xavier"))
             <= _val_err(_by(rs, activation="tanh", init="torch_default"))),
        ],
    ),
    "he_depth": Study(
        "He et al. 2015: a 30-layer ReLU net with Var(w) = 1/n \"completely stalls\"; He init (2/n) converges. "
        "Theory at init (depth 30, width 256): first/last back-propagated ratio ≈4e-5 for 1/n, ≈1 for He.",
        [("backprop_ratio at step 0", first("backprop_ratio")), ("val/acc (final)", last("val/acc")), VERDICT],
        ["trainer.max_epochs=2"],
        seed_column=lambda r: {"lecun": "≈4e-5; stalls", "he": "≈1; converges"}.get(r["params"].get("init"), ""),
        checks=[("lecun's ratio < 1e-3 and He's within [0.1, 10]",
                 lambda rs: first("backprop_ratio")(_by(rs, init="lecun")) < 1e-3
                 and 0.1 <= first("backprop_ratio")(_by(rs, init="he")) <= 10)],
    ),
    "cures": Study(
        "No seed: the literature's cures, each on a deep sigmoid net (20 layers of 64, Xavier, SGD 0.1, digits) "
        "that stays at chance without one. Expected: batch norm (Ioffe & Szegedy 2015) and skip connections "
        "(He et al. 2016) keep the back-propagated signal's size; clipping only bounds large gradients, so it "
        "cannot enlarge a vanishing one; ReLU with He init removes the cause.",
        [("backprop_ratio at step 0", first("backprop_ratio")), ("val/acc (final)", last("val/acc")), VERDICT],
        ["trainer.max_epochs=4"],
        checks=[("at least one cure lifts val/acc above the baseline's by 0.3",
                 lambda rs: max(last("val/acc")(r) for r in rs if _swept(r).get("cure") != "none")
                 > last("val/acc")(_by(rs, cure="none")) + 0.3)],
    ),
}


def _ratio_of_medians(r: Row) -> str:
    med = []
    for i in range(16):
        h = [v for _, v in r["history"](f"weight_change/mean_abs/layer_{i:02d}")]
        if not h:
            break
        med.append(sorted(h)[len(h) // 2])
    return f"{med[0] / med[-1]:.2g}" if len(med) > 1 and med[-1] else "—"


def _top_hidden(r: Row, stat: str) -> float | None:
    """Median over the logged steps of `stat` in the last hidden layer (the paper's Fig. 2: sigmoid's top
    hidden layer is driven to 0)."""
    n = sum(1 for k in r["metrics"] if k.startswith(f"{stat}/layer_"))
    h = sorted(v for _, v in r["history"](f"{stat}/layer_{n - 1:02d}")) if n else []
    return h[len(h) // 2] if h else None


def run_study(preset: str, quick: bool, extra: list[str], uri: str,
              reread: bool = False) -> tuple[list[Row], float, list[str]]:
    """Run the study (or, with `reread`, take its latest multirun from MLflow) and read the children back."""
    study = STUDIES[preset]
    if reread:
        return read_study(preset, uri, None, must_have=study.quick if quick else [],
                          must_lack=[] if quick else study.quick)
    sweep_dir = tempfile.mkdtemp(prefix=f"gradflow-{preset}-")
    args = [sys.executable, "-m", "src.train", "-m", f"experiment={preset}", "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep_dir}", *(study.quick if quick else []), *extra]
    # one intra-op thread unless told otherwise: these nets are too small to gain from more, and on a
    # shared machine extra threads spin waiting for cores (measured: 2 threads took 1.9x as long as 1)
    env = {"OMP_NUM_THREADS": "1", **os.environ, "MLFLOW_TRACKING_URI": uri}
    print("running:", " ".join(args[1:]), flush=True)
    job = subprocess.Popen(args, env=env)
    load = []  # the machine's 1-minute load average while the study ran: timings on a shared machine need it
    while job.poll() is None:
        load.append(os.getloadavg()[0])
        time.sleep(2)
    if job.returncode:
        raise subprocess.CalledProcessError(job.returncode, args)
    global LOAD
    LOAD = sum(load) / max(1, len(load))
    shown = ["python", "-m", "src.train", "-m", f"experiment={preset}", *(study.quick if quick else []), *extra]
    return read_study(preset, uri, shown, record_load=True)


def read_study(preset: str, uri: str, shown: list[str] | None, must_have: list[str] = (),
               must_lack: list[str] = (), record_load: bool = False) -> tuple[list[Row], float, list[str]]:
    """The latest multirun of the preset (with all of `must_have` and not all of `must_lack` among its
    overrides) and its child runs."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(preset)
    parents = client.search_runs([exp.experiment_id], "tags.`gradflow.multirun` = 'true'",
                                 order_by=["attributes.start_time DESC"])
    def given(p) -> set[str]:
        return set(p.data.tags.get("gradflow.overrides", "").split())
    parent = next(p for p in parents if set(must_have) <= given(p) and not (must_lack and set(must_lack) <= given(p)))
    global LOAD
    if record_load:  # kept with the runs, so a later --reread can still state it
        client.set_tag(parent.info.run_id, "gradflow.load_average", f"{LOAD:.2f}")
    else:
        LOAD = float(parent.data.tags.get("gradflow.load_average", "nan"))
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    rows = []
    for c in children:
        cache: dict[str, list] = {}

        def history(key, run_id=c.info.run_id, cache=cache):
            if key not in cache:
                cache[key] = [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                                                  key=lambda m: m.step)]
            return cache[key]
        rows.append({"name": c.info.run_name, "params": c.data.params, "tags": c.data.tags,
                     "metrics": c.data.metrics, "history": history, "status": c.info.status})
    wall = (parent.info.end_time - parent.info.start_time) / 1000 if parent.info.end_time else float("nan")
    if shown is None:  # re-read: the command as the parent run recorded it
        shown = ["python", "-m", "src.train", "-m", *(o for o in parent.data.tags.get("gradflow.overrides", "").split()
                                                      if o != "trainer.enable_progress_bar=false")]
    return rows, wall, shown


def markdown(preset: str, rows: list[Row], wall: float, command: list[str], quick: bool) -> str:
    study = STUDIES[preset]
    heads = ["run", *[h.replace("|", "\\|") for h, _ in study.columns], "seed / paper"]
    lines = [f"### `{preset}`{' (quick)' if quick else ''}", "", f"**Seed / paper.** {study.reference}", "",
             f"**Ours.** `{' '.join(command)}` — {len(rows)} run{'s' if len(rows) != 1 else ''}, {wall:.0f} s wall time "
             f"on 2 CPU cores shared with other work" + (f" (mean load average {LOAD:.1f} while it ran; above 2, "
             f"the wall time is inflated by the other work)" if not math.isnan(LOAD) else "") + ".", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [r["name"]]
        for _, fn in study.columns:
            v = fn(r)
            cells.append(_fmt(v) if isinstance(v, (int, float)) or v is None else str(v).replace("|", "\\|"))
        cells.append(study.seed_column(r).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    for text, check in study.checks:
        try:
            ok = "holds" if check(rows) else "does NOT hold"
        except Exception as e:  # noqa: BLE001 - a missing cell makes the check unanswerable, say so
            ok = f"cannot be checked ({type(e).__name__})"
        lines.append(f"\n- {text}: **{ok}**")
    return "\n".join(lines) + "\n"


START, END = "<!-- presets:start (python -m src.reproduce readme) -->", "<!-- presets:end -->"


def update_readme(results: Path, readme: Path = Path("README.md")) -> None:
    """Replace the README's generated block with the tables in `results` (full runs before quick ones)."""
    tables = sorted(results.glob("*.md"), key=lambda f: (f.stem.split(".")[0], ".quick" in f.name))
    seen, parts = set(), []
    for f in tables:
        preset = f.stem.split(".")[0]
        if preset not in seen:
            seen.add(preset)
            parts.append(f.read_text())
    text = readme.read_text()
    head, rest = text.split(START, 1)
    readme.write_text(head + START + "\n" + "\n".join(parts) + END + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["readme"]:
        update_readme(Path(argv[1] if len(argv) > 1 else "docs/results"))
        return 0
    p = argparse.ArgumentParser(prog="python -m src.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("preset", choices=sorted(STUDIES))
    p.add_argument("--quick", action="store_true", help="shorter runs (the step counts the tests use)")
    p.add_argument("--out", default="docs/results", help="folder for <preset>.md")
    p.add_argument("--reread", action="store_true",
                   help="run nothing: tabulate the preset's latest multirun in the tracking store")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. data=digits")
    a = p.parse_intermixed_args(argv)  # overrides may follow --quick
    rows, wall, command = run_study(a.preset, a.quick, a.overrides, resolve_uri(None), a.reread)
    text = markdown(a.preset, rows, wall, command, a.quick)
    out = Path(a.out) / f"{a.preset}{'.quick' if a.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
