"""Install mindtron: `pip install -e ".[test]"`."""
from setuptools import find_packages, setup

setup(
    name="mindtron",
    version="0.1.0",
    description="Megatron-compatible parallel training for MindSpore in dynamic-graph (PyNative) mode",
    packages=find_packages(include=["mindtron", "mindtron.*"]),
    python_requires=">=3.9",
    install_requires=[
        "mindspore==2.10.0",
        "numpy<2",  # MindSpore 2.10's extension modules are built against NumPy 1
        "pyyaml",
        "regex",
        "safetensors",
    ],
    # torch is test-only: the converter tests build Megatron checkpoints with the real torch.save (the
    # library never imports it). Pinned to the CPU build (+cpu wheel: pip's index here, or
    # --extra-index-url https://download.pytorch.org/whl/cpu elsewhere).
    # monitor: TensorBoard event files (tensorboard's own writer and reader), W&B, tqdm progress bars.
    extras_require={
        "monitor": ["tensorboard", "wandb", "tqdm"],
        "test": ["pytest>=7", "torch==2.13.0", "tensorboard", "wandb", "tqdm"],
    },
)
