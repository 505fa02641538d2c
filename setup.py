"""Install mindtron: `pip install -e ".[test]"`."""
from setuptools import find_packages, setup

MKL = "mkl; platform_machine == 'x86_64'"

setup(
    name="mindtron",
    version="0.1.0",
    description="Megatron-compatible parallel training for MindSpore in dynamic-graph (PyNative) mode",
    packages=find_packages(include=["mindtron", "mindtron.*"]),
    # Megatron-LM core_r0.19.0's flag table (mindtron/training/megatron_flags.py reads it)
    # and the C++ sources compiled on first use: the fused CPU kernels and the exit guard (parallel_core/cpu_kernels)
    package_data={"mindtron.training": ["megatron_flags_core_r0.19.tsv"],
                  "mindtron.parallel_core.cpu_kernels": ["kernels.cc", "teardown_guard.cc"]},
    python_requires=">=3.9",
    install_requires=[
        "mindspore==2.10.0",
        "numpy<2",  # MindSpore 2.10's extension modules are built against NumPy 1
        "pyyaml",
        "regex",
        "safetensors",
    ],
    # torch is optional: the converter reads Megatron's checkpoints without it, and imports it only to write
    # Megatron's torch_dist format (--target-format megatron-torch-dist, through torch.distributed.checkpoint)
    # or when asked to read with it (--reader torch); "torch" installs it for that. The tests build Megatron
    # checkpoints with the real torch.save and torch.distributed.checkpoint, pinned to the CPU build (+cpu
    # wheel: pip's index here, or --extra-index-url https://download.pytorch.org/whl/cpu elsewhere).
    # sentencepiece: --tokenizer-type SentencePieceTokenizer / GPTSentencePieceTokenizer / Llama2Tokenizer
    # (and their tests); transformers: --tokenizer-type HuggingFaceTokenizer.
    # monitor: TensorBoard event files (tensorboard's own writer and reader), W&B, tqdm progress bars.
    # plot: tools/moe_token_distribution.py's pictures (matplotlib).
    # mkl: Intel MKL for the CPU kernels' matrix products (about 12 % faster than numpy's OpenBLAS on the
    # linear layers' shapes; x86-64 only). Without it the products use numpy's OpenBLAS.
    extras_require={
        "test": ["pytest>=7", "torch==2.13.0", "sentencepiece", "tensorboard", "wandb", "tqdm", "matplotlib",
                 MKL],
        "plot": ["matplotlib"],
        "mkl": [MKL],
        "torch": ["torch>=2.6"],
        "monitor": ["tensorboard", "wandb", "tqdm"],
        "sentencepiece": ["sentencepiece"],
        "huggingface": ["transformers"],
    },
)
