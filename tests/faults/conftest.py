import pytest

from runs import load_train_script


@pytest.fixture(scope="session")
def train():
    """training/train.py imported as a module, for its functions (parse_args, push_with_retries, main)."""
    return load_train_script()


@pytest.fixture
def train_here(train):
    """train.py's main() run in this process: a launch costs ~25 s of CPU on this machine, mostly imports that this
    process has done already. On one thread, as launched runs are (OMP_NUM_THREADS=1), decoding in a thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lambda argv: train.main(argv + ["--dataloader_num_workers", "0"])
    torch.set_num_threads(threads)
