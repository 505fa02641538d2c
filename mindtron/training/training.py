"""The training loop: `pretrain()` with document 002's signature, one `train_step()` per iteration.

One iteration: for each micro-batch, forward + backward (gradients of loss / micro-batches, accumulated in
the gradient buckets), then the buckets' sequence-parallel, tied-embedding and data-parallel reduction
(reduce-scatter with the distributed optimizer), unscaling and an inf/nan check, clipping, the optimizer
step and the learning-rate schedule. Losses are averaged as Megatron does: per micro-batch over
its unmasked tokens, then over micro-batches and data-parallel ranks; with --calculate-per-token-loss each
micro-batch's loss is its sum over tokens and the gradients are divided by the unmasked tokens of the whole
global batch.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.context_parallel import get_batch_on_this_cp_rank
from mindtron.parallel_core.distributed import GradBuffer, GradBufferConfig
from mindtron.parallel_core.moe import MoEStepStats, TopKRouter, get_moe_metrics_tracker, update_expert_bias
from mindtron.parallel_core.optimizer import (AdaptiveLossScaler, ConstantLossScaler, DistributedOptimizer,
                                              DynamicLossScaler, Float16Optimizer, OptimizerParamScheduler,
                                              clip_grads, count_zeros, found_inf_in_grads, get_grad_norm,
                                              get_megatron_optimizer, needs_main_copies)
from mindtron.parallel_core.pipeline_parallel import ScheduleResult, get_forward_backward_func
from mindtron.parallel_core.pipeline_parallel.schedules import stage_graphs_allowed
from mindtron.parallel_core.timers import get_timers
from mindtron.training import checkpointing
from mindtron.training.callbacks import CallbackList, TrainState, build_callbacks
from mindtron.training.config import AllConfig
from mindtron.training.logging import TrainingLogger
from mindtron.training.num_microbatches import BatchSchedule, build_batch_schedule


# --------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------
def default_get_batch(data_iterator: Iterator, config: AllConfig) -> Dict[str, Tensor]:
    """The next micro-batch as model inputs: tokens, labels, loss_mask, attention_mask, position_ids.

    Accepts loader items holding "text" ([b, s + 1] ids, Megatron's GPT samples) or the five arrays.
    """
    from mindtron.data.gpt_batch import make_gpt_batch

    item = next(data_iterator)
    if "text" in item:
        d = config.dataset_config
        eod = d.eos_token_id if d.eos_token_id is not None else 0
        item = make_gpt_batch(np.asarray(item["text"]), eod, d.reset_position_ids, d.reset_attention_mask,
                              d.eod_mask_loss)
    return {k: v if isinstance(v, Tensor) else Tensor(np.asarray(v)) for k, v in item.items()}


def _as_batch(batch) -> Dict[str, Tensor]:
    if isinstance(batch, dict):
        return batch
    names = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")
    return dict(zip(names, batch))


def gpt_forward(model, batch: Dict[str, Tensor]) -> Tensor:
    """GPTModel's masked mean loss for one micro-batch."""
    return model(batch["tokens"], batch.get("position_ids"), batch.get("attention_mask"), batch.get("loss_mask"),
                 labels=batch["labels"])


# --------------------------------------------------------------------------------------------------------
# Building the pieces from the configs
# --------------------------------------------------------------------------------------------------------
def batch_schedule(config: AllConfig) -> BatchSchedule:
    """The run's global batch as a function of consumed samples: constant, --rampup-batch-size or
    --step-batch-size-schedule (training/num_microbatches.py)."""
    t = config.training_config
    dp = ps.get_data_parallel_world_size()
    gbs = t.global_batch_size
    if gbs is None:
        gbs = t.micro_batch_size * dp * max(1, t.gradient_accumulation_steps)
    return build_batch_schedule(gbs, t.micro_batch_size, dp, t.rampup_batch_size, t.step_batch_size_schedule,
                                config.model_config.seq_length, t.decrease_batch_size_if_needed)


def num_microbatches(config: AllConfig, consumed_samples: int = 0) -> int:
    """Micro-batches per iteration after `consumed_samples`: global batch / (micro batch x data parallel)."""
    return batch_schedule(config).num_microbatches(consumed_samples)


def global_batch_size(config: AllConfig, consumed_samples: int = 0) -> int:
    """The global batch trained by the iteration that starts after `consumed_samples`."""
    return batch_schedule(config).running_global_batch_size(consumed_samples)


def build_loss_scaler(config: AllConfig):
    """Static, dynamic (fp16 default) or adaptive loss scaling; a constant 1 without fp16."""
    t = config.training_config
    if t.use_adaptive_loss_scale:
        return AdaptiveLossScaler(t.loss_scale_value, t.scale_factor, t.loss_scale_window, t.max_scale_window,
                                  t.min_scale_window)
    if t.loss_scale is not None:
        return ConstantLossScaler(t.loss_scale)
    if t.fp16:
        return DynamicLossScaler(t.loss_scale_value, t.min_loss_scale, growth_factor=2.0, backoff_factor=0.5,
                                 growth_interval=t.loss_scale_window, hysteresis=t.loss_scale_factor)
    return ConstantLossScaler(1.0)


def build_scheduler(optimizer, config: AllConfig) -> OptimizerParamScheduler:
    """Megatron's scheduler in samples (it steps by each iteration's global batch). Sample-based runs
    (--train-samples) measure warmup/decay in samples; iteration-based ones in iterations x
    --global-batch-size, as Megatron's get_optimizer_param_scheduler does (with a batch-size ramp that is
    the final batch size)."""
    o, t = config.optimizer_config, config.training_config
    train_iters = t.training_iters
    if t.train_samples or o.lr_decay_samples is not None:
        decay_steps = o.lr_decay_samples or t.train_samples or train_iters * batch_schedule(config).global_batch_size
        warmup_steps = o.lr_warmup_samples
        wsd_steps = o.lr_wsd_decay_samples
        wd_steps = t.train_samples or decay_steps
    else:
        gbs = t.global_batch_size if t.global_batch_size is not None else batch_schedule(config).global_batch_size
        decay_steps = (o.lr_decay_iters or train_iters) * gbs
        warmup_steps = o.lr_warmup_iters * gbs
        wsd_steps = o.lr_wsd_decay_iters * gbs if o.lr_wsd_decay_iters else None
        wd_steps = train_iters * gbs
    if o.lr_warmup_fraction is not None:
        warmup_steps = int(o.lr_warmup_fraction * decay_steps)
    wd = o.weight_decay
    start_wd = o.start_weight_decay if o.start_weight_decay is not None else wd
    end_wd = o.end_weight_decay if o.end_weight_decay is not None else wd
    return OptimizerParamScheduler(
        optimizer, init_lr=o.lr_warmup_init, max_lr=o.learning_rate, min_lr=o.min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=max(decay_steps, 1), lr_decay_style=o.lr_decay_style,
        start_wd=start_wd, end_wd=end_wd, wd_incr_steps=wd_steps, wd_incr_style=o.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=o.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=o.override_opt_param_scheduler, wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style=o.lr_wsd_decay_style)


# --------------------------------------------------------------------------------------------------------
# One iteration
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepResult:
    """One iteration's outcome."""

    loss: float          # mean over micro-batches and data-parallel ranks (the language-model loss)
    grad_norm: Optional[float]
    skipped: bool        # inf/nan gradients: no update
    loss_scale: float
    global_batch_size: int = 0  # samples trained this iteration (the batch-size schedule's running batch)
    moe: Optional[MoEStepStats] = None  # the MoE layers' auxiliary losses and token counts (MoE models)
    num_zeros: Optional[int] = None      # zero gradient entries (--log-num-zeros-in-grad)
    params_norm: Optional[float] = None  # parameter L2 norm after the step (--log-params-norm)


class Trainer:
    """Holds the model, optimizer, scheduler and loss scaler of a run and performs iterations."""

    def __init__(self, model, config: AllConfig, forward_step_func: Optional[Callable] = None,
                 get_batch_func: Optional[Callable] = None):
        # `model` is one Cell, or with virtual pipeline stages the list of this rank's model chunks.
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.model, self.config = model, config
        self.chunk_params = [list(m.trainable_params()) for m in self.chunks]
        self.params = [p for chunk in self.chunk_params for p in chunk]
        lr = config.optimizer_config.learning_rate
        if lr is None:
            raise ValueError("no learning rate: pass --lr")
        t = config.training_config
        chunk_of_param = [c for c, chunk in enumerate(self.chunk_params) for _ in chunk]
        # --calculate-per-token-loss: micro-batch losses are sums over tokens; the iteration's gradients are
        # divided by the unmasked tokens of the whole global batch (Megatron-Core's finalize_model_grads)
        self.per_token_loss = bool(getattr(config.model_config, "calculate_per_token_loss", False))
        self._tokens: List[float] = []  # unmasked tokens of the micro-batches this rank's head saw
        self.loss_scaler = build_loss_scaler(config)
        # a scaler that adapts to overflows expects NaN/Inf gradients now and then: never an error with it
        check_for_nan = t.check_for_nan_in_loss_and_grad and isinstance(self.loss_scaler, ConstantLossScaler)
        self.grad_buffer = GradBuffer(self.params, chunk_of_param, GradBufferConfig(
            # without wrap_with_ddp, one bucket per group reduced after the last micro-batch
            bucket_size=t.bucket_size if t.wrap_with_ddp else 2 ** 62,
            grad_dtype_fp32=True,  # parameters are fp32 master weights, so gradients accumulate in fp32
            overlap_grad_reduce=t.overlap_grad_reduce and t.wrap_with_ddp,
            delay_grad_reduce=t.delay_grad_reduce,
            shard=t.use_distributed_optimizer, check_for_nan=check_for_nan,
            pad_to=128 if t.enable_mem_align else 1,
            average=not self.per_token_loss))  # per-token: summed, then divided by the global token count
        if t.use_distributed_optimizer:
            self.optimizer = DistributedOptimizer(config.optimizer_config, self.params, self.grad_buffer,
                                                  overlap_param_gather=config.optimizer_config.overlap_param_gather)
        elif needs_main_copies(self.params):  # fp16/bf16 weights: the optimizer steps fp32 main copies
            self.optimizer = Float16Optimizer(config.optimizer_config, self.params)
        else:
            self.optimizer = get_megatron_optimizer(config.optimizer_config, self.params)
        self.batch_schedule = batch_schedule(config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.forward_step_func, self.get_batch_func = forward_step_func, get_batch_func
        self.history: List[StepResult] = []  # one entry per iteration trained by this Trainer
        self.eval_history: List[Tuple[int, float]] = []  # (iteration, validation loss) per evaluation
        self.exit_signal_received = False  # train() stopped on --exit-signal-handler's signal
        self.callbacks: Optional[CallbackList] = None  # set by pretrain() (or train()) from the configuration
        self.clip = (config.optimizer_config.clip_grad if config.optimizer_config.clip_grad
                     else (config.training_config.max_grad_norm if config.training_config.use_clip_grad else 0.0))
        self.routers = [cell for m in self.chunks for _, cell in m.cells_and_names() if isinstance(cell, TopKRouter)]

    def _loss_of(self, batch_source, chunk: int = 0) -> Tensor:
        """Forward one micro-batch; Megatron-style forward_step_func(data_iterator, model) or GPTModel's loss.

        A loss_func returning Megatron-Core's (loss sum, token count, report) gives the mean over the tokens,
        or with a per-token loss the sum (its count recorded)."""
        model = self.chunks[chunk]
        head = chunk == len(self.chunks) - 1 and ps.is_pipeline_last_stage(ignore_virtual=True)
        if self.forward_step_func is not None:
            out = self.forward_step_func(batch_source, model)
            if isinstance(out, tuple):
                output, loss_func = out
                out = loss_func(output)
                if isinstance(out, tuple) and len(out) == 3:
                    loss, tokens = out[0], float(np.asarray(out[1].asnumpy() if isinstance(out[1], Tensor)
                                                            else out[1]))
                    if self.per_token_loss:
                        self._tokens.append(tokens)
                        return loss
                    cp = ps.get_context_parallel_world_size()
                    if cp > 1:  # tokens of the whole sequences; x cp as gradients average over dp x cp
                        tokens = float(comm.all_reduce(Tensor(np.array([tokens], np.float32)),
                                                       ps.get_context_parallel_group()).asnumpy()[0])
                        return loss * cp / max(tokens, 1.0)
                    return loss / max(tokens, 1.0)
                if isinstance(out, tuple):
                    out = out[0]
            if self.per_token_loss and head:
                raise ValueError("--calculate-per-token-loss needs the forward step's loss_func to return Megatron-"
                                 "Core's (loss summed over tokens, number of tokens, report)")
            return out
        if self.per_token_loss and head:
            mask = batch_source.get("loss_mask")
            self._tokens.append(float(mask.sum().asnumpy()) if mask is not None else float(batch_source["labels"].size))
        return gpt_forward(model, batch_source)

    def _next_micro_batch(self, data_iterator):
        get_timers()("batch-generator", log_level=2).start()
        try:
            return self._read_micro_batch(data_iterator)
        finally:
            get_timers()("batch-generator", log_level=2).stop()

    def _read_micro_batch(self, data_iterator):
        if self.forward_step_func is not None and self.get_batch_func is None:
            return iter([next(data_iterator)])  # forward_step_func reads its batch from an iterator
        if self.get_batch_func is not None:
            batch = _as_batch(self.get_batch_func(data_iterator))
        else:
            batch = default_get_batch(data_iterator, self.config)
        # context parallel: this rank's two load-balanced chunks of every sequence (a no-op when the batch
        # function has split it already)
        batch = get_batch_on_this_cp_rank(batch, self.config.model_config.seq_length)
        return iter([batch]) if self.forward_step_func is not None else batch

    def _stage_step(self, batch, input_tensor, chunk: int = 0):
        """This stage's forward for one micro-batch: the loss on the last stage, hidden states elsewhere."""
        if input_tensor is not None:
            self.chunks[chunk].set_input_tensor(input_tensor)
        return self._loss_of(batch, chunk)

    def set_train(self, mode: bool) -> None:
        for m in self.chunks:
            m.set_train(mode)

    def _micro_batches(self, data_iterator):
        while True:
            yield self._next_micro_batch(data_iterator)

    def _run_schedule(self, data_iterator, forward_only: bool, scale: float, num_micro_batches: int,
                      grad_sink=None) -> ScheduleResult:
        c = self.config
        seq = c.model_config.seq_length // ps.get_context_parallel_world_size()  # this rank's positions
        if c.model_config.sequence_parallel:
            seq //= ps.get_tensor_model_parallel_world_size()
        shape = (seq, c.training_config.micro_batch_size, c.model_config.hidden_size)
        self._tokens = []
        return get_forward_backward_func()(
            step=self._stage_step, batches=self._micro_batches(data_iterator),
            params=self.chunk_params if len(self.chunks) > 1 else self.params,
            num_microbatches=num_micro_batches, tensor_shape=shape, loss_scale=scale, forward_only=forward_only,
            grad_sink=grad_sink, calculate_per_token_loss=self.per_token_loss,
            keep_stage_graphs=stage_graphs_allowed(c.model_config))

    def _global_tokens(self) -> float:
        """Unmasked tokens of the whole global batch: counted where the loss is computed (last pipeline stage),
        shared over the pipeline and summed over data-parallel ranks (context ranks folded in), on every rank."""
        local = Tensor(np.array([sum(self._tokens)], np.float32))
        if ps.get_pipeline_model_parallel_world_size() > 1:  # the other stages contribute 0
            local = comm.all_reduce(local, ps.get_pipeline_model_parallel_group())
        total = comm.all_reduce(local, ps.get_data_parallel_group(with_context_parallel=True))
        return float(total.asnumpy()[0])

    def _mean_loss(self, losses: List[Tensor], tokens: Optional[float] = None) -> float:
        """Mean micro-batch loss of the last stage, averaged over data-parallel ranks (0 on other stages); with
        a per-token loss, the summed losses over the global batch's `tokens`."""
        local = ops.stack([l.astype(ms.float32) for l in losses]) if losses else Tensor([0.0], ms.float32)
        local = local.sum() if tokens is not None else local.mean()
        total = float(comm.all_reduce(local, ps.get_data_parallel_group(with_context_parallel=True)).asnumpy())
        if tokens is not None:
            return total / max(tokens, 1.0)
        return total / ps.get_data_parallel_world_size(with_context_parallel=True)

    def train_step(self, data_iterator, consumed_samples: int = 0) -> StepResult:
        """One iteration: as many micro-batches as the batch-size schedule gives after `consumed_samples`."""
        micro_batches = self.batch_schedule.num_microbatches(consumed_samples)
        batch = micro_batches * self.batch_schedule.per_micro_batch
        timers, t = get_timers(), self.config.training_config
        l1_barrier = t.barrier_with_L1_time
        self.set_train(True)
        self.sync_params()
        scale = self.loss_scaler.scale
        self.grad_buffer.reset()
        get_moe_metrics_tracker().clear()  # this iteration's router statistics only
        timers("forward-backward", log_level=1).start(barrier=l1_barrier)
        result = self._run_schedule(data_iterator, forward_only=False, scale=scale, num_micro_batches=micro_batches,
                                    grad_sink=self.grad_buffer)
        timers("forward-backward").stop()
        self.max_in_flight = max(getattr(self, "max_in_flight", 0), result.max_in_flight)
        timers("all-grads-sync", log_level=1).start(barrier=l1_barrier)
        self.grad_buffer.finish()
        moe_stats = self._finish_moe_step(micro_batches)
        timers("all-grads-sync").stop()
        timers("optimizer", log_level=1).start(barrier=l1_barrier)
        timers("optimizer-copy-to-main-grad", log_level=1).start()
        if isinstance(self.optimizer, DistributedOptimizer):
            # each data-parallel rank holds disjoint pieces: the norm and the inf check span every rank
            params, grads, group = self.optimizer.main_params, self.optimizer.shard_grads(), comm.world_group()
        else:
            params, grads, group = getattr(self.optimizer, "main_params", self.params), self.grad_buffer.grads(), None
        timers("optimizer-copy-to-main-grad").stop()
        timers("optimizer-unscale-and-check-inf", log_level=1).start()
        tokens = self._global_tokens() if self.per_token_loss else None
        divisor = scale * max(tokens, 1.0) if tokens is not None else scale
        if divisor != 1.0:
            grads = [g / divisor for g in grads]
        found_inf = found_inf_in_grads(grads, group)
        timers("optimizer-unscale-and-check-inf").stop()
        self.loss_scaler.update(found_inf)
        grad_norm = num_zeros = params_norm = None
        if not found_inf:
            if self.clip > 0.0:
                timers("optimizer-clip-main-grad", log_level=1).start()
                grads, grad_norm = clip_grads(params, grads, self.clip, model_parallel_group=group)
                timers("optimizer-clip-main-grad").stop()
            if t.log_num_zeros_in_grad:
                timers("optimizer-count-zeros", log_level=1).start()
                num_zeros = count_zeros(params, grads, group)
                timers("optimizer-count-zeros").stop()
            timers("optimizer-inner-step", log_level=1).start()
            if isinstance(self.optimizer, DistributedOptimizer):
                self.optimizer.step(grads)
            else:
                # mutable: the gradients change every step; as constants MindSpore would warn and recompile.
                self.optimizer(ms.mutable(tuple(g.astype(p.dtype) for g, p in zip(grads, params))))
            timers("optimizer-inner-step").stop()
            self.scheduler.step(increment=batch)  # Megatron counts the schedule in samples
        timers("optimizer").stop()
        if t.log_params_norm:  # the main (fp32) values the optimizer stepped, each shared one counted once
            params_norm = get_grad_norm(params, [p.value() for p in params], group)
        return StepResult(self._mean_loss(result.losses, tokens), grad_norm, bool(found_inf), float(scale), batch,
                          moe_stats, num_zeros, params_norm)

    def skip_step(self, data_iterator, consumed_samples: int = 0) -> int:
        """Read and drop one iteration's micro-batches without training (--iterations-to-skip, Megatron's
        dummy_train_step); returns the samples skipped."""
        micro_batches = self.batch_schedule.num_microbatches(consumed_samples)
        for _ in range(micro_batches):
            next(data_iterator)
        return micro_batches * self.batch_schedule.per_micro_batch

    def _finish_moe_step(self, micro_batches: int) -> Optional[MoEStepStats]:
        """After the gradients are reduced: move the expert biases, reset the routers' per-iteration counts,
        and reduce the iteration's MoE statistics (Megatron's finalize_model_grads and MoE logging)."""
        moe = self.config.model_config.moe_config
        if not moe.enabled:
            return None
        if moe.moe_router_enable_expert_bias:
            update_expert_bias(self.routers, moe.moe_router_bias_update_rate)
        for router in self.routers:
            router.reset_step_statistics()
        num_layers = self.config.model_config.num_layers
        pattern = moe.layer_pattern(num_layers)
        return get_moe_metrics_tracker().report(
            moe.tracked_losses(), num_layers, sum(pattern), 1.0 / micro_batches,
            moe.num_experts, [i for i, on in enumerate(pattern) if on])

    def sync_params(self) -> None:
        """Bring the model parameters up to date (the distributed optimizer's deferred all-gather)."""
        if isinstance(self.optimizer, DistributedOptimizer):
            barrier = self.config.training_config.barrier_with_L1_time
            get_timers()("params-all-gather", log_level=1).start(barrier=barrier)
            self.optimizer.finish_param_sync()
            get_timers()("params-all-gather").stop()

    def evaluate(self, data_iterator, eval_iters: int) -> float:
        """Mean loss over `eval_iters` iterations' worth of micro-batches, without gradients."""
        self.sync_params()
        self.set_train(False)
        losses: List[Tensor] = []
        # Megatron evaluates with --global-batch-size (the schedule's final batch), whatever the ramp
        micro_batches = self.batch_schedule.final_num_microbatches()
        tokens: List[float] = []
        try:
            for _ in range(eval_iters):
                losses += self._run_schedule(data_iterator, forward_only=True, scale=1.0,
                                             num_micro_batches=micro_batches).losses
                tokens += self._tokens
        except StopIteration:
            pass
        finally:
            self.set_train(True)
        if not losses and ps.is_pipeline_last_stage():
            raise ValueError("the validation data ran out before any batch was evaluated (--eval-iters)")
        if self.per_token_loss:  # Megatron's evaluation: summed losses over summed tokens
            self._tokens = tokens
            return self._mean_loss(losses, self._global_tokens())
        return self._mean_loss(losses)


# --------------------------------------------------------------------------------------------------------
# pretrain()
# --------------------------------------------------------------------------------------------------------
def _ensure_initialized(all_config: AllConfig) -> None:
    """Runtime, process groups and seeds for a caller that built the configs itself."""
    from mindtron.parallel_core.runtime import init_runtime

    init_runtime()
    if not ps.model_parallel_is_initialized():
        p = all_config.parallel_config
        check_context_parallel(all_config)
        ps.initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                     p.virtual_pipeline_model_parallel_size, p.context_parallel_size,
                                     p.expert_model_parallel_size, p.order,
                                     expert_tensor_parallel_size=p.expert_tensor_parallel_size)
        tp.model_parallel_seed(all_config.training_config.seed)


def check_context_parallel(all_config: AllConfig) -> None:
    """Carry document 002's context_parallel_algo / ulysses_degree_in_cp into the model config and check the
    context-parallel layout (before any process group exists)."""
    from mindtron.parallel_core.context_parallel import validate_context_parallel

    p, m = all_config.parallel_config, all_config.model_config
    if m.cp_comm_type is None and m.context_parallel_algo == "ring":
        m.context_parallel_algo = p.context_parallel_algo
    if m.ulysses_degree_in_cp is None:
        m.ulysses_degree_in_cp = p.ulysses_degree_in_cp
    validate_context_parallel(p.context_parallel_size, p.tensor_model_parallel_size, m.seq_length,
                              m.num_attention_heads, m.num_query_groups, m.num_layers, m.cp_comm_type,
                              m.context_parallel_algo, m.hierarchical_context_parallel_sizes, m.ulysses_degree_in_cp,
                              m.sequence_parallel)


def build_train_valid_test_data_loaders(all_config: AllConfig, train_valid_test_datasets_provider: Callable,
                                        consumed_samples: int = 0):
    """Datasets from the provider (sized in samples as Megatron asks) wrapped in samplers for this rank."""
    from mindtron.data.gpt_batch import DataLoader
    from mindtron.data.samplers import MegatronPretrainingRandomSampler, MegatronPretrainingSampler

    t = all_config.training_config
    kind = all_config.dataset_config.dataloader_type
    if kind == "external":
        raise ValueError("--dataloader-type external: pass the data loaders to pretrain() (train_data_loader=...)")
    if kind not in ("single", "cyclic"):
        raise ValueError(f"--dataloader-type {kind!r}: use single, cyclic or external")
    # Megatron's train_valid_test_num_samples: --train-samples, or iterations x --global-batch-size
    gbs = batch_schedule(all_config).global_batch_size
    # evaluations every eval_interval plus the closing one (only the closing one without --eval-interval)
    eval_runs = (t.training_iters // t.eval_interval + 1) if t.eval_interval else 1
    sizes = [t.train_samples or t.training_iters * gbs, eval_runs * t.eval_iters * gbs, t.eval_iters * gbs]
    datasets = train_valid_test_datasets_provider(sizes)
    loaders = []
    for i, ds in enumerate(datasets):
        if ds is None or len(ds) == 0:
            loaders.append(None)
            continue
        rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        if kind == "cyclic":
            sampler = MegatronPretrainingRandomSampler(ds, len(ds), consumed_samples if i == 0 else 0,
                                                       t.micro_batch_size, rank, size)
        else:
            sampler = MegatronPretrainingSampler(len(ds), consumed_samples if i == 0 else 0, t.micro_batch_size,
                                                 rank, size)
        loaders.append(DataLoader(ds, sampler))
    return tuple(loaders)


def build_model(model_provider_func: Callable):
    """This rank's model: one Cell, or with virtual pipeline stages a list of chunks (Megatron's get_model).

    Each chunk is built with the virtual rank set, so it holds its own layers and knows whether it carries
    the embedding (first chunk of the first stage) or the head (last chunk of the last stage).
    """
    chunks = ps.get_virtual_pipeline_model_parallel_world_size()
    if not chunks:
        return model_provider_func(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    models = []
    for c in range(chunks):
        ps.set_virtual_pipeline_model_parallel_rank(c)
        chunk = model_provider_func(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
        for param in chunk.get_parameters():  # chunks repeat local names; the optimizer needs unique ones
            param.name = f"model{c}.{param.name}"
        models.append(chunk)
    ps.set_virtual_pipeline_model_parallel_rank(0)
    return models


def pretrain(train_valid_test_datasets_provider: Optional[Callable] = None, model_provider_func: Optional[Callable] = None,
             model_type: Any = None, forward_step_func: Optional[Callable] = None,
             process_non_loss_data_func: Optional[Callable] = None, extra_args_provider: Optional[Callable] = None,
             all_config: Optional[AllConfig] = None, train_data_loader: Optional[Iterable] = None,
             get_batch_func: Optional[Callable] = None, args_defaults: Optional[dict] = None,
             valid_data_loader: Optional[Iterable] = None, test_data_loader: Optional[Iterable] = None,
             callbacks: Optional[Sequence[Any]] = None):
    """Train a model as document 002 describes; returns the Trainer (model, optimizer, ...) at the end.

    model_provider_func(pre_process, post_process) builds this rank's model. Data comes from
    `train_data_loader` (an iterable of micro-batches for this rank) or from
    `train_valid_test_datasets_provider([train, valid, test] sample counts)`. `get_batch_func(iterator)`
    turns loader items into model inputs; `forward_step_func(data_iterator, model)` may replace the default
    forward (it returns the loss, or Megatron's (output, loss_func)). `callbacks` (Callback instances or
    `{type: ..., ...}` mappings) run after those of the configuration's `callbacks:` (training/callbacks.py);
    `trainer.callbacks` holds them all.
    """
    if model_provider_func is None:
        raise ValueError("pretrain() needs model_provider_func(pre_process, post_process)")
    if all_config is None:
        from mindtron.training.arguments import get_args, init_configs_from_args
        from mindtron.training.initialize import initialize_megatron

        initialize_megatron(extra_args_provider, args_defaults or {})
        all_config = init_configs_from_args(get_args())
    _ensure_initialized(all_config)
    t = all_config.training_config
    if t.exit_on_missing_checkpoint and t.load_checkpoint and \
            checkpointing.read_latest_iteration(t.load_checkpoint) is None:
        raise FileNotFoundError(f"--load {t.load_checkpoint} holds no checkpoint (no readable "
                                "latest_checkpointed_iteration.txt) and --exit-on-missing-checkpoint is set: "
                                "fix the path, or drop the flag to start from scratch")
    model = build_model(model_provider_func)
    trainer = Trainer(model, all_config, forward_step_func, get_batch_func)
    trainer.callbacks = build_callbacks(all_config, callbacks)
    iteration, consumed = 0, 0
    if t.load_checkpoint and t.exit_on_missing_checkpoint and \
            checkpointing.read_latest_iteration(t.load_checkpoint) is None:
        raise FileNotFoundError(f"--load {t.load_checkpoint} holds no checkpoint (no "
                                "latest_checkpointed_iteration.txt) and --exit-on-missing-checkpoint is set")
    if t.load_checkpoint and (t.resume_training or t.finetune or
                              checkpointing.read_latest_iteration(t.load_checkpoint) is not None):
        iteration, consumed = checkpointing.load_checkpoint(
            t.load_checkpoint, model, trainer.optimizer, trainer.scheduler, trainer.loss_scaler,
            load_optim=not t.no_load_optim, load_rng=not t.no_load_rng, finetune=t.finetune, crc_check=t.crc_check,
            callbacks=trainer.callbacks)
        if t.new_dataset:
            consumed = 0
    if train_data_loader is None:
        if train_valid_test_datasets_provider is None:
            raise ValueError("pretrain() needs train_data_loader or train_valid_test_datasets_provider")
        train_data_loader, valid_data_loader, test_data_loader = build_train_valid_test_data_loaders(
            all_config, train_valid_test_datasets_provider, consumed)
    elif consumed and hasattr(getattr(train_data_loader, "batch_sampler", None), "consumed_samples"):
        train_data_loader.batch_sampler.consumed_samples = consumed  # resume where the run stopped
    iteration, consumed = train(trainer, all_config, iter(train_data_loader), valid_data_loader, iteration, consumed)
    # Megatron's closing evaluation on the validation and test sets (not when a scheduler's signal asked
    # the job to end: its grace period is for the checkpoint)
    if t.eval_iters and not trainer.exit_signal_received:
        for split, loader in (("validation", valid_data_loader), ("test", test_data_loader)):
            if loader is not None:
                TrainingLogger(all_config).evaluation(iteration, trainer.evaluate(iter(loader), t.eval_iters), split)
    return trainer


def train(trainer: Trainer, config: AllConfig, train_iterator: Iterator, valid_data_loader, iteration: int,
          consumed_samples: int) -> Tuple[int, int]:
    """Iterate until --train-iters, --exit-interval or --exit-duration-in-mins; evaluate and save on schedule.

    Each iteration trains the batch the batch-size schedule gives for the samples consumed so far; when the
    number of micro-batches changes, a checkpoint is saved first (with --save), as Megatron does. The
    trainer's callbacks (`trainer.callbacks`, training/callbacks.py) run at the points that module lists.
    """
    from mindtron.training.run_monitor import RunMonitor

    t = config.training_config
    logger = TrainingLogger(config)
    callbacks = trainer.callbacks
    if callbacks is None:
        callbacks = trainer.callbacks = build_callbacks(config)

    def state(result=None, checkpoint_dir=None) -> TrainState:
        return TrainState(trainer, config, iteration, consumed_samples, result, checkpoint_dir, logger.message)

    def save() -> None:
        directory = str(checkpointing.iteration_dir(t.output_dir, iteration))
        callbacks.call("on_save_checkpoint_begin", state(checkpoint_dir=directory))
        with monitor.saving():
            _save(trainer, config, iteration, consumed_samples, args_record, callbacks)
        callbacks.call("on_save_checkpoint_end", state(checkpoint_dir=directory))

    start = time.time()
    args_record = dataclasses.asdict(config)
    saved_at = None
    schedule = trainer.batch_schedule
    micro_batches = schedule.num_microbatches(consumed_samples, check=False)
    skip = set(t.iterations_to_skip or ())
    monitor = RunMonitor(config, args_record)  # timers, TensorBoard/W&B, profiler window, memory, exit signal
    callbacks.call("on_train_begin", state())
    while iteration < t.training_iters:
        monitor.before_iteration(iteration)
        now = schedule.num_microbatches(consumed_samples, check=False)
        if now != micro_batches and t.output_dir and saved_at != iteration:
            save()
            saved_at = iteration
        micro_batches = now
        if iteration + 1 in skip:
            consumed_samples += trainer.skip_step(train_iterator, consumed_samples)
            iteration += 1
            continue
        callbacks.call("on_train_step_begin", state())
        step_start = time.time()
        result = trainer.train_step(train_iterator, consumed_samples)
        trainer.history.append(result)
        iteration += 1
        consumed_samples += result.global_batch_size
        elapsed_ms = (time.time() - step_start) * 1000.0
        logger.iteration(iteration, consumed_samples, elapsed_ms, result, trainer.scheduler, result.global_batch_size)
        monitor.after_iteration(trainer, iteration, consumed_samples, result,
                                logger.learning_rate(trainer.scheduler), result.global_batch_size, elapsed_ms)
        callbacks.call("on_train_step_end", state(result))
        if t.eval_interval and valid_data_loader is not None and iteration % t.eval_interval == 0:
            loss = trainer.evaluate(iter(valid_data_loader), t.eval_iters)
            trainer.eval_history.append((iteration, loss))
            logger.evaluation(iteration, loss)
            monitor.evaluation(iteration, consumed_samples, loss)
        if t.output_dir and t.save_interval and iteration % t.save_interval == 0:
            save()
            saved_at = iteration
        stop = bool(t.exit_interval and iteration % t.exit_interval == 0)
        if t.exit_duration_in_mins:
            elapsed = comm.all_reduce(Tensor(np.array([(time.time() - start) / 60.0], np.float32)), op="max")
            stop = stop or float(elapsed.asnumpy()[0]) > t.exit_duration_in_mins
        if monitor.stop_requested():  # --exit-signal-handler: every rank stops after this same iteration
            logger.message(f"exiting after iteration {iteration}: the exit signal was received")
            trainer.exit_signal_received = stop = True
        if stop:
            break
    if t.output_dir and saved_at != iteration and iteration > 0:
        save()
    callbacks.call("on_train_end", state())
    monitor.close()
    trainer.sync_params()
    return iteration, consumed_samples


def _save(trainer: Trainer, config: AllConfig, iteration: int, consumed: int, args_record: dict,
          callbacks: Optional[CallbackList] = None) -> None:
    t = config.training_config
    checkpointing.save_checkpoint(t.output_dir, iteration, trainer.model, trainer.optimizer, trainer.scheduler,
                                  trainer.loss_scaler, consumed, args_record, save_optim=not t.no_save_optim,
                                  save_rng=not t.no_save_rng, keep_checkpoint_max=t.keep_checkpoint_max,
                                  callback_states=callbacks.state_dict() if callbacks is not None else None)
