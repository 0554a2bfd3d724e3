"""Untrusted files and names: pickles that run code, code files in a pipeline folder, repo ids and revisions that
try to leave the cache. Each payload would create a marker file if it ever ran; none may."""

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import HFValidationError

from helpers import run_without_ddpm_hf, tiny_pipeline

from ddpm_hf import DDPMPipeline

ALICE = "hf_test_alice"


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: any code execution leaves the marker behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_never_run_code(tmp_path):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": _Payload(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle file, which can run arbitrary code.*allow_pickle=True"):
        DDPMPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="diffusion_pytorch_model.bin"):  # allowed, but loaded with weights_only
        DDPMPipeline.from_pretrained(folder, allow_pickle=True)
    assert not marker.exists()


def _folder_with_code(tmp_path: Path, marker: Path) -> Path:
    """A pipeline folder whose model_index.json names modules of its own that create ``marker`` when imported."""
    folder = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(folder)
    payload = f"open({str(marker)!r}, 'w').close()\n"
    (folder / "pipeline_evil.py").write_text(payload + "from diffusers import DiffusionPipeline as DDPMPipeline\n")
    (folder / "scheduler" / "scheduling_evil.py").write_text(payload + "from diffusers import DDPMScheduler\n")
    index = json.loads((folder / "model_index.json").read_text())
    index.update({"_class_name": ["pipeline_evil", "DDPMPipeline"], "scheduler": ["scheduling_evil", "DDPMScheduler"],
                  "../../escape": ["os", "system"]})
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_code_in_a_pipeline_folder_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    folder = _folder_with_code(tmp_path, marker)
    # a component besides the unet and the scheduler: not a DDPM pipeline, refused without reading it
    with pytest.raises(ValueError, match=r"has the components \['\.\./\.\./escape'\] too: not a pixel-space DDPM"):
        DDPMPipeline.from_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    del index["../../escape"]
    (folder / "model_index.json").write_text(json.dumps(index))
    for kwargs in ({}, {"trust_remote_code": True}):  # ddpm_hf imports nothing from a folder, trusted or not
        pipe = DDPMPipeline.from_pretrained(folder, **kwargs)
        assert type(pipe).__module__.startswith("ddpm_hf") and type(pipe.scheduler).__module__.startswith("ddpm_hf")
    assert not marker.exists()

    # diffusers itself, without ddpm_hf, refuses the folder's code unless trust_remote_code=True
    result = run_without_ddpm_hf(f"""
        from diffusers import DiffusionPipeline
        try:
            DiffusionPipeline.from_pretrained({str(folder)!r})
        except Exception as err:
            print("refused:", type(err).__name__, err)
    """, cwd=tmp_path)
    assert "refused" in result.stdout and "trust_remote_code" in result.stdout, result.stdout
    assert not marker.exists()


@pytest.mark.parametrize("name", [
    "../pipe", "alice/..", "alice/x/../../y", "~alice/x", "alice/x;touch PWNED", "alice/x\nnewline",
    "alice/\u202emodel", "a" * 200 + "/b", "http://evil.example/x", "alice//x", "/absolute/not/here",
    "C:\\models\\x", "alice/x y", "-rf/x",
])
def test_odd_names_are_refused_without_touching_the_network_or_the_disk(hub, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="neither an existing folder nor a valid Hub repo id"):
        DDPMPipeline.from_pretrained(name, cache_dir=cache)
    assert hub.log == [] and os.listdir(tmp_path) == []  # no request, no cache folder, no file


@pytest.mark.parametrize("name, error, words", [
    ("", ValueError, "the pipeline name is empty"), ("..", FileNotFoundError, "missing ../model_index.json"),
    (".", FileNotFoundError, "missing model_index.json"),
])
def test_existing_folders_that_are_not_pipelines_are_named(hub, name, error, words):
    with pytest.raises(error, match=words) as raised:
        DDPMPipeline.from_pretrained(name)
    assert type(raised.value) is error  # this class itself: pytest.raises would also accept a subclass
    assert hub.log == []


def test_a_revision_cannot_leave_the_cache(hub, tmp_path):
    pipe = tiny_pipeline()
    pipe.push_to_hub("alice/ok", token=ALICE, sample_grid=pipe(batch_size=1, num_inference_steps=2).images[0])
    escape = tmp_path / "escaped"
    cache = tmp_path / "cache"
    relative = os.path.relpath(escape, cache / "models--alice--ok" / "refs")
    with pytest.raises(OSError, match="could not get alice/ok"):
        DDPMPipeline.from_pretrained("alice/ok", revision=relative, cache_dir=cache)
    assert not escape.exists()
    assert all(cache in p.parents for p in cache.rglob("*"))


def test_local_paths_with_dots_are_the_users_own(tmp_path, monkeypatch):
    tiny_pipeline().save_pretrained(tmp_path / "models" / "pipe")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert DDPMPipeline.from_pretrained("../models/pipe").unet.config.sample_size == 16


def test_push_to_a_malformed_repo_id_sends_nothing(hub):
    pipe = tiny_pipeline()
    grid = pipe(batch_size=1, num_inference_steps=2).images[0]
    # huggingface_hub's own repo-id check refuses them, before any request
    for repo_id in ("../alice", "alice/../bob/x", "alice/x?y"):
        with pytest.raises(HFValidationError, match=rf"^Repo id must .*: {re.escape(repr(repo_id))}") as refused:
            pipe.push_to_hub(repo_id, token=ALICE, sample_grid=grid)
        assert isinstance(refused.value, ValueError)  # what a caller of push_to_hub catches
    assert hub.log == [] and hub.repos == {}


def test_the_marker_mechanism_works(tmp_path):
    # The payloads above are real: unpickled without weights_only, this one does create its marker.
    marker = tmp_path / "PWNED"
    torch.save(_Payload(marker), tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert marker.exists()
    code = textwrap.dedent(f"open({str(tmp_path / 'PWNED2')!r}, 'w').close()")
    exec(compile(code, "payload", "exec"))
    assert (tmp_path / "PWNED2").exists()
