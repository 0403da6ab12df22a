"""Per-step cost of the gradient statistics, measured side by side in one process.

    python benchmarks/overhead.py [--steps 300] [--repeats 5] [--device cpu] [--threads N] [--no-slow-server]
                                  [--torch-path] [--mlflow-every N] [--models small,mid,wide] [--docs]
    python benchmarks/overhead.py --ddp 2 [--models small,mid,wide] [--steps 300] [--repeats 5] [--docs]

For each model it trains the same net (batch 32) under each condition, interleaved, `repeats` times, the
order reversed on every other repeat (off, stats, ... then ..., stats, off) so that a machine slowing down
or speeding up during the run biases no condition; each run's time per optimizer step is its mean over the
timed steps (on_train_batch_start to on_train_batch_start, after a warm-up; the last step's own time is not
counted). The table shows the median over repeats, and `paired`: the median over repeats of each repeat's
own ratio to `off` (runs seconds apart, so the slow drift of a shared machine cancels), with its range.
The machine-readable ratios are the paired medians.
`drain s` is how long the run's end then waited for the MLflow backlog, and `total vs off` compares the
timed steps plus that wait: a writer that fell behind during training shows there. Conditions:
  off        our pipeline with stats=off: the async MLflow logger gets train/loss every 10 steps
  stats      + GradientStatsCallback recording every statistic of every layer on every step
             (dense Parquet trace every step, MLflow snapshot every stats.log_every_n_steps steps as
             conf/stats/default.yaml sets it: 50)
  stats_torch  (--torch-path) `stats` with the fused C kernel turned off: the torch ops every machine has
  stats_every<N>  (--mlflow-every N) `stats` with the MLflow snapshot every N steps instead (the dense
             trace still gets every step): what MLflow's own cost per value adds
  lightning  Lightning's own way of logging per-layer norms every step: grad_norm() + self.log_dict()
             in on_before_optimizer_step, MLFlowLogger on a SQLite store, log_every_n_steps=1
  slow_server  (10x64) `stats`, but MLflow is a real `mlflow server` behind a proxy that holds every
             request 0.2 s: the training thread must not wait on it (slow_server_ratio = slow_server / stats)
Models: the MLPs small (10x64), mid (20x256) and wide (5x1024), the default; and, with `--models
cnn,lstm,transformer`, a 10-layer CNN on 8x8 images, an LSTM over 50 steps of the adding problem and a 4-block
transformer on 16 tokens, at the sizes of their studies.
The last lines are machine-readable: overhead_ratio_small (10x64), overhead_ratio (20x256), overhead_ratio_wide
(5x1024), overhead_ratio_<cnn|lstm|transformer> (and each one's `_cpu` and `_total` variants),
slow_server_ratio and vs_lightning_ratio (lightning / stats, 10x64). `--docs` also writes the table and those
lines into docs/performance.md (the MLPs' block, or one block for the other models).

`--ddp N`: the same nets trained by N processes under Lightning's DDP on the CPU (gloo), batch 32 per process,
`off` against `stats` (the callback on every rank, its shards combined with one all_gather per flush). Each run
is a fresh command (Lightning starts the other ranks by running it again), interleaved as above; the time per
step is global rank 0's. Lines: overhead_ratio_ddp<N>_<model> (paired medians, stats / off).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass
from typing import Callable
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import MLFlowLogger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from src.callbacks.gradient_stats import GradientStatsCallback  # noqa: E402
from src.data.datasets import adding, recall  # noqa: E402
from src.models.cnn import build_cnn  # noqa: E402
from src.models.mlp import build_mlp  # noqa: E402
from src.models.modules import Classifier, Regressor  # noqa: E402
from src.models.recurrent import build_recurrent  # noqa: E402
from src.models.transformer import build_transformer  # noqa: E402
from src.stats import fused  # noqa: E402
from src.tracking.logger import MlflowAsyncLogger  # noqa: E402
from src.tracking.store import client as mlflow_client, ensure_experiment  # noqa: E402
from src.tracking.writer import AsyncRunWriter  # noqa: E402
from tests.conftest import SlowProxy, free_port  # noqa: E402

import perf_page  # noqa: E402  (benchmarks/perf_page.py)

@dataclass(frozen=True)
class Bench:
    """A model of the benchmark: its label in the table, how it is built, its data (4096 samples) and task."""
    label: str
    build: Callable[[], torch.nn.Module]
    data: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    task: type = Classifier


def _features():
    return torch.randn(4096, 64), torch.randint(0, 10, (4096,))


def _mlp(depth: int, width: int, act: str) -> Bench:
    return Bench(f"{depth}x{width} {act}", lambda: build_mlp(64, 10, activation=act, init="xavier_uniform", depth=depth,
                                                              width=width), _features)


def _sequences(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated arrays as tensors: float32 values, int64 tokens and labels as they are."""
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    return (x.float() if x.is_floating_point() else x), (y.float() if y.is_floating_point() else y)


MODELS = {
    "small": _mlp(10, 64, "sigmoid"), "mid": _mlp(20, 256, "relu"), "wide": _mlp(5, 1024, "relu"),
    # the models beyond the MLP, each at the size its study uses (--models cnn,lstm,transformer)
    "cnn": Bench("cnn 10x16 relu", lambda: build_cnn(64, 10, activation="relu", init="kaiming_normal", depth=10,
                                                      channels=16), _features),
    "lstm": Bench("lstm 50 steps x64", lambda: build_recurrent(2, 1, in_kind="sequence", cell="lstm", activation="tanh",
                                                               init="torch_default", depth=1, width=64),
                  lambda: _sequences(*adding(4096, 50, np.random.default_rng(0))), Regressor),
    "transformer": Bench("transformer 4x64 relu", lambda: build_transformer(16, 16, in_kind="tokens", activation="relu",
                                                                           init="xavier_uniform", depth=4, width=64),
                         lambda: _sequences(*recall(4096, 16, 16, np.random.default_rng(0)))),
}
# the product's default MLflow snapshot cadence for the per-layer statistics
MLFLOW_EVERY = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/stats/default.yaml").log_every_n_steps


class StepTimer(L.Callback):
    """Wall time and the training thread's CPU time at each step's start. CPU time does not count the
    time the thread waits for a core, so it stays comparable on a machine others load (with --threads 1
    all of torch's work runs on this thread)."""

    def __init__(self):
        self.t: list[tuple[float, float]] = []

    def on_train_batch_start(self, *args):
        self.t.append((time.perf_counter(), time.thread_time()))

    def mean_step(self, warmup: int) -> tuple[float, float]:
        """(wall, cpu) time per step over the timed steps: a mean, not a median, so that the statistics
        computed every few dozen steps for the buffered ones are counted in full."""
        n = len(self.t) - 1 - warmup
        return tuple((b - a) / n for a, b in zip(self.t[warmup], self.t[-1]))


class LightningWay(Classifier):
    """Per-layer gradient norms the way Lightning's docs show it."""

    def on_before_optimizer_step(self, optimizer):
        self.log_dict(grad_norm(self.net, norm_type=2))


def model_list(text: str) -> list[str]:
    models = text.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(unknown)}; known: {', '.join(MODELS)}")
    return models


def run_once(model: str, condition: str, steps: int, warmup: int, uri: str, device: str, workdir: Path,
             devices: int = 1) -> tuple[float, float, float]:
    """(wall, cpu) seconds per timed step, and the seconds the run's end waited for the MLflow backlog.
    `devices` > 1: DDP, the MLflow run global rank 0's (the other ranks, started by Lightning with LOCAL_RANK
    set, log nothing)."""
    bench = MODELS[model]
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(*bench.data()), batch_size=32, shuffle=True)
    net = bench.build()
    cls = LightningWay if condition == "lightning" else bench.task
    module = cls(net, "sgd", {"lr": 0.01})
    timer = StepTimer()
    callbacks: list = [timer]
    run = None
    tracked = os.environ.get("LOCAL_RANK", "0") == "0"
    if not tracked:
        logger, log_every = False, 10
        if condition == "stats":
            callbacks.append(GradientStatsCallback(every_n_steps=1, log_every_n_steps=MLFLOW_EVERY))
    elif condition == "lightning":
        logger = MLFlowLogger(experiment_name="bench-lightning", tracking_uri=uri)
        log_every = 1
    else:
        client = mlflow_client(uri)
        exp = ensure_experiment(client, "bench", uri)
        run = client.create_run(exp, run_name=f"{model}-{condition}").info.run_id
        writer = AsyncRunWriter(client, run, spool_dir=workdir)
        logger = MlflowAsyncLogger(writer, "bench")
        log_every = 10
        if condition in ("stats", "slow_server", "stats_torch") or condition.startswith("stats_every"):
            every = int(condition[len("stats_every"):]) if condition.startswith("stats_every") else MLFLOW_EVERY
            callbacks.append(GradientStatsCallback(every_n_steps=1, log_every_n_steps=every,
                                                   trace_path=workdir / f"{run}.parquet"))
    trainer = L.Trainer(max_steps=steps + warmup, logger=logger, callbacks=callbacks, log_every_n_steps=log_every,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, accelerator=device, devices=devices,
                        **({"strategy": "ddp"} if devices > 1 else {}))
    library = fused.library
    if condition == "stats_torch":
        fused.library = lambda: None  # the callback then takes its torch path
    try:
        trainer.fit(module, data)
    finally:
        fused.library = library
    drain = 0.0
    if run is not None:
        t0 = time.perf_counter()
        writer.close()
        drain = time.perf_counter() - t0
        client.set_terminated(run)
    return (*timer.mean_step(warmup), drain)


@contextlib.contextmanager
def slow_server(workdir: Path, delay: float = 0.2):
    """A real `mlflow server` (own process group, stopped by its id) behind a proxy holding each request
    `delay` s; yields the proxy's URL."""
    port = free_port()
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}",
         "--artifacts-destination", str(workdir / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proxy = None
    try:
        deadline = time.monotonic() + 300  # minutes on a busy machine
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start, see {workdir / 'server.log'}")
                time.sleep(0.3)
        proxy = SlowProxy(port, delay)
        yield f"http://127.0.0.1:{proxy.port}"
    finally:
        if proxy is not None:
            proxy.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        log.close()


def ingest(uri: str, n_requests: int = 20) -> tuple[float, float]:
    """Metrics/s the store accepts through log_batch(1000) called directly, and metrics/s our writer
    sustains when a training loop hands it one step's browsable metrics (14 stats x 11 layers) at a time."""
    from mlflow.entities import Metric

    client = mlflow_client(uri)
    exp = ensure_experiment(client, "bench-ingest", uri)
    run = client.create_run(exp).info.run_id
    t0 = time.perf_counter()
    for r in range(n_requests):
        ts = int(time.time() * 1000)
        client.log_batch(run, metrics=[Metric(f"m/layer_{i:04d}", float(i), ts, r) for i in range(1000)])
    backend = n_requests * 1000 / (time.perf_counter() - t0)
    run = client.create_run(exp).info.run_id
    writer = AsyncRunWriter(client, run)
    per_step = {f"s{j:02d}/layer_{i:02d}": 1.0 for j in range(14) for i in range(11)}
    steps = n_requests * 1000 // len(per_step)
    t0 = time.perf_counter()
    for step in range(steps):
        writer.log_metrics(per_step, step)
    writer.close()
    return backend, writer.sent / (time.perf_counter() - t0)


def ddp_worker(spec: str, processes: int, steps: int, warmup: int) -> None:
    """One DDP run (`--ddp-run MODEL:CONDITION:OUT`); global rank 0 writes its times to OUT as JSON."""
    model, condition, out = spec.split(":", 2)
    workdir = Path(out).parent
    times = run_once(model, condition, steps, warmup, f"sqlite:///{workdir / 'mlflow.db'}", "cpu", workdir, processes)
    if os.environ.get("LOCAL_RANK", "0") == "0" and int(os.environ.get("NODE_RANK", "0")) == 0:
        Path(out).write_text(json.dumps({"wall": times[0], "cpu": times[1], "drain": times[2],
                                         "threads": torch.get_num_threads()}))


def ddp_main(args) -> None:
    """`--ddp N`: off vs stats under DDP, each run its own command, interleaved, paired per repeat."""
    workdir = Path(tempfile.mkdtemp(prefix="gradflow-bench-ddp-"))
    conds, times = ["off", "stats"], {}
    print(f"torch {torch.__version__}, DDP on {args.ddp} CPU processes (gloo), batch 32 per process, {args.steps} "
          f"timed steps after {args.warmup} warm-up, {args.repeats} repeats", flush=True)
    for r in range(args.repeats):
        for m in args.models:
            for c in conds if r % 2 == 0 else reversed(conds):
                out = workdir / f"{m}-{c}-{r}.json"
                done = subprocess.run([sys.executable, __file__, "--ddp", str(args.ddp), "--ddp-run", f"{m}:{c}:{out}",
                                       "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                      capture_output=True, text=True)
                if done.returncode or not out.exists():
                    sys.exit(f"the DDP run {m}/{c} failed:\n{done.stderr[-3000:]}")
                times.setdefault((m, c), []).append(json.loads(out.read_text()))
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    threads = times[(args.models[0], "off")][0]["threads"]
    table = ["| model | condition | ms/step (rank 0) | paired vs off | paired range |", "|---|---|---|---|---|"]
    summary = []
    for m in args.models:
        paired = [s["wall"] / o["wall"] for s, o in zip(times[(m, "stats")], times[(m, "off")])]
        for c in conds:
            ms = statistics.median(t["wall"] for t in times[(m, c)]) * 1e3
            pair = (f"{statistics.median(paired):.2f}x | {min(paired):.2f}-{max(paired):.2f}" if c == "stats"
                    else "1.00x | ")
            table.append(f"| {MODELS[m].label} | {c} | {ms:.2f} | {pair} |")
        summary.append(f"overhead_ratio_ddp{args.ddp}_{m}={statistics.median(paired):.3f}")
    print(f"\n{threads} torch thread(s) per process\n" + "\n".join(table) + "\n")
    print("\n".join(summary))
    if args.docs:
        perf_page.write("overhead-ddp", [f"{args.ddp} processes, {threads} torch thread(s) each.", "", *table, "",
                                         "```", *summary, "```"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="small,mid,wide", type=model_list,
                    help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-slow-server", action="store_true", help="skip the slow tracking server condition")
    ap.add_argument("--torch-path", action="store_true", help="also time the statistics without the C kernel")
    ap.add_argument("--mlflow-every", type=int, default=0,
                    help="also time the statistics with an MLflow snapshot every N steps")
    ap.add_argument("--docs", action="store_true", help="also write the table into docs/performance.md")
    ap.add_argument("--ddp", type=int, default=0, help="N > 1: off vs stats under DDP on N CPU processes")
    ap.add_argument("--ddp-run", help=argparse.SUPPRESS)  # one DDP run: MODEL:CONDITION:OUT (used by --ddp)
    args = ap.parse_args()
    if args.ddp_run:
        warnings.filterwarnings("ignore")
        return ddp_worker(args.ddp_run, args.ddp, args.steps, args.warmup)
    if args.ddp:
        if args.ddp < 2:
            ap.error("--ddp takes the number of processes, 2 or more")
        return ddp_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    workdir = Path(tempfile.mkdtemp(prefix="gradflow-bench-"))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    models = args.models
    slow = "small" in models and not args.no_slow_server
    conds = {m: ["off", "stats"] + ["stats_torch"] * args.torch_path
             + [f"stats_every{args.mlflow_every}"] * bool(args.mlflow_every)
             + (["lightning"] + ["slow_server"] * slow if m == "small" else []) for m in models}
    times = {(m, c): [] for m in models for c in conds[m]}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, batch 32, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.repeats} repeats; statistics kernel: "
          f"{'fused C (src/stats/fused.c)' if fused.library() else 'none, torch ops'}", flush=True)
    with slow_server(workdir) if slow else contextlib.nullcontext() as slow_uri:
        for r in range(args.repeats):
            for m in models:
                for c in conds[m] if r % 2 == 0 else reversed(conds[m]):
                    u = slow_uri if c == "slow_server" else uri
                    times[(m, c)].append(run_once(m, c, args.steps, args.warmup, u, args.device, workdir))
            print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    spread = {k: (min(t[0] for t in v), max(t[0] for t in v)) for k, v in times.items()}
    med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    drain = {k: statistics.median(t[2] for t in v) for k, v in times.items()}
    # the whole run: every timed step, then the wait for the MLflow backlog at its end
    total = {k: statistics.median(t[0] * args.steps + t[2] for t in v) for k, v in times.items()}

    def per_repeat(m: str, a: str, b: str, measure) -> list[float]:
        """Condition a's measure over condition b's, repeat by repeat (runs seconds apart)."""
        return [measure(x) / measure(y) for x, y in zip(times[(m, a)], times[(m, b)])]

    # a run's wall and CPU time per step, and the whole run: every timed step, then the drain
    wall, thread, whole = (lambda t: t[0]), (lambda t: t[1]), (lambda t: t[0] * args.steps + t[2])
    paired = {(m, c): per_repeat(m, c, "off", wall) for (m, c) in times}
    pmed = {(m, c): tuple(statistics.median(per_repeat(m, c, "off", f)) for f in (wall, thread, whole))
            for (m, c) in times}

    def between(m: str, a: str, b: str, measure=wall) -> float:
        """Median over repeats of condition a's time per step over condition b's, in the same repeat."""
        return statistics.median(per_repeat(m, a, b, measure))

    table = ["| model | condition | ms/step | vs off | min-max ms | cpu ms | cpu vs off | drain s | total vs off "
             "| paired vs off | paired range |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (m, c), t in med.items():
        lo, hi = spread[(m, c)]
        table.append(f"| {MODELS[m].label} | {c} | {t * 1e3:.2f} | {t / med[(m, 'off')]:.2f}x | "
                     f"{lo * 1e3:.1f}-{hi * 1e3:.1f} | {cpu[(m, c)] * 1e3:.2f} | {cpu[(m, c)] / cpu[(m, 'off')]:.2f}x | "
                     f"{drain[(m, c)]:.2f} | {total[(m, c)] / total[(m, 'off')]:.2f}x | {pmed[(m, c)][0]:.2f}x | "
                     f"{min(paired[(m, c)]):.2f}-{max(paired[(m, c)]):.2f} |")
    print("\n" + "\n".join(table) + "\n")
    names = {"small": "overhead_ratio_small", "mid": "overhead_ratio", "wide": "overhead_ratio_wide",
             **{m: f"overhead_ratio_{m}" for m in ("cnn", "lstm", "transformer")}}
    summary = [f"{names[m]}_cpu={pmed[(m, 'stats')][1]:.3f}" for m in models]
    summary += [f"{names[m]}_total={pmed[(m, 'stats')][2]:.3f}" for m in models]
    summary += [f"{names[m]}={pmed[(m, 'stats')][0]:.3f}" for m in models]
    if args.torch_path:
        summary += [f"{names[m]}_torch_path={pmed[(m, 'stats_torch')][0]:.3f}" for m in models]
    if args.mlflow_every:
        summary += [f"{names[m]}_mlflow_every_{args.mlflow_every}="
                    f"{pmed[(m, f'stats_every{args.mlflow_every}')][0]:.3f}" for m in models]
    backend, ours = ingest(uri)
    summary += [f"ingest: log_batch(1000) direct {backend:,.0f} metrics/s, AsyncRunWriter sustained {ours:,.0f} "
                f"metrics/s", f"ingest_ratio={ours / backend:.2f}"]
    if slow:  # wall time: waiting on the network would show there, not in CPU time
        summary.append(f"slow_server_ratio={between('small', 'slow_server', 'stats'):.3f}")
    if "small" in models:
        summary.append(f"vs_lightning_ratio_cpu={between('small', 'lightning', 'stats', thread):.2f}")
        summary.append(f"vs_lightning_ratio={between('small', 'lightning', 'stats'):.2f}")
    print("\n".join(summary))
    if args.docs:
        block = "overhead" if set(models) <= {"small", "mid", "wide"} else "overhead-models"
        perf_page.write(block, table + ["", "```", *summary, "```"])


if __name__ == "__main__":
    main()
