"""Megatron's entry point: parse the flags, start the runtime and process groups, seed everything."""
from __future__ import annotations

from typing import Callable, Optional

from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.runtime import init_runtime


def initialize_megatron(extra_args_provider: Optional[Callable] = None, args_defaults: Optional[dict] = None,
                        ignore_unknown_args: bool = False, args: Optional[list] = None):
    """Parse `sys.argv` (or `args`) with Megatron's flags, then set up PyNative mode, the process groups and
    the seeds. Returns the parsed arguments (also available from get_args())."""
    from mindtron.training.arguments import parse_args, set_args

    parsed = parse_args(extra_args_provider, ignore_unknown_args, args=args)
    for key, value in (args_defaults or {}).items():
        if getattr(parsed, key, None) is None:  # Megatron: defaults fill only what the user left unset
            setattr(parsed, key, value)
    set_args(parsed)
    init_runtime()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(parsed.tensor_model_parallel_size, parsed.pipeline_model_parallel_size,
                                     parsed.virtual_pipeline_model_parallel_size, parsed.context_parallel_size,
                                     parsed.expert_model_parallel_size)
    tp.model_parallel_seed(parsed.seed)
    return parsed
