"""Gradient check: autograd against central differences (`python -m src.gradcheck [overrides]` builds the
configured model with the same builder, registry and data as training and calls `check`).

In float64, for a random sample of the entries of every parameter of every recorded module (weights and
biases; src.stats.modules says which modules), compares autograd's dL/dw
with (L(w+h) - L(w-h)) / 2h: one row per parameter tensor with its maximum relative error |a - n| / max(|a|,
|n|). The command exits 1 above `gradcheck.tol`, 2 on a bad config.

Why not torch.autograd.gradcheck alone: it perturbs every entry of its inputs (a full Jacobian, too slow for
MNIST-wide layers), judges with |a - n| <= atol + rtol |n| rather than the relative error users compare with
the usual thresholds, and cannot skip entries whose perturbation crosses a kink. We still use it where it
fits: `torch_check` runs it on the sampled entries as a second opinion (and the tests use it).

Kinks: relu, leaky_relu and selu have a derivative that jumps at 0; a difference quotient whose two
evaluations put some unit on different sides of 0 measures neither one-sided derivative. Such entries are
detected (the sign pattern of every kinked activation's input differs between w+h and w-h) and skipped.
Tiny gradients: the difference quotient carries a round-off error of about 1e-15 |L| / h, so a gradient of
1e-9 (a vanishing net's first layers) cannot be resolved to 1e-6 relative: such entries are judged against
that round-off instead (see `check`); a wrong backward still fails there, by orders of magnitude.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.models.registry import ACTIVATION_BY_TYPE
from src.stats.modules import linear_layers, recorded_modules

# Relative round-off of a float64 loss: a few ulps of |L|, so a difference quotient carries ~1e-15 |L| / h.
ROUND_OFF = 1e-15


@dataclass
class ParamCheck:
    module: str            # the module's path (src.stats.modules)
    param: str             # its parameter ("weight", "bias", "weight_hh_l0", ...)
    checked: int
    skipped: int           # entries whose perturbation crossed a kink
    max_abs_grad: float
    max_rel_error: float


def check(net: nn.Module, x: Tensor, y: Tensor, samples: int = 20, eps: float = 1e-5, tol: float = 1e-6,
          seed: int = 0, loss_fn=F.cross_entropy) -> list[ParamCheck]:
    """Compare autograd with central differences on `samples` random entries of every parameter of every
    recorded module. `net` is converted to float64 in place.

    The error of one entry is |a - n| / max(|a|, |n|, noise / tol), noise = ROUND_OFF |L| / eps being the
    difference quotient's own round-off: large gradients are judged relatively, gradients too small to be
    resolved to `tol` (below ~3e-4 for L=3) absolutely (|a - n| must stay within the round-off)."""
    net = net.double()
    x = x.double() if x.is_floating_point() else x  # tokens stay indices
    checked = [(r.path, name, p) for r in recorded_modules(net, who="gradcheck")
               for name, p in r.module.named_parameters(recurse=False) if p.requires_grad]
    kinks = [m for m in net.modules() if type(m) in ACTIVATION_BY_TYPE and ACTIVATION_BY_TYPE[type(m)].kinked]
    signs: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: signs.append(inp[0] > 0)) for m in kinks]

    def loss() -> float:
        signs.clear()
        with torch.no_grad():
            return float(loss_fn(net(x), y))

    try:
        params = [p for _, _, p in checked]
        net.zero_grad()
        out = loss_fn(net(x), y)
        analytic = torch.autograd.grad(out, params)
        floor = ROUND_OFF * max(abs(float(out.detach())), 1e-300) / eps / tol
        gen = torch.Generator().manual_seed(seed)
        results = []
        for k, (module, name, p) in enumerate(checked):
            a_all = analytic[k].reshape(-1)
            flat = p.data.view(-1)
            idx = torch.randperm(flat.numel(), generator=gen)[:samples]
            errs, skipped, amax = [], 0, 0.0
            for j in idx.tolist():
                old = flat[j].item()
                flat[j] = old + eps
                plus, s_plus = loss(), list(signs)
                flat[j] = old - eps
                minus, s_minus = loss(), list(signs)
                flat[j] = old
                if any(bool((u != v).any()) for u, v in zip(s_plus, s_minus)):
                    skipped += 1
                    continue
                n = (plus - minus) / (2 * eps)
                a = float(a_all[j])
                amax = max(amax, abs(a))
                errs.append(abs(a - n) / max(abs(a), abs(n), floor))
            results.append(ParamCheck(module, name, len(errs), skipped, amax, max(errs, default=0.0)))
        return results
    finally:
        for h in hooks:
            h.remove()


def torch_check(net: nn.Module, x: Tensor, y: Tensor, layer: int, entries: Tensor, eps: float = 1e-5,
                atol: float = 1e-8, rtol: float = 1e-5, loss_fn=F.cross_entropy) -> bool:
    """torch.autograd.gradcheck of the loss as a function of a few entries of one layer's weight."""
    net = net.double()
    lin = linear_layers(net)[layer]
    w0 = lin.weight.detach().clone()

    def f(v: Tensor) -> Tensor:
        w = w0.reshape(-1).index_put((entries,), v).view_as(w0)
        return loss_fn(_with_weight(net, lin, w, x.double()), y)

    v = w0.reshape(-1)[entries].clone().requires_grad_(True)
    return torch.autograd.gradcheck(f, (v,), eps=eps, atol=atol, rtol=rtol, raise_exception=False)


def _with_weight(net: nn.Module, lin: nn.Linear, w: Tensor, x: Tensor) -> Tensor:
    name = next(n for n, m in net.named_modules() if m is lin)
    return torch.func.functional_call(net, {f"{name}.weight": w}, (x,), strict=False)


def table(results: list[ParamCheck], tol: float) -> str:
    width = max([len("module")] + [len(r.module) for r in results])
    rows = [f"{'module':<{width}} {'param':<12} {'checked':>7} {'kinks':>5} {'max |grad|':>11} {'max rel err':>11}  ok"]
    for r in results:
        ok = "yes" if r.max_rel_error <= tol else "NO"
        rows.append(f"{r.module:<{width}} {r.param:<12} {r.checked:>7} {r.skipped:>5} {r.max_abs_grad:>11.3e} "
                    f"{r.max_rel_error:>11.3e}  {ok}")
    return "\n".join(rows)


def exit_code(results: list[ParamCheck], tol: float) -> int:
    """0 when every checked entry is within `tol`, else 1."""
    return 0 if max((r.max_rel_error for r in results), default=0.0) <= tol else 1

