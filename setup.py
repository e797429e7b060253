from setuptools import find_packages, setup

setup(
    name="tagmoe-dist",
    version="0.1.0",
    description="Task-aware Mixture-of-Experts (TAG-MoE) with expert-parallel dispatch for DeepSpeed and Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tagmoe_dist", "tagmoe_dist.*"]),
    # the native CPU kernel is compiled from source on first use (dispatch/native.py)
    package_data={"tagmoe_dist": ["kernels/csrc/*.c"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "PyYAML>=6", "tqdm"],
    extras_require={
        "deepspeed": ["deepspeed>=0.16", "tensorboard", "matplotlib"],
        "megatron": ["megatron-core>=0.12"],
        "hf": ["transformers>=4.45", "safetensors>=0.4"],
        # diffusers MMDiTs (Qwen-Image, Flux, SD3) with TAG-MoE FFNs: docs/diffusion.md
        "diffusion": ["diffusers>=0.42", "safetensors>=0.4"],
        "test": ["pytest>=8", "hypothesis>=6", "matplotlib"],
    },
)
