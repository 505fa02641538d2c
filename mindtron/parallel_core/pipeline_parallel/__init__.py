"""Pipeline parallelism: exchange between neighbouring stages and the micro-batch schedules."""
from mindtron.parallel_core.pipeline_parallel.schedules import (
    ScheduleResult, forward_backward_no_pipelining, forward_backward_pipelining_without_interleaving,
    get_forward_backward_func)
