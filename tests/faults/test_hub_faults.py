"""Hub faults from the test server (tests/fakehub.py): HTTP 5xx, a connection dropped in the middle of an upload, a
server that stops answering, a token that cannot write. Uploads from training are retried with backoff and then
reported clearly; training goes on; local files are untouched; no token appears in any log or error. A token that
cannot write where the run would push stops it before training."""

import hashlib
import logging

import pytest
import torch

from helpers import tiny_pipeline
from runs import FAST, TRAIN, child_env, free_port, hold_publishing, write_images

from ddpm_hf import DDPMPipeline

pytestmark = pytest.mark.hub
ALICE = "hf_test_alice"




def _push(train, tmp_path, caplog, repo="alice/flaky", attempts=3, timeout=30.0):
    """push_with_retries as training calls it (within its run's hub_timeout), with a short backoff (0.2 s, ...)."""
    from ddpm_hf.hub import hub_timeout

    args = train.parse_args(["--push_to_hub", "--hub_model_id", repo, "--hub_token", ALICE, "--hub_push_attempts",
                             str(attempts), "--hub_timeout", str(timeout), "--output_dir", str(tmp_path / "run")])
    pipe = tiny_pipeline(num_train_timesteps=10)
    grid = tmp_path / "grid.png"
    pipe(batch_size=1, num_inference_steps=2).images[0].save(grid)
    with hub_timeout(timeout), caplog.at_level(logging.INFO, logger="ddpm_hf"):  # (ddpm_hf.hub pushes)
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


def test_a_push_refused_because_its_own_first_try_landed_goes_on_top_of_it(train, hub, tmp_path, caplog):
    """The Hub holds an upload's commit past the client's timeout, and huggingface_hub sends it again; the Hub takes
    the first try meanwhile, and the second, made on the head before it, is refused (412). The upload reads the new
    head and pushes again (nothing changed: no commit), within its one attempt: it is not reported failed."""
    import threading
    import time

    first = hub.inject("POST", "/commit/", "late", times=1, seconds=300)
    second = hub.inject("POST", "/commit/", "stall", times=1, seconds=300)

    def first_lands_then_the_second_is_answered():
        deadline = time.monotonic() + 120
        while not second.hits and time.monotonic() < deadline:
            time.sleep(0.01)
        first.release()
        first.done.wait(30)
        second.release()

    threading.Thread(target=first_lands_then_the_second_is_answered, daemon=True).start()
    try:
        ok, pipe = _push(train, tmp_path, caplog, attempts=1, timeout=3.0)
    finally:
        first.release()
        second.release()
    assert (first.answered, second.answered) == ([200], [412])
    assert ok and "alice/flaky moved on during the upload (HTTP 412): pushing again on its new head" in caplog.text
    assert "attempt" not in caplog.text
    assert len(hub.repos["alice/flaky"].history) == 2  # the repo's first commit and the first try
    _assert_pushed(hub, pipe, tmp_path)


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


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("token, flags, said", [
    (None, [], "--push_to_hub needs a Hub token with write access: pass --hub_token, set HF_TOKEN"),
    ("hf_wrong", [], "the Hub refused the token (HfHubHTTPError: Invalid user token.): pass a valid token"),
    (ALICE, ["--hub_private_repo"], "--hub_private_repo: alice/public exists and is public, and pushing does not "
                                    "change a repo's visibility"),
], ids=["no-token", "invalid-token", "public-repo-asked-private"])
def test_a_push_that_would_fail_stops_the_run_before_training(images, tmp_path, train_here, hub, token, flags, said):
    """What would make every upload fail (or publish weights the user asked to keep private) is found before the
    first step, as diffusers' example finds it by creating the repo first: not after the last step, the run then
    ending with success and the model not on the Hub."""
    tiny_pipeline().push_to_hub("alice/public", token=ALICE, sample_grid=tiny_pipeline()(
        batch_size=1, num_inference_steps=2).images[0])
    commits = len(hub.repos["alice/public"].history)
    out = tmp_path / "run"
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "2", "--push_to_hub", "--hub_model_id",
                   "alice/public", "--output_dir", str(out), *flags] + (["--hub_token", token] if token else [])
    with pytest.raises(SystemExit) as stopped:
        train_here(args)
    assert said in str(stopped.value.code) and (token is None or token not in str(stopped.value.code))
    assert not list(out.glob("checkpoint-*")) and not (out / "model_index.json").exists()
    assert len(hub.repos["alice/public"].history) == commits and not hub.repos["alice/public"].private


def test_a_hub_unreachable_at_the_check_stops_the_run_with_a_message(images, tmp_path, train_here, hub):
    """The check before training meets a connection dropped at every try: a ConnectionError's message, not the HTTP
    client's own exception type escaping (which the other processes would wait for until --ddp_timeout)."""
    hub.inject("GET", "/api/whoami-v2", "drop", times=-1)
    with pytest.raises(SystemExit) as stopped:
        train_here(FAST + ["--dataset_name", str(images), "--max_train_steps", "2", "--push_to_hub", "--hub_model_id",
                           "alice/x", "--hub_token", ALICE, "--output_dir", str(tmp_path / "run")])
    message = str(stopped.value.code)
    assert message.startswith("--push_to_hub: could not check --hub_model_id alice/x on the Hub ("), message
    assert "check the connection and the Hub's status" in message and ALICE not in message


def test_a_repo_name_without_namespace_is_the_token_accounts(images, tmp_path, train_here, hub):
    """--hub_model_id my-model, as the Hub and diffusers' example take it: the token's account's repo."""
    train_here(FAST + ["--dataset_name", str(images), "--max_train_steps", "2", "--push_to_hub", "--hub_model_id",
                       "my-model", "--hub_token", ALICE, "--output_dir", str(tmp_path / "run")])
    _assert_pushed(hub, DDPMPipeline.from_pretrained(tmp_path / "run"), tmp_path, repo="alice/my-model")


def test_a_final_upload_that_fails_ends_the_run_with_an_error_after_everything_is_saved(images, tmp_path, train_here,
                                                                                        hub):
    """Training done, the pipeline and the last checkpoint saved, the final upload failing (5xx after every retry):
    the run ends with an error naming the way to push again, not with success; done as it says, it pushes."""
    hub.inject("POST", "/commit/", "status", times=-1, status=500, retry_after=0)
    out = tmp_path / "run"
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "2", "--checkpointing_steps", "2",
                   "--push_to_hub", "--hub_model_id", "alice/down", "--hub_token", ALICE, "--hub_push_attempts", "1",
                   "--output_dir", str(out)]
    with pytest.raises(SystemExit) as stopped:
        train_here(args)
    message = str(stopped.value.code)
    assert message.startswith(f"training is done and its pipeline is in {out}, but it could not be pushed to "
                              "alice/down"), message
    assert ("the same command with --resume_from_checkpoint latest --max_train_steps 2 (it trains nothing more)"
            in message)
    assert (out / "model_index.json").is_file() and (out / "checkpoint-2").is_dir()
    hub.faults.clear()
    train_here(args + ["--resume_from_checkpoint", "latest", "--max_train_steps", "2"])  # the Hub back: it pushes
    _assert_pushed(hub, DDPMPipeline.from_pretrained(out), tmp_path, repo="alice/down")


def test_a_token_refused_during_an_upload_is_not_tried_again(train, hub, tmp_path, caplog):
    """A token revoked during a run: 401 would come back at every attempt."""
    args = train.parse_args(["--push_to_hub", "--hub_model_id", "alice/revoked", "--hub_token", "hf_revoked",
                             "--hub_push_attempts", "3", "--output_dir", str(tmp_path / "run")])
    pipe = tiny_pipeline(num_train_timesteps=10)
    sampled = []
    pipe.progress_bar = lambda iterable: sampled.append(1) or iterable  # (the grid the push would sample)
    with caplog.at_level(logging.INFO, logger="ddpm_hf"):
        ok = train.push_with_retries(pipe, args, None, step=7, backoff_s=0.2)  # no grid (it did not fit): none made
    assert not sampled
    assert not ok and "push to alice/revoked refused" in caplog.text and "401" in caplog.text
    assert "attempt" not in caplog.text and "hf_revoked" not in caplog.text


def test_a_checkpoint_upload_skipped_for_a_busy_one_does_not_wait_for_its_checkpoint(images, tmp_path, train_here,
                                                                                      hub, monkeypatch, caplog):
    """With --push_checkpoints, an upload waits for its checkpoint to be published (a kill during the upload then
    finds the checkpoint of its step); one skipped because the last is still running has nothing to wait for. The
    Hub holds the upload of step 2; the publishing of checkpoint-4 is held until step 5 has trained: had the loop
    waited for it at step 4, step 5 could not come and the hold would time out (20 s)."""
    stall = hub.inject("POST", "/commit/", "stall", times=1, seconds=300)
    # at step 5 the upload of step 2 may end too: the final one waits for it
    held = hold_publishing(monkeypatch, "checkpoint-4", until_step=5, then=stall.release)
    out = tmp_path / "run"
    try:
        with caplog.at_level(logging.WARNING, logger="ddpm_hf"):
            train_here(FAST + ["--dataset_name", str(images), "--max_train_steps", "6", "--checkpointing_steps", "2",
                               "--push_to_hub", "--push_checkpoints", "--hub_model_id", "alice/busy", "--hub_token",
                               ALICE, "--hub_timeout", "600", "--output_dir", str(out)])
    finally:
        stall.release()
    assert held == [True], "the loop waited for checkpoint-4, whose upload it skipped"
    assert "the upload of step 2 is still running: step 4 is not uploaded" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    _assert_pushed(hub, DDPMPipeline.from_pretrained(out), tmp_path, repo="alice/busy")


def test_a_private_repo_made_by_the_run_gets_every_checkpoint_whose_last_upload_has_ended(images, tmp_path,
                                                                                         train_here, hub,
                                                                                         monkeypatch):
    """--hub_private_repo --push_checkpoints into a repo that does not exist yet: the run creates it private (a
    push does not change a repo's visibility: made public, the weights would stay public), and an upload that has
    ended does not make the next checkpoint's skip. Each checkpoint waits here for the last upload to end, so that
    every one is due to be uploaded: steps 2, 4 and 6, the last one the final pipeline."""
    from ddpm_hf.hub import Uploads

    real_busy = Uploads.busy

    def busy_once_the_last_has_ended(self, step):
        if self.running is not None:
            self.running[0].join(60)
        return real_busy(self, step)

    monkeypatch.setattr(Uploads, "busy", busy_once_the_last_has_ended)
    out = tmp_path / "run"
    train_here(FAST + ["--dataset_name", str(images), "--max_train_steps", "6", "--checkpointing_steps", "2",
                       "--push_to_hub", "--push_checkpoints", "--hub_private_repo", "--hub_model_id", "alice/new",
                       "--hub_token", ALICE, "--output_dir", str(out)])
    repo = hub.repos["alice/new"]
    assert repo.private
    assert [repo.titles[sha] for sha in repo.history] == ["initial commit"] + [
        f"ddpm_hf: EMA weights at step {step}" for step in (2, 4, 6)]
    _assert_pushed(hub, DDPMPipeline.from_pretrained(out), tmp_path, repo="alice/new")


def test_a_commit_the_hub_takes_after_its_client_gave_up_does_not_replace_newer_weights(images, tmp_path,
                                                                                        train_here, hub):
    """The Hub holds the commit of step 2's upload past the client's timeout (--hub_timeout 5, time enough for its
    other requests on a busy machine); the upload is tried again and lands, training goes on, and the final pipeline
    (step 4) is pushed. Then the Hub takes the commit it held, as a server that finishes a request whose client has
    gone does: named with the head it was made on as its parent, it is refused (412). Without a parent it would land
    last, and the repo would hold step 2's weights."""
    late = hub.inject("POST", "/commit/", "late", times=1, seconds=300)
    out = tmp_path / "run"
    try:
        train_here(FAST + ["--dataset_name", str(images), "--max_train_steps", "4", "--checkpointing_steps", "2",
                           "--push_to_hub", "--push_checkpoints", "--hub_model_id", "alice/late", "--hub_token",
                           ALICE, "--hub_timeout", "5", "--output_dir", str(out)])
        assert late.hits, "the upload of step 2 was not held"
    finally:
        late.release()
    assert late.done.wait(60), "the held commit was not taken"
    assert late.answered == [412]
    commits = hub.repos["alice/late"].history
    _assert_pushed(hub, DDPMPipeline.from_pretrained(out), tmp_path, repo="alice/late")
    assert hub.repos["alice/late"].history == commits  # (the held commit made none)


@pytest.mark.distributed
def test_a_slow_checkpoint_upload_keeps_no_process_waiting(images, tmp_path, hub):
    """Two processes, a checkpoint's upload that the Hub holds until training is over: the other process waited for
    the main one's upload at their next meeting, and the run ended with the process group's timeout (30 s here,
    --ddp_timeout). Uploads run beside training: training ends, the checkpoint due while one was running is not
    uploaded, and the Hub gets the final pipeline once it answers."""
    import subprocess
    import sys
    import time

    stall = hub.inject("POST", "/commit/", "stall", times=1, seconds=300)
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "6", "--checkpointing_steps", "2",
                   "--push_to_hub", "--push_checkpoints", "--hub_model_id", "alice/slow", "--hub_token", ALICE,
                   "--hub_timeout", "600", "--ddp_timeout", "30", "--output_dir", str(out)]
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                 "2", "--main_process_port", str(free_port()), TRAIN, *args], stdout=sink,
                                stderr=subprocess.STDOUT, env=child_env(ACCELERATE_USE_CPU="1"), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-6").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)  # training goes on while the upload of step 2 is held
        trained = (out / "checkpoint-6").is_dir()
        stall.release()
        code = proc.wait(timeout=300)
    finally:
        stall.release()
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert trained and code == 0 and stall.hits, text[-4000:]
    assert "the upload of step 2 is still running: step 4 is not uploaded" in text
    # a grid for each upload made (steps 2 and 6), none sampled for the one skipped (a whole chain on the main GPU)
    assert sorted(p.name for p in (out / "samples").glob("step-*.png")) == ["step-0000002.png", "step-0000006.png"]
    _assert_pushed(hub, DDPMPipeline.from_pretrained(out), tmp_path, repo="alice/slow")
