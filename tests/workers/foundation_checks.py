"""Checks run on every rank of one msrun launch: collectives, process groups, tensor-parallel layers.

`main()` returns {"comm": {...}, "state": {...}, "tp": {...}}, each a map from check name to the largest
relative error seen (0.0 for exact agreement); the pytest modules assert on them. Every expected value is
computed locally from data each rank can regenerate for every other rank.
"""
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from mindtron.parallel_core import comm, cpu_kernels, parallel_state as ps
from mindtron.parallel_core.teardown import armed_at_exit
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.tensor_parallel.initialization import full_initial_value
from numerics import rel_err  # tests/ is on sys.path: msrun runs tests/rank_entry.py as the script


def data(rank: int, shape, dtype=np.float32, salt: int = 0) -> np.ndarray:
    rng = np.random.default_rng(1000 * salt + rank)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-50, 50, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------------------------------------------
# Collectives
# ------------------------------------------------------------------------------------------------------
def comm_checks(group: comm.ProcessGroup, tag: str) -> dict:
    out = {}
    me, n = comm.get_rank(), group.size
    shape = (4, 6)
    x = {r: data(r, shape) for r in group.ranks}
    mine = Tensor(x[me])
    stack = np.stack([x[r] for r in group.ranks])
    out[f"{tag}/all_reduce_sum"] = rel_err(comm.all_reduce(mine, group).asnumpy(), stack.sum(0))
    out[f"{tag}/all_reduce_max"] = rel_err(comm.all_reduce(mine, group, "max").asnumpy(), stack.max(0))
    out[f"{tag}/all_reduce_min"] = rel_err(comm.all_reduce(mine, group, "min").asnumpy(), stack.min(0))
    half = {r: data(r, shape, np.float16, 1) for r in group.ranks}
    out[f"{tag}/all_reduce_fp16"] = rel_err(comm.all_reduce(Tensor(half[me]), group).asnumpy(),
                                            np.stack([half[r] for r in group.ranks]).astype(np.float32).sum(0))
    for dim in (0, 1):
        out[f"{tag}/all_gather_dim{dim}"] = rel_err(comm.all_gather(mine, group, dim).asnumpy(),
                                                    np.concatenate([x[r] for r in group.ranks], dim))
    ints = {r: data(r, (3, 2), np.int32, 2) for r in group.ranks}
    out[f"{tag}/all_gather_int32"] = rel_err(comm.all_gather(Tensor(ints[me]), group).asnumpy(),
                                             np.concatenate([ints[r] for r in group.ranks]))
    big = {r: data(r, (2 * n, 3 * n)) for r in group.ranks}
    total = np.stack([big[r] for r in group.ranks]).sum(0)
    for dim in (0, 1):
        want = np.split(total, n, axis=dim)[group.rank]
        out[f"{tag}/reduce_scatter_dim{dim}"] = rel_err(
            comm.reduce_scatter(Tensor(big[me]), group, dim).asnumpy(), want)
    for src in group.ranks:
        out[f"{tag}/broadcast_from{src}"] = rel_err(comm.broadcast(mine, src, group).asnumpy(), x[src])
    out[f"{tag}/broadcast_int32"] = rel_err(
        comm.broadcast(Tensor(ints[me]), group.ranks[-1], group).asnumpy(), ints[group.ranks[-1]])
    # Even all-to-all: piece j of rank i's tensor ends up as piece i on rank j.
    for split_dim, concat_dim in ((0, 0), (1, 0), (0, 1)):
        want = np.concatenate([np.split(big[r], n, axis=split_dim)[group.rank] for r in group.ranks],
                              axis=concat_dim)
        got = comm.all_to_all(Tensor(big[me]), group, split_dim=split_dim, concat_dim=concat_dim).asnumpy()
        out[f"{tag}/all_to_all_split{split_dim}_concat{concat_dim}"] = rel_err(got, want)
    # Uneven all-to-all: rank i sends sends[i][j] rows to rank j (some zero).
    sends = [[(i + 2 * j) % 3 for j in range(n)] for i in range(n)]
    rows = {r: data(r, (sum(sends[i]), 5), salt=3) for i, r in enumerate(group.ranks)}
    want = np.concatenate([np.split(rows[r], np.cumsum(sends[i])[:-1])[group.rank]
                           for i, r in enumerate(group.ranks)])
    got = comm.all_to_all(Tensor(rows[me]), group, input_split_sizes=sends[group.rank],
                          output_split_sizes=[sends[i][group.rank] for i in range(n)]).asnumpy()
    out[f"{tag}/all_to_all_uneven"] = rel_err(got, want)
    comm.barrier(group)
    out[f"{tag}/barrier"] = 0.0
    return out


def exchange_checks(mode: str) -> dict:
    """Neighbours (0,1), (2,3), ... swap tensors of different shapes, then of equal shapes; then a one-way send
    1 -> 0."""
    out = {}
    me, world = comm.get_rank(), comm.get_world_size()
    peer = me ^ 1
    if peer >= world:
        return out
    shape = {r: (2 + r % 2, 3) for r in (me, peer)}
    got = comm.exchange(Tensor(data(me, shape[me], salt=4)), peer, shape[peer])
    out[f"{mode}/exchange/both_ways"] = rel_err(got.asnumpy(), data(peer, shape[peer], salt=4))
    # equal sizes: a native all-gather where the pair is the whole world (2 ranks), else the two-slot sum
    got = comm.exchange(Tensor(data(me, (4, 3), salt=6)), peer, (4, 3))
    out[f"{mode}/exchange/both_ways_equal"] = rel_err(got.asnumpy(), data(peer, (4, 3), salt=6))
    low, high = min(me, peer), max(me, peer)
    if me == low:
        got = comm.exchange(None, high, (5,))
        out[f"{mode}/exchange/one_way"] = rel_err(got.asnumpy(), data(high, (5,), salt=5))
    else:
        out[f"{mode}/exchange/one_way"] = 0.0 if comm.exchange(Tensor(data(me, (5,), salt=5)), low) is None else 1.0
    return out


def all_comm_checks() -> dict:
    world, me = comm.get_world_size(), comm.get_rank()
    groups = {"world": comm.world_group()}
    if world == 4:
        groups["pairs_01_23"] = comm.new_group([0, 1] if me < 2 else [2, 3])
        groups["pairs_02_13"] = comm.new_group([0, 2] if me % 2 == 0 else [1, 3])
    results = {}
    for mode in ("default", "fallback"):  # fallback: every op through the all-reduce constructions
        comm.capabilities.cache_clear()
        os.environ["MINDTRON_COMM_FALLBACK"] = "1" if mode == "fallback" else "0"
        for name, group in groups.items():
            results.update(comm_checks(group, f"{mode}/{name}"))
        results.update(exchange_checks(mode))
    comm.capabilities.cache_clear()
    os.environ["MINDTRON_COMM_FALLBACK"] = "0"
    return results


# ------------------------------------------------------------------------------------------------------
# Process groups
# ------------------------------------------------------------------------------------------------------
def layouts_for(world: int):
    if world == 2:
        return [dict(tensor_model_parallel_size=2), dict(pipeline_model_parallel_size=2),
                dict(context_parallel_size=2), dict(expert_model_parallel_size=2)]
    return [dict(tensor_model_parallel_size=2), dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
            dict(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2),
            dict(context_parallel_size=2, expert_model_parallel_size=2),
            dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, order="tp-pp-dp"),
            dict(expert_model_parallel_size=4)]


def expected_kernel_threads(layout: dict) -> int:
    """runtime.cpu_kernel_threads' rule with every rank on this machine (msrun sets OMP_NUM_THREADS=1)."""
    cores, world = len(os.sched_getaffinity(0)), comm.get_world_size()
    assert comm.processes_on_this_host() == world
    if os.environ.get("MINDTRON_CPU_THREADS"):  # the override wins
        return int(os.environ["MINDTRON_CPU_THREADS"])
    pp = layout.get("pipeline_model_parallel_size", 1)
    return 1 if world > cores else min(cores, cores * pp // world)


def state_checks() -> dict:
    """For each layout, every group this rank joined communicates among exactly the expected ranks."""
    out, me = {}, comm.get_rank()
    for layout in layouts_for(comm.get_world_size()):
        ps.initialize_model_parallel(**layout)
        tag = ",".join(f"{k.split('_')[0]}={v}" for k, v in layout.items())
        expected = ps.generate_rank_groups(ps.get_layout())
        for kind, groups in expected.items():
            member_of = [g for g in groups if me in g]
            group = ps._group(kind)
            if not member_of:
                out[f"state/{tag}/{kind}"] = 0.0 if group is None else 1.0
                continue
            assert len(member_of) == 1, (kind, member_of)
            ok = list(group.ranks) == member_of[0]
            total = comm.all_reduce(Tensor(np.array([me], np.float32)), group).asnumpy()[0]
            out[f"state/{tag}/{kind}"] = 0.0 if ok and total == sum(member_of[0]) else 1.0
        threads = cpu_kernels.threads()  # None without the kernels (MINDTRON_CPU_KERNELS=0)
        out[f"state/{tag}/kernel_threads"] = 0.0 if threads is None else abs(threads - expected_kernel_threads(layout))
        tp_group = ps.get_tensor_model_parallel_group()
        out[f"state/{tag}/tp_rank"] = 0.0 if ps.get_tensor_model_parallel_rank() == tp_group.ranks.index(me) else 1.0
        ps.destroy_model_parallel()
    return out


# ------------------------------------------------------------------------------------------------------
# Tensor-parallel layers against a dense single-process reference
# ------------------------------------------------------------------------------------------------------
SEED = 20241
S, B, H, FFN, VOCAB = 8, 2, 16, 32, 64


def full(cell, prefix: str, attr: str) -> np.ndarray:
    param = getattr(cell, attr)
    return full_initial_value(param.shard_spec, SEED, prefix + attr)


def seq_chunk(a: np.ndarray, group, on: bool) -> np.ndarray:
    return np.split(a, group.size, axis=0)[group.rank] if on else a


def mlp_check(sp: bool, tag: str) -> dict:
    """x -> ColumnParallel(h, 2 ffn, stride 2, SwiGLU) -> RowParallel(ffn, h); loss = sum(y * r)."""
    group = ps.get_tensor_model_parallel_group()
    fc1 = tp.ColumnParallelLinear(H, 2 * FFN, stride=2, sequence_parallel=sp)
    fc2 = tp.RowParallelLinear(FFN, H, sequence_parallel=sp)
    tp.initialize_parameters(fc1, SEED, "fc1.")
    tp.initialize_parameters(fc2, SEED, "fc2.")
    w1, w2 = full(fc1, "fc1.", "weight"), full(fc2, "fc2.", "weight")
    b1, b2 = data(7, (2 * FFN,)) * 0.1, data(8, (H,)) * 0.1  # non-zero biases, so their paths are checked
    fc1.bias.set_data(Tensor(fc1.bias.shard_spec.shard(b1)))
    fc2.bias.set_data(Tensor(b2))
    x_full, r_full = data(11, (S, B, H)), data(12, (S, B, H))

    def swiglu(h):
        gate, up = ops.chunk(h, 2, -1)
        return ops.silu(gate) * up

    def parallel_loss(x, r):
        h, _ = fc1(x)
        y, _ = fc2(swiglu(h))
        return (y * r).sum(), y

    x, r = Tensor(seq_chunk(x_full, group, sp)), Tensor(seq_chunk(r_full, group, sp))
    params = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    (loss, y), grads = ms.value_and_grad(parallel_loss, 0, params, has_aux=True)(x, r)
    gx, gparams = grads

    def dense_loss(x, w1, b1, w2, b2, r):
        h = ops.matmul(x, w1.T) + b1
        y = ops.matmul(swiglu(h), w2.T) + b2
        return (y * r).sum(), y

    (ref_loss, ref_y), ref_grads = ms.value_and_grad(dense_loss, (0, 1, 2, 3, 4), has_aux=True)(
        *(Tensor(a) for a in (x_full, w1, b1, w2, b2, r_full)))
    ref_gx, ref_gw1, ref_gb1, ref_gw2, ref_gb2 = (g.asnumpy() for g in ref_grads)
    out = {}
    loss_total = comm.all_reduce(loss, group).asnumpy() if sp else loss.asnumpy()
    out[f"{tag}/loss"] = rel_err(loss_total, ref_loss.asnumpy())
    out[f"{tag}/output"] = rel_err(y.asnumpy(), seq_chunk(ref_y.asnumpy(), group, sp))
    out[f"{tag}/grad_input"] = rel_err(gx.asnumpy(), seq_chunk(ref_gx, group, sp))
    out[f"{tag}/grad_fc1_weight"] = rel_err(gparams[0].asnumpy(), fc1.weight.shard_spec.shard(ref_gw1))
    out[f"{tag}/grad_fc1_bias"] = rel_err(gparams[1].asnumpy(), fc1.bias.shard_spec.shard(ref_gb1))
    out[f"{tag}/grad_fc2_weight"] = rel_err(gparams[2].asnumpy(), fc2.weight.shard_spec.shard(ref_gw2))
    # Under sequence parallelism the replicated bias sees only this rank's tokens: sum over the group.
    gb2 = comm.all_reduce(gparams[3], group).asnumpy() if fc2.bias.sequence_parallel else gparams[3].asnumpy()
    out[f"{tag}/grad_fc2_bias"] = rel_err(gb2, ref_gb2)
    out[f"{tag}/init_is_layout_independent"] = rel_err(fc1.weight.asnumpy(), fc1.weight.shard_spec.shard(w1))
    return out


def lm_check(sp: bool, smoothing: float, tag: str) -> dict:
    """ids -> VocabParallelEmbedding -> ColumnParallel(h, vocab) logits -> vocab-parallel cross entropy."""
    group = ps.get_tensor_model_parallel_group()
    emb = tp.VocabParallelEmbedding(VOCAB, H, reduce_scatter_embeddings=sp)
    head = tp.ColumnParallelLinear(H, VOCAB, bias=False, sequence_parallel=sp)
    tp.initialize_parameters(emb, SEED, "emb.")
    tp.initialize_parameters(head, SEED, "head.")
    e_full, w_full = full(emb, "emb.", "weight"), full(head, "head.", "weight")
    rng = np.random.default_rng(5)
    ids_full, labels_full = rng.integers(0, VOCAB, (B, S)), rng.integers(0, VOCAB, (S, B))

    def parallel_loss(ids, labels):
        h = emb(ids)
        if not sp:
            h = ops.transpose(h, (1, 0, 2))  # [s, b, h]
        logits, _ = head(h)  # [s, b, v/tp]
        return tp.vocab_parallel_cross_entropy(logits, labels, smoothing).mean(), logits

    (loss, logits), grads = ms.value_and_grad(parallel_loss, None, [emb.weight, head.weight], has_aux=True)(
        Tensor(ids_full, ms.int32), Tensor(labels_full, ms.int32))

    # Megatron's label smoothing spreads a V/(V-1)-scaled share over the vocabulary.
    smooth = smoothing * VOCAB / (VOCAB - 1)

    def dense_loss(e, w):
        h = ops.transpose(ops.gather(e, Tensor(ids_full, ms.int32), 0), (1, 0, 2))
        logits = ops.matmul(h, w.T)
        logp = ops.log_softmax(logits, -1)
        nll = -(logp * Tensor(np.eye(VOCAB, dtype=np.float32)[labels_full])).sum(-1)
        return ((1 - smooth) * nll - smooth * logp.mean(-1)).mean(), logits

    (ref_loss, ref_logits), (ref_ge, ref_gw) = ms.value_and_grad(dense_loss, (0, 1), has_aux=True)(
        Tensor(e_full), Tensor(w_full))
    return {
        f"{tag}/loss": rel_err(loss.asnumpy(), ref_loss.asnumpy()),
        f"{tag}/logits": rel_err(logits.asnumpy(), np.split(ref_logits.asnumpy(), group.size, -1)[group.rank]),
        f"{tag}/grad_embedding": rel_err(grads[0].asnumpy(), emb.weight.shard_spec.shard(ref_ge.asnumpy())),
        f"{tag}/grad_output_weight": rel_err(grads[1].asnumpy(), head.weight.shard_spec.shard(ref_gw.asnumpy())),
    }


def gather_and_scatter_checks(tag: str) -> dict:
    """ColumnParallel with gather_output and RowParallel with an unsplit input, forward and input grads."""
    col = tp.ColumnParallelLinear(H, FFN, gather_output=True)
    row = tp.RowParallelLinear(FFN, H, input_is_parallel=False)
    tp.initialize_parameters(col, SEED, "col.")
    tp.initialize_parameters(row, SEED, "row.")
    wc, wr = full(col, "col.", "weight"), full(row, "row.", "weight")
    x = data(21, (S, B, H))

    def parallel(x):
        h, _ = col(x)
        y, _ = row(h)
        return y.sum(), (h, y)

    def dense(x):
        h = ops.matmul(x, Tensor(wc).T)
        y = ops.matmul(h, Tensor(wr).T)
        return y.sum(), (h, y)

    (_, (h, y)), gx = ms.value_and_grad(parallel, 0, None, has_aux=True)(Tensor(x))
    (_, (rh, ry)), rgx = ms.value_and_grad(dense, 0, None, has_aux=True)(Tensor(x))
    return {f"{tag}/gathered_output": rel_err(h.asnumpy(), rh.asnumpy()),
            f"{tag}/row_output": rel_err(y.asnumpy(), ry.asnumpy()),
            f"{tag}/grad_input": rel_err(gx.asnumpy(), rgx.asnumpy())}


def tp_checks() -> dict:
    out, world = {}, comm.get_world_size()
    for size in (2, 4):
        if world % size:
            continue
        ps.initialize_model_parallel(tensor_model_parallel_size=size)
        for sp in (False, True):
            tag = f"tp{size}{'_sp' if sp else ''}"
            out.update(mlp_check(sp, f"{tag}/mlp"))
            out.update(lm_check(sp, 0.0, f"{tag}/lm"))
        out.update(lm_check(False, 0.1, f"tp{size}/lm_label_smoothing"))
        out.update(gather_and_scatter_checks(f"tp{size}/gather_scatter"))
        ps.destroy_model_parallel()
    return out


def main() -> dict:
    return {"comm": all_comm_checks(), "state": state_checks(), "tp": tp_checks(),
            "exit_guard_armed": armed_at_exit()}
