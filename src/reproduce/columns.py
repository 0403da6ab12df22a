"""What a reproduced study's tables show of each run: column functions of a run record (its params, tags,
final metrics and metric histories, as read back from MLflow)."""
from __future__ import annotations

import math
from typing import Callable

from src.stats.names import layer_key, mlp_layer

Row = dict  # {"name", "params", "tags", "metrics", "history": callable(key) -> [(step, value)], "status"}


def fmt(v: float | None, digits: int = 3) -> str:
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
            h = [v for _, v in r["history"](layer_key(stat, i)) if math.isfinite(v)]
            if not h and i > 0:
                break
            if h:
                per_layer.append(sorted(h)[len(h) // 2])
        hidden = per_layer[:-1] or per_layer
        return f"{min(hidden):.1e} … {max(hidden):.1e}" if hidden else "—"
    return get


def tag(key: str) -> Callable[[Row], str]:
    return lambda r: r["tags"].get(key, "—")


def swept(r: Row) -> dict[str, str]:
    """The run's parameters plus the key=value pairs its name carries (a `cure=...` is not a param)."""
    return {**r["params"], **dict(kv.split("=", 1) for kv in r["name"].split(",") if "=" in kv)}


def by(rows: list[Row], **params) -> Row | None:
    return next((r for r in rows if all(str(swept(r).get(k)) == str(v) for k, v in params.items())), None)


def val_err(r: Row | None) -> float:
    return 100 * (1 - tail_mean("val/acc", 3)(r)) if r else float("nan")


def ratio_of_medians(r: Row) -> str:
    med = []
    for i in range(16):
        h = [v for _, v in r["history"](layer_key("weight_change/mean_abs", i))]
        if not h:
            break
        med.append(sorted(h)[len(h) // 2])
    return f"{med[0] / med[-1]:.2g}" if len(med) > 1 and med[-1] else "—"


def top_hidden(r: Row, stat: str) -> float | None:
    """Median over the logged steps of `stat` in the last hidden layer (the paper's Fig. 2: sigmoid's top
    hidden layer is driven to 0)."""
    n = sum(1 for k in r["metrics"] if k.startswith(f"{stat}/{mlp_layer(0)[:-2]}"))  # the MLP's layer_LL keys
    h = sorted(v for _, v in r["history"](layer_key(stat, n - 1))) if n else []
    return h[len(h) // 2] if h else None
