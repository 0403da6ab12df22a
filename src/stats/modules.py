"""Which modules of a model the statistics record, and what each is called. The one place that decides it, for
the callbacks, the theory and the gradient check alike.

A module is recorded when it owns trainable parameters itself (not through its children): nn.Linear, the
convolutions, nn.Embedding, nn.RNN/LSTM/GRU, nn.MultiheadAttention (its in-projection; its `out_proj` is a
Linear of its own), the norms' affine parameters, and any user module with its own nn.Parameters. Its weight
family (grad_*, weight_*, update_ratio) describes those parameters taken together, biases left out as for a
Linear (all of them when a module owns nothing but biases); frozen parameters are left out, and a module with
none left is not recorded. Modules come in the order `named_modules()` lists them (the order they were
registered), each once however many times it runs or however many parents hold it.

Names are module paths (`encoder.layers.0.linear1`), relative to the innermost module that holds every
recorded one (so `self.net.layer_00` in a LightningModule is `layer_00`), keeping that holder's own name where
a path would otherwise start with a number (`net.0`, not `0`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# The kinds a module is recorded as (the trace's `kind` column, `stats.types`); "other" is any module of the
# user's own that owns parameters.
KINDS = ("linear", "conv", "embedding", "recurrent", "attention", "norm", "other")
# The kinds that make up a net's depth: backprop_ratio compares the first of these with the last but one.
LAYER_KINDS = ("linear", "conv", "embedding", "recurrent", "attention", "other")
_TYPES = ((nn.Linear, "linear"), (nn.modules.conv._ConvNd, "conv"), (nn.Embedding, "embedding"),
          (nn.EmbeddingBag, "embedding"), (nn.RNNBase, "recurrent"), (nn.MultiheadAttention, "attention"),
          (nn.modules.batchnorm._NormBase, "norm"), (nn.LayerNorm, "norm"), (nn.GroupNorm, "norm"),
          (nn.RMSNorm, "norm"), (nn.LocalResponseNorm, "norm"))


class NothingToRecord(ValueError):
    """No module of the model owns trainable parameters, or none is left by the selection."""


@dataclass
class Recorded:
    path: str                     # the module's name in metric keys and the trace
    kind: str                     # one of KINDS
    module: nn.Module
    names: tuple[str, ...]        # the module's own parameters the weight family covers
    params: list[nn.Parameter] = field(repr=False)


def as_one(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A module's tensors taken together: the one tensor itself, or several flattened into one (a copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


def kind_of(module: nn.Module) -> str:
    return next((kind for cls, kind in _TYPES if isinstance(module, cls)), "other")


def _covered(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    return [(n, p) for n, p in own if "bias" not in n] or own


def _short_names(paths: list[str]) -> list[str]:
    """Paths relative to the innermost module holding all of them; that module's name is kept where a path
    would start with a digit (or be empty)."""
    parts = [p.split(".") for p in paths]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    out = []
    for p in parts:
        keep = common if p[common:] and not p[common][0].isdigit() else max(common - 1, 0)
        out.append(".".join(p[keep:]) or "model")
    return out


def recorded_modules(model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None,
                     types: list[str] | None = None, who: str = "the statistics") -> list[Recorded]:
    """The modules of `model` to record. `include` / `exclude`: regular expressions searched in the module's
    path (as named_modules() gives it, or as shortened); `types`: kinds to keep. NothingToRecord (a
    ValueError) names the selection when nothing is left."""
    include, exclude, types = (_listed(v) for v in (include, exclude, types))
    found = [(path, m, _covered(m)) for path, m in model.named_modules()]
    found = [(path, m, cov) for path, m, cov in found if cov]
    short = _short_names([path for path, _, _ in found]) if found else []
    inc = [re.compile(p) for p in include or []]
    exc = [re.compile(p) for p in exclude or []]
    out = []
    for (path, m, cov), name in zip(found, short):
        kind = kind_of(m)
        if inc and not any(r.search(path) or r.search(name) for r in inc):
            continue
        if any(r.search(path) or r.search(name) for r in exc) or (types and kind not in types):
            continue
        out.append(Recorded(name, kind, m, tuple(n for n, _ in cov), [p for _, p in cov]))
    if not out:
        what = type(model).__name__
        if not found:
            raise NothingToRecord(f"{who} found no module with trainable parameters in {what}")
        chosen = ", ".join(f"stats.{k}={v}" for k, v in (("include", include), ("exclude", exclude),
                                                          ("types", types)) if v)
        raise NothingToRecord(f"{who}: no module of {what} matches {chosen}; its modules with trainable "
                              f"parameters: {', '.join(short[:20])}{' ...' if len(short) > 20 else ''}")
    return out


def _listed(v) -> list | None:
    """A setting given as one string or as a list of them."""
    return [v] if isinstance(v, str) else v


def selection_problems(include, exclude, types) -> list[str]:
    """One sentence per bad selection setting, `stats.<key>=<value>: why` (checked before anything runs)."""
    out = []
    for key, v in (("include", include), ("exclude", exclude), ("types", types)):
        if not (v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))):
            out.append(f"stats.{key}={v!r}: must be null, a string or a list of strings")
    if out:
        return out
    for key, v in (("include", include), ("exclude", exclude)):
        for p in _listed(v) or []:
            try:
                re.compile(p)
            except re.error as e:
                out.append(f"stats.{key}={v!r}: {p!r} is not a regular expression ({e})")
    for t in _listed(types) or []:
        if t not in KINDS:
            out.append(f"stats.types={types!r}: unknown type {t!r}; valid: {', '.join(KINDS)}")
    return out


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The model's nn.Linear layers in order: what the MLP's theory and the tests of plain nets read."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]
