"""The `convert` command: python -m mindtron.convert --load-dir SRC --save-dir DST [options] [model flags].

Model flags use Megatron's names (--num-layers, --num-query-groups, --swiglu, --disable-bias-linear, ...)
and override what the checkpoint stored; --true-vocab-size re-pads the vocabulary for the target layout.
Errors a user can fix are printed as one message (exit status 1), without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from mindtron.convert.converter import SOURCE_FORMATS, TARGET_FORMATS, convert_checkpoint
from mindtron.convert.spec import parse_overrides, suggest_flag
from mindtron.convert.torch_reader import CheckpointFormatError, UnsafeCheckpointError


def build_parser() -> argparse.ArgumentParser:
    """The converter's own options (model flags are parsed separately, by Megatron's flag table)."""
    p = argparse.ArgumentParser(
        prog="python -m mindtron.convert", allow_abbrev=False,
        description="Convert Megatron-LM checkpoints (legacy or Megatron-Core models, with Mixture-of-Experts; torch "
                    "or torch_dist format) to mindtron checkpoints and back, for any tensor x pipeline x expert "
                    "parallel layout. Megatron's model flags (--num-layers, --swiglu, --num-experts, ...) override "
                    "the checkpoint's stored arguments.")
    p.add_argument("--load-dir", "--load", dest="load_dir", required=True, help="checkpoint directory to read")
    p.add_argument("--save-dir", "--save", dest="save_dir", required=True, help="directory to write")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1, help="tensor-parallel size of the output")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, help="pipeline stages of the output")
    p.add_argument("--target-expert-parallel-size", type=int, default=1,
                   help="expert-parallel size of the output (MoE models; Megatron's converter's name)")
    p.add_argument("--target-expert-tensor-parallel-size", type=int, default=None,
                   help="expert tensor-parallel size of the output (default: the target tensor-parallel size, as "
                        "Megatron's --expert-tensor-parallel-size)")
    p.add_argument("--target-num-layer-list", default=None,
                   help="uneven layers per output stage, comma separated (mindtron output only), e.g. 3,1")
    p.add_argument("--source-format", choices=SOURCE_FORMATS, default="auto",
                   help="how the source names its tensors (default: detected)")
    p.add_argument("--target-format", choices=TARGET_FORMATS, default="mindtron",
                   help="mindtron (default), megatron-legacy (Megatron-LM's legacy model, torch format), "
                        "megatron-core (Megatron-Core names, torch format) or megatron-torch-dist (Megatron-Core, "
                        "torch_dist format; needs PyTorch)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: the tracker's)")
    p.add_argument("--verify", action="store_true",
                   help="load the result into GPTModel and compare its logits with the source weights'")
    p.add_argument("--verify-tolerance", type=float, default=1e-4, help="largest relative logit difference")
    p.add_argument("--reader", choices=("auto", "python", "torch"), default="auto",
                   help="how torch.save files are read: mindtron's safe reader, or PyTorch if installed")
    p.add_argument("--megatron-release", action="store_true",
                   help="with a megatron target format: write the 'release' directory (Megatron loads it "
                        "without optimizer and RNG state)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _layer_list(text: Optional[str]) -> Optional[List[int]]:
    if not text:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--target-num-layer-list {text!r} should be comma-separated layer counts, e.g. 3,1") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status."""
    parser = build_parser()
    options, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        overrides, ignored, unknown = parse_overrides(rest)
        if unknown:
            own = [o for a in parser._actions for o in a.option_strings]  # noqa: SLF001
            problems = "; ".join(f"{u}{suggest_flag(u, own)}" for u in unknown)
            raise ValueError(f"unknown argument(s): {problems}")
        if ignored:
            print(f"note: {', '.join(ignored)} do(es) not describe the model and are ignored by the converter",
                  file=sys.stderr)
        report = convert_checkpoint(
            options.load_dir, options.save_dir, options.target_tensor_parallel_size,
            options.target_pipeline_parallel_size, options.source_format, options.target_format, overrides,
            options.iteration, options.verify, options.reader, _layer_list(options.target_num_layer_list),
            options.megatron_release, options.verify_tolerance, show_progress=not options.no_progress,
            target_ep=options.target_expert_parallel_size, target_etp=options.target_expert_tensor_parallel_size)
    except (ValueError, FileNotFoundError, CheckpointFormatError, UnsafeCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
