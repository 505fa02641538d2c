"""Megatron's entry point: parse the flags, build the tokenizer, start the runtime and process groups, seed."""
from __future__ import annotations

from typing import Callable, Optional

from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.parallel_core.runtime import init_runtime


def _tokenizer_flags_given(args) -> bool:
    return bool(args.tokenizer_type or args.vocab_file or args.vocab_size is not None or args.tokenizer_model)


def initialize_megatron(extra_args_provider: Optional[Callable] = None, args_defaults: Optional[dict] = None,
                        ignore_unknown_args: bool = False, args: Optional[list] = None):
    """Parse `sys.argv` (or `args`) with Megatron's flags (`args_defaults` fill what the user left unset), build
    the tokenizer the flags name (which fixes the padded vocabulary), then set up PyNative mode, the process
    groups and the seeds. Returns the parsed arguments (also available from get_args())."""
    from mindtron.data.tokenizers import build_tokenizer
    from mindtron.training.arguments import parse_args, set_args

    parsed = parse_args(extra_args_provider, ignore_unknown_args, args=args, args_defaults=args_defaults)
    if _tokenizer_flags_given(parsed):
        build_tokenizer(parsed)
    set_args(parsed)
    init_runtime()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(parsed.tensor_model_parallel_size, parsed.pipeline_model_parallel_size,
                                     parsed.virtual_pipeline_model_parallel_size, parsed.context_parallel_size,
                                     parsed.expert_model_parallel_size,
                                     expert_tensor_parallel_size=getattr(parsed, "expert_tensor_parallel_size", None))
    tp.model_parallel_seed(parsed.seed)
    return parsed
