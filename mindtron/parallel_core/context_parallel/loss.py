"""The masked mean loss when each context rank holds part of every sequence."""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Tensor, ops

from mindtron.parallel_core import comm
from mindtron.parallel_core import parallel_state as ps


def context_parallel_token_mean(losses: Tensor, loss_mask: Optional[Tensor]) -> Tensor:
    """cp x (this rank's masked loss sum) / (unmasked tokens over the context group).

    The gradients of parameters replicated over context ranks are averaged over dp x cp (the grad buffer's
    `dp-cp` group), so the factor cp makes their sum over the context ranks the gradient of the whole
    sequences' masked mean, with every unmasked token counted once whatever rank holds it; averaging the
    reported losses over dp x cp likewise gives the whole sequences' mean.
    """
    cp = ps.get_context_parallel_world_size()
    losses = losses.astype(ms.float32)
    if loss_mask is None:
        total = losses.sum()
        count = Tensor(float(losses.size * cp), ms.float32)
    else:
        mask = loss_mask.astype(ms.float32)
        total = (losses * mask).sum()
        count = ops.stop_gradient(comm.all_reduce(mask.sum().reshape(1), ps.get_context_parallel_group()))[0]
    return total * cp / count
