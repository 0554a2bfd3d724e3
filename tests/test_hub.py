"""Publishing and loading through a Hub-compatible HTTP server on 127.0.0.1 (tests/fakehub.py), with the unmodified
huggingface_hub client over real HTTP."""

import logging
import re

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from ddpm_hf import DDPMPipeline
from helpers import run_without_ddpm_hf, sample_np, tiny_pipeline

ALICE, BOB = "hf_test_alice", "hf_test_bob"
pytestmark = pytest.mark.hub


def _push(pipe, repo_id, **kwargs):
    kwargs.setdefault("token", ALICE)
    return pipe.push_to_hub(repo_id, grid_size=2, **kwargs)


def test_push_then_load_with_ddpm_hf_and_plain_diffusers(hub, tmp_path):
    pipe = tiny_pipeline(variance_type="fixed_large")
    _push(pipe, "alice/tiny-ddpm", datasets=["fashion_mnist"], training_config={"learning_rate": 2e-4},
          evaluation={"bits/dim": 4.2})
    files = set(HfApi().list_repo_files("alice/tiny-ddpm"))
    assert files == {".gitattributes", "README.md", "samples.png", "model_index.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"}
    card = hub.repos["alice/tiny-ddpm"].files("main")[1]["README.md"].decode()
    for needle in ("library_name: diffusers", "pipeline_tag: unconditional-image-generation", "license: apache-2.0",
                   "- \"fashion_mnist\"", "| learning_rate | 0.0002 |", "| bits/dim | 4.2 |", "![samples](samples.png)",
                   'DDPMPipeline.from_pretrained("alice/tiny-ddpm")', "DiffusionPipeline.from_pretrained(repo_id)",
                   "Keep that pipeline in float32", "U-Net ε-predictor"):
        assert needle in card, needle
    # the card's usage code runs as written, for a model of 20 diffusion steps: plain diffusers, then ddpm_hf
    usage = [block.split("```")[0] for block in card.split("```python\n")[1:]]
    assert len(usage) == 2 and "num_inference_steps=20" in usage[0]
    run_without_ddpm_hf(usage[0], cwd=tmp_path)
    exec(usage[1], {})

    expected = sample_np(pipe)
    loaded = DDPMPipeline.from_pretrained("alice/tiny-ddpm", cache_dir=tmp_path / "cache1")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample_np(loaded), expected, rtol=0, atol=1e-5)
    run_without_ddpm_hf(f"""
        import numpy, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained("alice/tiny-ddpm", cache_dir={str(tmp_path / 'cache2')!r})
        pipe.set_progress_bar_config(disable=True)
        numpy.save("out.npy", pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
                                   output_type="np").images)
    """, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=0, atol=1e-5)


def test_a_repo_name_without_namespace_is_pushed_to_the_tokens_account(hub, tmp_path):
    """push_to_hub("name"), as diffusers' own takes it: alice's "alice/name", its card naming that repo (the upload
    used the bare name and failed after creating the repo empty)."""
    _push(tiny_pipeline(), "bare-name")
    files = hub.repos["alice/bare-name"].files("main")[1]
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert 'DDPMPipeline.from_pretrained("alice/bare-name")' in files["README.md"].decode()


def test_remote_code_layout_through_the_hub(hub, tmp_path):
    pipe = tiny_pipeline(variance_type="fixed_large_log")
    _push(pipe, "alice/remote-ddpm")
    card = hub.repos["alice/remote-ddpm"].files("main")[1]["README.md"].decode()
    assert "trust_remote_code=True" in card and "Keep that pipeline in float32" not in card  # remote code: ours
    expected = sample_np(pipe)
    run_without_ddpm_hf(f"""
        import numpy, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained("alice/remote-ddpm", trust_remote_code=True,
                                                 cache_dir={str(tmp_path / 'cache')!r})
        pipe.set_progress_bar_config(disable=True)
        numpy.save("out.npy", pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
                                   output_type="np").images)
    """, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=0, atol=1e-5)
    loaded = DDPMPipeline.from_pretrained("alice/remote-ddpm", cache_dir=tmp_path / "ours")
    assert loaded.scheduler.config.variance_type == "fixed_large_log"
    # a plain pipeline pushed over it: the remote code goes (diffusers would still find it, and the card would lie);
    # the user's own files stay
    for path in ("handler.py", "unet/NOTES.md"):
        HfApi(token=ALICE).upload_file(path_or_fileobj=b"# the user's\n", path_in_repo=path,
                                       repo_id="alice/remote-ddpm")
    _push(tiny_pipeline(), "alice/remote-ddpm")
    plain = {".gitattributes", "README.md", "model_index.json", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "handler.py",
             "unet/NOTES.md"}
    assert set(HfApi().list_repo_files("alice/remote-ddpm")) == plain | {"samples.png"}
    _push(tiny_pipeline(), "alice/remote-ddpm", sample_grid=False)  # no grid (it did not fit): not the last one's
    assert set(HfApi().list_repo_files("alice/remote-ddpm")) == plain


def test_diffusers_loading_arguments_are_taken_or_refused_saying_why(hub, tmp_path):
    """diffusers users pass use_safetensors=True, low_cpu_mem_usage, force_download, ...: taken where they mean
    something here (force_download downloads the weights again), refused with the reason where they would be ignored,
    never a TypeError naming an internal function."""
    pipe = tiny_pipeline()
    _push(pipe, "alice/args")
    cache = tmp_path / "cache"

    def weights_downloads():
        return sum(1 for method, path, _, _ in hub.log if method == "GET" and path.endswith(".safetensors"))

    loaded = DDPMPipeline.from_pretrained("alice/args", cache_dir=cache, use_safetensors=True, low_cpu_mem_usage=True,
                                          proxies=None, device_map=None, subfolder=None, variant=None)
    np.testing.assert_allclose(sample_np(loaded), sample_np(pipe), rtol=0, atol=0)
    before = weights_downloads()
    DDPMPipeline.from_pretrained("alice/args", cache_dir=cache)
    assert weights_downloads() == before  # from the cache
    DDPMPipeline.from_pretrained("alice/args", cache_dir=cache, force_download=True)
    assert weights_downloads() == before + 1
    for kwargs, said in [({"variant": "fp16"}, "variant='fp16'): ddpm_hf saves one float32 file, no variants"),
                         ({"device_map": "cuda"}, "pipe.to(device)"),
                         ({"use_safetensors": False}, "add allow_pickle=True if you trust them"),
                         ({"subfolder": "unet"}, "pass the folder that holds model_index.json"),
                         ({"revison": "main"}, "got an argument it does not take: revison; it takes ")]:
        with pytest.raises(ValueError, match=re.escape(said)):
            DDPMPipeline.from_pretrained("alice/args", cache_dir=cache, **kwargs)


def test_private_repo(hub, tmp_path):
    _push(tiny_pipeline(), "alice/secret", private=True)
    assert hub.repos["alice/secret"].private
    # The Hub answers 401 without a token and 404 to another user (it does not confirm that the repo exists);
    # the loader turns both into one OSError that names the repo and keeps the Hub's error as its cause.
    refused = rf"^could not get alice/secret \(revision main\) from {re.escape(hub.url)}: RepositoryNotFoundError: "
    with pytest.raises(OSError, match=refused + "401 Client Error") as anonymous:
        DDPMPipeline.from_pretrained("alice/secret", cache_dir=tmp_path / "a", token=False)
    assert "secret" in str(anonymous.value) or "401" in str(anonymous.value)
    assert isinstance(anonymous.value.__cause__, RepositoryNotFoundError)
    assert anonymous.value.__cause__.response.status_code == 401
    with pytest.raises(OSError, match=refused + "404 Client Error") as foreign:
        DDPMPipeline.from_pretrained("alice/secret", cache_dir=tmp_path / "b", token=BOB)
    assert isinstance(foreign.value.__cause__, RepositoryNotFoundError)
    assert foreign.value.__cause__.response.status_code == 404 and BOB not in str(foreign.value)
    owner = DDPMPipeline.from_pretrained("alice/secret", cache_dir=tmp_path / "c", token=ALICE)
    assert owner.unet.config.sample_size == 16


def test_writes_without_rights_fail_cleanly_and_never_show_the_token(hub, caplog):
    """Refused before the grid is sampled (minutes of the full chain on a CPU): creating the repo does not tell, an
    existing repo of another account is "created" all the same, and the upload's 403 came after the sampling."""
    pipe = tiny_pipeline()
    _push(pipe, "alice/guarded")
    before = list(hub.repos["alice/guarded"].history)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ValueError, match="Cannot use `token=False` with `whoami`") as no_token:
        _push(tiny_pipeline(seed=1), "alice/guarded", token=False)
    with pytest.raises(PermissionError, match=r"push_to_hub\('alice/guarded'\): the token's account, bob, cannot write "
                                         r"there \(it writes in bob\): pass token= with write access") as foreign:
        _push(tiny_pipeline(seed=1), "alice/guarded", token=BOB)
    assert hub.repos["alice/guarded"].history == before  # nothing half-written
    for text in (str(no_token.value), str(foreign.value), caplog.text):
        assert BOB not in text and ALICE not in text


def test_unchanged_repush_makes_no_commit_and_pinned_revisions_stay(hub, tmp_path):
    pipe = tiny_pipeline(seed=0)
    _push(pipe, "alice/versions")
    first = HfApi().model_info("alice/versions").sha
    _push(pipe, "alice/versions")
    assert HfApi().model_info("alice/versions").sha == first  # same files, no new commit

    _push(tiny_pipeline(seed=5), "alice/versions", commit_message="retrained")
    assert HfApi().model_info("alice/versions").sha != first
    pinned = DDPMPipeline.from_pretrained("alice/versions", revision=first, cache_dir=tmp_path / "cache")
    pinned.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample_np(pinned), sample_np(pipe), rtol=0, atol=1e-5)


def test_offline_reload_from_cache_makes_no_request(hub, tmp_path):
    pipe = tiny_pipeline()
    _push(pipe, "alice/offline")
    cache = tmp_path / "cache"
    DDPMPipeline.from_pretrained("alice/offline", cache_dir=cache)
    requests_before = len(hub.log)
    run_without_ddpm_hf(f"""
        from diffusers import DiffusionPipeline
        DiffusionPipeline.from_pretrained("alice/offline", cache_dir={str(cache)!r})
    """, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    # and ddpm_hf's own loader, offline, in a child where it is importable
    import subprocess
    import sys
    code = f"from ddpm_hf import DDPMPipeline; DDPMPipeline.from_pretrained('alice/offline', cache_dir={str(cache)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=300,
                   env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert len(hub.log) == requests_before


def test_hub_id_errors_are_clear(hub, tmp_path):
    not_got = rf"^could not get alice/does-not-exist \(revision main\) from {re.escape(hub.url)}: "
    with pytest.raises(OSError, match=not_got + "RepositoryNotFoundError: 404 Client Error") as missing:
        DDPMPipeline.from_pretrained("alice/does-not-exist", cache_dir=tmp_path, token=ALICE)
    assert isinstance(missing.value.__cause__, RepositoryNotFoundError)
    assert ("Check the repo id, your access to it and the connection; a repo downloaded before loads offline with "
            "HF_HUB_OFFLINE=1 (Python: local_files_only=True). There is no local folder alice/does-not-exist either"
            ) in str(missing.value)
    assert ALICE not in str(missing.value)
    requests_before = len(hub.log)
    with pytest.raises(OSError, match=not_got + "LocalEntryNotFoundError: Cannot find an appropriate cached snapshot"
                       ) as offline:
        DDPMPipeline.from_pretrained("alice/does-not-exist", cache_dir=tmp_path, local_files_only=True)
    assert isinstance(offline.value.__cause__, LocalEntryNotFoundError)
    assert len(hub.log) == requests_before  # local_files_only asks the Hub nothing
    assert torch is not None


def test_push_to_hub_takes_diffusers_arguments(hub):
    """diffusers' push_to_hub arguments: ``safe_serialization`` and ``variant`` (refused as save_pretrained refuses
    it, before the repo is created or anything sampled; they were a TypeError), and ``license=None`` leaves the card
    without one (it wrote 'license: None', which the Hub reads as a license named None)."""
    with pytest.raises(ValueError, match="variant='fp16': ddpm_hf saves one float32 file"):
        _push(tiny_pipeline(), "alice/kwargs", variant="fp16")
    assert "alice/kwargs" not in hub.repos
    _push(tiny_pipeline(), "alice/kwargs", license=None, safe_serialization=True)
    card = hub.repos["alice/kwargs"].files("main")[1]["README.md"].decode()
    assert "license" not in card.split("---")[1] and "library_name: diffusers" in card


def test_a_card_its_owner_wrote_is_kept(hub, tmp_path, caplog):
    """A push over a README.md the repo's owner wrote keeps it, as diffusers' push_to_hub keeps a repo's card (it was
    replaced by ddpm_hf's, its license with it); ddpm_hf's own card is written again at each push."""
    from huggingface_hub import HfApi

    _push(tiny_pipeline(), "alice/carded")
    first = hub.repos["alice/carded"].files("main")[1]["README.md"].decode()
    assert "- ddpm_hf" in first
    _push(tiny_pipeline(seed=1), "alice/carded", evaluation={"bits/dim": 3.7})  # ddpm_hf's card: regenerated
    assert "| bits/dim | 3.7 |" in hub.repos["alice/carded"].files("main")[1]["README.md"].decode()
    own = "---\nlicense: mit\n---\n# My model\n\nWritten by hand.\n"
    HfApi(token=ALICE).upload_file(path_or_fileobj=own.encode(), path_in_repo="README.md", repo_id="alice/carded")
    with caplog.at_level(logging.WARNING):
        _push(tiny_pipeline(seed=2), "alice/carded")
    files = hub.repos["alice/carded"].files("main")[1]
    assert files["README.md"].decode() == own and "did not write: it is kept" in caplog.text
    assert files["samples.png"]  # the rest of the push went up


def test_a_component_passed_in_is_neither_downloaded_nor_read(hub, tmp_path):
    """from_pretrained(repo, unet=...) as diffusers does it: the folder's U-Net weights are not downloaded (they
    were, only to be replaced), and a local folder without them loads, as in diffusers (the oracle); scheduler= the
    same for the scheduler's config."""
    import diffusers

    pipe = tiny_pipeline()
    _push(pipe, "alice/given")
    weights = [path for method, path, _, _ in hub.log if method == "GET" and path.endswith(".safetensors")]
    loaded = DDPMPipeline.from_pretrained("alice/given", cache_dir=tmp_path / "cache", unet=pipe.unet)
    assert loaded.unet is pipe.unet
    assert [path for method, path, _, _ in hub.log if method == "GET" and path.endswith(".safetensors")] == weights
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").unlink()
    diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe", unet=pipe.unet, scheduler=pipe.scheduler)
    both = DDPMPipeline.from_pretrained(tmp_path / "pipe", unet=pipe.unet, scheduler=pipe.scheduler)
    assert both.unet is pipe.unet and both.scheduler is pipe.scheduler
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DDPMPipeline.from_pretrained(tmp_path / "pipe", unet=pipe.unet)


def test_a_pull_request_to_another_accounts_repo(hub, tmp_path):
    """push_to_hub(create_pr=True) with a token that cannot write there (bob's, to alice's repo), as the Hub takes it:
    the rights check lets it through, the commit opens refs/pr/1 and main stays alice's; the pull request's
    revision loads, in ddpm_hf and in plain diffusers (the oracle), as bob's pipeline, and main as alice's."""
    alices, bobs = tiny_pipeline(seed=0), tiny_pipeline(seed=1)
    _push(alices, "alice/shared")
    main = list(hub.repos["alice/shared"].history)
    info = _push(bobs, "alice/shared", token=BOB, create_pr=True)
    assert (info.pr_revision, info.pr_num) == ("refs/pr/1", 1) and hub.repos["alice/shared"].history == main
    cache = tmp_path / "cache"
    for revision, pipe in (("refs/pr/1", bobs), ("main", alices)):
        loaded = DDPMPipeline.from_pretrained("alice/shared", revision=revision, cache_dir=cache)
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(sample_np(loaded), sample_np(pipe), rtol=0, atol=1e-5)
    theirs = run_without_ddpm_hf(f"""
        import diffusers
        pipe = diffusers.DiffusionPipeline.from_pretrained("alice/shared", revision="refs/pr/1",
                                                           cache_dir={str(tmp_path / "plain")!r})
        print(float(pipe.unet.conv_in.weight.sum()))
    """, cwd=tmp_path)
    expected = float(bobs.unet.conv_in.weight.detach().sum())
    assert float(theirs.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-5)
