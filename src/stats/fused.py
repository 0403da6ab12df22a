"""The fused statistics passes (fused.c beside this file), compiled once per kind of CPU, loaded with ctypes.

Why hand-written C: in eager torch ops the statistics take about a dozen passes over the gradients and
weights (norm, sum, min/max, sign, copy, subtract, ...), each a full read of memory the step itself barely
touches; one loop reads each tensor once. The compilers that could fuse them cost more per process than they
save (torch.compile's start-up even from its cache, numba's import, a C++ extension's build and its check on
every start). fused.c is plain C with no headers but libc, built by the system C compiler in well under a
second and cached by the hash of its source, flags and CPU. Without a compiler (or with GRADFLOW_FUSED=0)
the callback takes its torch path, which the tests hold to agree with this one.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from src.stats import reductions as stats

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.c")
# No -ffast-math: NaN/Inf must propagate. Reassociation alone lets the float32 block sums vectorise.
# No FMA contraction: f'(s) from an activation's output must round as the registry's torch ops round it.
FLAGS = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros", "-ffp-contract=off"]
# Tuned for the CPU it runs on (AVX-512 has 4x the lanes of the x86-64 baseline); the cache key holds the
# CPU's identity, so a home directory shared by different nodes keeps one build per kind of CPU.
NATIVE = ["-march=native"]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("GRADFLOW_CACHE_DIR") or Path(base) / "gradflow")


def _cpu() -> str:
    try:  # Linux: model and feature flags of the first CPU
        text = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        return "\n".join(line for line in text.splitlines() if line.split(":")[0].strip() in
                         ("model name", "flags", "Features", "CPU part"))
    except OSError:
        return platform.processor()


def _build(so: Path, cc: str) -> None:
    so.parent.mkdir(parents=True, exist_ok=True)
    # built under a temporary name and renamed: processes starting together never load a half-written file
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        out = Path(tmp) / so.name
        cmd = [cc, *FLAGS, str(SOURCE), "-o", str(out), "-lm"]
        try:
            subprocess.run(cmd[:1] + NATIVE + cmd[1:], check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError:  # a compiler without -march=native: the portable build
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        os.replace(out, so)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (disabled, no C compiler, or the build failed: logged once)."""
    if os.environ.get("GRADFLOW_FUSED", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.warning("no C compiler found: gradient statistics use the slower torch path")
        return None
    build = " ".join([cc, *NATIVE, *FLAGS, platform.machine(), _cpu()])
    key = hashlib.sha256(SOURCE.read_bytes() + build.encode()).hexdigest()
    so = _cache_dir() / f"fused-{key[:16]}.so"
    try:
        if not so.exists():
            _build(so, cc)
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("could not build or load %s (%s): gradient statistics use the slower torch path", SOURCE.name, detail)
        return None
    ptrs, i64 = ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64
    lib.grad_pass.argtypes = [i64, ptrs, ptrs, ptrs, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p]
    lib.weight_pass.argtypes = [i64, ptrs, ptrs, ctypes.c_void_p, ctypes.c_void_p]
    lib.add_squares.argtypes = [i64, ptrs, ctypes.c_void_p, ctypes.c_void_p]
    lib.add_squares.restype = None
    lib.act_pass.argtypes = [i64, ptrs, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.grad_pass.restype = lib.weight_pass.restype = lib.act_pass.restype = None
    return lib


def eligible(tensors: list[Tensor]) -> bool:
    """The kernel reads plain float32 memory on the CPU."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


# Nets of at least PARALLEL_MIN_NUMEL weights are reduced on torch's threads (ctypes releases the GIL during
# the call), layers of at least SPLIT_MIN_NUMEL entries in one piece per thread. Handing work to threads and
# combining the pieces has a fixed cost per pass, which only nets of millions of weights earn back (the
# 5x1024 MLP of benchmarks/overhead.py gains; 20x256 and 10x64 lose).
PARALLEL_MIN_NUMEL = 1 << 22
SPLIT_MIN_NUMEL = 1 << 18


class _Group:
    """The pieces (layer, offset, length) one thread reduces, with their fixed pointer arrays."""

    def __init__(self, pieces: list[tuple[int, int, int]], weights: list[Tensor], prev: list[Tensor]):
        self.pieces, P = pieces, len(pieces)
        arr = ctypes.c_void_p * P
        self.w, self.prev, self.g = arr(), arr(), arr()
        self.n = (ctypes.c_int64 * P)(*(m for _, _, m in pieces))
        self.point(weights, prev)
        self.grad_out = torch.zeros(P, len(stats.FUSED_GRAD_SUMS), dtype=torch.float64)
        self.weight_out = torch.zeros(P, len(stats.FUSED_WEIGHT_SUMS), dtype=torch.float64)

    def point(self, weights: list[Tensor], prev: list[Tensor]) -> None:
        self.w[:] = [weights[i].data_ptr() + 4 * off for i, off, _ in self.pieces]
        self.prev[:] = [prev[i].data_ptr() + 4 * off for i, off, _ in self.pieces]


class _Combine:
    """Per-piece sums [P, C] into per-module ones [modules, C] (`layer_of`: each piece's module). Columns 0-2
    (shift, shifted sum and sum of squares) are re-shifted to the shift of each module's first piece; columns
    in `maxed` take the max, the others add up. In numpy on the pieces sorted by module (reduceat): these
    arrays hold a few dozen numbers, where each torch op's dispatch costs more than its arithmetic."""

    def __init__(self, layer_of: list[int], lengths: list[int], modules: int):
        layer_of = np.asarray(layer_of)
        self.order = np.argsort(layer_of, kind="stable")
        self.starts = np.searchsorted(layer_of[self.order], np.arange(modules))
        self.module_of = layer_of[self.order]  # of each sorted piece
        self.lengths = np.asarray(lengths, dtype=np.float64)[self.order]

    def __call__(self, rows: np.ndarray, out: np.ndarray, maxed: tuple[int, ...]) -> None:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf sums propagate, as torch's did: no warning
            self._combine(rows, out, maxed)

    def _combine(self, rows: np.ndarray, out: np.ndarray, maxed: tuple[int, ...]) -> None:
        rows = rows[self.order]
        shift, total, total_sq = rows[:, 0], rows[:, 1], rows[:, 2]
        base = shift[self.starts]
        d = shift - base[self.module_of]  # each piece's shift relative to its module's first piece
        out[:, 0] = base
        out[:, 1] = np.add.reduceat(total + self.lengths * d, self.starts)
        out[:, 2] = np.add.reduceat(total_sq + 2 * d * total + self.lengths * d * d, self.starts)
        for j in range(3, rows.shape[1]):
            reduce = np.maximum if j in maxed else np.add
            out[:, j] = reduce.reduceat(rows[:, j], self.starts)


class FusedPasses:
    """The two passes over fixed tensors (the weights' storage must not move; gradients may be new tensors
    each step). Each pass writes a contiguous float64 row of sums per module into `out`, the columns of
    stats.FUSED_GRAD_SUMS and stats.FUSED_WEIGHT_SUMS; `owner[i]` is the module (row) of weights[i], one
    tensor per module by default. With `threads` > 1, big tensors are split into pieces reduced on that many
    threads (torch's own are idle between backward and the optimizer step).

    The update is W after the step minus `prev`. weight_pass leaves the weights in `prev`; the next step's
    grad_pass copies them again only when they may have changed since: the previous step was not recorded,
    their storage moved, or an in-place op bumped their version counter (a clamp under no_grad, say).
    Writes through `param.data` bump no counter: such an edit between two recorded steps counts as part of
    the second one's update."""

    def __init__(self, lib: ctypes.CDLL, weights: list[Tensor], threads: int = 1, owner: list[int] | None = None):
        self.lib, self.weights = lib, weights
        owner = list(range(len(weights))) if owner is None else owner
        self._rows = max(owner) + 1
        self.prev = [torch.empty_like(w) for w in weights]  # the weights before the step
        numel = [w.numel() for w in weights]
        threads = threads if sum(numel) >= PARALLEL_MIN_NUMEL else 1
        pieces = []
        for i, n in enumerate(numel):
            k = threads if threads > 1 and n >= SPLIT_MIN_NUMEL else 1
            bounds = [n * j // k for j in range(k + 1)]
            pieces += [(i, a, b - a) for a, b in zip(bounds, bounds[1:])]
        groups: list[list] = [[] for _ in range(max(1, min(threads, len(pieces))))]
        load = [0] * len(groups)
        for piece in sorted(pieces, key=lambda p: -p[2]):  # biggest first onto the least loaded thread
            j = load.index(min(load))
            groups[j].append(piece)
            load[j] += piece[2]
        # one call writes the caller's rows directly: one piece per module, in module order, on one thread
        self._whole = len(pieces) == self._rows and len(groups) == 1 and owner == list(range(self._rows))
        if self._whole:
            groups = [pieces]  # in module order
        self._groups = [_Group(g, weights, self.prev) for g in groups]
        self._pool = ThreadPoolExecutor(len(groups) - 1, "gradflow-fused") if len(groups) > 1 else None
        order = [p for g in groups for p in g]
        self._combine = _Combine([owner[i] for i, _, _ in order], [m for _, _, m in order], self._rows)
        self._w_at = self._ptrs(weights)
        self._after: int | None = None  # the step whose weights `prev` holds, and their versions then
        self._versions: list[int] = []

    @staticmethod
    def _ptrs(ts: list[Tensor]) -> list[int]:
        return [t.data_ptr() for t in ts]

    def _check_weights(self) -> bool:
        """True when the weights' storage moved (someone swapped param.data): the passes follow it."""
        at = self._ptrs(self.weights)
        if at == self._w_at:
            return False
        if not eligible(self.weights) or any(w.shape != p.shape for w, p in zip(self.weights, self.prev)):
            raise RuntimeError("the weights changed dtype, device or shape during training")
        for grp in self._groups:
            grp.point(self.weights, self.prev)
        self._w_at = at
        return True

    def _each_group(self, fn) -> None:
        """fn(group) for every group: all but the first on the pool's threads, the first on this one."""
        futures = [self._pool.submit(fn, grp) for grp in self._groups[1:]] if self._pool else []
        fn(self._groups[0])
        for f in futures:
            f.result()

    def _gather(self, outs: list[Tensor], out: Tensor, maxed: tuple[int, ...]) -> None:
        rows = outs[0] if len(outs) == 1 else torch.cat(outs)
        self._combine(rows.numpy(), out.numpy(), maxed)

    def grad_pass(self, grads: list[Tensor], out: Tensor, step: int) -> None:
        """Before optimizer step `step` (steps count up by one)."""
        moved = self._check_weights()
        copy = moved or self._after != step - 1 or self._versions != [w._version for w in self.weights]
        grads = [g if g.is_contiguous() and g.dtype == torch.float32 else g.contiguous().float() for g in grads]
        at = self._ptrs(grads)

        def run(grp: _Group) -> None:
            grp.g[:] = [at[i] + 4 * off for i, off, _ in grp.pieces]
            dest = out if self._whole else grp.grad_out
            self.lib.grad_pass(len(grp.pieces), grp.g, grp.w, grp.prev, ctypes.addressof(grp.n), copy,
                               dest.data_ptr())

        self._each_group(run)
        if not self._whole:
            # a piece with NaN has NaN for max |g| (fused.c), and the max over pieces keeps it
            self._gather([grp.grad_out for grp in self._groups], out, (stats.FUSED_GRAD_SUMS.index("absmax"),))

    def weight_pass(self, out: Tensor, step: int) -> None:
        """After optimizer step `step`."""
        self._check_weights()

        def run(grp: _Group) -> None:
            dest = out if self._whole else grp.weight_out
            self.lib.weight_pass(len(grp.pieces), grp.w, grp.prev, ctypes.addressof(grp.n), dest.data_ptr())

        self._each_group(run)
        self._after, self._versions = step, [w._version for w in self.weights]
        if not self._whole:
            self._gather([grp.weight_out for grp in self._groups], out, ())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class SquareSums:
    """out[i] += ||tensors[i]||^2 for float32 CPU tensors, one kernel call for all of them."""

    def __init__(self, lib: ctypes.CDLL, n: int):
        self.lib = lib
        self._x, self._x_n = (ctypes.c_void_p * n)(), (ctypes.c_int64 * n)()

    def __call__(self, tensors: list[Tensor], out: Tensor) -> bool:
        """Into a contiguous float64 CPU row, one entry per tensor; False (nothing done) unless every tensor
        is float32 on the CPU (then the caller reduces them itself)."""
        if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
            return False
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        self._x[:] = [t.data_ptr() for t in tensors]
        self._x_n[:] = [t.numel() for t in tensors]
        self.lib.add_squares(len(tensors), self._x, ctypes.addressof(self._x_n), out.data_ptr())
        return True


class ActivationPass:
    """The activation outputs of fixed layers, one kernel call per step: a contiguous float64 row of
    stats.FUSED_ACT_SUMS per layer into `out`. kinds: the registry's kernel_kind of each layer's activation;
    limits: threshold x max f'."""

    def __init__(self, lib: ctypes.CDLL, kinds: list[int], limits: list[float]):
        self.lib, L_ = lib, len(kinds)
        self._kinds, self._limits = (ctypes.c_int32 * L_)(*kinds), (ctypes.c_float * L_)(*limits)
        self._a, self._n = (ctypes.c_void_p * L_)(), (ctypes.c_int64 * L_)()

    def __call__(self, outputs: list[Tensor | None], out: Tensor) -> None:
        """A layer without an output this step (None) gets a count of 0."""
        outputs = [None if a is None else a if a.is_contiguous() else a.contiguous() for a in outputs]
        self._a[:] = [None if a is None else a.data_ptr() for a in outputs]
        self._n[:] = [0 if a is None else a.numel() for a in outputs]
        self.lib.act_pass(len(outputs), self._a, ctypes.addressof(self._n), ctypes.addressof(self._kinds),
                          ctypes.addressof(self._limits), out.data_ptr())

