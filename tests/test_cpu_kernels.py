"""mindtron's fused CPU kernels (parallel_core/cpu_kernels) equal MindSpore's ops, forward and gradient.

The softmax and the LayerNorm are compared with the same maths written with MindSpore's ops and
differentiated by MindSpore, eagerly and inside one compiled graph, on shapes with odd sizes (rows not
divisible by the thread count) and with masks broadcast over batch and heads; the LayerNorm also against
float64 numpy. The GeLU is compared with float64 numpy: MindSpore 2.10's CPU tanh is off by up to 1e-4
(the kernel's vector tanhf by 4e-7).
"""
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from mindtron.parallel_core import cpu_kernels

RNG = np.random.default_rng(11)

pytestmark = pytest.mark.skipif(not cpu_kernels.enabled(), reason="fused CPU kernels could not be built here")


def _close(actual, expected, rtol=2e-6):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-12)
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


def _randn(*shape, scale=1.0):
    return Tensor((RNG.standard_normal(shape) * scale).astype(np.float32))


def _gelu64(x):
    """float64 tanh GeLU and its derivative."""
    c = np.sqrt(2.0 / np.pi)
    t = np.tanh(c * x * (1.0 + 0.044715 * x * x))
    return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)


def _plain_masked_softmax(scale):
    def softmax(scores, mask):
        mask = ops.broadcast_to(mask, scores.shape)
        return ops.softmax(ops.masked_fill(scores * scale, mask, Tensor(-10000.0, ms.float32)), -1)
    return softmax


def _plain_layer_norm(eps):
    def norm(x, w, b):
        mean = x.mean(-1, keep_dims=True)
        var = ((x - mean) ** 2).mean(-1, keep_dims=True)
        return (x - mean) * ops.rsqrt(var + eps) * w + b
    return norm


def _value_and_grads(fn, args, diff, compiled):
    """fn(*args) and the gradients of sum(fn(*args) * weights) w.r.t. the args at positions `diff`, with
    the same pseudo-random weights for every fn called on these args."""
    shape = fn(*args).shape
    weights = Tensor(np.random.default_rng(3).standard_normal(shape).astype(np.float32))

    def objective(*a):
        return (fn(*a) * weights).sum()

    grad = ms.grad(objective, grad_position=diff)
    if compiled:
        grad = ms.jit(grad)
    grads = grad(*args)
    return fn(*args), (grads if isinstance(grads, tuple) else (grads,))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gelu_tanh(compiled):
    x = _randn(257, 129, scale=3.0)  # above the kernels' one-thread limit (2^15 elements)
    dy = _randn(257, 129)
    gelu = cpu_kernels.GeluTanh()

    def objective(x, dy):
        return (gelu(x) * dy).sum()

    grad = ms.grad(objective)
    if compiled:
        grad = ms.jit(grad)
    value, slope = _gelu64(x.asnumpy().astype(np.float64))
    _close(gelu(x).asnumpy(), value)
    _close(grad(x, dy).asnumpy(), slope * dy.asnumpy())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mask_shape", [(1, 1), (3, 1), (1, 4), (3, 4)], ids=lambda s: f"mask{s[0]}x{s[1]}")
def test_masked_softmax(compiled, mask_shape):
    b, n, s = 3, 4, 61
    scores = _randn(b, n, s, s, scale=4.0)
    causal = np.triu(np.ones((s, s), bool), 1)
    mask = np.broadcast_to(causal, mask_shape + (s, s)).copy()
    mask[..., 5, :] = True  # a fully masked row: uniform probabilities, zero gradient
    mask = mask | (RNG.random(mask.shape) < 0.2)
    mask = Tensor(mask)
    scale = 0.125
    fused, fused_grads = _value_and_grads(cpu_kernels.MaskedSoftmax(scale), (scores, mask), 0, compiled)
    plain, plain_grads = _value_and_grads(_plain_masked_softmax(scale), (scores, mask), 0, compiled)
    _close(fused.asnumpy(), plain.asnumpy())
    _close(fused_grads[0].asnumpy(), plain_grads[0].asnumpy())
    assert np.all(fused_grads[0].asnumpy()[np.broadcast_to(mask.asnumpy(), scores.shape)] == 0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("rows", [67, 401])  # one thread / several threads with partial sums
def test_layer_norm(compiled, rows):
    h, eps = 96, 1e-5
    x = _randn(rows, h, scale=2.0) + 3.0
    w, b = _randn(h), _randn(h)
    fused_cell = cpu_kernels.LayerNormRows(eps)

    def fused_fn(x, w, b):
        return fused_cell(x, w, b)[0]

    fused, fused_grads = _value_and_grads(fused_fn, (x, w, b), (0, 1, 2), compiled)
    plain, plain_grads = _value_and_grads(_plain_layer_norm(eps), (x, w, b), (0, 1, 2), compiled)
    _close(fused.asnumpy(), plain.asnumpy())
    for got, want in zip(fused_grads, plain_grads):
        _close(got.asnumpy(), want.asnumpy(), rtol=1e-5)
    x64 = x.asnumpy().astype(np.float64)
    expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + eps)
    _close(fused.asnumpy(), expected * w.asnumpy() + b.asnumpy())
    _, mean, rstd = fused_cell(x, w, b)
    _close(mean.asnumpy(), x64.mean(-1))
    _close(rstd.asnumpy(), 1.0 / np.sqrt(x64.var(-1) + eps))


def test_nan_passes_through():
    """No fast-math: a NaN in a row reaches that row's outputs, as with MindSpore's ops."""
    x = _randn(4, 8)
    x[1, 3] = float("nan")
    assert np.isnan(cpu_kernels.GeluTanh()(x).asnumpy()[1, 3])
    y = cpu_kernels.LayerNormRows(1e-5)(x, _randn(8), _randn(8))[0].asnumpy()
    assert np.isnan(y[1]).all() and not np.isnan(y[[0, 2, 3]]).any()
    scores = x.reshape(1, 1, 4, 8)
    probs = cpu_kernels.MaskedSoftmax(1.0)(scores, Tensor(np.zeros((1, 1, 4, 8), bool))).asnumpy()
    assert np.isnan(probs[0, 0, 1]).all() and not np.isnan(probs[0, 0, [0, 2, 3]]).any()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(compiled, smoothing):
    """Against the vocabulary-parallel cross entropy's plain form on one rank. A target outside the
    vocabulary picks nothing, in the loss and in the gradient (Megatron's target mask)."""
    from mindtron.parallel_core import parallel_state as ps
    from mindtron.parallel_core.tensor_parallel.cross_entropy import _VocabParallelCrossEntropy

    ps.initialize_model_parallel()
    try:
        rows, vocab = 173, 203
        logits = _randn(rows, vocab, scale=4.0)
        target = RNG.integers(0, vocab, rows).astype(np.int32)
        target[[3, 9]] = [-1, vocab]
        target = Tensor(target)
        fused_cell = cpu_kernels.CrossEntropy(smoothing, vocab)
        plain_cell = _VocabParallelCrossEntropy(ps.get_tensor_model_parallel_group(), smoothing)

        def fused(z, t):
            return fused_cell(z, t)[0]

        def plain(z, t):
            return plain_cell(z, t)[0]

        got, got_grads = _value_and_grads(fused, (logits, target), 0, compiled)
        want, want_grads = _value_and_grads(plain, (logits, target), 0, False)  # (its collectives stay eager)
        _close(got.asnumpy(), want.asnumpy())
        _close(got_grads[0].asnumpy(), want_grads[0].asnumpy())
    finally:
        ps.destroy_model_parallel()


@pytest.mark.skipif(not cpu_kernels.blas_enabled(), reason="no BLAS could be loaded here")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("lead,sizes", [((33,), (17, 29)), ((11, 3), (17, 29)), ((2, 3, 7), (17, 29)),
                                        ((160,), (170, 161))], ids=["2d", "3d", "4d", "2d-threaded"])
def test_linear(compiled, lead, sizes):
    """x [..., in] @ w [out, in]^T through blas_library() and its gradients against MindSpore's MatMul on
    the flattened rows; the input arrives transposed (not contiguous before the kernel). Products of 2^22
    multiply-adds and more are split over the OpenMP threads, smaller ones run on one thread."""
    out_size, in_size = sizes
    x = ops.transpose(_randn(in_size, *lead), tuple(range(1, len(lead) + 1)) + (0,))
    w = _randn(out_size, in_size)

    def plain(x, w):
        return ops.MatMul(transpose_b=True)(x.reshape(-1, in_size), w).reshape(lead + (out_size,))

    got, got_grads = _value_and_grads(cpu_kernels.Linear(), (x, w), (0, 1), compiled)
    want, want_grads = _value_and_grads(plain, (x, w), (0, 1), compiled)
    assert got.shape == want.shape == lead + (out_size,)
    _close(got.asnumpy(), want.asnumpy())
    for g, expected in zip(got_grads, want_grads):
        assert g.shape == expected.shape
        _close(g.asnumpy(), expected.asnumpy())


def _plain_attention(scale, heads_per_group):
    """The attention with MindSpore's ops on [b, n, s, hn] blocks, keys/values repeated per group."""
    def attention(q, k, v, mask):
        k, v = (ops.repeat_interleave(t, heads_per_group, 2) for t in (k, v))
        q, k, v = (ops.transpose(t, (1, 2, 0, 3)) for t in (q, k, v))
        probs = _plain_masked_softmax(scale)(ops.matmul(q, k.swapaxes(-1, -2)), mask)
        return ops.transpose(ops.matmul(probs, v), (2, 0, 1, 3))
    return attention


@pytest.mark.skipif(not cpu_kernels.blas_enabled(), reason="no BLAS could be loaded here")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("s,b,heads,groups,mask_shape", [
    (130, 2, 4, 2, (1, 1)),   # three query blocks, the last one short; two heads per key/value group
    (70, 3, 2, 2, (3, 1)),    # a mask per batch entry, one of its rows fully masked
    (64, 1, 3, 3, (1, 3)),    # a mask per head with the first keys masked for one head
    (9, 2, 2, 1, (1, 1)),     # one thread (few scores)
], ids=["groups", "batch-mask", "head-mask", "small"])
def test_attention(compiled, s, b, heads, groups, mask_shape):
    """The fused attention on the [s, b, heads, hn] layout against MindSpore's ops, forward and the
    gradients of q, k and v: query blocks that skip keys masked for the whole block (causal), masks
    broadcast over batch or heads, a fully masked row (uniform probabilities), shared key/value groups."""
    hn, scale = 16, 0.3
    mask = np.triu(np.ones((s, s), np.bool_), 1)[None, None].repeat(mask_shape[0], 0).repeat(mask_shape[1], 1)
    if mask_shape[0] > 1:
        mask[1, :, 5, :] = True
    if mask_shape[1] > 1:
        mask[0, 1, :, :3] = True
    args = (_randn(s, b, heads, hn), _randn(s, b, groups, hn), _randn(s, b, groups, hn), Tensor(mask))
    kernel = cpu_kernels.Attention(scale)

    def fused(q, k, v, m):
        return kernel(q, k, v, m)[0]

    got, got_grads = _value_and_grads(fused, args, (0, 1, 2), compiled)
    want, want_grads = _value_and_grads(_plain_attention(scale, heads // groups), args, (0, 1, 2), compiled)
    _close(got.asnumpy(), want.asnumpy())
    for g, expected in zip(got_grads, want_grads):
        assert g.shape == expected.shape
        _close(g.asnumpy(), expected.asnumpy())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("rows", [(131,), (431,), (3, 2, 71)])  # one thread / threads with partial sums / 3-D
def test_bias_add(compiled, rows):
    x, bias = _randn(*rows, 77), _randn(77)
    got, got_grads = _value_and_grads(cpu_kernels.BiasAdd(), (x, bias), (0, 1), compiled)
    want, want_grads = _value_and_grads(lambda x, b: x + b, (x, bias), (0, 1), False)
    _close(got.asnumpy(), want.asnumpy())
    for g, w in zip(got_grads, want_grads):
        assert g.shape == w.shape
        _close(g.asnumpy(), w.asnumpy())


# a norm weight, a bias, and matrices of sizes that cut into a partial last block (16384 elements a block)
STAT_SHAPES = [(77,), (1,), (300, 131), (16384,), (2, 16385)]


def test_gradient_stats_over_many_tensors():
    """One call over all gradients: the finite check finds a single inf or nan in any tensor and block, the
    square sum equals float64 numpy's, the clipping scale is x * c in float32 for every tensor."""
    stats = cpu_kernels.gradient_stats()
    values = [RNG.standard_normal(s).astype(np.float32) for s in STAT_SHAPES]
    grads = [Tensor(v) for v in values]
    assert stats.all_finite(*grads).asnumpy()[0] == 1.0
    assert stats.all_finite(grads[0]).asnumpy()[0] == 1.0
    for tensor, flat_index in [(0, 76), (2, 300 * 131 - 1), (3, 0), (4, 16384), (4, 2 * 16385 - 1)]:
        for bad in (np.inf, -np.inf, np.nan):
            broken = values[tensor].copy()
            broken.reshape(-1)[flat_index] = bad
            args = grads[:tensor] + [Tensor(broken)] + grads[tensor + 1:]
            assert stats.all_finite(*args).asnumpy()[0] == 0.0, (tensor, flat_index, bad)
    want = sum(float((v.astype(np.float64) ** 2).sum()) for v in values)
    assert stats.square_sum(*grads).asnumpy()[0] == pytest.approx(want, rel=1e-6)
    coeff = np.float32(0.37)
    scaled = stats.scale(grads, Tensor(np.array([coeff], np.float32)))
    assert len(scaled) == len(grads)
    for out, v in zip(scaled, values):
        assert out.shape == v.shape and np.array_equal(out.asnumpy(), v * coeff)
    (single,) = stats.scale(grads[2:3], Tensor(np.array([coeff], np.float32)))
    assert np.array_equal(single.asnumpy(), values[2] * coeff)


def _times_one(x):
    return x * 1.0


def test_adamw_step_updates_in_place_like_torch():
    """Three steps of the in-place AdamW kernel on Parameters against float64 AdamW (torch's formula): the
    parameters and both moments change in place, agree to fp32 rounding, and later ops (eager and compiled)
    read the new values."""
    step = cpu_kernels.adamw_step()
    params = [ms.Parameter(Tensor(RNG.standard_normal(s).astype(np.float32)), name=f"p{i}")
              for i, s in enumerate(STAT_SHAPES)]
    exp_avg = [ms.Parameter(Tensor(np.zeros(s, np.float32)), name=f"m{i}") for i, s in enumerate(STAT_SHAPES)]
    exp_avg_sq = [ms.Parameter(Tensor(np.zeros(s, np.float32)), name=f"v{i}") for i, s in enumerate(STAT_SHAPES)]
    ref = [p.asnumpy().astype(np.float64) for p in params]
    m = [np.zeros(s) for s in STAT_SHAPES]
    v = [np.zeros(s) for s in STAT_SHAPES]
    lr, wd, beta1, beta2, eps = 0.01, 0.1, 0.9, 0.95, 1e-8
    for t in (1, 2, 3):
        grads = [RNG.standard_normal(s).astype(np.float32) for s in STAT_SHAPES]
        step.step(params, [Tensor(g) for g in grads], exp_avg, exp_avg_sq, lr, wd, beta1, beta2, eps, t)
        for i, g in enumerate(grads):
            g = g.astype(np.float64)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            ref[i] = ref[i] * (1 - lr * wd) - lr / (1 - beta1 ** t) * m[i] / (np.sqrt(v[i]) / np.sqrt(1 - beta2 ** t) + eps)
    for i in range(len(STAT_SHAPES)):
        _close(params[i].asnumpy(), ref[i], rtol=1e-6)
        _close(exp_avg[i].asnumpy(), m[i], rtol=1e-6)
        _close(exp_avg_sq[i].asnumpy(), v[i], rtol=1e-6)
    _close((params[2] * 1.0).asnumpy(), ref[2], rtol=1e-6)
    _close(ms.jit(_times_one)(params[2]).asnumpy(), ref[2], rtol=1e-6)
    # a view would reach the kernel as a copy and lose the update: refused
    view = Tensor(np.zeros(10, np.float32))[2:7]
    zeros = [Tensor(np.zeros(5, np.float32)) for _ in range(3)]
    with pytest.raises(ValueError, match="view"):
        step.step([view], zeros[:1], zeros[1:2], zeros[2:], lr, wd, beta1, beta2, eps, 1)


@pytest.mark.skipif(not cpu_kernels.blas_enabled(), reason="no BLAS could be loaded here")
def test_empty_rows():
    """An expert that received no tokens: zero rows in, zero rows out, zero weight and bias gradients."""
    x, w, bias = Tensor(np.zeros((0, 8), np.float32)), _randn(5, 8), _randn(5)
    linear, add = cpu_kernels.Linear(), cpu_kernels.BiasAdd()

    def objective(x, w, bias):
        return cpu_kernels.GeluTanh()(add(linear(x, w), bias)).sum()

    dx, dw, dbias = ms.grad(objective, grad_position=(0, 1, 2))(x, w, bias)
    assert dx.shape == (0, 8)
    assert not dw.asnumpy().any() and not dbias.asnumpy().any()


def test_blas_library_choice(monkeypatch):
    """MKL when its wheel is installed, numpy's OpenBLAS otherwise or when MINDTRON_BLAS=openblas; a bad value
    names the variable."""
    mkl = cpu_kernels._mkl()
    monkeypatch.setenv("MINDTRON_BLAS", "openblas")
    assert "openblas" in Path(cpu_kernels.blas_library()).name
    monkeypatch.setenv("MINDTRON_BLAS", "auto")
    assert cpu_kernels.blas_library() == (mkl or cpu_kernels._numpy_openblas())
    if mkl is not None:
        assert Path(mkl).name.startswith("libmkl_rt.so")
    monkeypatch.setenv("MINDTRON_BLAS", "atlas")
    with pytest.raises(ValueError, match="MINDTRON_BLAS='atlas'"):
        cpu_kernels.blas_library()


def _product(function, *arrays):
    """Call the library's `function` (a Linear kernel) on numpy arrays through ctypes, as MindSpore does."""
    lib = ctypes.CDLL(cpu_kernels.library())
    params = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * len(arrays))(*[a.ndim for a in arrays])
    shapes = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
    shape_ptrs = (ctypes.POINTER(ctypes.c_int64) * len(arrays))(*shapes)
    assert getattr(lib, function)(len(arrays), params, ndims, shape_ptrs, None, None, None) == 0


@pytest.mark.skipif(not cpu_kernels.blas_enabled(), reason="no BLAS could be loaded here")
def test_products_do_not_depend_on_alignment():
    """The same product of buffers that start 64-byte aligned and 4 or 36 bytes off gives the same bits, as
    the compiled == eager and resume checks need wherever MindSpore places the tensors. (MKL documents
    alignment-dependent results unless asked for strict conditional numerical reproducibility, which the
    library does; on this machine its products gave the same bits without that too.)"""
    def placed(array, offset_bytes):
        raw = np.empty(array.size + 32, np.float32)
        start = (-raw.ctypes.data % 64 + offset_bytes) // 4
        view = raw[start:start + array.size].reshape(array.shape)
        view[...] = array
        return view

    x = RNG.standard_normal((300, 257)).astype(np.float32)
    w = RNG.standard_normal((190, 257)).astype(np.float32)
    results = []
    for offset in (0, 4, 36):
        out = placed(np.zeros((300, 190), np.float32), offset)
        _product("LinearForward", placed(x, offset), placed(w, offset), out)
        results.append(out.copy())
    assert all(np.array_equal(results[0], r) for r in results[1:])
    np.testing.assert_allclose(results[0], x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(cpu_kernels._mkl() is None, reason="MKL is not installed: the tests above ran on OpenBLAS")
def test_products_through_openblas_too():
    """With MKL installed the tests above ran on it; the BLAS products run again on numpy's OpenBLAS."""
    env = {**os.environ, "MINDTRON_BLAS": "openblas"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "linear or attention or empty_rows or alignment"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-500:]


def test_a_blas_that_does_not_load_is_a_warning(monkeypatch, caplog):
    """When the chosen BLAS does not load, the products fall back to MindSpore's MatMul and a warning says so."""
    built = ctypes.CDLL(cpu_kernels.library())
    built.BlasPath.restype = ctypes.c_char_p
    named = built.BlasPath().decode()
    assert named == (cpu_kernels.blas_library() or "")

    class NoBlas:
        """The built library, except that its BLAS did not load."""
        BlasPath = built.BlasPath

        @staticmethod
        def BlasAvailable():
            return 0

    monkeypatch.setattr(cpu_kernels, "_loaded", NoBlas)
    monkeypatch.setenv("MINDTRON_BLAS", "openblas")  # the message names the library built in, not this
    with caplog.at_level("WARNING", logger="mindtron"):
        assert cpu_kernels.blas_enabled.__wrapped__() is False
    assert f"the BLAS {named or '(none found at build time)'} could not be loaded" in caplog.text
    assert "MatMul" in caplog.text


@pytest.mark.skipif(not cpu_kernels.blas_enabled(), reason="no BLAS could be loaded here")
def test_thread_count_is_set_by_mindtron_and_keeps_the_results():
    """set_threads sizes every parallel region (msrun's OMP_NUM_THREADS=1 does not cap it); a split product
    and the row-wise kernels agree across thread counts, and the square sum keeps its bits."""
    before = cpu_kernels.threads()
    x = RNG.standard_normal((300, 257)).astype(np.float32)
    w = RNG.standard_normal((190, 257)).astype(np.float32)
    grads = [_randn(70001), _randn(301, 257)]
    results = {}
    try:
        for count in (1, 3):
            assert cpu_kernels.set_threads(count) == count and cpu_kernels.threads() == count
            out = np.zeros((300, 190), np.float32)
            _product("LinearForward", x, w, out)  # 14.7M multiply-adds: split over the threads
            norm = cpu_kernels.LayerNormRows(1e-5)(Tensor(x), Tensor(np.ones(257, np.float32)),
                                                   Tensor(np.zeros(257, np.float32)))[0]
            results[count] = (out, norm.asnumpy(), cpu_kernels.gradient_stats().square_sum(*grads).asnumpy())
    finally:
        cpu_kernels.set_threads(before)
    one, three = results[1], results[3]
    np.testing.assert_allclose(three[0], one[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(three[1], one[1], rtol=1e-6, atol=1e-6)
    assert np.array_equal(three[2], one[2])
