"""Fused fp32 CPU kernels (kernels.cc), compiled with the machine's C++ compiler on first use.

MindSpore's CPU kernels run one pass over the whole tensor per op, so the elementwise and row-wise parts of
a transformer layer (tanh GeLU, the scaled masked softmax, LayerNorm, the bias add, the single-rank cross
entropy, and their gradients) cost more than their arithmetic. The kernels here do each of them in one
threaded pass per row. The linear layers' products (`Linear`) and the attention's (inside `Attention`) go
through a BLAS: Intel MKL when the `mkl` wheel is installed, else numpy's OpenBLAS (blas_library()). All are
called through `ops.Custom(func_type="aot")` (which works in PyNative and inside `mindspore.jit`), each paired
with its written-out gradient. The layers use them on CPU for fp32 tensors when `enabled()` (`blas_enabled()`
for the products); otherwise, and with MINDTRON_CPU_KERNELS=0, they compute the same maths with MindSpore's ops.
tests/test_cpu_kernels.py checks each kernel and its gradient against MindSpore's ops (the GeLU against
float64 numpy).

The library is built once per source, compiler and CPU into $MINDTRON_KERNEL_CACHE (default
~/.cache/mindtron/kernels); a build that fails (no compiler, a glibc without vector tanhf) logs one warning
and leaves the plain ops in place.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

logger = logging.getLogger("mindtron")

SOURCE = Path(__file__).with_name("kernels.cc")
# no -ffast-math: the kernels must pass NaN and inf through as MindSpore's ops do
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))


def _mkl() -> Optional[str]:
    """libmkl_rt of the `mkl` wheel (pip install mindtron[mkl]), or None when it is not installed."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = sorted(str(Path(f.locate()).resolve()) for f in files if f.name.startswith("libmkl_rt.so"))
    return found[-1] if found else None


def _numpy_openblas() -> Optional[str]:
    """The OpenBLAS library numpy's wheel ships (numpy.libs/libopenblas*.so), or None."""
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    found = sorted(libs.glob("libopenblas*.so*")) + sorted(libs.glob("libscipy_openblas*.so*"))
    return str(found[0]) if found else None


def blas_library() -> Optional[str]:
    """The BLAS the products go through: MKL when the `mkl` wheel is installed (about 12 % faster than
    OpenBLAS on the linear layers' shapes here), else numpy's OpenBLAS; MINDTRON_BLAS=openblas picks OpenBLAS."""
    choice = os.environ.get("MINDTRON_BLAS", "auto").lower()
    if choice not in ("auto", "mkl", "openblas"):
        raise ValueError(f"MINDTRON_BLAS={choice!r}: use auto (MKL when installed, else OpenBLAS), mkl or openblas")
    mkl = _mkl() if choice != "openblas" else None
    if choice == "mkl" and mkl is None:
        raise ValueError("MINDTRON_BLAS=mkl but Intel MKL is not installed: pip install mindtron[mkl] (or unset "
                         "MINDTRON_BLAS to use numpy's OpenBLAS)")
    return mkl or _numpy_openblas()


def compiler() -> str:
    """The C++ compiler the native libraries are built with ($CXX, else g++ or c++)."""
    found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if found is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    return found


def build(source: Path, flags: list, link: tuple = ()) -> Path:
    """Compile `source` into a shared library in the cache, once per source, flags, compiler and CPU, and
    load it once to check that every symbol resolves. Atomic: concurrent workers may build it at once."""
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), " ".join([*flags, *link]), version, _cpu_signature()])
                         .encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MINDTRON_KERNEL_CACHE") or Path.home() / ".cache" / "mindtron" / "kernels")
    target = cache / f"mindtron_{source.stem}_{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            done = subprocess.run([cxx, *flags, str(source), "-o", tmp, *link], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip()[-2000:])
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        logger.info("compiled %s into %s", source.name, target)
    ctypes.CDLL(str(target))
    return target


@functools.lru_cache(maxsize=None)
def library() -> Optional[str]:
    """Path of the compiled kernel library, or None when it is switched off or cannot be built here."""
    if os.environ.get("MINDTRON_CPU_KERNELS", "1") == "0":
        return None
    blas = blas_library()
    try:
        # loading it resolves every symbol now (libmvec's tanhf needs glibc 2.35)
        path = build(SOURCE, FLAGS + ([f'-DMINDTRON_BLAS="{blas}"'] if blas else []), link=("-ldl",))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("mindtron's fused CPU kernels are unavailable, using MindSpore's ops (slower): %s. "
                       "Set MINDTRON_CPU_KERNELS=0 to skip them without this warning.", error)
        return None
    return str(path)


@functools.lru_cache(maxsize=None)
def _loaded() -> ctypes.CDLL:
    """The kernel library loaded into this process (call only where library() is not None)."""
    return ctypes.CDLL(library())


def enabled(dtype=ms.float32) -> bool:
    """Whether the fused kernels run for tensors of `dtype` here (CPU, fp32, library built)."""
    return dtype == ms.float32 and ms.get_context("device_target") == "CPU" and library() is not None


@functools.lru_cache(maxsize=None)
def blas_enabled(dtype=ms.float32) -> bool:
    """Whether the matrix products run through a BLAS here (the kernels are enabled and blas_library() loaded)."""
    if not enabled(dtype):
        return False
    kernels = _loaded()
    if not kernels.BlasAvailable():
        kernels.BlasPath.restype = ctypes.c_char_p  # the path built in, not what the environment says now
        logger.warning("the BLAS %s could not be loaded: the matrix products use MindSpore's MatMul (slower)",
                       kernels.BlasPath().decode() or "(none found at build time)")
        return False
    return True


def set_threads(count: int) -> Optional[int]:
    """Run the kernels' parallel regions on `count` threads (0: OpenMP's default); returns the count now in
    force, or None when the kernels are not in use here."""
    if not enabled():
        return None
    return int(_loaded().SetThreads(int(count)))


def threads() -> Optional[int]:
    """The threads the kernels' parallel regions use now (None when the kernels are not in use here)."""
    return int(_loaded().Threads()) if enabled() else None


def _kernel(name: str, out_shape, out_dtype):
    return ops.Custom(f"{library()}:{name}", out_shape, out_dtype, func_type="aot")


def _same(*shapes):
    return shapes[0]


def _scalar(value: float) -> Tensor:
    return Tensor(np.array([value], np.float32))


class GeluTanh(nn.Cell):
    """GeLU's tanh form (Megatron's bias-GeLU constants) and its closed-form derivative, one pass each."""

    def __init__(self):
        super().__init__()
        self.forward = _kernel("GeluTanhForward", _same, _same)
        self.backward = _kernel("GeluTanhBackward", _same, _same)

    def construct(self, x):
        return self.forward(x)

    def bprop(self, x, out, dout):
        return (self.backward(x, dout),)


class MaskedSoftmax(nn.Cell):
    """softmax(where(mask, -10000, scores * scale)) over the last axis: scores [B, N, Sq, Sk], mask (bool)
    [B or 1, N or 1, Sq, Sk] broadcast inside the kernel. The gradient is zero where the mask is set."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = _scalar(scale)
        self.forward = _kernel("MaskedSoftmaxForward", lambda s, m, c: s, lambda s, m, c: s)
        self.backward = _kernel("MaskedSoftmaxBackward", lambda p, g, m, c: p, lambda p, g, m, c: p)

    def construct(self, scores, mask):
        return self.forward(scores, mask, self.scale)

    def bprop(self, scores, mask, out, dout):
        return self.backward(out, dout, mask, self.scale), ops.zeros_like(mask)


class GradientStats(nn.Cell):
    """One threaded pass over many fp32 gradients at once (each a single op call, however many tensors):
    `all_finite(*grads)` -> [1] (1.0 when no element is inf/nan, else 0.0), `square_sum(*grads)` -> [1] (the
    sum of all g^2, accumulated in float64), `scale(*grads, c)` -> a tuple of g * c (c [1])."""

    def __init__(self):
        super().__init__()
        self.all_finite = _kernel("AllFinite", lambda *g: [1], lambda *g: g[0])
        self.square_sum = _kernel("SquareSum", lambda *g: [1], lambda *g: g[0])
        self._scale = _kernel("Scale", lambda *g: [list(s) for s in g[:-1]], lambda *g: list(g[:-1]))

    def scale(self, grads, coeff: Tensor) -> tuple:
        out = self._scale(*grads, coeff)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@functools.lru_cache(maxsize=None)
def gradient_stats() -> Optional[GradientStats]:
    """The shared GradientStats kernels where they run (CPU, library built), else None."""
    return GradientStats() if enabled() else None


def gradient_stats_for(tensors) -> Optional[GradientStats]:
    """gradient_stats() when its kernels can take all of `tensors` (CPU, library built, all fp32), else None."""
    stats = gradient_stats()
    return stats if stats is not None and all(t.dtype == ms.float32 for t in tensors) else None


class AdamWStep(nn.Cell):
    """torch.optim.AdamW's update of fp32 parameters and their moments, in place and in one threaded pass
    over all of them: `step(params, grads, exp_avgs, exp_avg_sqs, lr, weight_decay, beta1, beta2, eps,
    step)` with `step` counted from 1. The tensors must be the optimizer's own Parameters (they are
    written through; MindSpore sees one dummy output)."""

    def __init__(self):
        super().__init__()
        self.kernel = _kernel("AdamWStep", lambda *s: [1], lambda *t: t[0])

    def step(self, params, grads, exp_avgs, exp_avg_sqs, lr: float, weight_decay: float, beta1: float,
             beta2: float, eps: float, step: int) -> None:
        if not params:
            return
        written = (*params, *exp_avgs, *exp_avg_sqs)
        if any(t.dtype != ms.float32 or t.storage_offset() or not t.is_contiguous() for t in written):
            # MindSpore would hand the kernel a copy of such a tensor, and the update would be lost
            raise ValueError("AdamWStep updates fp32 tensors that own their memory; got a view or another dtype")
        grads = [g if g.dtype == ms.float32 else g.astype(ms.float32) for g in grads]
        # the scalars as torch computes them (in double, applied in float32)
        hyper = np.array([1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2,
                          (1.0 - beta2 ** step) ** 0.5, eps, -lr / (1.0 - beta1 ** step)], np.float32)
        self.kernel(*params, *grads, *exp_avgs, *exp_avg_sqs, Tensor(hyper))


@functools.lru_cache(maxsize=None)
def adamw_step() -> Optional[AdamWStep]:
    """The in-place AdamW kernel where it runs (CPU, library built), else None."""
    return AdamWStep() if enabled() else None


class Attention(nn.Cell):
    """softmax(where(mask, -10000, q k^T * scale)) v for each batch entry and head, on the projections'
    layout: q [Sq, B, N, hn], k and v [Sk, B, G, hn] (each of the G key/value groups serves N/G consecutive
    query heads), mask (bool) [B or 1, N or 1, Sq, Sk] -> (context [Sq, B, N, hn], probs [B, N, Sq, Sk]).
    The probabilities are kept for the gradient; keys masked for a whole block of queries are skipped."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = _scalar(scale)
        self.forward = _kernel("AttentionForward", lambda q, k, v, m, c: (q, [q[1], q[2], q[0], k[0]]),
                               lambda q, k, v, m, c: (q, q))
        self.backward = _kernel("AttentionBackward", lambda q, k, v, m, p, g, c: (q, k, v),
                                lambda q, k, v, m, p, g, c: (q, q, q))

    def construct(self, q, k, v, mask):
        return self.forward(q, k, v, mask, self.scale)

    def bprop(self, q, k, v, mask, out, dout):
        dq, dk, dv = self.backward(q, k, v, mask, out[1], dout[0], self.scale)
        return dq, dk, dv, ops.zeros_like(mask)


class BiasAdd(nn.Cell):
    """x [..., C] + bias [C] in one pass; the bias gradient is a threaded column sum."""

    def __init__(self):
        super().__init__()
        self.forward = _kernel("BiasAddForward", lambda x, b: x, lambda x, b: x)
        self.column_sum = _kernel("ColumnSum", lambda g: g[-1:], lambda g: g)

    def construct(self, x, bias):
        return self.forward(x, bias)

    def bprop(self, x, bias, out, dout):
        return dout, self.column_sum(dout)


class LayerNormRows(nn.Cell):
    """LayerNorm over the rows of x [R, H] with weight and bias [H]: (y, mean [R], rstd [R])."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = _scalar(eps)
        self.forward = _kernel("LayerNormForward", lambda x, w, b, e: (x, x[:1], x[:1]),
                               lambda x, w, b, e: (x, x, x))
        self.backward = _kernel("LayerNormBackward", lambda g, x, w, m, r: (x, w, w),
                                lambda g, x, w, m, r: (x, x, x))

    def construct(self, x, weight, bias):
        return self.forward(x, weight, bias, self.eps)

    def bprop(self, x, weight, bias, out, dout):
        return self.backward(dout[0], x, weight, out[1], out[2])  # (dx, dweight, dbias)


class CrossEntropy(nn.Cell):
    """Per-row cross entropy of logits [R, V] against int32 targets [R] (a target outside [0, V) picks
    nothing), with Megatron's label smoothing: (loss [R], row max [R], row sum of exp(z - max) [R])."""

    def __init__(self, label_smoothing: float, vocab: int):
        super().__init__()
        smoothing = label_smoothing * vocab / (vocab - 1) if label_smoothing > 0 else 0.0
        self.smoothing = _scalar(smoothing)
        self.forward = _kernel("CrossEntropyForward", lambda z, t, s: (z[:1], z[:1], z[:1]),
                               lambda z, t, s: (z, z, z))
        self.backward = _kernel("CrossEntropyBackward", lambda z, t, m, e, g, s: z, lambda z, t, m, e, g, s: z)

    def construct(self, logits, target):
        return self.forward(logits, target, self.smoothing)

    def bprop(self, logits, target, out, dout):
        grad = self.backward(logits, target, out[1], out[2], dout[0], self.smoothing)
        return grad, ops.zeros_like(target)


class Linear(nn.Cell):
    """x [..., in] @ w [out, in]^T -> [..., out] through blas_library(), the rows being all of x's leading
    dimensions; the gradients dy w and dy^T x are products of the same kind. (The linear layers still pass
    x as 2-D rows: see tensor_parallel.layers._Matmul.)"""

    def __init__(self):
        super().__init__()
        self.forward = _kernel("LinearForward", lambda x, w: list(x[:-1]) + [w[0]], lambda x, w: x)
        self.grad_input = _kernel("LinearGradInput", lambda g, w: list(g[:-1]) + [w[1]], lambda g, w: g)
        self.grad_weight = _kernel("LinearGradWeight", lambda g, x: [g[-1], x[-1]], lambda g, x: g)

    def construct(self, x, weight):
        return self.forward(x, weight)

    def bprop(self, x, weight, out, dout):
        return self.grad_input(dout, weight), self.grad_weight(dout, x)
