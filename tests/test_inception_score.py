"""The Inception Score's arithmetic against closed forms and an independent KL (scipy.stats.entropy, natural log)."""

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from ddpm_hf.metrics import inception_score


def one_hot(labels, classes=10):
    return torch.eye(classes, dtype=torch.float64)[torch.as_tensor(labels)]


def test_uniform_one_hot_predictions_score_the_number_of_classes():
    """Confident predictions spread evenly over 10 classes: KL(p(y|x) ‖ p(y)) = log 10 for every image, IS = 10."""
    mean, std = inception_score(one_hot(np.arange(1000) % 10), splits=10)  # every split holds 10 of each class
    assert mean == pytest.approx(10, abs=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_identical_predictions_score_one():
    """p(y|x) = p(y) for every image: every KL is 0, IS = 1 whatever the prediction."""
    row = torch.softmax(torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 0)
    mean, std = inception_score(row.repeat(200, 1), splits=10)
    assert mean == pytest.approx(1, abs=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_two_classes_against_scipy_kl_per_split():
    """A hand-made two-class set (with a 0 probability: 0 log 0 = 0): each split's score is exp of the mean
    KL(p(y|x) ‖ p(y)) with p(y) that split's own marginal, the deviation is over splits (ddof 0)."""
    probabilities = np.array([[0.9, 0.1], [1.0, 0.0], [0.8, 0.2], [0.6, 0.4],  # split 1, mostly class 0
                              [0.2, 0.8], [0.1, 0.9], [0.4, 0.6]])  # split 2 (tensor_split: sizes 4, 3)

    def expected(part, marginal=None):
        marginal = part.mean(0) if marginal is None else marginal
        return np.exp(np.mean([entropy(p, marginal) for p in part]))

    whole = expected(probabilities)
    assert inception_score(torch.from_numpy(probabilities), splits=1) == pytest.approx((whole, 0), abs=1e-14)
    scores = [expected(probabilities[:4]), expected(probabilities[4:])]
    mean, std = inception_score(torch.from_numpy(probabilities), splits=2)
    assert mean == pytest.approx(np.mean(scores), abs=1e-14) and std == pytest.approx(np.std(scores), abs=1e-14)
    pooled_marginal = [expected(part, probabilities.mean(0)) for part in (probabilities[:4], probabilities[4:])]
    assert abs(mean - np.mean(pooled_marginal)) > 0.1  # so the check above pins each split's own marginal


def test_splits_give_the_spread():
    """Half the samples spread evenly over 10 classes (IS 10), the other half all of one class (IS 1): two splits
    score 10 and 1, so mean 5.5 and deviation 4.5; one split scores exp(H(p(y))) of the pooled marginal."""
    probabilities = torch.cat([one_hot(np.arange(100) % 10), one_hot(np.zeros(100, dtype=int))])
    assert inception_score(probabilities, splits=2) == pytest.approx((5.5, 4.5), abs=1e-12)
    marginal = probabilities.mean(0).numpy()
    assert inception_score(probabilities, splits=1)[0] == pytest.approx(np.exp(entropy(marginal)), abs=1e-12)


def test_refuses_what_is_not_class_probabilities():
    with pytest.raises(ValueError, match="summing to 1"):
        inception_score(torch.randn(20, 10), splits=2)  # logits, not probabilities
    with pytest.raises(ValueError, match="splits"):
        inception_score(one_hot(np.arange(5)), splits=10)

