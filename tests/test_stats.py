"""Bootstrap intervals and paired tests on constructed predictions whose answer is known."""

import numpy as np
import pytest

from erc.evaluation import stats
from erc.metrics import classification_metrics

C = 4


def utterances(num_dialogues: int, seed: int, per_dialogue: int = 8):
    """Dialogue index and true class of the utterances of `num_dialogues` dialogues."""
    rng = np.random.default_rng(seed)
    return np.repeat(np.arange(num_dialogues), per_dialogue), rng.integers(0, C, size=num_dialogues * per_dialogue)


def guess(actual, accuracy: float, seed: int):
    """Predictions of `actual`, each right with probability `accuracy`."""
    rng = np.random.default_rng(seed)
    wrong = (actual + rng.integers(1, C, size=len(actual))) % C
    return np.where(rng.random(len(actual)) < accuracy, actual, wrong)


def confusions(dialogue, actual, predicted_per_seed):
    d = int(dialogue.max()) + 1
    return np.stack([stats.dialogue_confusions(dialogue, actual, p, d, C) for p in predicted_per_seed])


def test_weighted_f1_matches_the_metrics_module():
    dialogue, actual = utterances(30, seed=1)
    predicted = guess(actual, 0.6, seed=2)
    cm = stats.dialogue_confusions(dialogue, actual, predicted, 30, C).sum(0)
    expected = classification_metrics(actual, predicted, [str(i) for i in range(C)])["wf1"]
    assert stats.weighted_f1(cm) == pytest.approx(expected)


def test_identical_predictions_give_p_one():
    dialogue, actual = utterances(40, seed=2)
    seeds = [guess(actual, 0.7, seed=10 + s) for s in range(3)]
    conf = confusions(dialogue, actual, seeds)
    assert stats.paired_randomization(conf, conf.copy(), replicates=500) == pytest.approx(1.0)


def test_a_model_better_on_every_dialogue_is_significant():
    dialogue, actual = utterances(60, seed=3)
    better = confusions(dialogue, actual, [actual.copy() for _ in range(3)])  # right everywhere
    worse = confusions(dialogue, actual, [guess(actual, 0.5, seed=20 + s) for s in range(3)])
    assert (stats.weighted_f1(better.sum(1)) > stats.weighted_f1(worse.sum(1))).all()
    assert stats.paired_randomization(better, worse, replicates=2000) < 0.01
    # ... and a test that saw only noise does not call a difference
    noise = confusions(dialogue, actual, [guess(actual, 0.5, seed=40 + s) for s in range(3)])
    assert stats.paired_randomization(noise, worse, replicates=2000) > 0.05


def test_the_interval_narrows_as_dialogues_are_added():
    widths = []
    for n in (20, 80, 320):
        dialogue, actual = utterances(n, seed=4)
        conf = confusions(dialogue, actual, [guess(actual, 0.65, seed=50 + s) for s in range(3)])
        low, high = stats.bootstrap_ci(conf, replicates=1000)
        point = stats.weighted_f1(conf.sum(1)).mean()
        assert low <= point <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]


def test_the_interval_grows_with_the_spread_between_seeds():
    dialogue, actual = utterances(100, seed=5)
    steady = confusions(dialogue, actual, [guess(actual, 0.6, seed=60 + s) for s in range(5)])
    spread = confusions(dialogue, actual, [guess(actual, a, seed=70 + s) for s, a in enumerate((0.3, 0.45, 0.6, 0.75, 0.9))])
    width = lambda c: np.subtract(*stats.bootstrap_ci(c, replicates=1000)[::-1])  # noqa: E731
    assert width(spread) > 2 * width(steady)


def test_holm():
    adjusted = stats.holm([0.01, 0.04, 0.03, float("nan"), 0.005])
    assert adjusted[4] == pytest.approx(0.02)   # smallest of 4: x4
    assert adjusted[0] == pytest.approx(0.03)   # second: x3
    assert adjusted[2] == pytest.approx(0.06)   # third: x2
    assert adjusted[1] == pytest.approx(0.06)   # fourth: x1 = 0.04, but never below the one before
    assert np.isnan(adjusted[3])
