"""The gradients mindtron writes out for speed on CPU equal MindSpore's own kernels' gradients.

LayerNorm, the tanh GeLU and the attention softmax carry custom bprops (MindSpore 2.10's CPU gradient kernels
for them, or autodiff of their ops, are about 2x slower than the written-out maths); each is checked against
autodiff of MindSpore's plain ops, eagerly and inside one compiled graph holding all of them (MindSpore fails
to compile some bprop combinations, see tensor_parallel.utils.expand_last). These are the forms the layers
use where mindtron's fused CPU kernels (tests/test_cpu_kernels.py) are not built or are switched off.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindtron.legacy_model.attention import Softmax
from mindtron.legacy_model.mlp import GeluTanh
from mindtron.legacy_model.norms import LayerNorm, _LayerNormRows

from mindtron.parallel_core.tensor_parallel.layers import add_bias
from mindtron.parallel_core.tensor_parallel.utils import expand_last

RNG = np.random.default_rng(7)


def _close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-12)
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


class _Fast(nn.Cell):
    """LayerNorm -> + bias -> tanh GeLU -> softmax, mindtron's cells."""

    def __init__(self, h, compiled):
        super().__init__()
        self.norm = LayerNorm(h)
        self.norm.layer_norm = _LayerNormRows(1e-5)  # the form used where the fused CPU kernels are not built
        self.bias = ms.Parameter(Tensor(RNG.standard_normal(h).astype(np.float32)), name="bias")
        self.gelu = GeluTanh()
        self.softmax = Softmax()
        if compiled:
            self._f = ms.jit(self._f)

    def _f(self, x):
        return self.softmax(self.gelu(add_bias(self.norm(x), self.bias)))

    def construct(self, x):
        return self._f(x)


class _Plain(nn.Cell):
    """The same maths through MindSpore's own kernels and their gradients."""

    def __init__(self, fast):
        super().__init__()
        self.fast = fast
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-5)

    def construct(self, x):
        f = self.fast
        h = x.shape[-1]
        y = self.layer_norm(x.reshape(-1, h), f.norm.weight, f.norm.bias)[0].reshape(x.shape)
        y = ops.bias_add(y.reshape(-1, h), f.bias).reshape(x.shape)
        y = y * 0.5 * (1.0 + ops.tanh(0.79788456 * y * (1.0 + 0.044715 * y * y)))
        return ops.softmax(y, -1)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_written_out_gradients_equal_mindspores_kernels(compiled):
    s, b, h = 6, 3, 16
    x = Tensor(RNG.standard_normal((s, b, h)).astype(np.float32) * 2.0 + 0.5)
    dy = Tensor(RNG.standard_normal((s, b, h)).astype(np.float32))
    fast = _Fast(h, compiled)
    fast.norm.weight.set_data(Tensor(RNG.standard_normal(h).astype(np.float32)))
    fast.norm.bias.set_data(Tensor(RNG.standard_normal(h).astype(np.float32)))
    plain = _Plain(fast)
    params = fast.trainable_params()
    assert len(params) == 3
    grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)
    got = grad(fast, params)(x, dy)
    want = grad(plain, params)(x, dy)
    _close(fast(x).asnumpy(), plain(x).asnumpy())
    for g, w in zip([got[0][0]] + list(got[1]), [want[0][0]] + list(want[1])):
        assert g.shape == w.shape
        _close(g.asnumpy(), w.asnumpy())


@pytest.mark.parametrize("fused", [True, False], ids=["default", "mindspore-kernel"])
def test_layer_norm_gradient_matches_float64_maths(fused):
    n, h, eps = 5, 8, 1e-5
    x = RNG.standard_normal((n, h)) * 3.0 + 1.0
    w, bias, dy = RNG.standard_normal(h), RNG.standard_normal(h), RNG.standard_normal((n, h))
    norm = LayerNorm(h, eps=eps)
    if not fused:
        norm.layer_norm = _LayerNormRows(eps)
    norm.weight.set_data(Tensor(w.astype(np.float32)))
    norm.bias.set_data(Tensor(bias.astype(np.float32)))
    grads = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)(norm, norm.trainable_params())(
        Tensor(x.astype(np.float32)), Tensor(dy.astype(np.float32)))
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    xhat = (x - mu) / np.sqrt(var + eps)
    g = dy * w
    dx = (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True)) / np.sqrt(var + eps)
    _close(grads[0][0].asnumpy(), dx)
    _close(grads[1][0].asnumpy(), (dy * xhat).sum(0))
    _close(grads[1][1].asnumpy(), dy.sum(0))


def test_expand_last_repeats_exactly():
    x = Tensor(RNG.standard_normal((4, 1)).astype(np.float32) * 1e30)
    np.testing.assert_array_equal(expand_last(x, 5).asnumpy(), np.repeat(x.asnumpy(), 5, 1))
    v = Tensor(np.array([1.5, -2.0, 3e-38], np.float32))
    np.testing.assert_array_equal(expand_last(v, 3).asnumpy(), np.repeat(v.asnumpy()[:, None], 3, 1))
