"""Gradient buckets, overlapped reduction and the distributed optimizer inside pretrain(), on 2 and 4 ranks.
Each layout returns its losses, final parameters (when each rank holds the whole model) and optimizer
state sizes, for tests/test_ddp.py to compare with the single-process run."""
import os

import numpy as np

from mindtron.parallel_core.optimizer import DistributedOptimizer, optimizer_state_dict
from workers import training_checks as tc

STEPS = 4  # checkpoints are saved half-way, after iteration STEPS // 2
SMALL_BUCKETS = 3000  # elements: the tiny GPT spreads over many buckets


def run(steps=STEPS, **options) -> dict:
    """tc.train with the options, plus final parameters and optimizer-state size of this rank."""
    captured = {}

    def capture(trainer):
        opt = trainer.optimizer
        inner = opt.optimizer if isinstance(opt, DistributedOptimizer) else opt
        captured["state_numel"] = sum(int(np.prod(v.shape)) for k, v in optimizer_state_dict(inner).items()
                                      if k.startswith("exp_avg"))
        captured["params"] = {n: p.asnumpy() for n, p in tc.trainer_named(trainer).items()}
        captured["buckets"] = len(trainer.grad_buffer.buckets)

    result = tc.train(tc.make_config(steps=steps, **options), on_finish=capture)
    result.update(captured)
    return result


def layouts_2(root: str) -> dict:
    """DP=2 with small buckets, with overlap, with the distributed optimizer (and overlapped param gather);
    then a distributed-optimizer run stopped at half-way and saved into `root` for the 4-rank resume."""
    out = {
        "dp2_buckets": run(bucket_size=SMALL_BUCKETS),
        "dp2_overlap": run(bucket_size=SMALL_BUCKETS, overlap_grad_reduce=True),
        "dp2_distopt": run(bucket_size=SMALL_BUCKETS, use_distributed_optimizer=True),
        "dp2_distopt_overlap": run(bucket_size=SMALL_BUCKETS, use_distributed_optimizer=True,
                                   overlap_grad_reduce=True, overlap_param_gather=True),
        "dp2_no_ddp": run(wrap_with_ddp=False),
    }
    out["dp2_distopt_saved"] = run(bucket_size=SMALL_BUCKETS, use_distributed_optimizer=True, output_dir=root,
                                   exit_interval=STEPS // 2)
    out["files"] = sorted(os.listdir(os.path.join(root, f"iter_{STEPS // 2:07d}", "mp_rank_00")))
    # fp16 weights: the checkpoint must carry the fp32 main pieces, or the resumed run drifts
    out["dp2_distopt_fp16_resume"] = tc.resume(steps=STEPS, save_at=STEPS // 2, bucket_size=SMALL_BUCKETS,
                                               use_distributed_optimizer=True, fp16=True, loss_scale=1024.0,
                                               model_options=FP16)
    out["reduction_timing"] = reduction_timing()
    out["deferred_param_gather"] = deferred_param_gather()
    return out


FP16 = {"params_dtype": "float16", "compute_dtype": "float16", "embedding_init_dtype": "float16"}


def _two_params():
    import mindspore as ms
    from mindspore import Tensor
    return [ms.Parameter(Tensor(np.ones((4, 3), np.float32)), name="layer.weight"),
            ms.Parameter(Tensor(np.ones((3,), np.float32)), name="layer.bias")]


def _rank_grads(rank: int):
    from mindspore import Tensor
    return [Tensor(np.full((4, 3), rank + 1.0, np.float32)), Tensor(np.full((3,), rank + 1.0, np.float32))]


def reduction_timing() -> dict:
    """When buckets are reduced: with overlap at chunk_done, before finish(); without, only in finish();
    with delay_grad_reduce on pipeline rank 1, one backward step after chunk_done."""
    from mindtron.parallel_core.distributed import GradBuffer, GradBufferConfig
    from mindtron.parallel_core import parallel_state as ps
    from mindtron.parallel_core import comm

    rank, out = comm.get_rank(), {}
    ps.initialize_model_parallel(1, 1)  # DP=2
    try:
        for overlap in (True, False):
            buffer = GradBuffer(_two_params(), [0, 0], GradBufferConfig(overlap_grad_reduce=overlap))
            buffer.add(0, _rank_grads(rank))
            buffer.chunk_done(0)
            before = [b.reduced for b in buffer.buckets]
            early = buffer.buckets[0].data.asnumpy().copy()
            buffer.finish()
            out[f"overlap_{overlap}"] = {"reduced_before_finish": before, "data_before_finish": early,
                                         "grads": [g.asnumpy() for g in buffer.grads()]}
    finally:
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 2)  # PP=2: rank 1 is pipeline rank 1
    try:
        chunks = [0, 1]  # two chunks, so a later backward step can arrive after chunk 0 finished
        buffer = GradBuffer(_two_params(), chunks, GradBufferConfig(overlap_grad_reduce=True,
                                                                    delay_grad_reduce=True))
        grads = _rank_grads(rank)
        buffer.add(0, grads[:1])
        buffer.chunk_done(0)
        at_done = buffer.bucket_of[0].reduced
        buffer.add(1, grads[1:])  # one more backward step
        after_one = buffer.bucket_of[0].reduced
        buffer.finish()
        out["delay"] = {"at_chunk_done": at_done, "after_one_step": after_one}
    finally:
        ps.destroy_model_parallel()
    return out


def deferred_param_gather() -> dict:
    """With overlap_param_gather the parameters keep their old values after the step until
    finish_param_sync, which then writes the same values as the immediate gather."""
    from mindtron.parallel_core.distributed import GradBuffer, GradBufferConfig
    from mindtron.parallel_core import parallel_state as ps
    from mindtron.parallel_core import comm

    rank, out = comm.get_rank(), {}
    ps.initialize_model_parallel(1, 1)
    try:
        optimizer_config = tc.make_config().optimizer_config
        for overlap in (False, True):
            params = _two_params()
            buffer = GradBuffer(params, [0, 0], GradBufferConfig(shard=True))
            opt = DistributedOptimizer(optimizer_config, params, buffer, overlap_param_gather=overlap)
            buffer.add(0, _rank_grads(rank))
            buffer.finish()
            opt.step(opt.shard_grads())
            after_step = [p.asnumpy().copy() for p in params]
            opt.finish_param_sync()
            out[f"overlap_{overlap}"] = {"after_step": after_step, "after_sync": [p.asnumpy() for p in params]}
    finally:
        ps.destroy_model_parallel()
    return out


def layouts_4(root: str) -> dict:
    """DP=4 plain / overlap / distributed optimizer; TP=2 x DP=2 and PP=2 x DP=2 with the distributed
    optimizer; resuming the 2-rank distributed-optimizer checkpoint at DP=4; expert reduction groups."""
    return {
        "dp4": run(bucket_size=SMALL_BUCKETS),
        "dp4_overlap": run(bucket_size=SMALL_BUCKETS, overlap_grad_reduce=True),
        "dp4_distopt": run(bucket_size=SMALL_BUCKETS, use_distributed_optimizer=True),
        "tp2_dp2_distopt": run(tp=2, sp=True, bucket_size=SMALL_BUCKETS, use_distributed_optimizer=True,
                               overlap_grad_reduce=True),
        "pp2_dp2_distopt": run(pp=2, bucket_size=SMALL_BUCKETS, use_distributed_optimizer=True,
                               overlap_grad_reduce=True),
        "pp2_vpp2_dp2_overlap": run(pp=2, vpp=2, bucket_size=SMALL_BUCKETS, overlap_grad_reduce=True),
        "pp2_vpp2_dp2_overlap_no_delay": run(pp=2, vpp=2, bucket_size=SMALL_BUCKETS, overlap_grad_reduce=True,
                                             delay_grad_reduce=False),
        "dp4_resumed_from_dp2": run(bucket_size=SMALL_BUCKETS, use_distributed_optimizer=True, load_checkpoint=root),
        "dp4_distopt_saved_for_dp2": run(bucket_size=SMALL_BUCKETS, use_distributed_optimizer=True,
                                         output_dir=root + "_dp4", exit_interval=STEPS // 2),
        "dp4_distopt_resume": tc.resume(steps=STEPS, save_at=STEPS // 2, bucket_size=SMALL_BUCKETS,
                                        use_distributed_optimizer=True),
        "expert_groups": expert_groups(),
    }


def nan_report() -> str:
    """A NaN planted in one rank's gradient is reported with the rank and the parameter name."""
    import mindspore as ms
    from mindspore import Tensor
    from mindtron.parallel_core.distributed import GradBuffer, GradBufferConfig
    from mindtron.parallel_core import parallel_state as ps
    from mindtron.parallel_core import comm

    ps.initialize_model_parallel(1, 1)
    try:
        params = [ms.Parameter(Tensor(np.ones((4, 3), np.float32)), name="layer.weight"),
                  ms.Parameter(Tensor(np.ones((3,), np.float32)), name="layer.bias")]
        buffer = GradBuffer(params, [0, 0], GradBufferConfig(check_for_nan=True))
        grads = [Tensor(np.ones((4, 3), np.float32)), Tensor(np.ones((3,), np.float32))]
        if comm.get_rank() == 1:
            grads[1] = Tensor(np.array([1.0, np.nan, 1.0], np.float32))
        buffer.add(0, grads)
        try:
            buffer.finish()
        except RuntimeError as err:
            return str(err)
        return ""
    finally:
        ps.destroy_model_parallel()


def expert_groups() -> dict:
    """EP=2 on 4 ranks: an expert parameter (`allreduce = False`) is summed over its expert-data-parallel
    group of 2, a dense one over all 4 data-parallel ranks, and both are divided by the data-parallel size 4
    (Megatron's scaling); both in the same buffer."""
    import mindspore as ms
    from mindspore import Tensor
    from mindtron.parallel_core.distributed import GradBuffer, GradBufferConfig
    from mindtron.parallel_core import parallel_state as ps
    from mindtron.parallel_core import comm

    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=2)
    try:
        dense = ms.Parameter(Tensor(np.zeros((2, 2), np.float32)), name="dense.weight")
        expert = ms.Parameter(Tensor(np.zeros((3,), np.float32)), name="experts.weight")
        expert.allreduce = False
        buffer = GradBuffer([dense, expert], [0, 0], GradBufferConfig())
        rank = comm.get_rank()
        buffer.add(0, [Tensor(np.full((2, 2), rank, np.float32)), Tensor(np.full((3,), rank, np.float32))])
        buffer.finish()
        g_dense, g_expert = buffer.grads()
        return {"dense": g_dense.asnumpy(), "expert": g_expert.asnumpy(), "buckets": len(buffer.buckets),
                "expert_group": list(ps.get_data_modulo_expert_parallel_group(with_context_parallel=True).ranks)}
    finally:
        ps.destroy_model_parallel()
