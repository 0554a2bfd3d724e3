import pytest

from runs import load_train_script, train_in_process


@pytest.fixture(scope="session")
def train():
    """training/train.py imported as a module, for its functions (parse_args, push_with_retries, main)."""
    return load_train_script()


@pytest.fixture
def train_here(train):
    """train.py's main() run in this process (see runs.train_in_process), decoding in a thread: a launch costs ~25 s
    of CPU on this machine, mostly imports that this process has done already."""
    return lambda argv: train_in_process(train, argv + ["--dataloader_num_workers", "0"])
