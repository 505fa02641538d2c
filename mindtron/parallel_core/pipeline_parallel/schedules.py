"""Forward/backward schedules over micro-batches: no pipelining and 1F1B (Megatron's
`get_forward_backward_func`).

A schedule runs `num_microbatches` micro-batches through this rank's model and returns the per-micro-batch
losses (last stage) and the gradients summed over micro-batches. A non-last stage runs each micro-batch's
forward once with autodiff recording (a `_StageCell` with `set_grad`) and keeps that graph (the micro-batch's
activations, as Megatron keeps them) until its output gradient arrives; `GradOperation` on the same cell and
the same input tensors then finds the recorded graph and runs only the backward. 1F1B bounds how many graphs
are held by pp - stage. `--recompute-granularity full` still trades that memory for compute inside the layers
and the stage then stores only each micro-batch's input and re-runs its forward at backward time: MindSpore 2.10
pulls a recorded graph with recompute cells back wrongly once other micro-batches' forwards ran in between
(tests/test_stage_graphs.py), so the schedules keep graphs only with `keep_stage_graphs=True` (the Trainer's
choice: no recompute configured; `stage_graphs_allowed(model_config)`). Dropout masks of a kept graph are
the ones its forward drew; the re-run path draws new masks for the re-run forward.

Why a cell and not `mindspore.vjp`: MindSpore 2.10's PyNative executor keeps the graphs of function-level vjp
calls as a stack, so only the most recent one can be pulled back (first-in-first-out, as 1F1B needs, fails
with "Can not find top cell for backward" or pulls back the wrong graph); a cell's already-run graphs are
found by their input tensors in any order.

`step(batch, input_tensor)` is the stage's forward: it returns the loss on the last stage and the hidden
states [s, b, h] elsewhere; `input_tensor` is the previous stage's output (None on the first stage).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterator, List, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import ParameterTuple, Tensor, nn, ops

from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core.moe import aux_loss as moe_aux_loss
from mindtron.parallel_core.pipeline_parallel import p2p_communication as p2p
from mindtron.parallel_core.timers import get_timers


@dataclasses.dataclass
class ScheduleResult:
    """What one iteration's schedule produced on this rank."""

    losses: List[Tensor]            # unscaled loss of each micro-batch (last stage only)
    grads: Optional[List[Tensor]]   # summed over micro-batches, aligned with `params` (None if forward_only)
    max_in_flight: int = 0          # most micro-batch inputs held at once


class StageRunner:
    """Forward and backward of one stage for one micro-batch."""

    keep_graph = True
    """Keep each in-flight micro-batch's forward graph rather than re-running the forward at backward time
    (same gradients bit for bit; one stage forward less per micro-batch) where the `keep_graph` argument
    allows it. False here turns it off everywhere (bench/mindformers_layouts.py --stage-recompute)."""

    def __init__(self, step: Callable, params: Sequence, scale: float, keep_graph: Optional[bool] = None):
        self.step, self.params, self.scale = step, list(params), scale
        # MoE auxiliary losses get the main loss's gradient scale (Megatron's MoEAuxLossAutoScaler)
        moe_aux_loss.set_aux_loss_backward_scale(scale)
        self._weights = ParameterTuple(self.params)
        self._grad_input_and_weights = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)
        self._grad_weights = ops.GradOperation(get_by_list=True, sens_param=True)
        keep = self.keep_graph and keep_graph is not False
        self._cell = _StageCell(step) if keep else None

    def forward(self, batch, input_tensor: Optional[Tensor]) -> Tensor:
        with get_timers()("forward-compute", log_level=2):
            return self.step(batch, input_tensor)

    def loss_and_grads(self, batch, input_tensor: Optional[Tensor]):
        """Last stage: (loss, input grad or None, weight grads) with the loss scaled by `scale`.

        MindSpore's autodiff runs the forward inside the gradient call, so its time counts as backward-compute.
        """
        with get_timers()("backward-compute", log_level=2):
            return self._loss_and_grads(batch, input_tensor)

    def _loss_and_grads(self, batch, input_tensor: Optional[Tensor]):
        if input_tensor is None:
            def fn():
                loss = self.step(batch, None)
                return loss * self.scale, loss
            (_, loss), grads = ms.value_and_grad(fn, None, self.params, has_aux=True)()
            return loss, None, list(grads)

        def fn_x(x):
            loss = self.step(batch, x)
            return loss * self.scale, loss
        (_, loss), (gx, grads) = ms.value_and_grad(fn_x, 0, self.params, has_aux=True)(input_tensor)
        return loss, gx, list(grads)

    def forward_for_backward(self, batch, input_tensor: Optional[Tensor]):
        """Non-last stage: (output, pending) where `pending` is what `backward` needs later: the key and input
        of this forward's recorded graph (keep_graph), or the batch and input to re-run it from."""
        if self._cell is None:
            return self.forward(batch, input_tensor), (batch, input_tensor)
        key = Tensor(np.zeros((1,), np.int32))  # names this micro-batch's graph (by tensor identity)
        self._cell.batches[id(key)] = batch
        args = (key,) if input_tensor is None else (key, input_tensor)
        with get_timers()("forward-compute", log_level=2):
            return self._cell(*args), args

    def backward(self, pending, output_grad: Tensor):
        """Non-last stage: pull `output_grad` back through a `forward_for_backward`: (input grad or None,
        weight grads)."""
        with get_timers()("backward-compute", log_level=2):
            if self._cell is None:
                return self._recompute_backward(*pending, output_grad)
            # the same cell and the same argument tensors: the graph recorded by the forward is reused
            with moe_aux_loss.replaying():  # (were the forward re-run, its router statistics are counted)
                if len(pending) == 1:
                    grads = self._grad_weights(self._cell, self._weights)(*pending, output_grad)
                    input_grad = None
                else:
                    input_grads, grads = self._grad_input_and_weights(self._cell, self._weights)(
                        *pending, output_grad)
                    input_grad = input_grads[1]
            del self._cell.batches[id(pending[0])]
            return input_grad, list(grads)

    def _recompute_backward(self, batch, input_tensor: Optional[Tensor], output_grad: Tensor):
        with moe_aux_loss.replaying():  # the re-run forward's router statistics were counted already
            if input_tensor is None:
                grads = self._grad_weights(lambda: self.step(batch, None), self._weights)(output_grad)
                return None, list(grads)
            input_grads, grads = self._grad_input_and_weights(lambda x: self.step(batch, x), self._weights)(
                input_tensor, output_grad)
        return input_grads[0], list(grads)


def stage_graphs_allowed(model_config) -> bool:
    """Whether a stage may keep its micro-batches' forward graphs: not with recomputed cells (activation
    recompute, MoE layer recompute), whose recorded graphs MindSpore 2.10 cannot pull back out of order."""
    moe = getattr(model_config, "moe_config", None)
    return model_config.recompute_granularity is None and not getattr(moe, "moe_layer_recompute", False)


class _StageCell(nn.Cell):
    """The stage's forward as a cell with autodiff recording on: `construct(key, [input])` runs
    `step(batches[id(key)], input)`. The key tensor makes each micro-batch's call distinct."""

    def __init__(self, step: Callable):
        super().__init__(auto_prefix=False)
        self.step = step
        self.batches = {}
        self.set_grad(True)

    def construct(self, key, *input_tensor):
        return self.step(self.batches[id(key)], input_tensor[0] if input_tensor else None)


def _accumulate(total: Optional[List[Tensor]], grads: List[Tensor]) -> List[Tensor]:
    grads = [g.astype(ms.float32) for g in grads]
    return grads if total is None else [a + b for a, b in zip(total, grads)]


class _GradSum:
    """Weight gradients of each model chunk summed over the micro-batches, or handed to `sink` (a
    distributed GradBuffer: `add(chunk, grads)` per micro-batch, `chunk_done(chunk)` after the last one,
    so it can start reducing that chunk while the schedule goes on)."""

    def __init__(self, chunks: int, num_microbatches: int, sink=None):
        self.totals: List[Optional[List[Tensor]]] = [None] * chunks
        self.counts = [0] * chunks
        self.m, self.sink = num_microbatches, sink

    def add(self, chunk: int, grads: List[Tensor]) -> None:
        if self.sink is None:
            self.totals[chunk] = _accumulate(self.totals[chunk], grads)
        else:
            self.sink.add(chunk, grads)
        self.counts[chunk] += 1
        if self.counts[chunk] == self.m and self.sink is not None:
            self.sink.chunk_done(chunk)

    def result(self) -> Optional[List[Tensor]]:
        """Gradients concatenated over chunks (None when a sink holds them)."""
        if self.sink is not None:
            return None
        return [g for total in self.totals for g in total]


def _loss_weight(loss_scale: float, num_microbatches: int, calculate_per_token_loss: bool) -> float:
    # Megatron divides each micro-batch's (mean) loss by the micro-batch count; a per-token loss (a sum
    # over tokens) is divided by the global batch's token count after the reduction instead.
    return loss_scale if calculate_per_token_loss else loss_scale / num_microbatches


def forward_backward_no_pipelining(step: Callable, batches: Iterator, params: Sequence, num_microbatches: int,
                                   loss_scale: float = 1.0, forward_only: bool = False, grad_sink=None,
                                   calculate_per_token_loss: bool = False, **_) -> ScheduleResult:
    """Micro-batch accumulation on one stage: loss / num_microbatches (the loss itself with
    `calculate_per_token_loss`), gradients summed."""
    runner = StageRunner(step, params, _loss_weight(loss_scale, num_microbatches, calculate_per_token_loss))
    losses, total = [], _GradSum(1, num_microbatches, grad_sink)
    for _ in range(num_microbatches):
        batch = next(batches)
        if forward_only:
            losses.append(runner.forward(batch, None))
            continue
        loss, _, grads = runner.loss_and_grads(batch, None)
        losses.append(loss)
        total.add(0, grads)
    return ScheduleResult(losses, None if forward_only else total.result(), 1)


def forward_backward_pipelining_without_interleaving(step: Callable, batches: Iterator, params: Sequence,
                                                     num_microbatches: int, tensor_shape: Sequence[int],
                                                     dtype=ms.float32, loss_scale: float = 1.0,
                                                     forward_only: bool = False, grad_sink=None,
                                                     calculate_per_token_loss: bool = False,
                                                     keep_stage_graphs: bool = True, **_) -> ScheduleResult:
    """1F1B: warm-up forwards, then one forward and one backward each step, then cool-down backwards.

    Stage r runs min(pp - r - 1, m) warm-up forwards, so it holds at most pp - r micro-batch inputs.
    """
    rank = ps.get_pipeline_model_parallel_rank()
    size = ps.get_pipeline_model_parallel_world_size()
    last = ps.is_pipeline_last_stage()
    runner = StageRunner(step, params, _loss_weight(loss_scale, num_microbatches, calculate_per_token_loss),
                         keep_stage_graphs)
    warmup = min(size - rank - 1, num_microbatches)
    steady = num_microbatches - warmup
    pending = collections.deque()  # what the backward of each micro-batch still to come needs
    losses: List[Tensor] = []
    total = _GradSum(1, num_microbatches, grad_sink)
    most = 0

    def forward_step(batch, x):
        """Forward one micro-batch; on the last stage also its backward (it needs nothing from later)."""
        if last and not forward_only:
            loss, gx, grads = runner.loss_and_grads(batch, x)
            losses.append(loss)
            total.add(0, grads)
            return None, gx
        if last or forward_only:
            out = runner.forward(batch, x)
            if last:
                losses.append(out)
            return (None if last else out), None
        out, held = runner.forward_for_backward(batch, x)
        pending.append(held)
        return out, None

    def backward_step(output_grad):
        gx, grads = runner.backward(pending.popleft(), output_grad)
        total.add(0, grads)
        return gx

    for _ in range(warmup):
        x = p2p.recv_forward(tensor_shape, dtype)
        batch = next(batches)
        out, _ = forward_step(batch, x)
        p2p.send_forward(out, dtype)
        if not forward_only:
            most = max(most, len(pending))
    x = p2p.recv_forward(tensor_shape, dtype) if steady > 0 else None
    for i in range(steady):
        final = i == steady - 1
        batch = next(batches)
        out, last_stage_gx = forward_step(batch, x)
        if forward_only:
            p2p.send_forward(out, dtype)
            if not final:
                x = p2p.recv_forward(tensor_shape, dtype)
            continue
        if last:
            gx = last_stage_gx  # the last stage did this micro-batch's backward already
            most = max(most, 1)
        else:
            most = max(most, len(pending))
            output_grad = p2p.send_forward_recv_backward(out, tensor_shape, dtype)
            gx = backward_step(output_grad)
        if final:
            p2p.send_backward(gx, dtype)
        else:
            x = p2p.send_backward_recv_forward(gx, tensor_shape, dtype)
    if not forward_only:
        for _ in range(warmup):
            output_grad = p2p.recv_backward(tensor_shape, dtype)
            p2p.send_backward(backward_step(output_grad), dtype)
    return ScheduleResult(losses, None if forward_only else total.result(), most)


def get_forward_backward_func() -> Callable:
    """The schedule for this layout: no pipelining, or 1F1B with pipeline stages."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return forward_backward_no_pipelining
    if ps.get_virtual_pipeline_model_parallel_world_size() is not None:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


def forward_backward_pipelining_with_interleaving(step: Callable, batches: Iterator, params: Sequence[Sequence],
                                                  num_microbatches: int, tensor_shape: Sequence[int],
                                                  dtype=ms.float32, loss_scale: float = 1.0,
                                                  forward_only: bool = False, grad_sink=None,
                                                  calculate_per_token_loss: bool = False,
                                                  keep_stage_graphs: bool = True, **_) -> ScheduleResult:
    """Interleaved 1F1B over v model chunks per rank (Megatron's virtual pipeline schedule).

    `params[c]` are chunk c's parameters and `step(batch, input_tensor, chunk=c)` its forward. Virtual
    micro-batch k runs forward on chunk (k // p) % v and backward on chunk v - 1 - (k // p) % v; the
    micro-batch count must be a multiple of the pipeline size p. Returns gradients concatenated over chunks.
    """
    p = ps.get_pipeline_model_parallel_world_size()
    v = len(params)
    rank = ps.get_pipeline_model_parallel_rank()
    if num_microbatches % p:
        raise ValueError(f"the interleaved schedule needs the number of micro-batches ({num_microbatches}) to be "
                         f"a multiple of --pipeline-model-parallel-size {p}; change --global-batch-size")
    total = num_microbatches * v
    first_rank, last_rank = rank == 0, rank == p - 1
    weight = _loss_weight(loss_scale, num_microbatches, calculate_per_token_loss)
    runners = [StageRunner(lambda b, x, c=c: step(b, x, chunk=c), params[c], weight, keep_stage_graphs)
               for c in range(v)]
    all_warmup = num_microbatches == p
    warmup = total if (forward_only or all_warmup) else min((p - rank - 1) * 2 + (v - 1) * p, total)
    steady = total - warmup
    inputs = [collections.deque() for _ in range(v)]   # what each backward to come needs, per chunk
    fresh = [collections.deque() for _ in range(v)]    # received inputs awaiting forward, per chunk
    out_grads = [collections.deque() for _ in range(v)]
    chunk_batches = [collections.deque() for _ in range(v)]
    losses: List[Tensor] = []
    totals = _GradSum(v, num_microbatches, grad_sink)
    most = 0

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    def is_first_virtual(c):
        return first_rank and c == 0

    def is_last_virtual(c):
        return last_rank and c == v - 1

    def forward_k(k: int):
        nonlocal most
        c = chunk_of(k, True)
        if c == 0:  # chunk 0 starts a new micro-batch; later chunks see the same ones in the same order
            batch = next(batches)
            for later in range(1, v):
                chunk_batches[later].append(batch)
        else:
            batch = chunk_batches[c].popleft()
        x = None if is_first_virtual(c) else fresh[c].popleft()
        if is_last_virtual(c) and not forward_only:
            loss, gx, grads = runners[c].loss_and_grads(batch, x)
            losses.append(loss)
            totals.add(c, grads)
            inputs[c].append(gx)  # backward already done: keep its input gradient
            most = max(most, sum(len(q) for q in inputs))
            return None
        if forward_only or is_last_virtual(c):
            out = runners[c].forward(batch, x)
            if is_last_virtual(c):
                losses.append(out)
                return None
            return out
        out, held = runners[c].forward_for_backward(batch, x)
        inputs[c].append(held)
        most = max(most, sum(len(q) for q in inputs))
        return out

    def backward_k(k: int):
        c = chunk_of(k, False)
        held = inputs[c].popleft()
        if is_last_virtual(c):
            gx = held
        else:
            gx, grads = runners[c].backward(held, out_grads[c].popleft())
            totals.add(c, grads)
        return None if is_first_virtual(c) else gx

    shape = tuple(tensor_shape)
    # The first chunk's input on rank 0 is the data; every other chunk receives from the previous rank.
    if not first_rank:
        fresh[0].append(p2p.exchange_with_both(None, None, True, False, shape, dtype)[0])
    for k in range(warmup):
        out = forward_k(k)
        next_c = chunk_of(k + 1, True)
        recv_prev = not (first_rank and next_c == 0) and k != total - 1
        recv_next = (k == warmup - 1 and not forward_only and not all_warmup and not last_rank)
        received, grad = p2p.exchange_with_both(out, None, recv_prev, recv_next, shape, dtype)
        if recv_prev:
            fresh[next_c].append(received)
        if recv_next:
            out_grads[v - 1].append(grad)
    for i in range(steady):
        fk, bk = i + warmup, i
        out = forward_k(fk)
        gx = backward_k(bk)
        if first_rank:
            nf = chunk_of(fk - (p - 1), True)
            recv_prev = nf != v - 1
            nf += 1
        else:
            nf = chunk_of(fk + 1, True)
            recv_prev = True
        if last_rank:
            nb = chunk_of(bk - (p - 1), False)
            recv_next = nb != 0
            nb -= 1
        else:
            nb = chunk_of(bk + 1, False)
            recv_next = True
        if i == steady - 1:
            recv_prev = False
        received, grad = p2p.exchange_with_both(out, gx, recv_prev, recv_next, shape, dtype)
        if recv_prev:
            fresh[nf].append(received)
        if recv_next:
            out_grads[nb].append(grad)
    if not forward_only:
        if all_warmup and not last_rank:
            out_grads[v - 1].append(p2p.exchange_with_both(None, None, False, True, shape, dtype)[1])
        for k in range(steady, total):
            gx = backward_k(k)
            nb = chunk_of(k + 1, False)
            recv_next = not (last_rank and nb == v - 1) and k != total - 1
            _, grad = p2p.exchange_with_both(None, gx, False, recv_next, shape, dtype)
            if recv_next:
                out_grads[nb].append(grad)
    return ScheduleResult(losses, None if forward_only else totals.result(), most)
