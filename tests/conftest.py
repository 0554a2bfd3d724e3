"""Test session setup. The local Hub server starts here, at import time, before anything imports huggingface_hub,
diffusers or datasets: they read HF_ENDPOINT and HF_HOME once, when first imported. Keep project imports out of this
block."""

import os
import signal
import tempfile

from fakehub import FakeHub

TOKENS = {"hf_test_alice": "alice", "hf_test_bob": "bob"}
HUB = FakeHub(TOKENS)
_HF_HOME = tempfile.mkdtemp(prefix="ddpm_hf_test_hf_home_")
os.environ.update({
    "HF_ENDPOINT": HUB.url,
    "HF_HOME": _HF_HOME,
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DDPM_HF_CACHE": tempfile.mkdtemp(prefix="ddpm_hf_test_cache_"),
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_ETAG_TIMEOUT": "5",
    "HF_HUB_DOWNLOAD_TIMEOUT": "10",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
})
for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(variable, None)
# A suite started in the background by a shell without job control (`cmd &`, nohup) inherits SIGINT ignored, and so
# would every training process it starts: Ctrl-C tests would then wait for a run that cannot be interrupted. Children
# get the default disposition back (a Python handler is reset to the default at exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def no_arrow_pause_on_close():
    """datasets sleeps 5 s (config.SLEEP_TIME_ON_THREADS_SHUTDOWN) whenever a pass over shuffled parquet shards ends
    or is closed, so that no Arrow scan is alive at interpreter exit (an abort before pyarrow 25). Training streams
    turn it off (ddpm_hf.data.sources.without_exit_pause); the tests' own plain streams skip it too, for the whole
    session (set once, here, rather than by whichever test runs first).
    test_passes_end_and_close_without_datasets_exit_pause counts the pauses themselves."""
    import datasets

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0


@pytest.fixture
def hub():
    """The local Hub, emptied; after the test it must have answered every request it received."""
    HUB.reset()
    yield HUB
    assert not HUB.misses, f"requests the fake Hub could not answer: {HUB.misses}"


@pytest.fixture
def dataset_hub(hub, monkeypatch):
    """The local Hub, for a test that uploads dataset repos (upload_folder, push_to_hub): the Hub stores data files
    (parquet, images) in LFS or Xet, and the local Hub speaks LFS only, so this process's huggingface_hub must not
    choose Xet. Other tests keep the client's default upload path (Xet-capable; every model file is regular here)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    yield hub


def pytest_unconfigure(config):
    HUB.stop()
