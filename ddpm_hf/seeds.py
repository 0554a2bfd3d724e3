"""Every seed the library derives from a user's ``--seed``, in one place.

Each is ``seed`` and the indices of what it seeds, hashed together by numpy's SeedSequence (64 bits), with a different
third word per use: for seeds below 2**32 (the flags refuse others; SeedSequence cuts larger numbers into 32-bit
words), no two uses, indices or user seeds give the same stream. Sums such as ``seed + index`` would: seed 1's image 0
was seed 0's image 1. (SeedSequence pads its words with zeros: a use's words end with its tag, or with a word that
follows its tag.)
"""

import numpy as np

SEED_RANGE = range(2**32)  # what --seed takes (numpy's seeds; SeedSequence would cut larger numbers into words)
_NOISE, _DROPOUT = 1, 2  # third words; the images' seeds have none (they kept the form of earlier releases)


def _hashed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0])


def image_seed(seed: int, index: int) -> int:
    """Image ``index`` of the set drawn with ``seed`` (both ≥ 0): a sample of ``ddpm-hf sample``/``evaluate``, or
    the noise of the bound for test image ``index``."""
    return _hashed(seed, index)


def noise_seed(seed: int, stream: int, from_step: int = 0) -> int:
    """The diffusion noise (t and ε of Algorithm 1) of data stream ``stream`` in training, from the run's start, or
    ``from_step`` where a resume begins the data anew (--next_epoch_on_resume)."""
    return _hashed(seed, stream, _NOISE, from_step) if from_step else _hashed(seed, stream, _NOISE)


def dropout_seed(seed: int, process: int, batch: int) -> int:
    """The dropout masks of process ``process``'s batch number ``batch`` (micro-batches counted from the run's
    start): other on every process, and what a resumed run draws again without any saved generator state."""
    return _hashed(seed, batch, _DROPOUT, process)
