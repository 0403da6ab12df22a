"""The fused statistics passes (src/fused.c), compiled once per kind of CPU and loaded with ctypes.

Why hand-written C: the statistics need ~12 passes over the gradients and weights in eager torch ops (norm,
sum, min/max, sign, copy, subtract, ...), each a full read of memory the step itself barely touches; one
loop reads each tensor once. The compilers that could fuse them cost more than they save per process:
torch.compile 3.6 s at start-up even with a warm cache, numba 2-3 s of import, a torch C++ extension about a
minute to build and a ninja check per process. fused.c is ~160 lines of plain C with no headers but libc,
built by the system C compiler in 0.25 s (measured here) and cached by the hash of its source, flags and CPU;
loading it costs a millisecond. Without a compiler (or with GRADFLOW_FUSED=0) the callback uses the torch
path, which tests require to agree with this one.
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
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.c")
# No -ffast-math: NaN/Inf must propagate. Reassociation alone lets the float32 block sums vectorise.
# No FMA contraction: f'(s) from an activation's output must round as the registry's torch ops round it.
FLAGS = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros", "-ffp-contract=off"]
# Tuned for the CPU it runs on (AVX-512 here: 4x the lanes of the x86-64 baseline); the cache key holds the
# CPU's identity, so a home directory shared by different nodes keeps one build per kind of CPU.
NATIVE = ["-march=native"]


# activation modules whose saturation the kernel counts from their output (fused.c's kinds)
ACT_KINDS = {nn.Identity: 0, nn.ReLU: 1, nn.Sigmoid: 2, nn.Tanh: 3}


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
    lib.grad_pass.argtypes = [i64, ptrs, ptrs, ptrs, ctypes.c_void_p, ctypes.c_void_p]
    lib.weight_pass.argtypes = [i64, ptrs, ptrs, ctypes.c_void_p, ctypes.c_void_p]
    lib.add_squares.argtypes = [i64, ptrs, ctypes.c_void_p, ctypes.c_void_p]
    lib.add_squares.restype = None
    lib.act_pass.argtypes = [i64, ptrs, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.grad_pass.restype = lib.weight_pass.restype = lib.act_pass.restype = None
    return lib


def eligible(tensors: list[Tensor]) -> bool:
    """The kernel reads plain float32 memory on the CPU."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


class FusedPasses:
    """The two passes over fixed layers (the weights' storage must not move; gradients may be new tensors
    each step). Each pass writes a contiguous float64 row of sums per layer into `out`, the columns of
    stats.FUSED_GRAD_SUMS and stats.FUSED_WEIGHT_SUMS."""

    def __init__(self, lib: ctypes.CDLL, weights: list[Tensor]):
        self.lib, self.weights = lib, weights
        L_ = len(weights)
        self.prev = [torch.empty_like(w) for w in weights]  # the weights before the step
        arr = ctypes.c_void_p * L_
        self._w, self._prev, self._g = arr(*self._ptrs(weights)), arr(*self._ptrs(self.prev)), arr()
        self._n = torch.tensor([w.numel() for w in weights], dtype=torch.int64)
        self._w_at = [w.data_ptr() for w in weights]
        self._x, self._x_n = arr(), (ctypes.c_int64 * L_)()

    @staticmethod
    def _ptrs(ts: list[Tensor]) -> list[int]:
        return [t.data_ptr() for t in ts]

    def _check_weights(self) -> None:
        at = self._ptrs(self.weights)
        if at != self._w_at:  # someone swapped param.data: follow it
            if not eligible(self.weights) or any(w.shape != p.shape for w, p in zip(self.weights, self.prev)):
                raise RuntimeError("the weights changed dtype, device or shape during training")
            self._w[:], self._w_at = at, at

    def grad_pass(self, grads: list[Tensor], out: Tensor) -> None:
        self._check_weights()
        grads = [g if g.is_contiguous() and g.dtype == torch.float32 else g.contiguous().float() for g in grads]
        self._g[:] = self._ptrs(grads)
        self.lib.grad_pass(len(grads), self._g, self._w, self._prev, self._n.data_ptr(), out.data_ptr())

    def weight_pass(self, out: Tensor) -> None:
        self._check_weights()
        self.lib.weight_pass(len(self.weights), self._w, self._prev, self._n.data_ptr(), out.data_ptr())


    def add_squares(self, tensors: list[Tensor], out: Tensor) -> bool:
        """out[i] += ||tensors[i]||^2 into a contiguous float64 CPU row, one per layer; False (nothing done)
        unless every tensor is float32 on the CPU (then the caller reduces them itself)."""
        if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
            return False
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        self._x[:] = self._ptrs(tensors)
        self._x_n[:] = [t.numel() for t in tensors]
        self.lib.add_squares(len(tensors), self._x, ctypes.addressof(self._x_n), out.data_ptr())
        return True


class ActivationPass:
    """The activation outputs of fixed layers, one kernel call per step: a contiguous float64 row of
    stats.FUSED_ACT_SUMS per layer into `out`. kinds: ACT_KINDS values; limits: threshold x max f'."""

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

