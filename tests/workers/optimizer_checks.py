"""Multi-rank checks of the gradient norm, clipping and the inf/nan agreement (run on 2 ranks by
tests/test_optimizer.py; `clip_case` also runs in one process there as the reference)."""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.optimizer import clip_grads, found_inf_in_grads, get_grad_norm

H, FFN, S, B = 8, 12, 4, 2
MAX_NORM = 0.05
SEED = 4321


class TinyMLP(nn.Cell):
    """ColumnParallel -> tanh -> RowParallel, times a replicated per-feature scale (a norm-like weight)."""

    def __init__(self):
        super().__init__()
        self.fc1 = tp.ColumnParallelLinear(H, FFN)
        self.fc2 = tp.RowParallelLinear(FFN, H)
        self.scale = tp.replicated_parameter((H,), tp.init_method_normal(1.0))

    def construct(self, x, r):
        h, _ = self.fc1(x)
        y, _ = self.fc2(ops.tanh(h))
        return (y * self.scale * r).sum()


def clip_case() -> dict:
    """Gradients of TinyMLP under the current tp size, clipped to MAX_NORM; full (gathered) arrays by name."""
    model = TinyMLP()
    tp.initialize_parameters(model, seed=SEED)
    rng = np.random.default_rng(7)
    x = Tensor(rng.standard_normal((S, B, H)).astype(np.float32))
    r = Tensor(rng.standard_normal((S, B, H)).astype(np.float32))
    names, params = zip(*model.parameters_and_names())
    grads = ms.value_and_grad(model, None, list(params))(x, r)[1]
    clipped, norm = clip_grads(list(params), list(grads), MAX_NORM)
    group = ps.get_tensor_model_parallel_group()

    def full(p, g):
        if getattr(p, "tensor_model_parallel", False):
            return comm.all_gather(g, group, p.partition_dim).asnumpy()
        return g.asnumpy()

    return {"norm": norm,
            "grads": {n: full(p, g) for n, p, g in zip(names, params, grads)},
            "clipped": {n: full(p, g) for n, p, g in zip(names, params, clipped)}}


def found_inf_case() -> dict:
    """Only the last rank holds an inf: every rank must still report it."""
    clean = [Tensor(np.ones((3, 2), np.float32)), Tensor(np.zeros((4,), np.float32))]
    poisoned = list(clean)
    if comm.get_rank() == comm.get_world_size() - 1:
        poisoned[1] = Tensor(np.array([0.0, np.inf, 0.0, 0.0], np.float32))
    group = ps.get_model_parallel_group()
    return {"clean": found_inf_in_grads(clean, group), "poisoned": found_inf_in_grads(poisoned)}


def pp_case() -> dict:
    """Two pipeline stages, each with its own weight and a copy of the tied embedding: the copy counts once."""
    rank = ps.get_pipeline_model_parallel_rank()
    own = [np.random.default_rng(100 + s).standard_normal((3, 4)).astype(np.float32) for s in range(2)]
    emb = np.random.default_rng(200).standard_normal((5, 4)).astype(np.float32)
    w = Parameter(Tensor(own[rank]), name=f"stage{rank}.weight")
    if rank == 0:
        e = Parameter(Tensor(emb), name="language_model.embedding.word_embeddings.weight")
        e.shared_embedding = True
    else:
        e = Parameter(Tensor(emb), name="word_embeddings_for_head.weight")
    params = [w, e]
    grads = [Tensor(own[rank]), Tensor(emb)]
    want = float(np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in own + [emb])))
    want_inf = float(max(np.abs(a).max() for a in own + [emb]))
    return {"norm": get_grad_norm(params, grads), "want": want,
            "inf_norm": get_grad_norm(params, grads, norm_type=float("inf")), "want_inf": want_inf}


def main() -> dict:
    out = {}
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    out["tp2"] = clip_case()
    out["found_inf"] = found_inf_case()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(pipeline_model_parallel_size=2)
    out["pp2"] = pp_case()
    ps.destroy_model_parallel()
    return out
