from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
version = {}
for line in (ROOT / "ddpm_hf" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="ddpm-hf",
    version=version["__version__"],
    description="Denoising Diffusion Probabilistic Models (Ho et al. 2020) for the Hugging Face ecosystem: "
    "diffusers-compatible scheduler, U-Net and pipeline, accelerate training, bits/dim and FID evaluation.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The top-level folders show the architecture (library, pipelines, training script); all install under ddpm_hf.
    packages=["ddpm_hf", "ddpm_hf.data", "ddpm_hf.pipelines"],
    package_dir={"ddpm_hf": "ddpm_hf", "ddpm_hf.pipelines": "pipelines"},
    package_data={"ddpm_hf": ["embedded/fashion_mnist/README.md", "embedded/fashion_mnist/data/*.parquet",
                              "assets/*.safetensors"]},
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.30",
        "transformers",
        "accelerate>=0.30",
        "datasets>=2.19",
        # 24 and older abort at exit after a parquet scan left part-way (ddpm_hf.data.sources.without_exit_pause)
        "pyarrow>=25",
        "huggingface_hub>=1.0",  # set_client_factory (the upload timeout) arrived with 1.0's httpx client
        "safetensors",
        "tqdm",
        "Pillow>=10.3",  # 16-bit grey PNGs open as I;16 (scaled to 8 bits, see ddpm_hf.data.decoding)
        "numpy",
        "tensorboard",
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
