"""Installs jaxrlhf: `pip install -e .` (library) or `pip install -e .[test]` (plus tests)."""
from setuptools import find_packages, setup

setup(
    name="jaxrlhf",
    version="0.1.0",
    description="The InstructGPT RLHF recipe (SFT, K-wise reward models, PPO-ptx) in JAX/Flax NNX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["jaxrlhf", "jaxrlhf.*"]),
    install_requires=[
        "jax>=0.7,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "chex>=0.1.90,<0.2",
        "ml_collections>=1.0,<2",
        "absl-py>=2.0,<3",
        "transformers>=4.50,<6",
        "datasets>=3.0,<6",
        "safetensors>=0.4,<1",
        "tokenizers>=0.20,<1",
        "jinja2>=3.1,<4",          # HF chat templates
        "numpy>=1.26,<3",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        # Accelerator builds of jax (same version bounds as install_requires): NVIDIA GPUs
        # with a CUDA 12 driver (>= 525; Colab, most hosts) or CUDA 13 (>= 580), Cloud TPU VMs.
        "cuda": ["jax[cuda12]>=0.7,<0.13"],
        "cuda12": ["jax[cuda12]>=0.7,<0.13"],
        "cuda13": ["jax[cuda13]>=0.7,<0.13"],
        "tpu": ["jax[tpu]>=0.7,<0.13"],
        # A workdir in a Google Cloud Storage bucket (gs://...), read and written through
        # fsspec (jaxrlhf.paths); orbax checkpoints there use tensorstore's own GCS driver.
        "gcs": ["gcsfs>=2024.2"],
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",
            "hypothesis>=6.100,<7",
        ],
    },
)
