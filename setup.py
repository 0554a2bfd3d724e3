import ast
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
# __version__ and MINIMUM_VERSIONS of ddpm_hf/__init__.py, read without importing the package
assigned = {node.targets[0].id: ast.literal_eval(node.value)
            for node in ast.parse((ROOT / "ddpm_hf" / "__init__.py").read_text()).body
            if isinstance(node, ast.Assign)
            and getattr(node.targets[0], "id", None) in ("__version__", "MINIMUM_VERSIONS")}

setup(
    name="ddpm-hf",
    version=assigned["__version__"],
    description="Denoising Diffusion Probabilistic Models (Ho et al. 2020) for the Hugging Face ecosystem: "
    "diffusers-compatible scheduler, U-Net and pipeline, accelerate training, bits/dim and FID evaluation.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",  # 3.10 is past its end of life (2026-10); the newest diffusers and transformers need 3.11
    # The top-level folders show the architecture (library, pipelines, training script); all install under ddpm_hf.
    packages=["ddpm_hf", "ddpm_hf.data", "ddpm_hf.pipelines"],
    package_dir={"ddpm_hf": "ddpm_hf", "ddpm_hf.pipelines": "pipelines"},
    package_data={"ddpm_hf": ["embedded/fashion_mnist/README.md", "embedded/fashion_mnist/data/*.parquet",
                              "assets/*.safetensors"]},
    # the floors' reasons are in ddpm_hf/__init__.py
    install_requires=[f"{name}>={least}" for name, least in assigned["MINIMUM_VERSIONS"].items()] + [
        "packaging", "safetensors", "tqdm", "numpy", "tensorboard",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis", "torchmetrics>=1.0", "scipy", "matplotlib"],
        "metrics": ["torchmetrics>=1.0", "scipy", "matplotlib"],
    },
    entry_points={"console_scripts": ["ddpm-hf=ddpm_hf.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
