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
    extras_require={"test": ["pytest>=7"]},
)
