"""Hub faults from the test server (tests/fakehub.py): HTTP 5xx, a connection dropped in the middle of an upload, a
server that stops answering. Uploads from training are retried with backoff and then reported clearly; training
goes on; local files are untouched; no token appears in any log or error."""

import hashlib
import logging

import pytest
import torch

from helpers import tiny_pipeline

from ddpm_hf import DDPMPipeline

pytestmark = pytest.mark.hub
ALICE = "hf_test_alice"




def _push(train, tmp_path, caplog, repo="alice/flaky", attempts=3, timeout=30.0):
    """push_with_retries as training calls it, with a short backoff (0.2 s, 0.4 s, ...)."""
    args = train.parse_args(["--push_to_hub", "--hub_model_id", repo, "--hub_token", ALICE, "--hub_push_attempts",
                             str(attempts), "--hub_timeout", str(timeout), "--output_dir", str(tmp_path / "run")])
    pipe = tiny_pipeline(num_train_timesteps=10)
    grid = tmp_path / "grid.png"
    pipe(batch_size=1, num_inference_steps=2).images[0].save(grid)
    with caplog.at_level(logging.INFO, logger="ddpm_hf"):  # training and ddpm_hf.hub, which pushes
        ok = train.push_with_retries(pipe, args, grid, step=7, backoff_s=0.2)
    return ok, pipe


def _commit_times(hub):
    return [t for method, path, _, t in hub.log if method == "POST" and "/commit/" in path]


def _assert_pushed(hub, pipe, tmp_path, repo="alice/flaky"):
    loaded = DDPMPipeline.from_pretrained(repo, token=ALICE, cache_dir=tmp_path / "cache")
    for key, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value, rtol=0, atol=0)


def test_server_errors_are_retried_with_backoff(train, hub, tmp_path, caplog):
    fault = hub.inject("POST", "/commit/", "status", times=2, status=503)
    ok, pipe = _push(train, tmp_path, caplog)
    assert ok and len(fault.hits) == 2
    times = _commit_times(hub)
    assert len(times) == 3  # two refused, the third accepted
    assert times[1] - times[0] >= 1 and times[2] - times[1] >= 2  # huggingface_hub's exponential backoff
    assert "HTTP Error 503" in caplog.text and "pushed the EMA pipeline of step 7" in caplog.text
    _assert_pushed(hub, pipe, tmp_path)


def test_a_connection_dropped_mid_upload_is_retried(train, hub, tmp_path, caplog):
    fault = hub.inject("POST", "/commit/", "drop", times=1)
    ok, pipe = _push(train, tmp_path, caplog)
    assert ok and len(fault.hits) == 1 and len(_commit_times(hub)) == 2
    assert len(hub.repos["alice/flaky"].history) == 2  # the repo's first commit and one upload, no partial one
    _assert_pushed(hub, pipe, tmp_path)


def test_a_server_that_stops_answering_times_out_and_is_retried(train, hub, tmp_path, caplog):
    fault = hub.inject("POST", "/commit/", "stall", times=1, seconds=6)
    ok, pipe = _push(train, tmp_path, caplog, timeout=2.0)  # a third of the stall: a busy machine's answer is in time
    assert ok and len(fault.hits) == 1 and len(_commit_times(hub)) == 2
    assert "timed out" in caplog.text.lower()
    _assert_pushed(hub, pipe, tmp_path)
    from huggingface_hub import get_session

    assert get_session().timeout.read is None  # the limit applied to training's uploads only


def test_a_hub_that_keeps_failing_is_reported_and_nothing_local_changes(train, hub, tmp_path, caplog):
    # Retry-After: 0 keeps huggingface_hub's 5 retries per upload at 1 s each; our 2 attempts wrap them.
    fault = hub.inject("POST", "/commit/", "status", times=-1, status=500, retry_after=0)
    local = tmp_path / "run"  # the final pipeline lies in --output_dir
    tiny_pipeline().save_pretrained(local)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in local.rglob("*") if p.is_file()}
    ok, _ = _push(train, tmp_path, caplog, attempts=2)
    assert not ok and len(fault.hits) == 2 * 6
    assert "attempt 1/2" in caplog.text and "attempt 2/2" in caplog.text
    assert "gave up pushing step 7 to alice/flaky after 2 attempts" in caplog.text and "500" in caplog.text
    assert ALICE not in caplog.text
    assert len(hub.repos["alice/flaky"].history) == 1  # only the repo's creation
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in local.rglob("*") if p.is_file()} == before


def test_downloads_from_a_failing_hub_fail_clearly_without_the_token(hub, tmp_path):
    pipe = tiny_pipeline(num_train_timesteps=10)
    pipe.push_to_hub("alice/source", token=ALICE, sample_grid=pipe(batch_size=1, num_inference_steps=2).images[0])
    hub.inject("GET", "/resolve/", "status", times=-1, status=502)
    hub.inject("HEAD", "/resolve/", "status", times=-1, status=502)
    hub.inject("GET", "/api/models/", "status", times=-1, status=502)
    with pytest.raises(OSError, match=r"could not get alice/source \(revision main\) from http") as raised:
        DDPMPipeline.from_pretrained("alice/source", token=ALICE, cache_dir=tmp_path / "cache")
    assert "502" in str(raised.value) and "local_files_only=True" in str(raised.value)
    assert ALICE not in str(raised.value)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing half-downloaded was kept as a file
