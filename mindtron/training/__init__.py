"""Training: Megatron's arguments and configs, initialisation, the pretrain() loop, checkpoints, logging."""
from mindtron.training.config import AllConfig, DatasetConfig, OptimizerConfig, ParallelConfig, TrainingConfig
from mindtron.training.initialize import initialize_megatron
from mindtron.training.training import Trainer, build_model, pretrain


def __getattr__(name):
    # The argument layer is imported lazily: building configs in code should not need the flag table.
    if name in ("parse_args", "get_args", "set_args", "init_configs_from_args"):
        from mindtron.training import arguments

        return getattr(arguments, name)
    raise AttributeError(name)
