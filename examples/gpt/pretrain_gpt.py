"""Pretrain a GPT with Megatron's flags on mindtron (document 002's pretrain_gpt.py flow).

    bash examples/gpt/pretrain_gpt.sh                 # tiny GPT on CPU from the bundled corpus (quick start)
    msrun ... examples/gpt/pretrain_gpt.py --num-layers 24 --hidden-size 1024 ... --data-path my_text_document

Any Megatron flag is accepted; `--config path.yaml` loads document 002's YAML layout (flags still win).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from mindtron.data.builders import build_gpt_datasets  # noqa: E402
from mindtron.legacy_model import GPTModel  # noqa: E402
from mindtron.training import get_args, init_configs_from_args, initialize_megatron, pretrain  # noqa: E402

# A tiny GPT that trains in about a minute on two CPU cores; any flag on the command line overrides these.
TINY_DEFAULTS = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
    "max_position_embeddings": 64, "micro_batch_size": 4, "train_iters": 100, "lr": 2e-3,
}


def model_provider_func(pre_process=True, post_process=True):
    """GPTModel for one pipeline stage (the first stage embeds, the last one holds the output head)."""
    return GPTModel(init_configs_from_args(get_args()).model_config, pre_process=pre_process,
                    post_process=post_process)


def train_valid_test_datasets_provider(num_samples):
    """Train/valid/test GPT datasets with the sample counts pretrain() asks for (--data-path, the per-split
    paths or --mock-data)."""
    return build_gpt_datasets(get_args(), num_samples)


def main():
    initialize_megatron(args_defaults=TINY_DEFAULTS)  # parses flags, builds the tokenizer, process groups
    all_config = init_configs_from_args(get_args())
    pretrain(train_valid_test_datasets_provider, model_provider_func, model_type=None, forward_step_func=None,
             process_non_loss_data_func=None, extra_args_provider=None, all_config=all_config,
             train_data_loader=None, get_batch_func=None, args_defaults={})


if __name__ == "__main__":
    main()
