"""Context parallelism in one process: chunk selection and load balancing, the online-softmax merge against
a plain softmax (causal blocks, sliding windows, a softmax offset), the batch split, and the checks that run
before any process group exists (flags named in the errors)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from mindtron.parallel_core.context_parallel import (OnlineSoftmax, block_plan, chunk_positions,
                                                     get_batch_on_this_cp_rank, layer_comm_types, local_positions,
                                                     rank_chunks, validate_context_parallel)
from mindtron.training.arguments import init_configs_from_args, parse_args

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "64", "--micro-batch-size", "2", "--train-iters", "10"]


def test_load_balanced_chunks_cover_the_sequence_once():
    for cp in (1, 2, 3, 4):
        seen = np.concatenate([local_positions(48, r, cp) for r in range(cp)])
        assert sorted(seen.tolist()) == list(range(48))
    assert rank_chunks(0, 2) == [0, 3] and rank_chunks(1, 2) == [1, 2]
    assert local_positions(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # causal work per rank is equal: sum over its positions of (position + 1)
    work = [int((local_positions(64, r, 4) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1, work


def test_block_plan_follows_megatrons_ring_pattern():
    cp, L = 4, 2
    r = 1
    q = rank_chunks(r, cp)  # [1, 6]
    # own block: each query chunk sees its diagonal, the late one also the early one
    assert block_plan(q[0], rank_chunks(r, cp), L)[0] == [0]
    keep, hidden = block_plan(q[1], rank_chunks(r, cp), L)
    assert keep == [0, 1] and hidden is not None and hidden[:, :L].sum() == 0  # chunk 1 fully visible
    # from an earlier rank (0: chunks 0, 7): both query chunks take only its first half, unmasked
    for qc in q:
        keep, hidden = block_plan(qc, rank_chunks(0, cp), L)
        assert keep == [0] and hidden is None
    # from a later rank (2: chunks 2, 5): only the late query chunk, all of it, unmasked
    assert block_plan(q[0], rank_chunks(2, cp), L)[0] == []
    keep, hidden = block_plan(q[1], rank_chunks(2, cp), L)
    assert keep == [0, 1] and hidden is None
    # a window of 2 positions back skips chunks entirely before it
    assert block_plan(6, [0, 7, 1, 6, 5], L, (2, 0))[0] == [3, 4]


def _softmax_attention(s, v, hidden, offset=None):
    s = np.where(hidden, -10000.0, s)
    if offset is not None:
        s = np.concatenate([s, np.broadcast_to(offset.reshape(1, -1, 1, 1), s.shape[:3] + (1,))], -1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return (p[..., :v.shape[2]] if offset is not None else p) @ v


@pytest.mark.parametrize("window,offset", [(None, False), ((3, 0), False), (None, True)])
def test_online_softmax_merge_equals_one_softmax(window, offset):
    rng = np.random.default_rng(0)
    b, n, s, hn, cp = 2, 3, 16, 4, 2
    L = s // (2 * cp)
    scores = rng.normal(size=(b, n, s, s)).astype(np.float32) * 3
    v = rng.normal(size=(b, n, s, hn)).astype(np.float32)
    off = rng.normal(size=(n,)).astype(np.float32) if offset else None
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    hidden = j > i
    if window:
        hidden |= j < i - window[0]
    want = _softmax_attention(scores, v, hidden, off)
    for qc in range(2 * cp):
        state = OnlineSoftmax()
        if offset:
            state.start_with_offset(Tensor(off), (b, n, L))
        for r in (1, 0):  # blocks arrive in ring order
            ks = rank_chunks(r, cp)
            keep, mask = block_plan(qc, ks, L, window)
            if not keep:
                continue
            cols = chunk_positions([ks[k] for k in keep], L)
            blk = scores[:, :, qc * L:(qc + 1) * L][..., cols]
            if mask is not None:
                blk = np.where(mask[None, None], -10000.0, blk)
            state.add(Tensor(blk.astype(np.float32)), Tensor(v[:, :, cols]))
        got = state.result().asnumpy()
        np.testing.assert_allclose(got, want[:, :, qc * L:(qc + 1) * L], rtol=1e-5, atol=1e-6)


def test_online_softmax_gradient_equals_softmax_gradient():
    rng = np.random.default_rng(1)
    s1, s2 = (Tensor(rng.normal(size=(1, 2, 4, 4)).astype(np.float32)) for _ in range(2))
    v1, v2 = (Tensor(rng.normal(size=(1, 2, 4, 3)).astype(np.float32)) for _ in range(2))

    def merged(a, b):
        state = OnlineSoftmax()
        state.add(a, v1)
        state.add(b, v2)
        return state.result().sum()

    def plain(a, b):
        return ops.BatchMatMul()(ops.softmax(ops.concat([a, b], -1), -1), ops.concat([v1, v2], 2)).sum()

    got = ms.grad(merged, (0, 1))(s1, s2)
    want = ms.grad(plain, (0, 1))(s1, s2)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.asnumpy(), w.asnumpy(), rtol=1e-5, atol=1e-6)


def test_batch_split_keeps_true_positions_and_the_mask_rows():
    s = 16
    tokens = np.arange(2 * s).reshape(2, s).astype(np.int32)
    causal = np.triu(np.ones((1, 1, s, s), np.bool_), 1)
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": np.ones((2, s), np.float32),
             "position_ids": np.tile(np.arange(s, dtype=np.int32), (2, 1)), "attention_mask": causal}
    local = get_batch_on_this_cp_rank(batch, s, cp_rank=1, cp=2)
    assert local["tokens"][0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert local["position_ids"][1].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert local["attention_mask"] is None  # plain causal: built per block instead
    eod = causal.copy()
    eod[0, 0, 8:, :8] = True  # a second document from position 8
    local = get_batch_on_this_cp_rank({**batch, "attention_mask": eod}, s, cp_rank=0, cp=2)
    assert local["attention_mask"].shape == (1, 1, 8, 16)
    np.testing.assert_array_equal(local["attention_mask"][0, 0], eod[0, 0, local_positions(s, 0, 2)])
    # already split: left alone
    assert get_batch_on_this_cp_rank(local, s, cp_rank=0, cp=2) is local
    with pytest.raises(ValueError, match="--seq-length 16"):
        get_batch_on_this_cp_rank({"tokens": tokens[:, :12]}, s, cp_rank=0, cp=2)


def test_comm_types_per_layer_and_document_002_names():
    assert layer_comm_types(3, None, "ulysses") == ["a2a"] * 3
    assert layer_comm_types(2, ["a2a", "p2p"]) == ["a2a", "p2p"]
    with pytest.raises(ValueError, match="--cp-comm-type gives 2 values"):
        layer_comm_types(3, ["a2a", "p2p"])
    with pytest.raises(ValueError, match="--cp-comm-type 'ring'"):
        layer_comm_types(3, ["ring"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(seq_length=20, cp=4), r"--seq-length 20 must be a multiple of 2 x --context-parallel-size \(8\)"),
    (dict(cp=4, cp_comm_type=["a2a"], num_attention_heads=6, num_query_groups=6),
     r"--num-attention-heads 6 is not divisible by the Ulysses degree 4"),
    (dict(cp=2, tp=2, cp_comm_type=["a2a"], num_query_groups=2),
     r"--num-query-groups 2 is not divisible by the Ulysses degree 2 .* x --tensor-model-parallel-size 2"),
    (dict(cp=4, cp_comm_type=["a2a+p2p"]), r"needs --hierarchical-context-parallel-sizes"),
    (dict(cp=4, cp_comm_type=["a2a+p2p"], hierarchical_sizes=[2, 3]),
     r"--hierarchical-context-parallel-sizes \[2, 3\] must be two sizes .* product is --context-parallel-size 4"),
    (dict(cp=4, ulysses_degree_in_cp=3), r"--ulysses-degree-in-cp 3 must divide --context-parallel-size 4"),
    (dict(seq_length=40, cp=4, tp=4, sequence_parallel=True),
     r"--seq-length 40 / --context-parallel-size 4 = 10 .* --tensor-model-parallel-size 4 under --sequence-parallel"),
])
def test_invalid_layouts_fail_naming_the_flag(kwargs, message):
    args = dict(cp=2, tp=1, seq_length=32, num_attention_heads=8, num_query_groups=8, num_layers=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        validate_context_parallel(**args)


def test_command_line_flags_reach_the_model_config_and_fail_early(monkeypatch):
    monkeypatch.delenv("MS_WORKER_NUM", raising=False)
    args = parse_args(args=BASE + ["--context-parallel-size", "2", "--cp-comm-type", "a2a", "p2p"], world_size=2)
    model = init_configs_from_args(args).model_config
    assert model.cp_comm_type == ["a2a", "p2p"] and model.layer_cp_comm_type(2) == "p2p"
    args = parse_args(args=BASE + ["--context-parallel-size", "4", "--context-parallel-algo", "hybrid_cp_algo",
                                   "--ulysses-degree-in-cp", "2"], world_size=4)
    model = init_configs_from_args(args).model_config
    assert model.cp_comm_type is None and model.layer_cp_comm_type(1) == "a2a+p2p"
    assert model.ulysses_degree_in_cp == 2
    with pytest.raises(ValueError, match="--seq-length 36 must be a multiple of 2 x --context-parallel-size"):
        parse_args(args=BASE + ["--seq-length", "36", "--context-parallel-size", "4"], world_size=4)
    with pytest.raises(ValueError, match="--num-attention-heads 4 is not divisible by the Ulysses degree 2"):
        parse_args(args=BASE + ["--context-parallel-size", "2", "--cp-comm-type", "a2a",
                                "--tensor-model-parallel-size", "4"], world_size=8)
    with pytest.raises(ValueError, match="positions per context rank must be divisible by --tensor-model-parallel"):
        parse_args(args=BASE + ["--seq-length", "40", "--context-parallel-size", "4", "--tensor-model-parallel-size",
                                "4", "--sequence-parallel"], world_size=16)


def test_document_002_yaml_selects_the_hybrid(tmp_path, monkeypatch):
    monkeypatch.delenv("MS_WORKER_NUM", raising=False)
    path = tmp_path / "cp.yaml"
    path.write_text("parallel_config:\n  context_parallel_size: 4\n  context_parallel_algo: hybrid_cp_algo\n"
                    "  ulysses_degree_in_cp: 2\n")
    cfg = init_configs_from_args(parse_args(args=BASE + ["--yaml-cfg", str(path)], world_size=4))
    assert cfg.parallel_config.context_parallel_size == 4
    assert cfg.model_config.layer_cp_comm_type(1) == "a2a+p2p" and cfg.model_config.ulysses_degree_in_cp == 2
    path.write_text("parallel_config:\n  context_parallel_size: 4\n  context_parallel_algo: ulysses_cp_algo\n")
    with pytest.raises(ValueError, match="--num-attention-heads 4 is not divisible by the Ulysses degree 4 .* x "
                                         "--tensor-model-parallel-size 2"):
        parse_args(args=BASE + ["--yaml-cfg", str(path), "--tensor-model-parallel-size", "2"], world_size=8)
