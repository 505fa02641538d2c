"""`--exit-signal-handler`: stop cleanly when the cluster scheduler asks (SIGTERM, or `--exit-signal`).

The handler only notes that the signal arrived; the training loop asks `any_rank_received()` after each
iteration, which sums every rank's flag in one all-reduce, so all ranks agree on the same iteration to stop
at even when the signal reached only some of them (Megatron's DistributedSignalHandler gathers the flags
the same way). The loop then saves a checkpoint (with `--save`) and returns normally, so the job exits 0.

Under msrun the workers run in their own process groups: a signal sent to the launcher's process group
does not reach them. `examples/gpt/pretrain_gpt.sh` forwards it to the workers of its msrun.
"""
from __future__ import annotations

import signal
import numpy as np

__all__ = ["DistributedSignalHandler"]


class DistributedSignalHandler:
    """Catches `sig` in this process while active (a context manager, as in Megatron)."""

    def __init__(self, sig: int = signal.SIGTERM):
        self.sig = signal.Signals(sig)
        self.received = False
        self._previous = None
        self._active = False

    def __enter__(self) -> "DistributedSignalHandler":
        self.received = False
        self._previous = signal.getsignal(self.sig)
        signal.signal(self.sig, self._handle)
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _handle(self, signum, frame) -> None:
        if not self.received:
            print(f"received {signal.Signals(signum).name}: finishing this iteration, then saving and exiting",
                  flush=True)
        self.received = True

    def release(self) -> bool:
        """Restore the previous handler; False if already released."""
        if not self._active:
            return False
        signal.signal(self.sig, self._previous)
        self._active = False
        return True

    def any_rank_received(self, group=None) -> bool:
        """True on every rank when some rank of `group` (default: the job) got the signal. Collective."""
        from mindspore import Tensor
        from mindtron.parallel_core import comm

        flag = Tensor(np.array([1.0 if self.received else 0.0], np.float32))
        return float(comm.all_reduce(flag, group).asnumpy()[0]) > 0.0

