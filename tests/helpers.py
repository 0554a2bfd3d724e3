"""Small models and subprocess helpers shared by the tests."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet, unet_config

# Imported first in a child interpreter, this makes `import ddpm_hf` fail as if the package were not installed.
BLOCK_DDPM_HF = textwrap.dedent("""
    import importlib.abc, sys
    class _NoDDPMHF(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ddpm_hf" or name.startswith("ddpm_hf."):
                raise ModuleNotFoundError("No module named 'ddpm_hf' (blocked by the test)")
            return None
    sys.meta_path.insert(0, _NoDDPMHF())
""")


def tiny_pipeline(seed: int = 0, num_train_timesteps: int = 20, **scheduler_kwargs) -> DDPMPipeline:
    """A 176 k-parameter 16×16 U-Net with random weights and a short chain: samples in well under a second."""
    torch.manual_seed(seed)
    unet = DDPMUNet(**unet_config("tiny-16")).eval()
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, **scheduler_kwargs)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_np(pipe, seed: int = 0, batch_size: int = 2):
    return pipe(batch_size=batch_size, generator=torch.Generator().manual_seed(seed),
                num_inference_steps=pipe.scheduler.config.num_train_timesteps, output_type="np").images


def run_without_ddpm_hf(code: str, cwd: Path, env: dict = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which ddpm_hf cannot be imported; raise with its output on failure."""
    script = BLOCK_DDPM_HF + "\n" + textwrap.dedent(code)
    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=full_env, capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"child failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
