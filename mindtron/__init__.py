"""mindtron: Megatron-compatible parallel training for MindSpore in dynamic-graph (PyNative) mode."""

__version__ = "0.1.0"
