"""Megatron-LM checkpoints (torch and torch_dist formats, dense or Mixture-of-Experts) <-> mindtron checkpoints,
with resharding to any tensor x pipeline x expert parallel layout.

    python -m mindtron.convert --load-dir megatron_ckpt --save-dir mindtron_ckpt \
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 1 --target-expert-parallel-size 2 --verify

Modules, one job each:
    safe_pickle      unpickling without running anything: allowed data constructors, inert placeholders, refusals
    torch_reader     torch.save files read without PyTorch and without running pickled code
    torch_writer     torch.save files written without PyTorch (Megatron outputs)
    dcp_reader       PyTorch Distributed Checkpoint directories (.metadata, *.distcp) read without PyTorch
    names            canonical tensor names, the shapes the model settings predict, per-expert pieces stacked
    names_legacy     Megatron legacy state dicts <-> canonical names (old and new spellings)
    names_core       Megatron-Core state dicts <-> canonical names (local and Transformer Engine layers, MoE experts)
    names_dist       torch_dist's layer-stacked keys <-> per-layer (and per-expert) Megatron-Core keys
    qkv_order        fused QKV row orders of checkpoint versions 0 and 1
    spec             model settings from stored arguments and command-line overrides
    shards           tensor- and expert-parallel merge/split, vocabulary re-padding, pipeline stage plans
    model_state      assembling shards into the whole model, and checking it against the settings
    megatron_source  reading Megatron-LM checkpoint directories (torch format)
    megatron_dist    reading Megatron-LM checkpoint directories in the torch_dist format
    mindtron_format  reading and writing mindtron checkpoints
    megatron_writer  writing Megatron-LM torch-format checkpoints (legacy or Megatron-Core names; no PyTorch)
    megatron_dist_writer  writing Megatron-Core torch_dist checkpoints (through PyTorch's DCP)
    verify           logits of the converted model against a float64 forward pass of the source weights
    converter, cli   one conversion; the command line
"""
from mindtron.convert.converter import convert_checkpoint, read_checkpoint, write_checkpoint
from mindtron.convert.model_state import FullCheckpoint
from mindtron.convert.report import ConversionReport
from mindtron.convert.torch_reader import (CheckpointFormatError, UnsafeCheckpointError, load_torch_file,
                                           read_torch_file)
from mindtron.convert.torch_writer import write_torch_file

__all__ = ["convert_checkpoint", "read_checkpoint", "write_checkpoint", "FullCheckpoint", "ConversionReport",
           "CheckpointFormatError", "UnsafeCheckpointError", "load_torch_file", "read_torch_file", "write_torch_file"]
