"""Megatron-LM checkpoints <-> mindtron checkpoints, with resharding to any tensor x pipeline layout."""
