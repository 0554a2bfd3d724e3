import pytest

from runs import load_train_script


@pytest.fixture(scope="session")
def train():
    """training/train.py imported as a module, for its functions (parse_args, push_with_retries, main)."""
    return load_train_script()
